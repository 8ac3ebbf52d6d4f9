"""The controller: per-request monitoring and steering state, driven by any engine through a small interface.

It owns everything per request that is not the model: row slots, the `Monitor` (risk, flags), the
`PolicyTable` (policies -> coefficients), the steering layers the engine's taps read, each row's tokens
and text (incremental detokenizer), its pending token event and, at the end, its `Result`. An engine
(the transformers loop in `Steerer`, the `LogitsProcessor` drop-in, a vLLM plugin) drives it with:

    membership   add(spec) -> slot          a row joins (prefilled by the engine)
                 remove(slot)               a row leaves without a result (cancelled)
                 finish(slot, reason, ...)  a row ended: its Result; the slot is free again
    per pass     coefficients(rows, positions)            before: [B, K] alphas, written to `steering`
                 observe(rows, positions, residuals, closing) -> Observation   after: device tensors
                 settle(slots, positions, closing, host)  after the step's one host transfer
                 token(slot, token, recorded, final) -> TokenEvent          a chosen token is known

`rows` is a [B] tensor of slots (on the model's device) aligned with the batch; an engine with its own
row order (vLLM's persistent batch: rows added, removed and moved between steps) keeps a `SlotMap`. Every
per-row table is a [capacity, K] tensor on the model's device, so a pass is a few tensor operations for
the whole batch; `observe` reads nothing back. The engine brings `Observation.tensors()` to the host in
the same transfer as its own per-step data (tokens, finished rows), and Python then touches only what
it must: the token events and the rows whose flags changed.

Steering is masked per row (an exact zero where a row's coefficients are zero), and a layer's add is
skipped when no row in flight can steer there; the controller knows that on the host (policies and flag
events), so deciding it costs no device read.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from steerer.bank import ProbeBank
from steerer.constraints import Constraint, check_constraint, validate_request
from steerer.detokenize import IncrementalDetokenizer
from steerer.lens import LensWeights, token_ids, words_of
from steerer.monitor import NO_FLAG, FlagEvent, Monitor, MonitorConfig
from steerer.policy import OFF, PolicyKind, PolicyTable, SteeringPolicy, check_strengths
from steerer.request import Detection, Result, RowSpec, Spec, TokenEvent, Verdict  # noqa: F401 (re-exported)
from steerer.taps import LayerSteering, Where
from steerer.tasks import TASKS, get_task
from steerer.tasks.base import Detector, Progress


@dataclass
class Observation:
    """What `observe` computed for one pass, on the model's device; `tensors()` go to the host together."""

    smoothed: torch.Tensor  # [B, K] risk after this pass
    applied: torch.Tensor  # [B, K] coefficients of this pass
    raised: torch.Tensor  # [B, K] bool
    cleared: torch.Tensor  # [B, K] bool

    def tensors(self) -> list[torch.Tensor]:
        return [self.smoothed, self.applied, self.raised, self.cleared]


@dataclass
class _Row:
    spec: Spec
    request_id: str
    tasks: list[str]  # the row's tasks with a probe in the bank (a detector-only task has no column)
    columns: list[int]
    detok: IncrementalDetokenizer
    steered: dict[str, int]
    always: set[int]  # layers this row may steer at (constant, proportional; conditional while its gate is up)
    conditional: set[int]  # columns with a conditional policy
    pending: tuple[list[float], list[float], list[FlagEvent]] | None = None  # readings for the next token
    eos: bool = False
    policies: dict[str, SteeringPolicy] = field(default_factory=dict)
    detectors: dict[str, Detector] = field(default_factory=dict)  # tasks a prefix may still decide
    detected: dict[str, int] = field(default_factory=dict)  # task -> token that broke it
    progress: dict[int, Progress] = field(default_factory=dict)  # column -> progress tracker (forecast input)
    length: int = 0  # characters of text so far
    ends: list[int] = field(default_factory=list)  # text length after each token (rows with detectors)
    out_of_range: dict[str, str] = field(default_factory=dict)  # task -> why its scoped probe is muted here


