"""`SteererRows`: a V1 logits processor that changes no logits and tells the plugin which request is in which
row of vLLM's persistent batch.

vLLM's V1 model runner calls `update_state(BatchUpdate)` after it has condensed and reordered the batch and
before the forward pass, with each added row's `SamplingParams` (whose `extra_args["steerer_slot"]` names the
controller slot) and prompt. That is the one supported place a plugin learns the row -> request mapping.
The V2 model runner has another logits-processor interface, so the driver pins V1
(`VLLM_USE_V2_MODEL_RUNNER=0`) and the tests check the pin holds.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from steerer.engine.vllm.state import STATE, UNMANAGED
from steerer.engine.vllm.wire import SLOT_KEY

__all__ = ["SLOT_KEY", "SteererRows", "slot_of"]


def slot_of(params) -> int:
    extra = getattr(params, "extra_args", None) or {}
    slot = extra.get(SLOT_KEY, UNMANAGED)
    return int(slot) if isinstance(slot, int) and not isinstance(slot, bool) else UNMANAGED


class SteererRows(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        STATE.new_batch()  # a new engine's batch: no rows of an engine shut down earlier in this process

    def is_argmax_invariant(self) -> bool:
        return True  # it never changes logits (so greedy decoding skips `apply`)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        added = [(row, slot_of(params), len(prompt or ())) for row, params, prompt, _ in batch_update.added]
        moved = [(a, b, direction == MoveDirectionality.SWAP) for a, b, direction in batch_update.moved]
        STATE.update_rows(batch_update.batch_size, batch_update.removed, added, moved)
