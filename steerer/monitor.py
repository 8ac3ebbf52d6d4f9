"""Per-token violation monitoring: probe scores -> smoothed risk -> flags with hysteresis -> events.

All state is held in tensors indexed by an integer row slot ([capacity, K] for K probes), so one step
for the whole batch is a few tensor ops: score every probe once, blend into an exponential moving
average, compare with each probe's threshold. Python only runs for the (rare) flag changes.

Two readings per task and token: the bank's probe (trained at the end of the response: the end verdict)
and, where the bank carries them, its token-level warning predictors (`ProbeBank.warning`: trained on the
tokens before a violation's onset, reading the task's progress towards its limit), which drive the smoothed
risk and the flags. Steering reads the end probes: the conditional gate (at the probe's `gate_threshold`,
calibrated for steering) and the proportional strength follow their smoothed risk (`steer_risk`), the reading
the steering sweep calibrated them on. Steering must not blind the monitor: residuals are read
with what this pass's steering added at or below each probe's layer taken back out, a raised flag holds for
`hold_tokens`, and a task that detection settled (`settle`) no longer changes its flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steerer import conditioning
from steerer.bank import ProbeBank
from steerer.lens import MAX_LENS_TOKENS, LensWeights, id_table, pool

NO_FLAG = -2  # `Monitor.first_flag` of a row never flagged (-1 is a reading: the prompt's last token)


@dataclass(frozen=True)
class MonitorConfig:
    smoothing: float = 0.5  # weight of the previous smoothed risk in the moving average
    hysteresis: float = 0.05  # raise above threshold + h, clear below threshold - h
    warmup_tokens: int = 2  # no flags before this many generated tokens (the state is still the prompt's)
    hold_tokens: int = 8  # a raised flag (and the steering gate) stays up at least this many tokens
    # take this pass's steering (alpha x direction, added at or below a probe's layer) back out of the residual
    # before reading it: exact on the direct path; False reads the steered residual as is (for measuring it)
    deduct_steering: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.smoothing < 1:
            raise ValueError("smoothing must be in [0, 1)")
        if not 0 <= self.hysteresis < 0.5:
            raise ValueError("hysteresis must be in [0, 0.5)")
        if self.hold_tokens < 0:
            raise ValueError("hold_tokens must be >= 0")


@dataclass(frozen=True)
class FlagEvent:
    row: int
    token_index: int  # position in the response of the token whose residual raised/cleared the flag
    task: str
    risk: float
    raised: bool  # True = raised, False = cleared


class Scorer:
    """One bank's probes read per row: the weight row and constant each request's params select, its lens ids
    and its progress, and the steering correction (one gather and one batched product per pass)."""

    def __init__(self, bank: ProbeBank, capacity: int, lens: LensWeights | None, steering: ProbeBank) -> None:
        k = len(bank.probes)
        device = bank.weights.device
        self.bank = bank
        self.layers = [p.layer for p in bank.probes]
        self.row_weights = bank.row_weights.to(device)  # [K + V, d]
        self.row_index = torch.arange(k, device=device).repeat(capacity, 1)  # [capacity, K]
        self.row_offset = bank.biases.to(device).repeat(capacity, 1)  # [capacity, K]
        self.lens_probes = [k for k, param in enumerate(bank.lens_params) if param]
        if self.lens_probes and lens is None:
            raise ValueError("probes " + ", ".join(bank.tasks[k] for k in self.lens_probes) + " read the "
                             "logit lens of the request's words: the monitor needs the model's lens weights")
        self.lens = lens
        if self.lens_probes:
            self.row_lens = bank.lens_weights.to(device)  # [K + V, 2]
            self.lens_ids = torch.zeros(capacity, k, MAX_LENS_TOKENS, dtype=torch.long, device=device)
            self.lens_mask = torch.zeros(capacity, k, MAX_LENS_TOKENS, dtype=torch.bool, device=device)
        # forecasts read each row's running mean of its lens inputs (`conditioning.forecasts`): sums and counts
        self.mean_probes = {k for k in self.lens_probes if conditioning.forecasts(bank.probes[k].conditioning)}
        if self.mean_probes:
            self.lens_sum = torch.zeros(capacity, k, 2, device=device)
            self.lens_count = torch.zeros(capacity, k, 1, device=device)
        # running maxima of the lens (`conditioning.lens_max`): per row the highest reading so far, pooled or per id
        self.peak_probes = {k: how for k in self.lens_probes if (how := conditioning.lens_max(bank.probes[k].conditioning))}
        if self.peak_probes:
            self.lens_peak = torch.full((capacity, k, MAX_LENS_TOKENS), -torch.inf, device=device)
        # running means of the residual term (`conditioning.pool`): per row its sum over generated readings, and their count
        pools = [k for k, p in enumerate(bank.probes) if conditioning.pool(p.conditioning) == "mean"]
        self.pool_probes = torch.tensor(pools, dtype=torch.long, device=device) if pools else None
        if pools:
            self.pool_sum = torch.zeros(capacity, len(pools), device=device)
            self.pool_count = torch.zeros(capacity, 1, device=device)
        self.progress_probes = [k for k, reads in enumerate(bank.progress_params) if reads]
        if self.progress_probes:
            self.row_progress = bank.progress_weights.to(device)  # [K + V, 3]
        # correction[k, j]: steering of column j is added at or below probe k's layer, so its reading holds it
        steer_layers = torch.tensor([p.steering_layer for p in steering.probes], device=device)
        self.correction = (steer_layers[None, :] <= torch.tensor(self.layers, device=device)[:, None]).float()
        self.directions = steering.directions.to(device)  # [K, d]

    def register(self, row: int, params: dict[str, dict] | None, lens_ids: dict[str, list[int]] | None) -> None:
        self.row_index[row], self.row_offset[row] = self.bank.request_rows(params)
        for k in self.lens_probes:
            ids, mask = id_table((lens_ids or {}).get(self.bank.tasks[k], []))
            self.lens_ids[row, k], self.lens_mask[row, k] = ids, mask
        if self.mean_probes:
            self.lens_sum[row], self.lens_count[row] = 0.0, 0.0
        if self.peak_probes:
            self.lens_peak[row] = -torch.inf
        if self.pool_probes is not None:
            self.pool_sum[row], self.pool_count[row] = 0.0, 0.0

    def score(self, rows: torch.Tensor, residuals: dict[int, torch.Tensor], applied: torch.Tensor | None = None,
              progress: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K] P(satisfied). `applied` [B, K]: this pass's steering coefficients, subtracted (times their
        directions) from the residuals of the layers at or above where they were added; `progress` [B, K]
        and `index` [B]: the progress inputs of probes that read them."""
        stacked = torch.stack([residuals[layer] for layer in self.layers]).float()  # [K, B, d]
        if applied is not None:
            added = torch.einsum("bj,kj,jd->kbd", applied.float(), self.correction, self.directions)
            steered = (applied != 0).any(dim=1)  # an unsteered row reads its residual as is (even past a NaN)
            stacked = torch.where(steered[None, :, None], stacked - added, stacked)
        index_rows = self.row_index[rows]
        logits = torch.einsum("kbd,bkd->bk", stacked, self.row_weights[index_rows])
        if self.pool_probes is not None:
            logits = self._pooled(rows, logits, index)
        logits = logits + self.row_offset[rows]
        for k in self.lens_probes:  # a row without words for this probe has an all-false mask: zero inputs
            how = self.peak_probes.get(k)
            if how == "ids":  # each id's running maximum, pooled
                peak = torch.maximum(self.lens_peak[rows, k], self.lens.logits(stacked[k], self.lens_ids[rows, k]))
                self.lens_peak[rows, k] = peak
                features = pool(peak, self.lens_mask[rows, k])
            else:
                features = self.lens.features(stacked[k], self.lens_ids[rows, k], self.lens_mask[rows, k])  # [B, 2]
            if how == "pooled":
                features = torch.maximum(self.lens_peak[rows, k, :2], features)
                self.lens_peak[rows, k, :2] = features
            if k in self.mean_probes:  # rows are distinct within a pass: one read and one write each
                total, count = self.lens_sum[rows, k] + features, self.lens_count[rows, k] + 1.0
                self.lens_sum[rows, k], self.lens_count[rows, k] = total, count
                features = total / count
            logits[:, k] = logits[:, k] + (self.row_lens[index_rows[:, k]] * features).sum(-1)
        if progress is not None:
            for k in self.progress_probes:
                features = conditioning.progress_features(progress[:, k], index)  # [B, 3]
                logits[:, k] = logits[:, k] + (self.row_progress[index_rows[:, k]] * features).sum(-1)
        return torch.sigmoid(logits)

    def _pooled(self, rows: torch.Tensor, logits: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """[B, K] residual terms with the pooled probes' replaced by their running mean over the generated readings
        (w . mean(x) = mean(w . x)); the prompt's last reading (index -1) reads as is and does not count (without
        `index` every reading counts). Rows are distinct within a pass: one read and one write each."""
        part = logits[:, self.pool_probes]  # [B, P]
        generated = (torch.ones_like(rows, dtype=torch.bool) if index is None else index.to(rows.device) >= 0)[:, None]
        total = self.pool_sum[rows] + torch.where(generated, part, torch.zeros_like(part))
        count = self.pool_count[rows] + generated.float()
        self.pool_sum[rows], self.pool_count[rows] = total, count
        logits = logits.clone()
        logits[:, self.pool_probes] = torch.where(count > 0, total / count.clamp(min=1.0), part)
        return logits


@dataclass
class Monitor:
    """Step hooks that score every probe of the bank at every pass, for the rows registered with it.

    Rows are integer slots in [0, capacity). `risk` is 1 - P(satisfied); a row only gets flags for
    the tasks it registered, and never for a muted probe (`muted`, [K] bool: probes not trusted to flag,
    see `ProbeBank.muted`; their risk is still computed and reported). `record=True` keeps each row's
    per-token P(satisfied) trace (the end probe's). `gate` [capacity, K] is the conditional-steering gate:
    the same rule as the flags at the bank's gate thresholds.
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
        self.risk_threshold = (1.0 - self.bank.alerting.flag_thresholds).to(device)  # [K]
        # flags start after the warm-up, except a forecast's, which may flag from the prompt's last token (-1)
        self.warmup = torch.tensor([-1 if conditioning.forecasts(p.conditioning) else self.config.warmup_tokens
                                    for p in self.bank.alerting.probes], device=device)  # [K]
        self.gate_threshold = (1.0 - self.bank.gate_thresholds).to(device)  # [K], on the end probes' risk
        h = self.config.hysteresis
        self._flag_bounds = (self.risk_threshold + h, self.risk_threshold - h)  # raise above, clear below
        self._gate_bounds = (self.gate_threshold + h, self.gate_threshold - h)
        self.active = torch.zeros(self.capacity, k, dtype=torch.bool, device=device)
        self.smoothed = torch.zeros(self.capacity, k, device=device)  # alerting risk (warning predictors)
        self.steer_risk = self.smoothed  # the end probes' smoothed risk (its own table with warning predictors)
        self.seen = torch.zeros(self.capacity, dtype=torch.bool, device=device)
        self.flags = torch.zeros(self.capacity, k, dtype=torch.bool, device=device)
        self.gate = torch.zeros(self.capacity, k, dtype=torch.bool, device=device)
        self.raised_at = torch.zeros(self.capacity, k, dtype=torch.long, device=device)
        self.gate_at = torch.zeros(self.capacity, k, dtype=torch.long, device=device)
        self.settled = torch.zeros(self.capacity, k, dtype=torch.bool, device=device)
        self.progress = torch.zeros(self.capacity, k, device=device)  # per task: fraction of its limit so far
        self.ever_flagged = torch.zeros(self.capacity, k, dtype=torch.bool, device=device)
        self.first_flag = torch.full((self.capacity, k), NO_FLAG, dtype=torch.long, device=device)
        self.last_p = torch.zeros(self.capacity, k, device=device)
        self.eos_p = torch.full((self.capacity, k), float("nan"), device=device)
        # The end probes (verdicts) and, where the bank has them, the warning predictors (risk, flags, gate).
        if self.lens is not None and (any(self.bank.lens_params) or any(self.bank.alerting.lens_params)):
            self.lens = LensWeights(self.lens.norm_weight.to(device), self.lens.eps, self.lens.unembedding.to(device))
        self.end = Scorer(self.bank, self.capacity, self.lens, self.bank)
        self.alert = self.end if self.bank.warning is None else Scorer(self.bank.warning, self.capacity, self.lens,
                                                                       self.bank)
        if self.alert is not self.end:
            self.steer_risk = torch.zeros(self.capacity, k, device=device)
        self.reads_progress = bool(self.end.progress_probes or self.alert.progress_probes)
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
        for scorer in {id(s): s for s in (self.end, self.alert)}.values():
            scorer.register(row, params, lens_ids)
        for table in (self.smoothed, self.steer_risk, self.last_p, self.progress):
            table[row] = 0
        self.seen[row] = False
        self.flags[row] = False
        self.gate[row] = False
        self.settled[row] = False
        self.ever_flagged[row] = False
        self.first_flag[row] = NO_FLAG
        self.eos_p[row] = float("nan")
        if self.record:
            self.traces[row] = []

    def before_forward(self, rows, index) -> None:
        pass

    def observe(self, rows: torch.Tensor, index: torch.Tensor, residuals: dict[int, torch.Tensor],
                closing: torch.Tensor, applied: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score one pass for row slots `rows` (a tensor on the monitor's device) and update every table.
        `applied` [B, K]: the steering coefficients of this pass (None: nothing was steered).

        Pure tensor work, no host reads: returns the smoothed risk [B, K] and the flags raised and cleared
        [B, K] (bool), for the caller to bring to the host in its one transfer and pass to `flag_events`.
        """
        progress = self.progress[rows] if self.reads_progress else None
        applied = applied if self.config.deduct_steering else None
        p = self.end.score(rows, residuals, applied, progress, index)  # [B, K]
        alert = p if self.alert is self.end else self.alert.score(rows, residuals, applied, progress, index)
        beta = self.config.smoothing
        seen = self.seen[rows, None]
        risk = 1.0 - alert
        smoothed = torch.where(seen, beta * self.smoothed[rows] + (1 - beta) * risk, risk)
        self.smoothed[rows] = smoothed
        steer_risk = smoothed
        if self.steer_risk is not self.smoothed:
            end_risk = 1.0 - p
            steer_risk = torch.where(seen, beta * self.steer_risk[rows] + (1 - beta) * end_risk, end_risk)
            self.steer_risk[rows] = steer_risk
        self.seen[rows] = True
        self.last_p[rows] = p
        self.eos_p[rows] = torch.where(closing[:, None], p, self.eos_p[rows])
        if self.record:
            for i, (row, position) in enumerate(zip(rows.tolist(), index.tolist(), strict=True)):
                self.traces[row].append((position, p[i].cpu()))
        at = index[:, None]  # [B, 1], broadcast against [B, K]
        settled = self.settled[rows]
        live = self.active[rows] & ~settled
        raised, cleared = self._hysteresis(rows, at, smoothed, live & (at >= self.warmup), self._flag_bounds,
                                           self.flags, self.raised_at)
        # A settled task's gate stays up (`settle`): folded into the gate's own update, one write per pass.
        self._hysteresis(rows, at, steer_risk, live & (at >= self.config.warmup_tokens), self._gate_bounds, self.gate,
                         self.gate_at, settled)
        self.ever_flagged[rows] = self.ever_flagged[rows] | raised
        first = self.first_flag[rows]
        self.first_flag[rows] = torch.where(raised & (first == NO_FLAG), at, first)
        return smoothed, raised, cleared

    def _hysteresis(self, rows, at, risk, eligible, bounds, state, since, force=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raise above threshold + h, clear below threshold - h once held `hold_tokens` (`bounds`: those two
        [K] tensors, computed once); updates `state` (or-ed with `force`, [B, K] bool) and `since`. Each table
        is read once and written once: a pass's cost on the host is its number of tensor ops."""
        above, below = bounds
        up, last = state[rows], since[rows]
        raised = eligible & ~up & (risk > above)
        cleared = eligible & up & ((at - last) >= self.config.hold_tokens) & (risk < below)
        new = (up | raised) & ~cleared
        state[rows] = new if force is None else new | force
        since[rows] = torch.where(raised, at, last)
        return raised, cleared

    def settle(self, row: int, task: str) -> None:
        """Detection decided this task for the row: its flag, a prediction, no longer rises or clears (the
        detection replaced it), and the steering gate stays up for the rest of the response (conditional
        steering goes on unless the controller stops it, see `stop_steering_on_detection`)."""
        self.settled[row, self.bank.index(task)] = True  # applied from the next reading on (`observe`)

    def set_progress(self, rows: list[int], columns: list[int], values: list[float]) -> None:
        """Progress fractions for the next pass's readings (one indexed write for the whole step)."""
        device = self.progress.device
        self.progress[torch.tensor(rows, device=device), torch.tensor(columns, device=device)] = torch.tensor(
            values, dtype=self.progress.dtype, device=device)

    def score(self, rows: torch.Tensor, residuals: dict[int, torch.Tensor]) -> torch.Tensor:
        """[B, K] P(satisfied) of the end probes, unsteered residuals, no progress: what offline tools read."""
        return self.end.score(rows, residuals)

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
