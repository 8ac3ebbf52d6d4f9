"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts."""

from __future__ import annotations


def register() -> None:
    """The models and checks (`registry.register_models`), and, in vLLM's engine-core process, the utility
    methods through which `VLLMSteerer` installs its driver there (`core_side.py`). Idempotent."""
    from steerer.engine.vllm.core_side import add_utilities
    from steerer.engine.vllm.registry import register_models

    register_models()
    add_utilities()