class Controller:
    """Per-request monitoring and steering state; see the module docstring."""

    def __init__(self, bank: ProbeBank, tokenizer: Any, *, capacity: int = 128, device: str | torch.device = "cpu",
                 monitor_config: MonitorConfig | None = None, where: Where = Where.GENERATED, record: bool = False,
                 check: bool = True, use_unreliable_probes: bool = False, lens: LensWeights | None = None,
                 stop_steering_on_detection: bool = False):
        self.bank = bank
        self.tokenizer = tokenizer
        self.capacity = capacity
        self.device = torch.device(device)
        self.check = check  # False: Verdict.satisfied stays None (the server checks off the model thread)
        self.where = Where(where)
        # True: once a task's violation is detected, its conditional steering stops from the next pass (the
        # violation cannot be undone). False (default): it goes on steering the rest of the text.
        self.stop_steering_on_detection = stop_steering_on_detection
        on_device = bank.to(self.device)
        # Probes whose measured reliability does not clear chance neither flag nor steer, unless overridden.
        self.muted = bank.muted(use_unreliable_probes)
        self.use_unreliable_probes = use_unreliable_probes  # else scoped probes are muted per request (`add`)
        self.monitor = Monitor(on_device, monitor_config or MonitorConfig(), capacity, record=record, muted=self.muted,
                               lens=lens)
        self._lens_params = {p.task: param for b in (bank, bank.alerting)  # the warning predictors' lens too
                             for p, param in zip(b.probes, b.lens_params, strict=True) if param}
        self.policies = PolicyTable(on_device, capacity, self.where, muted=self.muted)
        self.steering: dict[int, LayerSteering] = self.policies.steering  # what the engine's taps add
        self.tap_layers: tuple[int, ...] = bank.layers
        self._layer_of = [p.steering_layer for p in bank.probes]  # where each probe's steering is added
        self._muted = self.muted.tolist()
        self._free = list(range(capacity - 1, -1, -1))
        self._rows: dict[int, _Row] = {}
        self._users: Counter[int] = Counter()  # layer -> rows that steer there now
        self._applied = torch.zeros(capacity, len(bank.probes), device=self.device)
        self._applied_dirty = False
        self._steered_pass = False  # the last `coefficients` handed some layer non-zero rows
        self._progress_tasks = {p.task for p, reads in zip(bank.alerting.probes, bank.alerting.progress_params,
                                                             strict=True) if reads}
        self._progress_updates: list[tuple[int, int, float]] = []  # (slot, column, fraction) for the next pass
        self._ids = itertools.count()

    @property
    def in_flight(self) -> int:
        return len(self._rows)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def slot_of(self, request_id: str) -> int | None:
        for slot, row in self._rows.items():
            if row.request_id == request_id:
                return slot
        return None

    # -- membership ------------------------------------------------------------------------------------
    def validate(self, spec: Spec) -> None:
        """ValueError (a message for the user) unless the spec's constraints and policies fit this bank: the one
        request validation every entry point uses (`steerer.constraints.validate_request`)."""
        validate_request(spec, self.bank.tasks)
        check_strengths(spec, self.bank)  # the bank's strength bound (`steerer.policy.strength_bounds`)

    def add(self, spec: Spec, request_id: str | None = None, validated: bool = False) -> int:
        """A row joins: register it and return its slot. Validated here unless the caller already did
        (`validated=True`: one validation per path, see `steerer.driver`)."""
        if not validated:
            self.validate(spec)
        if not self._free:
            raise RuntimeError(f"no free slot (capacity {self.capacity})")
        slot = self._free.pop()
        params = {c.task: dict(c.params) for c in spec.constraints}
        # A task the bank has no probe for is served on its detector alone (`constraints.detector_only`):
        # detections, guard and checker, no column (no risk, flags or steering).
        detectors = {c.task: d for c in spec.constraints if (d := get_task(c.task).detect(c.params)) is not None}
        tasks = [c.task for c in spec.constraints if c.task in self.bank.tasks]
        policies = {t: spec.policy_for(t) for t in tasks}
        params_probed = {t: params[t] for t in tasks}
        # Scoped probes asked outside the parameter range they were measured reliable on: muted for this row.
        out_of_range = self.bank.out_of_range(params_probed, self.use_unreliable_probes)
        policies = {t: OFF if t in out_of_range else p for t, p in policies.items()}
        lens_ids = {t: token_ids(self.tokenizer, words_of(params[t], self._lens_params[t]))
                    for t in tasks if t in self._lens_params}
        self.monitor.register(slot, [t for t in tasks if t not in out_of_range], params_probed, lens_ids)
        self.policies.set(slot, policies, params_probed)
        columns = [self.bank.index(t) for t in tasks]
        always = self._steering_layers(tasks, columns, policies)
        conditional = {k for t, k in zip(tasks, columns, strict=True) if policies[t].code == PolicyKind.CONDITIONAL}
        progress = {k: get_task(t).progress(params[t]) for t, k in zip(tasks, columns, strict=True)
                    if t in self._progress_tasks and get_task(t).progress is not None}
        row = _Row(spec, request_id or spec.id or f"req-{next(self._ids)}", tasks, columns,
                   IncrementalDetokenizer(self.tokenizer), dict.fromkeys(params, 0), always, conditional,
                   policies=policies, detectors=detectors, progress=progress, out_of_range=out_of_range)
        self._users.update(always)
        self._rows[slot] = row
        return slot

    def _steering_layers(self, tasks: list[str], columns: list[int], policies: dict[str, SteeringPolicy]) -> set[int]:
        """Layers a row may steer at: those of its unmuted columns with a non-zero policy (a conditional row's
        zeros while its gate is down are exact, so it counts from admission)."""
        return {self._layer_of[k] for t, k in zip(tasks, columns, strict=True)
                if not self._muted[k] and policies[t].alpha != 0 and policies[t].code != PolicyKind.OFF}

    def remove(self, slot: int) -> None:
        """A row leaves (finished or cancelled); its slot is free for the next `add`."""
        row = self._rows.pop(slot, None)
        if row is None:
            return
        self._users.subtract(row.always)
        self._applied[slot] = 0
        self._free.append(slot)

    def request_id(self, slot: int) -> str:
        return self._rows[slot].request_id

    def row_detectors(self, slot: int) -> dict[str, Detector]:
        """The row's live detectors (tasks a prefix may still decide), for the guard (`steerer.guard`)."""
        return self._rows[slot].detectors

    def row_text(self, slot: int) -> tuple[IncrementalDetokenizer, int]:
        """The row's detokenizer and the characters its detectors were fed, for the guard to try tokens on."""
        row = self._rows[slot]
        return row.detok, row.length

    # -- per pass --------------------------------------------------------------------------------------
    def coefficients(self, rows: torch.Tensor, positions: torch.Tensor,
                     live: torch.Tensor | None = None) -> torch.Tensor | None:
        """Before a pass: each row's alphas [B, K] from its policy and the monitor's state after the last
        pass, handed to the steering layers. `positions` [B]: -1 for a row's prompt. `live` [B] bool: rows
        that may steer (others get zeros). None (and nothing added) when no row in flight steers."""
        active = {layer: self._users[layer] > 0 for layer in self.steering}
        self._steered_pass = any(active.values())
        if not self._steered_pass:
            for steer in self.steering.values():
                steer.active = False
            if self._applied_dirty:
                self._applied.zero_()
                self._applied_dirty = False
            return None
        coeffs = self.policies.coefficients(rows, self.monitor.gate[rows], self.monitor.steer_risk[rows])
        if self.where is Where.GENERATED:
            coeffs = torch.where(positions[:, None] >= 0, coeffs, 0.0)
        if live is not None:
            coeffs = torch.where(live[:, None], coeffs, 0.0)
        self.policies.apply(coeffs, active)
        self._applied[rows] = coeffs
        self._applied_dirty = True
        return coeffs

    def observe(self, rows: torch.Tensor, positions: torch.Tensor, residuals: dict[int, torch.Tensor],
                closing: torch.Tensor) -> Observation:
        """After a pass: score the residuals of `rows` (each row's last token), update risk and flags. No host
        reads; bring `Observation.tensors()` to the host with the step's other data, then call `settle`.
        Readings are taken with this pass's steering subtracted, so steering does not fool its own monitor."""
        if self._progress_updates:
            self.monitor.set_progress(*map(list, zip(*self._progress_updates, strict=True)))
            self._progress_updates = []
        applied = self._applied[rows] if self._steered_pass else None
        smoothed, raised, cleared = self.monitor.observe(rows, positions, residuals, closing, applied)
        return Observation(smoothed, self._applied[rows], raised, cleared)

    def settle(self, slots: list[int], positions: list[int], closing: list[bool], host: list[torch.Tensor]) -> None:
        """On the host, after the transfer: flag events, steering bookkeeping for rows whose flags changed,
        and each row's readings for its next token event (`token`). `host`: `Observation.tensors()` on CPU."""
        smoothed, applied, raised, cleared = host
        by_slot: dict[int, list[FlagEvent]] = {}
        for event in self.monitor.flag_events(slots, positions, smoothed, raised, cleared):
            by_slot.setdefault(event.row, []).append(event)
        risks, alphas = smoothed.tolist(), applied.tolist()
        for i, slot in enumerate(slots):
            if closing[i]:
                continue
            row = self._rows[slot]
            row.pending = ([risks[i][k] for k in row.columns], [alphas[i][k] for k in row.columns],
                           by_slot.get(slot, []))

    def token(self, slot: int, token: int, recorded: bool, final: bool = False) -> TokenEvent:
        """The token a row chose in the pass last settled: append it (recorded) or note EOS, and return its
        event. `final`: the row ends with it (any text held back for an incomplete character is flushed)."""
        row = self._rows[slot]
        if row.pending is None:
            raise RuntimeError("internal error: a token arrived without the pass that chose it")
        risks, applied, flags = row.pending
        row.pending = None
        if recorded:
            text = row.detok.add(token)
            index = len(row.detok.tokens) - 1
        else:
            text, index = "", len(row.detok.tokens)
            row.eos = True
        if final:
            text += row.detok.flush()
        for task, alpha in zip(row.tasks, applied, strict=True):
            row.steered[task] += alpha != 0
        if recorded and row.progress:
            self._progress_updates += [(slot, k, tracker.feed(text)) for k, tracker in row.progress.items()]
        detections = self._detect(slot, row, text, recorded, final) if row.detectors else []
        return TokenEvent(row.request_id, index, token, text, dict(zip(row.tasks, risks, strict=True)),
                          dict(zip(row.tasks, applied, strict=True)), flags, detections)

    def _detect(self, slot: int, row: _Row, text: str, recorded: bool, final: bool) -> list[Detection]:
        """Feed the token's text to the row's detectors: the violations it made certain (each once)."""
        row.length += len(text)
        if recorded:
            row.ends.append(row.length)
        elif row.ends:
            row.ends[-1] = row.length  # text an EOS flushed belongs to the tokens before it
        found = []
        for task, detector in list(row.detectors.items()):
            position = detector.feed(text, final)
            if position is None:
                continue
            del row.detectors[task]
            index = min(bisect.bisect_left(row.ends, position), max(len(row.ends) - 1, 0))
            row.detected[task] = index
            found.append(Detection(task, index))
            if task not in row.tasks:  # detector-only: no probe column to settle or steering to stop
                continue
            self.monitor.settle(slot, task)
            if self.stop_steering_on_detection:
                self._stop_conditional(slot, row, task)
        if final:
            row.detectors.clear()
        return found

    def _stop_conditional(self, slot: int, row: _Row, task: str) -> None:
        k = self.bank.index(task)
        if k not in row.conditional:
            return
        row.conditional.discard(k)
        row.policies[task] = OFF
        remaining = self._steering_layers(row.tasks, row.columns, row.policies)
        self._users.subtract(row.always - remaining)
        row.always = remaining
        self.policies.set(slot, row.policies, {c.task: dict(c.params) for c in row.spec.constraints})

    def finish(self, slot: int, finish_reason: str | None = None, prompt_tokens: int = 0,
               tokens: list[int] | None = None) -> Result:
        """A row ended: its `Result` (verdicts from the end reading, flags and the checker), slot released."""
        return self.finish_all([(slot, finish_reason, prompt_tokens, tokens)])[0]

    def finish_all(self, ended: list[tuple[int, str | None, int, list[int] | None]]) -> list[Result]:
        """Rows that ended in the same pass, as (slot, finish_reason, prompt_tokens, tokens): their `Result`s,
        slots released. The checkers run once for all of them (`check_results`: one MiniLM encode for every
        topic verdict, not one per row), after every slot is free."""
        results = [self._result(*item) for item in ended]
        return check_results(results) if self.check else results

    def _result(self, slot: int, finish_reason: str | None, prompt_tokens: int, tokens: list[int] | None) -> Result:
        row = self._rows[slot]
        tokens = list(row.detok.tokens if tokens is None else tokens)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        probed = tuple(c for c in row.spec.constraints if c.task in row.tasks)
        by_task = {v.task: v for v in build_verdicts(self.monitor, slot, probed, torch.tensor(row.columns,
                                                     dtype=torch.long), text, check=False)}
        verdicts = [by_task.get(c.task) or detector_only_verdict(c) for c in row.spec.constraints]
        for verdict in verdicts:
            verdict.detected_at = row.detected.get(verdict.task)
            if verdict.task in row.out_of_range:  # a scoped probe outside its measured range: muted for this row
                verdict.predicted_violation, verdict.probe_muted = False, True
                verdict.probe_note = row.out_of_range[verdict.task]
        traces = self.monitor.traces_for(slot, row.tasks)
        reason = finish_reason or ("eos" if row.eos else "length")
        result = Result(row.request_id, text, tokens, reason, verdicts, prompt_tokens, dict(row.steered),
                        self.bank.version, traces)
        self.remove(slot)
        return result


