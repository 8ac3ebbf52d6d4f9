"""`Steerer`: a model plus a probe bank, generating with live monitoring and per-request steering.

A `Steerer` is the transformers backend (`steerer.backend.Backend`): the generation loop (`RunningBatch` over
an `Engine`, `HFEngine` unless one is injected) whose passes go to a `steerer.driver.Driver`, the one loop every
engine shares, over a `Controller`, which owns the per-request state: slots, monitor, policies, token events,
results. `admit()` adds requests between steps and `step()` runs one pass for everything in
flight, so the same object serves a static batch (`generate`, `run`) and the gRPC scheduler's continuous
batching. Per pass: policy -> coefficients (from the previous pass's flags/risk) -> forward with taps and
steering -> probe scores -> risk, flags -> one host transfer -> token events.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from steerer import backend
from steerer.bank import ProbeBank
from steerer.controller import Controller, build_verdicts, check_verdicts
from steerer.driver import Driver, Options
from steerer.engine.base import Engine
from steerer.generation import Generation, RunningBatch, StepView
from steerer.lens import lens_for
from steerer.model import LoadedModel, chat_prompt
from steerer.monitor import Monitor, MonitorConfig
from steerer.policy import PolicyTable
from steerer.request import Detection, Request, Result, SamplingParams, TokenEvent, Verdict
from steerer.taps import Where

__all__ = ["Detection", "Request", "Result", "SamplingParams", "Steerer", "TokenEvent", "Verdict", "build_verdicts",
           "check_verdicts", "results_as_dict"]


class Steerer:
    """Generate with monitoring and steering: the transformers backend (`steerer.backend.Backend`). See the
    module docstring.

    `engine`: the engine (default `HFEngine(lm)` on the model's device); the Steerer installs its taps and
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
        self.options = Options(capacity, monitor_config, Where(where), record, check, use_unreliable_probes,
                               stop_steering_on_detection)
        self.driver = Driver.build(bank, lm.tokenizer, engine.eos_token_ids, self.options, device=self.device,
                                   lens=lens_for(bank, lm.model))
        self.driver.can_guard = True  # the loop vets its draws (`RunningBatch` -> `guard`)
        self.controller: Controller = self.driver.controller
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
        return self.driver.in_flight

    @property
    def free_slots(self) -> int:
        return self.driver.free_slots

    # -- requests in and out ---------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Raise ValueError (with a message for the user) if the request cannot run on this bank. The one
        request validation (prompt, sampling, constraints, bank), remembered: `admit` does not repeat it."""
        self.driver.validate(request)

    def admit(self, requests: Iterable[Request]) -> list[Result]:
        """Prefill requests and add them to the running batch (all or none). Returns any that finished at once."""
        requests = list(requests)
        slots = self.driver.join_all(requests)  # EOS and length are the batch's to decide (on the device)
        prompts = [chat_prompt(self.lm.tokenizer, r.prompt, r.system) for r in requests]
        finished = self.batch.add(slots, prompts, [r.sampling for r in requests])
        return self._finish_all(finished)

    def step(self) -> tuple[list[TokenEvent], list[Result]]:
        """One pass for every request in flight: the token events it produced and the results it ended."""
        finished = self.batch.step()
        return self.drain(), self._finish_all(finished)

    def drain(self) -> list[TokenEvent]:
        events, self._pending = self._pending, []
        return events

    def cancel(self, request_id: str) -> bool:
        """Drop a request in flight (client went away); its slot is free before the next pass."""
        slot = self.driver.slot_of(request_id)
        if slot is None:
            return False
        self.batch.remove([slot])
        self.driver.leave(slot)
        return True

    def generate(self, requests: Iterable[Request], max_batch: int | None = None) -> Iterator[TokenEvent | Result]:
        """Run requests to completion in shared batches, yielding token events and final results."""
        return backend.generate(self, requests, max_batch)

    def run(self, requests: Iterable[Request], max_batch: int | None = None) -> list[Result]:
        return backend.run(self, requests, max_batch)

    # -- StepHooks: the generation loop's passes go to the driver ----------------------------------------
    def _slots(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def before_forward(self, rows: list[int], index: torch.Tensor) -> None:
        self.driver.before(self._slots(rows), index)

    def after_forward(self, view: StepView) -> None:
        driver = self.driver
        observation = driver.observe(self._slots(view.rows), view.index, view.residuals, view.closing)
        host, readings = view.fetch(*observation.tensors())  # the step's one host transfer
        driver.settle(view.rows, host.index, host.closing, readings)
        pending = self._pending
        for i, slot in enumerate(view.rows):
            if not host.closing[i]:  # EOS and length were decided on the device (`RunningBatch`)
                pending.append(driver.token(slot, host.tokens[i], recorded=host.recorded[i], final=host.finished[i]))

    def guarding(self, rows: list[int]) -> bool:
        return self.driver.guarding(rows)

    def guard(self, rows: list[int], logits: torch.Tensor, tokens: torch.Tensor, redraw) -> torch.Tensor:
        """Veto and redraw tokens a guarded constraint forbids, before they are used (`Driver.guard`)."""
        return self.driver.guard(rows, logits, tokens, redraw)

    # -- internals -----------------------------------------------------------------------------------
    def _finish(self, generation: Generation) -> Result:
        return self._finish_all([generation])[0]

    def _finish_all(self, generations: list[Generation]) -> list[Result]:
        """The rows a pass ended, checked together (one batched checker call per task)."""
        return self.driver.finish_all([(g.row, g.finish_reason, g.prompt_tokens, g.tokens) for g in generations])


def results_as_dict(result: Result) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(result)
