"""The scheduler in-process: checkers run off the thread that drives the model, results arrive exactly once;
with a fake engine (no model): a crashed pass, a deadline while generating, a probe-bank swap, refusals."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from types import SimpleNamespace

import pytest

from steerer.constraints import Constraint, validate_request
from steerer.core import Request, Result, TokenEvent
from steerer.generation import SamplingParams
from steerer.service.scheduler import Failure, QueueFull, Reason, Scheduler, SchedulerError
from steerer.service.testing import placeholder_bank
from steerer.tasks import TASKS

PROMPT = "Name three colors."


def _request(tokens: int, *constraints: str) -> Request:
    return Request(PROMPT, constraints=tuple(Constraint(c) for c in constraints),
                   sampling=SamplingParams(max_new_tokens=tokens, ignore_eos=True))


def _items(ticket, timeout: float = 120.0) -> list:
    """Everything on a ticket's queue up to and including its Result or Failure."""
    items = []
    while not items or isinstance(items[-1], TokenEvent):
        items.append(ticket.out.get(timeout=timeout))
    return items


class BlockingChecker:
    """A `lowercase` checker that blocks until released and records the thread it ran on."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []
        self.fail = False

    def __call__(self, response: str, params) -> bool:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(120), "never released"
        if self.fail:
            raise RuntimeError("checker bug")
        return True


@pytest.fixture
def checker(monkeypatch) -> BlockingChecker:
    blocking = BlockingChecker()
    monkeypatch.setitem(TASKS, "lowercase", dataclasses.replace(TASKS["lowercase"], checker=blocking))
    return blocking


@pytest.fixture
def scheduler(lm):
    bank = placeholder_bank(lm.fingerprint, lm.hidden_size, "v1")
    scheduler = Scheduler(lm, bank, max_batch=2, max_queue=2, batch_wait_s=0).start()
    yield scheduler
    scheduler.stop(drain=False, timeout=60)


def test_a_slow_checker_does_not_hold_up_generation(scheduler, checker):
    first = scheduler.submit(_request(2, "lowercase"))
    assert checker.entered.wait(120)  # first's check is running, and blocked
    second = scheduler.submit(_request(4))
    tokens = [second.out.get(timeout=120) for _ in range(4)]  # generated while the check still blocks
    assert all(isinstance(t, TokenEvent) for t in tokens)
    assert isinstance(second.out.get(timeout=120), Result)  # nothing to check: not queued behind first
    assert all(isinstance(item, TokenEvent) for item in _drain(first))  # no result before its check ends
    checker.release.set()
    result = _items(first)[-1]
    assert isinstance(result, Result) and result.verdicts[0].satisfied is True
    assert checker.threads == ["steerer-checker_0"]
    assert first.out.empty() and second.out.empty()


def test_a_failing_checker_still_delivers_the_result(scheduler, checker):
    checker.fail = True
    checker.release.set()
    result = _items(scheduler.submit(_request(2, "lowercase", "json_format")))[-1]
    assert isinstance(result, Result)
    verdicts = {v.task: v.satisfied for v in result.verdicts}
    assert verdicts["lowercase"] is None  # unknown: the checker raised


def test_stop_waits_for_pending_checks(scheduler, checker):
    ticket = scheduler.submit(_request(2, "lowercase"))
    assert checker.entered.wait(120)
    stopper = threading.Thread(target=scheduler.stop, kwargs={"drain": True, "timeout": 120})
    stopper.start()
    checker.release.set()
    stopper.join(120)
    items = _items(ticket)
    assert isinstance(items[-1], Result) and items[-1].verdicts[0].satisfied is True
    assert ticket.out.empty()  # exactly one terminal item


def _drain(ticket) -> list:
    items = []
    while True:
        try:
            items.append(ticket.out.get_nowait())
        except queue.Empty:
            return items


def test_admission_comes_in_chunks_while_rows_decode():
    from steerer.service.scheduler import admission_size

    # Idle: the whole wave (up to the free slots) joins in one prefill; nobody is stalled by it.
    assert admission_size(30, 32, False, 8, 0.0, 0.05) == 30
    assert admission_size(40, 32, False, 8, 0.0, 0.05) == 32
    # Decoding: at most one chunk per step boundary, and never more than the free slots.
    assert admission_size(30, 32, True, 8, 1.0, 0.05) == 8
    assert admission_size(30, 3, True, 8, 1.0, 0.05) == 3
    # A partial chunk waits for company until its oldest request has waited admit_wait_s ...
    assert admission_size(2, 32, True, 8, 0.01, 0.05) == 0
    assert admission_size(2, 32, True, 8, 0.06, 0.05) == 2
    # ... unless it fills the free slots anyway.
    assert admission_size(2, 2, True, 8, 0.0, 0.05) == 2
    assert admission_size(0, 32, True, 8, 9.0, 0.05) == 0


# -- a fake engine: the scheduler's crash, deadline and swap paths without a model ------------------------------
FAKE_LM = SimpleNamespace(fingerprint="fake-model", hidden_size=8)
LONG = 8000  # tokens: a request that is still generating when the test acts on it


class FakeSteerer:
    """What the scheduler drives, without a model: each step gives every request in flight one token; a
    request ends after `max_new_tokens`. `crash` makes the next step raise; `step_s` slows each step."""

    def __init__(self, bank, capacity: int = 2, step_s: float = 0.0):
        self.bank = bank
        self.capacity = capacity
        self.step_s = step_s
        self.crash = False
        self.closed = False
        self.cancelled: list[str] = []
        self.live: dict[str, list] = {}  # request id -> [request, tokens produced]

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.live)

    @property
    def in_flight(self) -> int:
        return len(self.live)

    def validate(self, request: Request) -> None:
        validate_request(request, self.bank.tasks)

    def admit(self, requests) -> list[Result]:
        for request in requests:
            self.validate(request)
            self.live[request.id] = [request, 0]
        return []

    def drain(self) -> list[TokenEvent]:
        return []

    def step(self):
        if self.crash:
            raise RuntimeError("the device fell over")
        time.sleep(self.step_s)
        events, results = [], []
        for rid, entry in list(self.live.items()):
            request, n = entry
            events.append(TokenEvent(rid, n, 7, "x", {}, {}))
            entry[1] = n + 1
            if entry[1] >= request.sampling.max_new_tokens:
                del self.live[rid]
                results.append(Result(rid, "x" * entry[1], [7] * entry[1], "length", [], 1, {}, self.bank.version))
        return events, results

    def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        return self.live.pop(request_id, None) is not None

    def close(self) -> None:
        self.closed = True


class FakeFactory:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.made: list[FakeSteerer] = []

    def __call__(self, bank) -> FakeSteerer:
        self.made.append(FakeSteerer(bank, **self.kwargs))
        return self.made[-1]


def _fake_scheduler(factory: FakeFactory, version: str = "v1", **kwargs) -> Scheduler:
    bank = placeholder_bank(FAKE_LM.fingerprint, FAKE_LM.hidden_size, version)
    options = dict(max_batch=2, max_queue=2, batch_wait_s=0, steerer_factory=factory) | kwargs
    return Scheduler(FAKE_LM, bank, **options).start()


def _terminal(ticket, timeout: float = 30.0):
    return _items(ticket, timeout)[-1]


def test_fake_engine_runs_requests_to_their_results():
    factory = FakeFactory()
    scheduler = _fake_scheduler(factory)
    try:
        items = _items(scheduler.submit(_request(3, "lowercase")))
        assert [type(i) for i in items] == [TokenEvent] * 3 + [Result]
        assert items[-1].bank_version == "v1"
    finally:
        scheduler.stop(timeout=30)
    assert len(factory.made) == 1 and factory.made[0].closed


def test_a_crashed_pass_fails_requests_in_flight_and_recovers_with_a_fresh_steerer():
    factory = FakeFactory(step_s=0.001)
    scheduler = _fake_scheduler(factory)
    try:
        doomed = [scheduler.submit(_request(LONG)) for _ in range(2)]
        assert isinstance(doomed[0].out.get(timeout=30), TokenEvent)  # generating
        first = factory.made[0]
        first.crash = True
        for ticket in doomed:
            failure = _terminal(ticket)
            assert isinstance(failure, Failure) and failure.reason is Reason.INTERNAL
            assert "RuntimeError" in failure.message
        assert first.closed and len(factory.made) == 2  # a fresh steerer, on the same bank
        assert factory.made[1].bank is first.bank
        result = _terminal(scheduler.submit(_request(2)))
        assert isinstance(result, Result) and result.bank_version == "v1"
    finally:
        scheduler.stop(timeout=30)


def test_a_deadline_that_passes_while_generating_fails_the_request_and_frees_its_slot():
    factory = FakeFactory(step_s=0.002)
    scheduler = _fake_scheduler(factory)
    try:
        ticket = scheduler.submit(_request(LONG), deadline=time.monotonic() + 0.2)
        other = scheduler.submit(_request(5))
        failure = _terminal(ticket)
        assert isinstance(failure, Failure) and failure.reason is Reason.DEADLINE
        # gRPC's own wording, so a client reads one phrase whichever clock fired first (the CI flake of stop 29)
        assert failure.message == "Deadline Exceeded during generation"
        assert ticket.id in factory.made[0].cancelled and ticket.id not in factory.made[0].live
        assert isinstance(_terminal(other), Result)
        late = scheduler.submit(_request(5), deadline=time.monotonic() - 1)  # expired before admission
        expired = _terminal(late)
        assert expired.reason is Reason.DEADLINE and expired.message == "Deadline Exceeded while queued"
    finally:
        scheduler.stop(timeout=30)


def test_a_bank_swap_waits_for_requests_in_flight_and_later_ones_run_on_the_new_bank():
    factory = FakeFactory(step_s=0.002)
    scheduler = _fake_scheduler(factory)
    try:
        old = scheduler.submit(_request(500))
        assert isinstance(old.out.get(timeout=30), TokenEvent)
        new_bank = placeholder_bank(FAKE_LM.fingerprint, FAKE_LM.hidden_size, "v2")
        outcome: dict = {}
        reloader = threading.Thread(target=lambda: outcome.update(previous=scheduler.reload(new_bank, timeout=30)))
        reloader.start()
        deadline = time.monotonic() + 30
        while scheduler._swap is None:  # the swap is pending
            assert time.monotonic() < deadline
            time.sleep(0.001)
        with pytest.raises(SchedulerError) as busy:
            scheduler.reload(new_bank, timeout=1)
        assert busy.value.reason is Reason.ABORTED
        later = scheduler.submit(_request(2))  # queued: nothing is admitted while a swap waits
        assert _terminal(old).bank_version == "v1"
        reloader.join(30)
        assert outcome == {"previous": "v1"}
        assert _terminal(later).bank_version == "v2"
        assert [s.bank.version for s in factory.made] == ["v1", "v2"] and factory.made[0].closed
        assert scheduler.bank is new_bank
    finally:
        scheduler.stop(timeout=30)


def test_a_swap_whose_steerer_cannot_be_built_keeps_the_old_bank():
    factory = FakeFactory()
    scheduler = _fake_scheduler(factory)

    def flaky(bank):
        if bank.version == "broken":
            raise RuntimeError("cannot attach")
        return factory(bank)

    scheduler._factory = flaky
    try:
        with pytest.raises(RuntimeError, match="cannot attach"):
            scheduler.reload(placeholder_bank(FAKE_LM.fingerprint, FAKE_LM.hidden_size, "broken"), timeout=30)
        assert scheduler.bank.version == "v1"
        assert _terminal(scheduler.submit(_request(2))).bank_version == "v1"
    finally:
        scheduler.stop(timeout=30)


def test_refusals_carry_their_reason():
    factory = FakeFactory(step_s=0.002)
    scheduler = _fake_scheduler(factory, max_queue=0, max_batch=1)
    try:
        running = scheduler.submit(_request(LONG))
        assert isinstance(running.out.get(timeout=30), TokenEvent)
        with pytest.raises(QueueFull) as full:
            scheduler.submit(_request(2))
        assert full.value.reason is Reason.BUSY
        invalid = Request("Hi", constraints=(Constraint("no_such_task"),))
        with pytest.raises(ValueError, match="unknown task"):
            scheduler.validate(invalid)
        scheduler.cancel(running)
    finally:
        scheduler.stop(timeout=30)
    with pytest.raises(SchedulerError) as stopped:
        scheduler.submit(_request(2))
    assert stopped.value.reason is Reason.SHUTTING_DOWN


def test_the_servicer_maps_every_reason_to_a_status_code():
    from steerer.service.servicer import STATUS_OF

    assert set(STATUS_OF) == set(Reason)
    assert len(set(STATUS_OF.values())) == len(Reason)


class GatedAdmission:
    """The real `Steerer`, whose `admit` (the prefill) waits for `release`: a long admission the test holds
    open to read the gauges during it."""

    def __init__(self, steerer) -> None:
        self._steerer = steerer
        self.entered = threading.Event()
        self.release = threading.Event()

    def admit(self, requests):
        self.entered.set()
        assert self.release.wait(120), "never released"
        return self._steerer.admit(requests)

    def __getattr__(self, name):
        return getattr(self._steerer, name)


def test_gauges_count_a_wave_while_it_is_being_admitted(lm):
    """Both gauges once read 0 for seconds while a wave was prefilled; every submitted request is in the
    batch (admitted or being admitted) or in the queue until its result."""
    from steerer.core import Steerer
    from steerer.metrics import Metrics

    metrics = Metrics()
    gates: list[GatedAdmission] = []

    def factory(bank):
        gates.append(GatedAdmission(Steerer(lm, bank, capacity=4, check=False)))
        return gates[-1]

    bank = placeholder_bank(lm.fingerprint, lm.hidden_size, "v1")
    scheduler = Scheduler(lm, bank, max_batch=4, max_queue=4, batch_wait_s=0, metrics=metrics,
                          steerer_factory=factory).start()

    def gauge(name: str) -> float:
        return metrics.registry.get_sample_value(name)

    try:
        tickets = [scheduler.submit(_request(2))]
        assert gates[0].entered.wait(60)  # the first admission is under way, and held
        tickets += [scheduler.submit(_request(2)) for _ in range(5)]
        assert gauge("steerer_batch_size") >= 1
        assert gauge("steerer_batch_size") + gauge("steerer_queue_depth") == 6
        gates[0].release.set()
        assert all(isinstance(_terminal(t, 120), Result) for t in tickets)
        wait_until = time.monotonic() + 30
        while gauge("steerer_batch_size") and time.monotonic() < wait_until:
            time.sleep(0.05)
        assert gauge("steerer_batch_size") == 0 and gauge("steerer_queue_depth") == 0
    finally:
        gates[0].release.set()
        scheduler.stop(drain=False, timeout=60)
