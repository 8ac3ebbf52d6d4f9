"""The interface a backend implements: run passes over a running batch, and host taps and steering.

The generation loop (`generation.RunningBatch`) and the controller (`controller.Controller`) reach a model
only through these calls, so a second backend (vLLM) provides them and nothing else:

- `install(tap_layers, steering)` / `uninstall()`: put taps at `tap_layers` and steering at the layers of
  `steering` (each a `taps.LayerSteering` whose per-row coefficients the controller sets before a pass).
- `prefill(prompts)`, `decode(state, tokens)`: one pass; next-token logits [B, V].
- `residuals()`: after a pass, `{layer: [B, d]}` the residual stream after each tapped layer at each row's
  last input token (steering included), on `device`.
- `merge(a, b)`, `select(state, keep)`: rows join and leave between passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from steerer.taps import LayerSteering


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
    num_layers: int
    hidden_size: int
    eos_token_ids: tuple[int, ...]
    device: torch.device

    def install(self, tap_layers: tuple[int, ...], steering: dict[int, LayerSteering]) -> None:
        """Tap the residual stream at `tap_layers` and steer at the layers of `steering` from now on."""

    def uninstall(self) -> None:
        """Take the taps and steering off the model."""

    def residuals(self) -> dict[int, torch.Tensor]:
        """After a pass: the tapped residual [B, d] per layer, at each row's last input token."""

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, BatchState]:
        """Run the prompts (left-padded); return next-token logits [B, V] and the new batch."""

    def decode(self, state: BatchState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return next-token logits [B, V]. Updates `state` in place."""

    def merge(self, a: BatchState, b: BatchState) -> BatchState:
        """Concatenate two running batches (rows of `a` first)."""

    def select(self, state: BatchState, keep: torch.Tensor) -> BatchState:
        """Keep only the rows at indices `keep` (in that order)."""
