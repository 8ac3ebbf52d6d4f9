"""The guard on vLLM (`steerer.guard`, docs/GUARD.md "vLLM"): a logits processor, because vLLM's sampler draws
after the logits processors and cannot be asked to draw again.

So the guard acts before the draw. For each row with a guarded constraint still undecided that samples a token
from this pass, the candidates are checked best first (the driver's live detectors, a copy of the row's
detokenizer: `Driver.allowed`) until the passing ones hold `MASS` of what the vetoes leave of the row's
distribution at its temperature (greedy: the first passing one), at most `MAX_CHECKS` candidates; every other
token is set to -inf, so neither greedy nor sampling can draw a vetoed one. An at-most limit's veto of the best
candidate, or more than `guard.MAX_VETOES` vetoes with none passing, leave only EOS.

Rows without a guarded constraint are not looked at: the processor returns the logits untouched unless some row
in flight is guarded. Two engines use it: `VLLMSteerer` registers `SteererGuard` beside `SteererRows` and
`attach`es its driver (engine core and worker share the process); `SteererServe` (plain `vllm serve`) calls
`guard_logits` from its own `apply`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from steerer.driver import Driver
from steerer.engine.vllm.state import STATE, UNMANAGED

__all__ = ["MASS", "MAX_CHECKS", "Hook", "SteererGuard", "attach", "detach", "guard_logits", "guarded_rows"]

MASS = 0.999  # share of the distribution the vetoes leave that a sampled row's passing candidates must hold
MAX_CHECKS = 128  # candidates checked per row and token (best first); the rest is excluded
GREEDY = 1e-5  # vLLM's sampler treats a temperature below this as greedy (`_SAMPLING_EPS`)


@dataclass(frozen=True)
class Hook:
    """What the guard needs from the engine that owns the driver: per slot, the tokens vLLM has generated for
    its request (None: do not guard the row now, e.g. it already chose EOS) and its sampling temperature."""

    driver: Driver
    outputs: Callable[[int], int | None]
    temperature: Callable[[int], float]


_HOOK: Hook | None = None  # the in-process engine's (`VLLMSteerer`); `SteererGuard` reads it


def attach(hook: Hook) -> None:
    global _HOOK
    _HOOK = hook


def detach(driver: Driver) -> None:
    global _HOOK
    if _HOOK is not None and _HOOK.driver is driver:
        _HOOK = None


def guarded_rows(hook: Hook) -> list[tuple[int, int]]:
    """(logits row, slot) of the rows of the pass just run that sample a token from it and have a guarded
    constraint still undecided (a prefill chunk that stops short of the prompt's end samples nothing)."""
    driver = hook.driver
    rows = [(row, slot) for row, slot in enumerate(STATE.rows.slots)
            if slot is not None and slot != UNMANAGED and driver.guarding([slot])]
    info = STATE.last_pass() if rows and STATE.live else None  # the pass just run (its rows' positions)
    if info is None:
        return []
    out = []
    for row, slot in rows:
        outputs = hook.outputs(slot)
        if outputs is not None and info.complete(row, outputs):
            out.append((row, slot))
    return out


def candidates(logits: torch.Tensor, temperature: float, k: int) -> tuple[list[int], list[float] | None]:
    """A row's best `k` tokens, best first, and their probabilities at `temperature` (None: greedy)."""
    if temperature < GREEDY:
        return torch.topk(logits, k).indices.tolist(), None
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top = torch.topk(probs, k)
    return top.indices.tolist(), top.values.tolist()


def guard_logits(hook: Hook, logits: torch.Tensor) -> torch.Tensor:
    """`logits` [rows, V] (in place) with every guarded row's disallowed tokens at -inf (module docstring)."""
    rows = guarded_rows(hook)
    if not rows:
        return logits
    if logits.shape[0] != len(STATE.rows.slots):
        raise RuntimeError(f"steerer guard: {logits.shape[0]} logits rows for {len(STATE.rows.slots)} batch rows "
                           "(speculative decoding is not supported)")
    k = min(MAX_CHECKS, logits.shape[-1])
    for row, slot in rows:
        tokens, probs = candidates(logits[row], hook.temperature(slot), k)
        allowed = hook.driver.allowed(slot, tokens, probs, MASS)
        index = torch.tensor(allowed, dtype=torch.long, device=logits.device)
        kept = logits[row, index]
        logits[row].fill_(float("-inf"))
        logits[row, index] = kept
    return logits


class SteererGuard(LogitsProcessor):
    """`VLLMSteerer`'s guard (registered beside `SteererRows`): applies `guard_logits` with the attached hook.
    Not argmax invariant: greedy batches call it too (it returns at once when no row is guarded)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        hook = _HOOK
        return logits if hook is None else guard_logits(hook, logits)
