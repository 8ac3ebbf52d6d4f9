"""Per-token violation monitoring: probe scores -> smoothed risk -> flags with hysteresis -> events.

All state is held in tensors indexed by an integer row slot ([capacity, K] for K probes), so one step
for the whole batch is a few tensor ops: score every probe once, blend into an exponential moving
average, compare with each probe's threshold. Python only runs for the (rare) flag changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steerer.bank import ProbeBank


@dataclass(frozen=True)
class MonitorConfig:
    smoothing: float = 0.5  # weight of the previous smoothed risk in the moving average
    hysteresis: float = 0.05  # raise above threshold + h, clear below threshold - h
    warmup_tokens: int = 2  # no flags before this many generated tokens (the state is still the prompt's)

    def __post_init__(self) -> None:
        if not 0 <= self.smoothing < 1:
            raise ValueError("smoothing must be in [0, 1)")
        if not 0 <= self.hysteresis < 0.5:
            raise ValueError("hysteresis must be in [0, 0.5)")


@dataclass(frozen=True)
class FlagEvent:
    row: int
    token_index: int  # position in the response of the token whose residual raised/cleared the flag
    task: str
    risk: float
    raised: bool  # True = raised, False = cleared


@dataclass
class Monitor:
    """Step hooks that score every probe of the bank at every pass, for the rows registered with it.

    Rows are integer slots in [0, capacity). `risk` is 1 - P(satisfied); a row only gets flags for
    the tasks it registered, and never for a muted probe (`muted`, [K] bool: probes not trusted to flag,
    see `ProbeBank.muted`; their risk is still computed and reported). `record=True` keeps each row's
    per-token P(satisfied) trace.
    """

    bank: ProbeBank
    config: MonitorConfig = field(default_factory=MonitorConfig)
    capacity: int = 256
    record: bool = False
    events: list[FlagEvent] = field(default_factory=list)
    muted: torch.Tensor | None = None  # [K] bool; None = none muted

    def __post_init__(self) -> None:
        k = len(self.bank.probes)
        self.muted = torch.zeros(k, dtype=torch.bool) if self.muted is None else self.muted.bool()
        self.risk_threshold = 1.0 - self.bank.flag_thresholds  # [K]
        self.active = torch.zeros(self.capacity, k, dtype=torch.bool)
        self.smoothed = torch.zeros(self.capacity, k)
        self.seen = torch.zeros(self.capacity, dtype=torch.bool)
        self.flags = torch.zeros(self.capacity, k, dtype=torch.bool)
        self.ever_flagged = torch.zeros(self.capacity, k, dtype=torch.bool)
        self.first_flag = torch.full((self.capacity, k), -1, dtype=torch.long)
        self.last_p = torch.zeros(self.capacity, k)
        self.eos_p = torch.full((self.capacity, k), float("nan"))
        self.traces: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def register(self, row: int, tasks: list[str]) -> None:
        if not 0 <= row < self.capacity:
            raise ValueError(f"row slot {row} outside the monitor's capacity {self.capacity}")
        self.active[row] = False
        for task in tasks:  # a muted probe is never active: the flag rule then costs nothing extra per token
            k = self.bank.index(task)
            self.active[row, k] = not bool(self.muted[k])
        for table in (self.smoothed, self.last_p):
            table[row] = 0
        self.seen[row] = False
        self.flags[row] = False
        self.ever_flagged[row] = False
        self.first_flag[row] = -1
        self.eos_p[row] = float("nan")
        if self.record:
            self.traces[row] = []

    def before_forward(self, rows, index) -> None:
        pass

    def after_forward(self, view) -> None:
        rows = torch.as_tensor(view.rows, dtype=torch.long)
        p = self.bank.score(view.residuals)  # [B, K]
        risk = 1.0 - p
        beta = self.config.smoothing
        smoothed = torch.where(self.seen[rows, None], beta * self.smoothed[rows] + (1 - beta) * risk, risk)
        self.smoothed[rows] = smoothed
        self.seen[rows] = True
        self.last_p[rows] = p
        closing = view.closing
        if bool(closing.any()):
            self.eos_p[rows[closing]] = p[closing]
        if self.record:
            for i, row in enumerate(view.rows):
                self.traces[row].append((int(view.index[i]), p[i]))
        eligible = self.active[rows] & (view.index >= self.config.warmup_tokens)[:, None]
        h = self.config.hysteresis
        flags = self.flags[rows]
        raised = eligible & ~flags & (smoothed > self.risk_threshold + h)
        cleared = flags & (smoothed < self.risk_threshold - h)
        if not bool((raised | cleared).any()):
            return
        self.flags[rows] = (flags | raised) & ~cleared
        self.ever_flagged[rows] |= raised
        first = self.first_flag[rows]
        self.first_flag[rows] = torch.where(raised & (first < 0), view.index[:, None].expand_as(first), first)
        for i, k in (raised | cleared).nonzero().tolist():
            self.events.append(FlagEvent(int(rows[i]), int(view.index[i]), self.bank.probes[k].task,
                                         float(smoothed[i, k]), bool(raised[i, k])))

    def drain_events(self) -> list[FlagEvent]:
        events, self.events = self.events, []
        return events

    def traces_for(self, row: int, tasks: list[str]) -> dict[str, list[float]] | None:
        """Per task, P(satisfied) at each generated token (record=True), else None."""
        if not self.record:
            return None
        return {task: [p for index, p in self.trace(row, task) if index >= 0] for task in tasks}

    def trace(self, row: int, task: str) -> list[tuple[int, float]]:
        k = self.bank.index(task)
        return [(index, float(p[k])) for index, p in self.traces.get(row, [])]


def first_flag(p_satisfied: list[float], indices: list[int], threshold: float, config: MonitorConfig) -> int | None:
    """Replay one row's probe readings through the monitor's rule: the token index of the first flag.

    The same arithmetic as `Monitor.after_forward` for a single probe, as a pure function, so flag
    thresholds can be calibrated offline on stored per-token readings.
    """
    smoothed = None
    risk_threshold = 1.0 - threshold + config.hysteresis
    for p, index in zip(p_satisfied, indices, strict=True):
        risk = 1.0 - p
        smoothed = risk if smoothed is None else config.smoothing * smoothed + (1 - config.smoothing) * risk
        if index >= config.warmup_tokens and smoothed > risk_threshold:
            return index
    return None


class BankScorer(Monitor):
    """A monitor with every probe active on every row: the benchmark's worst case."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.active[:] = True
