"""`Steerer`: a model plus a probe bank, generating with live monitoring and per-request steering.

One `Steerer` owns one set of hooks (taps and steering at the bank's layers), a `Monitor`, a
`PolicyTable` and a `RunningBatch`. `admit()` adds requests between steps and `step()` runs one pass for
everything in flight, so the same object serves a static batch (`generate`, `run`) and the gRPC
scheduler's continuous batching. Per pass: policy -> alphas (from the previous pass's flags/risk) ->
forward with taps and steering -> probe scores -> risk, flags -> token events.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from steerer.bank import ProbeBank
from steerer.constraints import Constraint, check_constraint
from steerer.engine.hf import HFEngine
from steerer.generation import Generation, RunningBatch, SamplingParams, StepView
from steerer.model import LoadedModel, chat_prompt
from steerer.monitor import FlagEvent, Monitor, MonitorConfig
from steerer.policy import OFF, PolicyTable, SteeringPolicy
from steerer.taps import LayerHooks, Where


@dataclass(frozen=True)
class Request:
    prompt: str | list[dict]  # a user message, or chat messages
    constraints: tuple[Constraint, ...] = ()
    policy: SteeringPolicy = OFF  # applies to every constraint without its own entry in `policies`
    policies: dict[str, SteeringPolicy] = field(default_factory=dict)
    sampling: SamplingParams = SamplingParams()
    id: str | None = None
    system: str | None = None

    def policy_for(self, task: str) -> SteeringPolicy:
        return self.policies.get(task, self.policy)


@dataclass
class TokenEvent:
    request_id: str
    index: int  # position of this token in the response
    token_id: int
    text: str  # the text this token adds
    risks: dict[str, float]  # smoothed risk per constraint after reading the previous token
    steering: dict[str, float]  # alpha applied per constraint in the pass that chose this token
    flags: list[FlagEvent] = field(default_factory=list)


@dataclass
class Verdict:
    task: str
    params: dict
    predicted_violation: bool  # from the probe at the end of the response (EOS residual); False if muted
    p_satisfied_end: float | None  # the probe's reading there (None if it is not a finite number)
    flagged: bool  # a flag was raised at some point during generation (never for a muted probe)
    first_flag_token: int | None
    satisfied: bool | None  # the checker's verdict on the final text (None if not checkable)
    probe_reliable: bool = True  # the bank marks the probe reliable (its AUROC interval clears chance)
    probe_muted: bool = False  # unreliable and not overridden: no prediction, no flags, no steering


@dataclass
class Result:
    request_id: str
    text: str
    tokens: list[int]
    finish_reason: str
    verdicts: list[Verdict]
    prompt_tokens: int
    steered_tokens: dict[str, int]
    bank_version: str
    traces: dict[str, list[float]] | None = None  # per-token P(satisfied) per task (record=True only)


@dataclass
class _Live:
    request: Request
    request_id: str
    tasks: list[str]
    columns: torch.Tensor
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    steered: dict[str, int] = field(default_factory=dict)


class Steerer:
    """Generate with monitoring and steering. See the module docstring."""

    def __init__(self, lm: LoadedModel, bank: ProbeBank, monitor_config: MonitorConfig | None = None,
                 capacity: int = 128, where: Where = Where.GENERATED, record: bool = False,
                 check_bank: bool = True, check: bool = True, use_unreliable_probes: bool = False):
        if check_bank:
            bank.check_model(lm.fingerprint, lm.hidden_size)
        self.lm = lm
        self.bank = bank
        # check=False leaves Verdict.satisfied None for the caller to fill with `check_verdicts`: the server
        # runs checkers (a MiniLM embedder for topic) off the thread that drives the model.
        self.check = check
        self.capacity = capacity
        # Probes whose measured reliability does not clear chance neither flag nor steer, unless overridden.
        self.muted = bank.muted(use_unreliable_probes)
        self.monitor = Monitor(bank, monitor_config or MonitorConfig(), capacity, record=record, muted=self.muted)
        self.policies = PolicyTable(bank, capacity, where, muted=self.muted)
        self.hooks = LayerHooks(lm.model, tap_layers=bank.layers, steering=self.policies.steering).attach()
        self.engine = HFEngine(lm, self.hooks)
        self.batch = RunningBatch(self.engine, self, tap_eos=True)
        self._free = list(range(capacity - 1, -1, -1))
        self._live: dict[int, _Live] = {}
        self._pending: list[TokenEvent] = []
        self._applied = torch.zeros(capacity, len(bank.probes))
        self._ids = itertools.count()

    def close(self) -> None:
        self.hooks.remove()

    def __enter__(self) -> Steerer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # -- requests in and out ---------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Raise ValueError (with a message for the user) if the request cannot run on this bank."""
        request.sampling.validate()
        if isinstance(request.prompt, str) and not request.prompt.strip():
            raise ValueError("prompt is empty")
        for constraint in request.constraints:
            constraint.validate()
            if constraint.task not in self.bank.tasks:
                raise ValueError(f"the probe bank has no probe for task {constraint.task!r}")
        tasks = [c.task for c in request.constraints]
        if len(set(tasks)) != len(tasks):
            raise ValueError("each task may appear once per request")
        unknown = set(request.policies) - set(tasks)
        if unknown:
            raise ValueError(f"steering policies name tasks without a constraint: {', '.join(sorted(unknown))}")

    def admit(self, requests: Iterable[Request]) -> list[Result]:
        """Prefill requests and add them to the running batch. Returns any that finished at once."""
        requests = list(requests)
        if len(requests) > len(self._free):
            raise RuntimeError(f"only {len(self._free)} free slots for {len(requests)} requests")
        slots, prompts = [], []
        for request in requests:
            self.validate(request)
            slot = self._free.pop()
            tasks = [c.task for c in request.constraints]
            self.monitor.register(slot, tasks)
            self.policies.set(slot, {t: request.policy_for(t) for t in tasks})
            columns = torch.tensor([self.bank.index(t) for t in tasks], dtype=torch.long)
            rid = request.id or f"req-{next(self._ids)}"
            self._live[slot] = _Live(request, rid, tasks, columns, steered=dict.fromkeys(tasks, 0))
            slots.append(slot)
            prompts.append(chat_prompt(self.lm.tokenizer, request.prompt, request.system))
        finished = self.batch.add(slots, prompts, [r.sampling for r in requests])
        return [self._finish(g) for g in finished]

    def step(self) -> tuple[list[TokenEvent], list[Result]]:
        """One pass for every request in flight: the token events it produced and the results it ended."""
        finished = self.batch.step()
        return self.drain(), [self._finish(g) for g in finished]

    def drain(self) -> list[TokenEvent]:
        events, self._pending = self._pending, []
        return events

    def cancel(self, request_id: str) -> bool:
        """Drop a request in flight (client went away); its slot is free before the next pass."""
        for slot, live in self._live.items():
            if live.request_id == request_id:
                self.batch.remove([slot])
                self._release(slot)
                return True
        return False

    def generate(self, requests: Iterable[Request], max_batch: int | None = None) -> Iterator[TokenEvent | Result]:
        """Run requests to completion in shared batches, yielding token events and final results."""
        queue = list(requests)
        max_batch = min(max_batch or self.capacity, self.capacity)
        while queue or self.in_flight:
            room = min(max_batch - self.in_flight, len(self._free))
            if queue and room > 0:
                admitted, queue = queue[:room], queue[room:]
                done = self.admit(admitted)
                yield from self.drain()
                yield from done
            events, done = self.step()
            yield from events
            yield from done

    def run(self, requests: Iterable[Request], max_batch: int | None = None) -> list[Result]:
        requests = list(requests)
        by_id = {r.request_id: r for r in self.generate(requests, max_batch) if isinstance(r, Result)}
        order = [r.id for r in requests]
        if all(order):
            return [by_id[i] for i in order]
        return sorted(by_id.values(), key=lambda r: int(r.request_id.rsplit("-", 1)[-1]))

    # -- StepHooks -----------------------------------------------------------------------------------
    def before_forward(self, rows: list[int], index: torch.Tensor) -> None:
        slots = torch.as_tensor(rows, dtype=torch.long)
        flags = self.monitor.flags[slots]
        risk = self.monitor.smoothed[slots]
        coeffs = self.policies.coefficients(slots, flags, risk)
        coeffs = torch.where(index[:, None] >= 0, coeffs, torch.zeros_like(coeffs)) \
            if self.policies.where is Where.GENERATED else coeffs
        self.policies.apply(coeffs)
        self._applied[slots] = coeffs

    def after_forward(self, view: StepView) -> None:
        self.monitor.after_forward(view)
        flag_events: dict[int, list[FlagEvent]] = {}
        for event in self.monitor.drain_events():
            flag_events.setdefault(event.row, []).append(event)
        risks = self.monitor.smoothed
        tokenizer = self.lm.tokenizer
        closing = view.closing.tolist()
        recorded = view.recorded.tolist()
        tokens = view.tokens.tolist()
        for i, slot in enumerate(view.rows):
            if closing[i]:
                continue
            live = self._live[slot]
            applied = self._applied[slot, live.columns].tolist()
            for task, alpha in zip(live.tasks, applied, strict=True):
                live.steered[task] += alpha != 0
            text = ""
            if recorded[i]:
                live.tokens.append(tokens[i])
                full = tokenizer.decode(live.tokens, skip_special_tokens=True)
                text, live.text = full[len(live.text):], full
            index = len(live.tokens) - 1 if recorded[i] else len(live.tokens)
            self._pending.append(TokenEvent(
                live.request_id, index, tokens[i], text,
                dict(zip(live.tasks, risks[slot, live.columns].tolist(), strict=True)),
                dict(zip(live.tasks, applied, strict=True)), flag_events.get(slot, [])))

    # -- internals -----------------------------------------------------------------------------------
    def _finish(self, generation: Generation) -> Result:
        slot = generation.row
        live = self._live[slot]
        text = self.lm.tokenizer.decode(generation.tokens, skip_special_tokens=True)
        verdicts = build_verdicts(self.monitor, slot, live.request.constraints, live.columns, text, self.check)
        traces = self.monitor.traces_for(slot, live.tasks)
        result = Result(live.request_id, text, generation.tokens, generation.finish_reason, verdicts,
                        generation.prompt_tokens, live.steered, self.bank.version, traces)
        self._release(slot)
        return result

    def _release(self, slot: int) -> None:
        self._live.pop(slot, None)
        self._free.append(slot)


