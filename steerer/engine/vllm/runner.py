"""The V1 model-runner pin: steerer's plugin needs vLLM's V1 `GPUModelRunner` (also the CPU runner's base).

It learns rows from V1's logits-processor `BatchUpdate` (`rows.py`) and the serve plugin reads the runner's
`requests`; vLLM's V2 runner (`vllm/v1/worker/gpu/`) has neither (docs/VLLM.md, "V2 model runner", says what
V2 support would take). The driver sets `VLLM_USE_V2_MODEL_RUNNER=0`; this check turns a vLLM without a V1
runner, or a caller who forces V2, into one clear line instead of a batch-layout error later.
"""

from __future__ import annotations

from collections.abc import Collection

FLAG = "VLLM_USE_V2_MODEL_RUNNER"


def v1_runner_problem(flag_value: str | None, known_flags: Collection[str], has_v1_runner: bool) -> str | None:
    """Why the V1 runner cannot be used (one line), or None. `flag_value`: the environment's
    VLLM_USE_V2_MODEL_RUNNER; `known_flags`: the variables this vLLM reads; `has_v1_runner`: whether
    `vllm.v1.worker.gpu_model_runner.GPUModelRunner` imports."""
    if not has_v1_runner:
        return "steerer's vLLM plugin needs vLLM's V1 model runner, which this vLLM no longer has (V2 only)"
    if FLAG not in known_flags:
        return f"steerer's vLLM plugin pins vLLM's V1 model runner with {FLAG}=0, which this vLLM does not read"
    if flag_value is not None and flag_value.strip().lower() in ("1", "true", "yes", "on"):
        return f"steerer's vLLM plugin runs on vLLM's V1 model runner: set {FLAG}=0 (it is {flag_value!r})"
    return None


def check_v1_runner() -> None:
    """Raise the problem `v1_runner_problem` finds in this process's vLLM and environment."""
    import os

    import vllm.envs

    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: F401
        has_v1 = True
    except ImportError:
        has_v1 = False
    problem = v1_runner_problem(os.environ.get(FLAG), set(vllm.envs.environment_variables), has_v1)
    if problem is not None:
        raise RuntimeError(problem)
