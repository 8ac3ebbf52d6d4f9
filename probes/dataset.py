"""The probe data as training code reads it: per task, rows (corpus rows with their split) and residuals.

Residuals come from teacher forcing the committed corpus (``probes.features``): every layer at POSITIONS of
each response (the last prompt token, the first generated token, ten body deciles, the end reading), and
every pass at a subset of layers (``tokens``, flattened with row ``offsets``) for per-token monitors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

POSITIONS = ("last_prompt", "first", *(f"body{i}" for i in range(10)), "eos")
SPLIT_SEED = 13


def position_indices(n_tokens: int, ended_by_eos: bool) -> list[int]:
    """Residual indices for POSITIONS: -1 = last prompt token; i = generated token i; EOS = n_tokens."""
    last = n_tokens if ended_by_eos else max(n_tokens - 2, 0)
    body_end = max(last - 1, 1) if ended_by_eos else max(last, 1)
    body = np.linspace(min(1, body_end), body_end, 10).round().astype(int).tolist()
    return [-1, min(0, last), *(min(b, last) for b in body), last]


@dataclass
class TaskData:
    """Everything stored for one task, loaded into memory (fp32 positions)."""

    rows: list[dict]
    positions: torch.Tensor  # [N, P, L, d]
    tokens: torch.Tensor  # [sum T, Lt, d]
    offsets: torch.Tensor  # [N+1]
    lexical: np.ndarray | None = None  # [N, L, 2] logit-lens inputs at the end reading (probes.evaluation)
    lens: tuple | None = None  # (LensWeights, tokenizer, param) that computed them
    summaries: dict | None = None  # per-row summaries of the readings at token layers (`probes.summaries.attach`)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r["satisfied"] for r in self.rows], dtype=int)

    @property
    def split(self) -> np.ndarray:
        return np.array([r["split"] for r in self.rows])

    @property
    def groups(self) -> np.ndarray:
        return np.array([r["base_id"] for r in self.rows])
