"""Per-token violation monitoring: probe scores -> smoothed risk -> flags with hysteresis -> events.

All state is held in tensors indexed by an integer row slot ([capacity, K] for K probes), so one step
for the whole batch is a few tensor ops: score every probe once, blend into an exponential moving
average, compare with each probe's threshold. Python only runs for the (rare) flag changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steerer.bank import ProbeBank
from steerer.lens import MAX_LENS_TOKENS, LensWeights, id_table


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
    lens: LensWeights | None = None  # the model's final norm and unembedding, for probes with lens inputs

    def __post_init__(self) -> None:
        k = len(self.bank.probes)
        device = self.bank.weights.device  # every table lives where the bank's tensors (and the model) are
        self.muted = torch.zeros(k, dtype=torch.bool) if self.muted is None else self.muted.bool().cpu()
        self._muted = self.muted.tolist()
        self.risk_threshold = (1.0 - self.bank.flag_thresholds).to(device)  # [K]
        self.active = torch.zeros(self.capacity, k, dtype=torch.bool, device=device)
        self.smoothed = torch.zeros(self.capacity, k, device=device)
        self.seen = torch.zeros(self.capacity, dtype=torch.bool, device=device)
        self.flags = torch.zeros(self.capacity, k, dtype=torch.bool, device=device)
        self.ever_flagged = torch.zeros(self.capacity, k, dtype=torch.bool, device=device)
        self.first_flag = torch.full((self.capacity, k), -1, dtype=torch.long, device=device)
        self.last_p = torch.zeros(self.capacity, k, device=device)
        self.eos_p = torch.full((self.capacity, k), float("nan"), device=device)
        # Per row: the weight row each probe reads with (its request's params may pick a variant) and the
        # logit's constant (bias + conditioning inputs); see `ProbeBank.request_rows`.
        self.row_weights = self.bank.row_weights.to(device)  # [K + V, d]
        self.row_index = torch.arange(k, device=device).repeat(self.capacity, 1)  # [capacity, K]
        self.row_offset = self.bank.biases.to(device).repeat(self.capacity, 1)  # [capacity, K]
        # Probes with lens inputs: per row the token ids of its request's words (padded, masked).
        self.lens_probes = [k for k, param in enumerate(self.bank.lens_params) if param]
        if self.lens_probes and self.lens is None:
            raise ValueError("probes " + ", ".join(self.bank.tasks[k] for k in self.lens_probes) + " read the "
                             "logit lens of the request's words: the monitor needs the model's lens weights")
        if self.lens_probes:
            self.lens = LensWeights(self.lens.norm_weight.to(device), self.lens.eps, self.lens.unembedding.to(device))
            self.row_lens = self.bank.lens_weights.to(device)  # [K + V, 2]
            self.lens_ids = torch.zeros(self.capacity, k, MAX_LENS_TOKENS, dtype=torch.long, device=device)
            self.lens_mask = torch.zeros(self.capacity, k, MAX_LENS_TOKENS, dtype=torch.bool, device=device)
        self.traces: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def register(self, row: int, tasks: list[str], params: dict[str, dict] | None = None,
                 lens_ids: dict[str, list[int]] | None = None) -> None:
        """Start monitoring slot `row` for `tasks`; `params` (task -> the request's params) conditions the
        probes that declare it (e.g. the bound of a count limit, the target sentiment); `lens_ids` (task ->
        token ids of the request's words, `steerer.lens.token_ids`) feeds probes with lens inputs."""
        if not 0 <= row < self.capacity:
            raise ValueError(f"row slot {row} outside the monitor's capacity {self.capacity}")
        active = [False] * len(self._muted)
        for task in tasks:  # a muted probe is never active: the flag rule then costs nothing extra per token
            k = self.bank.index(task)
            active[k] = not self._muted[k]
        self.active[row] = torch.tensor(active)
        self.row_index[row], self.row_offset[row] = self.bank.request_rows(params)
        for k in self.lens_probes:
            ids, mask = id_table((lens_ids or {}).get(self.bank.tasks[k], []))
            self.lens_ids[row, k], self.lens_mask[row, k] = ids, mask
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

    def observe(self, rows: torch.Tensor, index: torch.Tensor, residuals: dict[int, torch.Tensor],
                closing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score one pass for row slots `rows` (a tensor on the monitor's device) and update every table.

        Pure tensor work, no host reads: returns the smoothed risk [B, K] and the flags raised and cleared
        [B, K] (bool), for the caller to bring to the host in its one transfer and pass to `flag_events`.
        """
        p = self.score(rows, residuals)  # [B, K]
        risk = 1.0 - p
        beta = self.config.smoothing
        smoothed = torch.where(self.seen[rows, None], beta * self.smoothed[rows] + (1 - beta) * risk, risk)
        self.smoothed[rows] = smoothed
        self.seen[rows] = True
        self.last_p[rows] = p
        self.eos_p[rows] = torch.where(closing[:, None], p, self.eos_p[rows])
        if self.record:
            for i, (row, position) in enumerate(zip(rows.tolist(), index.tolist(), strict=True)):
                self.traces[row].append((position, p[i].cpu()))
        eligible = self.active[rows] & (index >= self.config.warmup_tokens)[:, None]
        h = self.config.hysteresis
        flags = self.flags[rows]
        raised = eligible & ~flags & (smoothed > self.risk_threshold + h)
        cleared = flags & (smoothed < self.risk_threshold - h)
        self.flags[rows] = (flags | raised) & ~cleared
        self.ever_flagged[rows] = self.ever_flagged[rows] | raised
        first = self.first_flag[rows]
        self.first_flag[rows] = torch.where(raised & (first < 0), index[:, None].expand_as(first), first)
        return smoothed, raised, cleared

    def score(self, rows: torch.Tensor, residuals: dict[int, torch.Tensor]) -> torch.Tensor:
        """[B, K] P(satisfied): each row's residual at each probe's layer, read with the weight row and
        constant its request selected (one gather and one batched product, whatever the mix of params)."""
        stacked = torch.stack([residuals[p.layer] for p in self.bank.probes]).float()  # [K, B, d]
        index = self.row_index[rows]
        logits = torch.einsum("kbd,bkd->bk", stacked, self.row_weights[index]) + self.row_offset[rows]
        for k in self.lens_probes:  # a row without words for this probe has an all-false mask: zero inputs
            features = self.lens.features(stacked[k], self.lens_ids[rows, k], self.lens_mask[rows, k])  # [B, 2]
            logits[:, k] = logits[:, k] + (self.row_lens[index[:, k]] * features).sum(-1)
        return torch.sigmoid(logits)

    def flag_events(self, rows: list[int], index: list[int], smoothed: torch.Tensor, raised: torch.Tensor,
                    cleared: torch.Tensor) -> list[FlagEvent]:
        """The flag changes of one pass as events, from host copies of what `observe` returned."""
        changed = raised | cleared
        if not bool(changed.any()):
            return []
        return [FlagEvent(int(rows[i]), int(index[i]), self.bank.probes[k].task, float(smoothed[i, k]),
                          bool(raised[i, k])) for i, k in changed.nonzero().tolist()]

    def after_forward(self, view) -> None:
        """Step hooks for a `RunningBatch` (tests, benchmarks): `observe`, then events for flag changes."""
        rows = torch.as_tensor(view.rows, dtype=torch.long, device=self.smoothed.device)
        smoothed, raised, cleared = self.observe(rows, view.index, view.residuals, view.closing)
        changed = raised | cleared
        if bool(changed.any()):
            self.events += self.flag_events(list(view.rows), view.index.tolist(), smoothed.cpu(), raised.cpu(),
                                            cleared.cpu())

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
