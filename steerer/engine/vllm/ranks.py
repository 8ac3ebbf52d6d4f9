"""Tensor-parallel ranks in a vLLM worker: one rank's taps decide, one rank publishes.

Under tensor parallel every rank holds the full residual stream after each all-reduce and runs the op and the
`vllm serve` plugin's controller. The ranks' residuals agree only up to the last bits (the CPU backend's
all-reduce sums in a different order per rank: measured 1.5e-5 on values up to 171), so a flag threshold could
fall between them and the controllers would steer differently. `agree` makes agreement a guarantee: rank 0's
tapped residuals are broadcast over vLLM's tensor-parallel group before any controller scores them, so every
controller sees the same numbers, decides the same coefficients and writes the same steering tables.

`agree` is a collective: every rank must call it at the same point with tensors of the same shapes. The plugin
calls it from `update_state`, which vLLM's model runner calls on every rank with the same scheduler output, and
the rows it reads are decided by that output alone. Without a distributed group (tensor parallel 1, or the op's
tests without vLLM's distributed state) it returns its input.
"""

from __future__ import annotations

import torch


def _group():
    """vLLM's tensor-parallel group coordinator, or None where there is none (or it has one rank)."""
    try:
        from vllm.distributed import parallel_state
    except ImportError:
        return None
    group = getattr(parallel_state, "_TP", None)
    return group if group is not None and group.world_size > 1 else None


def tp_rank() -> int:
    """This worker's rank in its tensor-parallel group (0 without one)."""
    group = _group()
    return 0 if group is None else int(group.rank_in_group)


def tp_size() -> int:
    group = _group()
    return 1 if group is None else int(group.world_size)


def publishes() -> bool:
    """Only rank 0 serves metrics and writes results: every rank finishes the same requests, and counting
    each on every rank would multiply them by the tensor-parallel size."""
    return tp_rank() == 0


def agree(residuals: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Rank 0's tapped residuals on every rank (one broadcast of the stacked layers); the input as it is without
    tensor parallel."""
    group = _group()
    if group is None or not residuals:
        return residuals
    layers = sorted(residuals)
    stacked = torch.stack([residuals[layer] for layer in layers]).contiguous()
    group.broadcast(stacked, src=0)
    return {layer: stacked[i] for i, layer in enumerate(layers)}


# -- the offline driver's workers (`VLLMSteerer` at tensor parallel > 1) ---------------------------------------------
# Called on every rank through `LLM.collective_rpc` (vLLM passes the worker first): the driver's one controller,
# in the driver's process, steers every rank with the same coefficients and reads rank 0's pass and taps.
def install(worker, capacity: int, tap_layers: list[int], steering: dict[int, tuple[torch.Tensor, str]],
            max_tokens: int, max_rows: int, dtype: torch.dtype | None) -> int:
    """`WorkerState.install` on this rank with the driver's directions (coefficients follow each step)."""
    from steerer.engine.vllm.state import STATE
    from steerer.taps import LayerSteering, Where

    if STATE.installed:
        raise RuntimeError("another VLLMSteerer holds this worker's vLLM plugin state; close it first")
    STATE.install(capacity, tap_layers, {layer: LayerSteering(d, Where(w)) for layer, (d, w) in steering.items()},
                  max_tokens=max_tokens, max_rows=max_rows, dtype=dtype)
    return STATE.passes


def uninstall(worker) -> None:
    from steerer.engine.vllm.state import STATE

    STATE.uninstall()


def set_coefficients(worker, coefficients: dict[int, tuple[torch.Tensor | None, bool]]) -> None:
    """The controller's alphas for the next pass, per steered layer (what `Driver.before_slots` wrote locally)."""
    from steerer.engine.vllm.state import STATE

    for layer, (coeffs, active) in coefficients.items():
        steer = STATE.steering[layer]
        if coeffs is None:
            steer.coeffs, steer.active = None, False
        else:
            steer.set_coeffs(coeffs.to(STATE.buffers.device if STATE.buffers else coeffs.device), active)


def last_pass(worker) -> tuple | None:
    """Rank 0's latest pass and its tapped residuals (copies), as (PassInfo, {layer: [rows, d]}) on the CPU;
    None on other ranks and before the first pass."""
    from steerer.engine.vllm.state import STATE

    if tp_rank() != 0:
        return None
    info = STATE.last_pass()
    if info is None:
        return None
    return info, {layer: taps.detach().to("cpu", copy=True) for layer, taps in STATE.captured.items()}
