"""Steering policies as data: per row and probe, a kind and a strength, turned into per-row alphas.

The table is EasySteer-style: policies live in [capacity, K] tensors indexed by row slot, and one pass
computes every row's coefficients at once. A row with policy `off` gets exact zeros, so its tokens are
the ones it would produce unsteered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch

from steerer.bank import ProbeBank
from steerer.taps import LayerSteering, Where

MAX_ALPHA = 1000.0


class PolicyKind(IntEnum):
    OFF = 0
    CONSTANT = 1  # always add alpha * direction
    CONDITIONAL = 2  # add alpha * direction only while the task's flag is up
    PROPORTIONAL = 3  # add alpha * smoothed risk * direction


@dataclass(frozen=True)
class SteeringPolicy:
    kind: str = "off"
    alpha: float = 0.0

    def __post_init__(self) -> None:
        names = [k.name.lower() for k in PolicyKind]
        if self.kind not in names:
            raise ValueError(f"unknown steering policy {self.kind!r}; choose one of {', '.join(names)}")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha):
            raise ValueError(f"steering strength must be a finite number, got {self.alpha!r}")
        if abs(self.alpha) > MAX_ALPHA:
            raise ValueError(f"steering strength {self.alpha} is outside [-{MAX_ALPHA:g}, {MAX_ALPHA:g}]")

    @property
    def code(self) -> PolicyKind:
        return PolicyKind[self.kind.upper()]

    @classmethod
    def parse(cls, text: str) -> SteeringPolicy:
        """'off', 'constant:8', 'conditional:12', 'proportional:20'."""
        kind, _, alpha = text.partition(":")
        try:
            return cls(kind.strip().lower(), float(alpha) if alpha else 0.0)
        except ValueError as exc:
            raise ValueError(f"bad policy {text!r}: {exc}") from exc


OFF = SteeringPolicy()


@dataclass
class PolicyTable:
    """Per-row, per-probe policy kinds and strengths, and the bank's steering hooks they drive.

    A muted probe (`muted`, [K] bool, see `ProbeBank.muted`) never steers: its policy stays `off`.
    """

    bank: ProbeBank
    capacity: int = 256
    where: Where = Where.GENERATED
    muted: torch.Tensor | None = None  # [K] bool; None = none muted

    def __post_init__(self) -> None:
        k = len(self.bank.probes)
        self.muted = torch.zeros(k, dtype=torch.bool) if self.muted is None else self.muted.bool()
        self.kinds = torch.zeros(self.capacity, k, dtype=torch.long)
        self.alphas = torch.zeros(self.capacity, k)
        self.layer_columns: dict[int, torch.Tensor] = {}
        self.steering: dict[int, LayerSteering] = {}
        for layer in self.bank.layers:
            columns = torch.tensor([i for i, p in enumerate(self.bank.probes) if p.layer == layer])
            self.layer_columns[layer] = columns
            self.steering[layer] = LayerSteering(self.bank.directions[columns], self.where)

    def set(self, row: int, policies: dict[str, SteeringPolicy]) -> None:
        self.kinds[row] = PolicyKind.OFF
        self.alphas[row] = 0
        for task, policy in policies.items():
            k = self.bank.index(task)
            if self.muted[k]:
                continue
            self.kinds[row, k] = policy.code
            self.alphas[row, k] = policy.alpha

    def coefficients(self, rows: torch.Tensor, flags: torch.Tensor, risk: torch.Tensor) -> torch.Tensor:
        """[B, K] alphas for the next pass from the policy and the monitor's current state."""
        kinds, alphas = self.kinds[rows], self.alphas[rows]
        gate = ((kinds == PolicyKind.CONSTANT).float()
                + ((kinds == PolicyKind.CONDITIONAL) & flags).float()
                + (kinds == PolicyKind.PROPORTIONAL).float() * risk)
        return alphas * gate

    def apply(self, coeffs: torch.Tensor) -> None:
        """Hand each layer's columns of the [B, K] coefficients to its steering hook."""
        for layer, columns in self.layer_columns.items():
            self.steering[layer].set_coeffs(coeffs[:, columns])