def build_verdicts(monitor: Monitor, row: int, constraints: tuple[Constraint, ...], columns: torch.Tensor,
                   text: str, check: bool = True) -> list[Verdict]:
    """Per constraint: the probe's reading at the end (EOS pass, else the last token), flag history and
    (check=True) the checker's verdict on the final text."""
    verdicts = []
    for constraint, k in zip(constraints, columns.tolist(), strict=True):
        p_end = float(monitor.eos_p[row, k])
        if p_end != p_end:  # no EOS pass (length limit): the last token's reading stands in
            p_end = float(monitor.last_p[row, k])
        first = int(monitor.first_flag[row, k])
        probe, muted = monitor.bank.probes[k], bool(monitor.muted[k])
        finite = math.isfinite(p_end)
        verdicts.append(Verdict(constraint.task, dict(constraint.params),
                                not muted and finite and p_end < probe.threshold, p_end if finite else None,
                                bool(monitor.ever_flagged[row, k]), first if first >= 0 else None,
                                check_constraint(constraint, text) if check else None, bool(probe.reliable), muted))
    return verdicts


def check_verdicts(result: Result) -> Result:
    """Fill in the checker's verdict on the final text for every constraint of a result (in place)."""
    for verdict in result.verdicts:
        verdict.satisfied = check_constraint(Constraint(verdict.task, verdict.params), result.text)
    return result


def results_as_dict(result: Result) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(result)