@dataclass
class SlotMap:
    """Batch rows -> controller slots for an engine with a persistent batch whose rows are added, removed
    and moved between steps (vLLM's logits-processor `BatchUpdate`): `rows()` is the [B] slot tensor that
    `coefficients` and `observe` take, kept on the device and rebuilt only when membership changed."""

    device: torch.device | str = "cpu"
    slots: list[int | None] = field(default_factory=list)
    _tensor: torch.Tensor | None = None

    def apply(self, added: list[tuple[int, int]] = (), removed: list[int] = (),
              moved: list[tuple[int, int, bool]] = ()) -> None:
        """`added`: (row, slot); `removed`: rows; `moved`: (a, b, swap) -- swap exchanges rows a and b,
        else row a moves to b (a is left empty). Applied in vLLM's order: removed, added, moved."""
        for row in removed:
            self.slots[row] = None
        for row, slot in added:
            if row >= len(self.slots):
                self.slots += [None] * (row + 1 - len(self.slots))
            self.slots[row] = slot
        for a, b, swap in moved:
            if b >= len(self.slots):
                self.slots += [None] * (b + 1 - len(self.slots))
            if swap:
                self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
            else:
                self.slots[b], self.slots[a] = self.slots[a], None
        while self.slots and self.slots[-1] is None:
            self.slots.pop()
        self._tensor = None

    def rows(self) -> torch.Tensor:
        if self._tensor is None:
            if any(s is None for s in self.slots):
                raise ValueError("the batch has empty rows; condense it before a pass")
            self._tensor = torch.tensor(self.slots, dtype=torch.long, device=self.device)
        return self._tensor


