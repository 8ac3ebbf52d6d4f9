"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts."""

from __future__ import annotations

from steerer.engine.vllm import ARCHITECTURE, MODEL_CLASS


def register() -> None:
    """Make `SteererLlamaForCausalLM` known to vLLM's model registry (lazily: imported when a model loads), install
    its start-up checks (`startup.py`), and have a vLLM child process (engine core, worker) die with its parent.
    Idempotent: vLLM may load plugins several times per process."""
    from vllm import ModelRegistry

    from steerer.engine.vllm.startup import die_with_parent, in_child_process, register_checks

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    register_checks()
    if in_child_process():
        die_with_parent()
