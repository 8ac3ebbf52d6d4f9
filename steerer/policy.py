"""Steering policies: the one vocabulary of policy kinds, their parsing, and the table that turns policies
into per-row alphas.

A strength is bounded per bank and task (`strength_bounds`: a multiple of the residual norm at the task's steering
layer, from the bank's steering sweep) and checked by `check_strengths` in `Controller.validate`.

`POLICY_KINDS` (from `PolicyKind`) is the list every entry point offers (the library, the drop-in, the gRPC
conversion, the client and both command lines); `SteeringPolicy.parse` reads the 'kind:alpha' they take.
A policy may also *guard* its constraint (`steerer.guard`): 'guard' alone, or with steering as
'guard+conditional:8' (`POLICY_CHOICES` lists the names a command line offers).
This module imports torch only when a `PolicyTable` is built, so the light client can use the vocabulary.

The table is EasySteer-style: policies live in [capacity, K] tensors indexed by row slot, and one pass
computes every row's coefficients at once. A row with policy `off` gets exact zeros, so its tokens are
the ones it would produce unsteered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from steerer.bank import ProbeBank
    from steerer.taps import Where

MAX_ALPHA = 1000.0  # any bank: the absolute limit `SteeringPolicy` enforces
# A bank's bound per task: this multiple of the mean residual norm at the task's steering layer (a vector as long
# as the residual stream itself; the shipped bank's sweep measured up to 0.32 of it, and 1000 at lowercase's
# layer 21, 3.5 norms, writes "The a a a ...").
STRENGTH_BOUND_NORMS = 1.0


class PolicyKind(IntEnum):
    OFF = 0
    CONSTANT = 1  # always add alpha * direction
    CONDITIONAL = 2  # add alpha * direction only while the task's steering gate is up (`Monitor.gate`)
    PROPORTIONAL = 3  # add alpha * smoothed risk * direction


POLICY_KINDS: tuple[str, ...] = tuple(k.name.lower() for k in PolicyKind)  # "off", "constant", ...
GUARD = "guard"
# The policy names a command line offers: the steering kinds, guard alone, and guard with each steering kind.
POLICY_CHOICES: tuple[str, ...] = (*POLICY_KINDS, GUARD, *(f"{GUARD}+{k}" for k in POLICY_KINDS if k != "off"))


@dataclass(frozen=True)
class SteeringPolicy:
    kind: str = "off"
    alpha: float = 0.0
    guard: bool = False  # veto, at sampling, tokens that would make the task's detector fire (`steerer.guard`)

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"unknown steering policy {self.kind!r}; choose one of {', '.join(POLICY_KINDS)}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha):
            raise ValueError(f"steering strength must be a finite number, got {self.alpha!r}")
        if abs(self.alpha) > MAX_ALPHA:
            raise ValueError(f"steering strength {self.alpha} is outside [-{MAX_ALPHA:g}, {MAX_ALPHA:g}]")
        if not isinstance(self.guard, bool):
            raise ValueError(f"guard must be true or false, got {self.guard!r}")

    @property
    def code(self) -> PolicyKind:
        return PolicyKind[self.kind.upper()]

    @classmethod
    def parse(cls, text: str) -> SteeringPolicy:
        """'off', 'constant:8', 'conditional:12', 'proportional:20', 'guard', 'guard+conditional:12' (case and
        spaces around parts ignored)."""
        guard, rest = split_guard(text)
        return cls(*split_policy(rest), guard=guard)

    @classmethod
    def named(cls, name: str, alpha: float = 0.0) -> SteeringPolicy:
        """A command line's `--policy NAME --alpha A`: 'guard+conditional' with 8 is 'guard+conditional:8'."""
        guard, rest = split_guard(name)
        kind, _ = split_policy(rest)
        return cls(kind, alpha if kind != "off" else 0.0, guard=guard)

    def kind_name(self) -> str:
        """The steering kind, "guard+" before it when the policy guards (the outcome log's policy column; its
        strength is a column of its own)."""
        return f"{GUARD}+{self.kind}" if self.guard else self.kind

    def spec(self) -> str:
        """The policy as `parse` reads it back: 'guard+conditional:8', 'constant:4', 'off'."""
        steering = f"{self.kind}:{self.alpha:g}" if self.kind != "off" else ""
        return "+".join(part for part in (GUARD if self.guard else "", steering) if part) or "off"