def build_verdicts(monitor: Monitor, row: int, constraints: tuple[Constraint, ...], columns: torch.Tensor,
                   text: str, check: bool = True) -> list[Verdict]:
    """Per constraint: the probe's reading at the end (EOS pass, else the last token), flag history and
    (check=True) the checker's verdict on the final text. One host read for the row."""
    k = len(monitor.bank.probes)
    end = torch.cat([monitor.eos_p[row], monitor.last_p[row], monitor.first_flag[row].float(),
                     monitor.ever_flagged[row].float()]).cpu().view(4, k)
    verdicts = []
    for constraint, k in zip(constraints, columns.tolist(), strict=True):
        p_end = float(end[0, k])
        if p_end != p_end:  # no EOS pass (length limit): the last token's reading stands in
            p_end = float(end[1, k])
        first = int(end[2, k])
        probe, muted = monitor.bank.probes[k], bool(monitor.muted[k])
        finite = math.isfinite(p_end)
        verdicts.append(Verdict(constraint.task, dict(constraint.params),
                                not muted and finite and p_end < probe.threshold, p_end if finite else None,
                                bool(end[3, k]), first if first != NO_FLAG else None,
                                check_constraint(constraint, text) if check else None, bool(probe.reliable), muted,
                                probe_note=probe.unreliable_reason() or ""))
    return verdicts


