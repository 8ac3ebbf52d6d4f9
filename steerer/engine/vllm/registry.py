"""What every process that runs steerer's vLLM model needs registered (`plugin.register` adds the engine-core hooks)."""

from __future__ import annotations

from steerer.engine.vllm import STEERER_ARCHITECTURES


def register_models() -> None:
    """Make every `Steerer<Arch>` (`FAMILIES`) known to vLLM's model registry (lazily: imported when a model loads),
    install their start-up checks (`startup.py`), and have a vLLM child process (engine core, worker) die with its
    parent. Idempotent: vLLM may load plugins several times per process."""
    from vllm import ModelRegistry

    from steerer.engine.vllm.startup import die_with_parent, in_child_process, register_checks

    known = set(ModelRegistry.get_supported_archs())
    for architecture in STEERER_ARCHITECTURES:
        if architecture not in known:
            ModelRegistry.register_model(architecture, f"steerer.engine.vllm.model:{architecture}")
    register_checks()
    from steerer.engine.vllm.results_route import share_store

    share_store()  # the API server names the results folder its engine's worker writes (results_route.py)
    if in_child_process():
        die_with_parent()