def split_guard(text: str) -> tuple[bool, str]:
    """'guard+conditional:8' -> (True, 'conditional:8'); 'guard' -> (True, 'off'); others -> (False, text).
    The parts are joined by '+' in either order; guard named twice or two steering parts is an error."""
    parts = [part.strip() for part in text.split("+")]
    guards = [part for part in parts if part.partition(":")[0].strip().lower() == GUARD]
    rest = [part for part in parts if part.partition(":")[0].strip().lower() != GUARD]
    if len(guards) > 1 or len(rest) > 1 or any(g.partition(":")[2].strip() for g in guards):
        raise ValueError(f"bad policy {text!r}; use 'guard', 'KIND:ALPHA' or 'guard+KIND:ALPHA'")
    return bool(guards), rest[0] if rest else "off"


def split_policy(text: str) -> tuple[str, float]:
    """'kind:alpha' -> (kind, alpha): the kind checked against `POLICY_KINDS`, alpha read as a float ('' is 0)
    but not range-checked (`SteeringPolicy` does that; the gRPC client leaves it to the server)."""
    kind, _, alpha = text.partition(":")
    kind = kind.strip().lower()
    if kind not in POLICY_KINDS:
        raise ValueError(f"unknown steering policy {kind!r}; choose one of {', '.join(POLICY_KINDS)}")
    try:
        return kind, float(alpha) if alpha.strip() else 0.0
    except ValueError:
        raise ValueError(f"bad steering strength in policy {text!r}") from None


OFF = SteeringPolicy()


def residual_norms(bank: ProbeBank) -> dict[int, float]:
    """layer -> mean residual norm there, from the steering sweep's records in the bank manifest
    (`extra["steering"][task]`: alpha = fraction x norm at its layer); {} for a bank without them."""
    found: dict[int, list[float]] = {}
    for record in (bank.extra.get("steering") or {}).values():
        if not isinstance(record, dict):
            continue
        layer, alpha, fraction = record.get("layer"), record.get("alpha"), record.get("fraction")
        if isinstance(layer, int) and all(isinstance(x, int | float) and x > 0 for x in (alpha, fraction)):
            found.setdefault(layer, []).append(float(alpha) / float(fraction))
    return {layer: sum(norms) / len(norms) for layer, norms in found.items()}


def strength_bounds(bank: ProbeBank) -> dict[str, float]:
    """task -> the largest |alpha| the bank accepts: `extra["strength_bounds"]` (task -> bound) where the
    manifest sets it, else `STRENGTH_BOUND_NORMS` x the residual norm at the probe's steering layer (the
    nearest measured layer where the sweep did not measure that one), else `MAX_ALPHA`; never above it."""
    explicit = bank.extra.get("strength_bounds")
    norms = residual_norms(bank)
    bounds = {}
    for probe in bank.probes:
        if isinstance(explicit, dict) and isinstance(explicit.get(probe.task), int | float):
            bound = float(explicit[probe.task])
        elif norms:
            layer = min(norms, key=lambda known: (abs(known - probe.steering_layer), known))
            bound = STRENGTH_BOUND_NORMS * norms[layer]
        else:
            bound = MAX_ALPHA
        bounds[probe.task] = min(round(bound, 1), MAX_ALPHA)
    return bounds


