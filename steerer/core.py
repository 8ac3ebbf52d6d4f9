"""`Steerer`: a model plus a probe bank, generating with live monitoring and per-request steering.

A `Steerer` is the transformers generation loop (`RunningBatch` over an `Engine`, `HFEngine` unless one is
injected) driving a `Controller`, which owns the per-request state: slots, monitor, policies, token
events, results. `admit()` adds requests between steps and `step()` runs one pass for everything in
flight, so the same object serves a static batch (`generate`, `run`) and the gRPC scheduler's continuous
batching. Per pass: policy -> coefficients (from the previous pass's flags/risk) -> forward with taps and
steering -> probe scores -> risk, flags -> one host transfer -> token events.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from steerer.bank import ProbeBank
from steerer.constraints import Constraint
from steerer.controller import (
    Controller,
    Detection,
    Result,
    TokenEvent,
    Verdict,
    build_verdicts,
    check_verdicts,
)
from steerer.engine.base import Engine
from steerer.generation import Generation, RunningBatch, SamplingParams, StepView
from steerer.lens import lens_for
from steerer.model import LoadedModel, chat_prompt
from steerer.monitor import Monitor, MonitorConfig
from steerer.policy import OFF, PolicyTable, SteeringPolicy
from steerer.taps import Where

__all__ = ["Detection", "Request", "Result", "Steerer", "TokenEvent", "Verdict", "build_verdicts", "check_verdicts",
           "results_as_dict"]


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


class Steerer:
    """Generate with monitoring and steering. See the module docstring.

    `engine`: the backend (default `HFEngine(lm)` on the model's device); the Steerer installs its taps and
    steering on it and takes them off in `close()`.
    `stop_steering_on_detection`: stop a task's conditional steering once its violation is detected (see
    `Controller`); off by default, so steering goes on shaping the rest of the text.
    """

    def __init__(self, lm: LoadedModel, bank: ProbeBank, monitor_config: MonitorConfig | None = None,
                 capacity: int = 128, where: Where = Where.GENERATED, record: bool = False,
                 check_bank: bool = True, check: bool = True, use_unreliable_probes: bool = False,
                 engine: Engine | None = None, stop_steering_on_detection: bool = False):
        if check_bank:
            bank.check_model(lm.fingerprint, lm.hidden_size)
        self.lm = lm
        self.bank = bank
        # check=False leaves Verdict.satisfied None for the caller to fill with `check_verdicts`: the server
        # runs checkers (a MiniLM embedder for topic) off the thread that drives the model.
        self.check = check
        self.capacity = capacity
        if engine is None:
            from steerer.engine.hf import HFEngine

            engine = HFEngine(lm)
        self.engine = engine
        self.device = torch.device(engine.device)
        self.controller = Controller(bank, lm.tokenizer, capacity=capacity, device=self.device,
                                     monitor_config=monitor_config, where=where, record=record, check=check,
                                     use_unreliable_probes=use_unreliable_probes, lens=lens_for(bank, lm.model),
                                     stop_steering_on_detection=stop_steering_on_detection)
        engine.install(self.controller.tap_layers, self.controller.steering)
        self.batch = RunningBatch(engine, self, tap_eos=True)
        self._pending: list[TokenEvent] = []

    def close(self) -> None:
        self.engine.uninstall()

    def __enter__(self) -> Steerer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def monitor(self) -> Monitor:
        return self.controller.monitor

    @property
    def policies(self) -> PolicyTable:
        return self.controller.policies

    @property
    def muted(self) -> torch.Tensor:
        """[K] bool: the probes that neither flag nor steer here (see `ProbeBank.muted`)."""
        return self.controller.muted

    @property
    def in_flight(self) -> int:
        return self.controller.in_flight

    @property
    def free_slots(self) -> int:
        return self.controller.free_slots

    # -- requests in and out ---------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Raise ValueError (with a message for the user) if the request cannot run on this bank."""
        self.controller.validate(request)  # the one request validation (prompt, sampling, constraints, bank)

    def admit(self, requests: Iterable[Request]) -> list[Result]:
        """Prefill requests and add them to the running batch. Returns any that finished at once."""
        requests = list(requests)
        if len(requests) > self.controller.free_slots:
            raise RuntimeError(f"only {self.controller.free_slots} free slots for {len(requests)} requests")
        for request in requests:
            self.validate(request)
        slots = [self.controller.add(request) for request in requests]
        prompts = [chat_prompt(self.lm.tokenizer, r.prompt, r.system) for r in requests]
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
        slot = self.controller.slot_of(request_id)
        if slot is None:
            return False
        self.batch.remove([slot])
        self.controller.remove(slot)
        return True

    def generate(self, requests: Iterable[Request], max_batch: int | None = None) -> Iterator[TokenEvent | Result]:
        """Run requests to completion in shared batches, yielding token events and final results."""
        queue = list(requests)
        max_batch = min(max_batch or self.capacity, self.capacity)
        while queue or self.in_flight:
            room = min(max_batch - self.in_flight, self.free_slots)
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

    # -- StepHooks: the generation loop drives the controller ------------------------------------------
    def _slots(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def before_forward(self, rows: list[int], index: torch.Tensor) -> None:
        self.controller.coefficients(self._slots(rows), index)

    def after_forward(self, view: StepView) -> None:
        controller = self.controller
        observation = controller.observe(self._slots(view.rows), view.index, view.residuals, view.closing)
        host, readings = view.fetch(*observation.tensors())  # the step's one host transfer
        controller.settle(view.rows, host.index, host.closing, readings)
        pending = self._pending
        for i, slot in enumerate(view.rows):
            if not host.closing[i]:
                pending.append(controller.token(slot, host.tokens[i], host.recorded[i], host.finished[i]))

    # -- internals -----------------------------------------------------------------------------------
    def _finish(self, generation: Generation) -> Result:
        return self.controller.finish(generation.row, generation.finish_reason, generation.prompt_tokens,
                                      generation.tokens)


def results_as_dict(result: Result) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(result)
