"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts."""

from __future__ import annotations

from steerer.engine.vllm import ARCHITECTURE, MODEL_CLASS


def register() -> None:
    """Make `SteererLlamaForCausalLM` known to vLLM's model registry (lazily: imported when a model loads).
    Idempotent: vLLM may load plugins several times per process."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