def check_strengths(spec, bank: ProbeBank) -> None:
    """ValueError naming the bound unless every constraint's steering strength is within the bank's
    (`strength_bounds`); `spec` is a `Request` or `RowSpec` whose tasks are in the bank."""
    bounds = strength_bounds(bank)
    for constraint in spec.constraints:
        policy, bound = spec.policy_for(constraint.task), bounds.get(constraint.task, MAX_ALPHA)
        if policy.code != PolicyKind.OFF and abs(policy.alpha) > bound:
            raise ValueError(f"steering strength {policy.alpha:g} for {constraint.task} is above this bank's bound "
                             f"{bound:g}; use at most {bound:g}")


@dataclass
class PolicyTable:
    """Per-row, per-probe policy kinds and strengths, and the bank's steering hooks they drive.

    A muted probe (`muted`, [K] bool, see `ProbeBank.muted`) never steers: its policy stays `off`.
    """

    bank: ProbeBank
    capacity: int = 256
    where: Where | str = "generated"  # a `taps.Where` (a str enum)
    muted: torch.Tensor | None = None  # [K] bool; None = none muted

    def __post_init__(self) -> None:
        import torch

        from steerer.taps import LayerSteering, Where

        self.where = Where(self.where)
        k = len(self.bank.probes)
        device = self.bank.weights.device  # the tables and directions live with the bank (the model's device)
        self.muted = torch.zeros(k, dtype=torch.bool) if self.muted is None else self.muted.bool().cpu()
        self.kinds = torch.zeros(self.capacity, k, dtype=torch.long, device=device)
        self.alphas = torch.zeros(self.capacity, k, device=device)
        self.layer_columns: dict[int, torch.Tensor] = {}
        self.steering: dict[int, LayerSteering] = {}
        for layer in self.bank.steering_layers:
            columns = torch.tensor([i for i, p in enumerate(self.bank.probes) if p.steering_layer == layer],
                                   device=device)
            self.layer_columns[layer] = columns
            self.steering[layer] = LayerSteering(self.bank.directions[columns], self.where)

    def set(self, row: int, policies: dict[str, SteeringPolicy], params: dict[str, dict] | None = None) -> None:
        """A row's policies; `params` (task -> the request's params) may flip a strength's sign where the probe
        declares `steer_signs` (e.g. towards shorter text for "at most", longer for "at least")."""
        import torch

        from steerer.conditioning import steer_sign

        kinds, alphas = [int(PolicyKind.OFF)] * len(self.bank.probes), [0.0] * len(self.bank.probes)
        for task, policy in policies.items():
            k = self.bank.index(task)
            if self.muted[k]:
                continue
            sign = steer_sign(self.bank.probes[k].conditioning, (params or {}).get(task, {}))
            kinds[k], alphas[k] = int(policy.code), float(policy.alpha) * sign
        self.kinds[row] = torch.tensor(kinds)  # one small copy per row, not one per cell
        self.alphas[row] = torch.tensor(alphas)

    def coefficients(self, rows: torch.Tensor, gate: torch.Tensor, risk: torch.Tensor) -> torch.Tensor:
        """[B, K] alphas for the next pass from the policy and the monitor's current state (its steering
        gate [B, K] bool and smoothed risk [B, K])."""
        import torch

        kinds, alphas = self.kinds[rows], self.alphas[rows]
        gate = ((kinds == PolicyKind.CONSTANT).float()
                + ((kinds == PolicyKind.CONDITIONAL) & gate).float()
                + torch.where(kinds == PolicyKind.PROPORTIONAL, risk, 0.0))
        return alphas * gate

    def apply(self, coeffs: torch.Tensor, active: dict[int, bool] | None = None) -> None:
        """Hand each layer's columns of the [B, K] coefficients to its steering hook. `active` (per layer:
        may any row be steered there) spares a device read per layer; None reads it off the coefficients."""
        for layer, columns in self.layer_columns.items():
            self.steering[layer].set_coeffs(coeffs[:, columns], None if active is None else active[layer])