def detector_only_verdict(constraint: Constraint) -> Verdict:
    """The verdict of a constraint served on its detector alone: no probe reading, flags or prediction;
    `detected_at` and the checker's verdict are filled in as for any other."""
    return Verdict(constraint.task, dict(constraint.params), False, None, False, None, None, probe_reliable=False,
                   probe_muted=True, probe_note="no probe in the bank: detector only")


def check_verdicts(result: Result) -> Result:
    """Fill in the checker's verdict on the final text for every constraint of a result (in place)."""
    return check_results([result])[0]


def check_results(results: list[Result]) -> list[Result]:
    """`check_verdicts` for several results (in place): each task's verdicts in one `Task.check_many` call,
    so a batched checker (topic) runs once for all of them. The same verdicts as one result at a time."""
    by_task: dict[str, list[tuple[Verdict, str]]] = {}
    for result in results:
        for verdict in result.verdicts:
            by_task.setdefault(verdict.task, []).append((verdict, result.text))
    for task_id, pairs in by_task.items():
        task = TASKS.get(task_id)
        values = (task.check_many([text for _, text in pairs], [v.params for v, _ in pairs]) if task is not None
                  else [None] * len(pairs))  # no checker for an unknown task (`check_constraint`)
        for (verdict, _), value in zip(pairs, values, strict=True):
            verdict.satisfied = value
    return results
