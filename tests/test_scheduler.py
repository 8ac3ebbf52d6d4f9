"""The scheduler in-process: checkers run off the thread that drives the model, results arrive exactly once."""

from __future__ import annotations

import dataclasses
import queue
import threading

import pytest

from probes.tasks import TASKS
from steerer.constraints import Constraint
from steerer.core import Request, Result, TokenEvent
from steerer.generation import SamplingParams
from steerer.service.scheduler import Scheduler
from steerer.service.testing import placeholder_bank

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
