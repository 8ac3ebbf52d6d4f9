"""The interface a backend implements: prefill rows, decode one step, and reshape the running batch.

Everything the generation loop, the monitor and the scheduler need from a model goes through these five
calls, so a second backend (vLLM) only has to provide them plus `hooks` (taps and steering).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from steerer.taps import LayerHooks


@dataclass
class BatchState:
    """The running batch: KV cache, padding mask and per-row positions (rows in a fixed order)."""

    cache: Any
    attention_mask: torch.Tensor  # [B, T] 1 = real token (left padding)
    next_position: torch.Tensor  # [B] position id of the next input token
    prompt_lengths: torch.Tensor  # [B]

    @property
    def batch_size(self) -> int:
        return int(self.attention_mask.shape[0])


class Engine(Protocol):
    hooks: LayerHooks
    num_layers: int
    hidden_size: int
    eos_token_ids: tuple[int, ...]

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, BatchState]:
        """Run the prompts (left-padded); return next-token logits [B, V] and the new batch."""

    def decode(self, state: BatchState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return next-token logits [B, V]. Updates `state` in place."""

    def merge(self, a: BatchState, b: BatchState) -> BatchState:
        """Concatenate two running batches (rows of `a` first)."""

    def select(self, state: BatchState, keep: torch.Tensor) -> BatchState:
        """Keep only the rows at indices `keep` (in that order)."""
