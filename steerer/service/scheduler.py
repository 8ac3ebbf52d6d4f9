"""Continuous batching for the server: one thread owns the `Steerer`; RPC threads only talk to queues.

The `Steerer` is not thread-safe, so a single scheduler thread drives it. RPC threads `submit()` a
request to a bounded FIFO (once the batch is full and `max_queue` more wait, `QueueFull`: the servicer's
RESOURCE_EXHAUSTED) and read their ticket's output queue: `TokenEvent`s, then one `Result` or `Failure`.
Between two forward passes the scheduler admits as many waiting requests as there are free slots, in one
shared prefill, and they join the running batch: concurrent clients share forward passes instead of
queuing behind each other.

Cancellation (the client went away, or its deadline passed) frees the request's slot before the next
pass. A probe-bank swap stops admission, lets the requests in flight finish on the old bank, then
replaces the `Steerer` and resumes, so every response is produced by exactly one bank version.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import grpc
import torch

from steerer.bank import ProbeBank
from steerer.core import Request, Result, Steerer, TokenEvent
from steerer.model import LoadedModel
from steerer.monitor import MonitorConfig
from steerer.service.metrics import Metrics

log = logging.getLogger("steerer.service")


class SchedulerError(Exception):
    """A request the scheduler refuses; `code` is the gRPC status the caller should see."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class QueueFull(SchedulerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Failure:
    """A request ended without a result."""

    code: grpc.StatusCode
    message: str


@dataclass(eq=False)  # tickets compare by identity (deque.remove)
class Ticket:
    request: Request  # its `id` is the scheduler's own, unique; clients' ids may collide
    arrived: float  # time.monotonic() when the RPC arrived
    deadline: float | None = None  # time.monotonic() after which the request is abandoned
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # TokenEvent*, then Result | Failure
    bank_version: str | None = None
    cancelled: bool = False
    done: bool = False

    @property
    def id(self) -> str:
        return self.request.id


@dataclass
class _Swap:
    bank: ProbeBank
    finished: threading.Event = field(default_factory=threading.Event)
    previous: str | None = None
    error: BaseException | None = None


class Scheduler:
    def __init__(self, lm: LoadedModel, bank: ProbeBank, *, max_batch: int = 32, max_queue: int = 64,
                 batch_wait_s: float = 0.005, metrics: Metrics | None = None,
                 monitor_config: MonitorConfig | None = None, threads: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.lm = lm
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics or Metrics()
        self.monitor_config = monitor_config
        # torch's intra-op thread count is per OS thread: the scheduler thread must set it itself, or it
        # runs with whatever a fresh thread gets instead of what the process was configured with.
        self.threads = threads or torch.get_num_threads()
        self._steerer = Steerer(lm, bank, monitor_config, capacity=max_batch)
        self.bank = bank  # the bank new requests will run on; replaced when a swap completes
        self._queue: deque[Ticket] = deque()
        self._live: dict[str, Ticket] = {}
        self._cancels: list[Ticket] = []
        self._swap: _Swap | None = None
        self._stopping = False
        self._abort = False
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="steerer-scheduler", daemon=True)
        self.metrics.set_bank(bank.version, bank.model, bank.tasks)

    # -- API for RPC threads ---------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def validate(self, request: Request) -> None:
        """ValueError with a user-facing message if the request cannot run on the current bank."""
        self._steerer.validate(request)  # reads only the request and the (immutable) bank

    def submit(self, request: Request, arrived: float | None = None, deadline: float | None = None) -> Ticket:
        """Queue a request; raises QueueFull past `max_queue` waiting, SchedulerError when stopping."""
        with self._cv:
            if self._stopping:
                raise SchedulerError("the server is shutting down")
            # Requests the next step boundary will admit into free slots do not count against the queue.
            free = max(0, self.max_batch - len(self._live)) if self._swap is None else 0
            if len(self._queue) >= self.max_queue + free:
                raise QueueFull(f"server busy: {len(self._queue)} requests wait for a slot (at most {self.max_queue} "
                                f"beyond a full batch of {self.max_batch}); retry later")
            ticket = Ticket(replace(request, id=f"q{next(self._ids)}"), arrived or time.monotonic(), deadline)
            self._queue.append(ticket)
            self.metrics.queue_depth.set(len(self._queue))
            self._cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client is gone: drop the request (queued now, in flight before the next pass)."""
        with self._cv:
            if ticket.done or ticket.cancelled:
                return
            ticket.cancelled = True
            try:
                self._queue.remove(ticket)
                ticket.done = True
                self.metrics.queue_depth.set(len(self._queue))
            except ValueError:
                self._cancels.append(ticket)
                self._cv.notify()

    def reload(self, bank: ProbeBank, timeout: float | None = None) -> str:
        """Swap in `bank` once the requests in flight finish; returns the previous version.

        Raises BankError for a bank of another model, SchedulerError if a swap is already pending or this
        one did not complete within `timeout` (it still completes later).
        """
        bank.check_model(self.lm.fingerprint, self.lm.hidden_size)
        swap = _Swap(bank)
        with self._cv:
            if self._stopping:
                raise SchedulerError("the server is shutting down")
            if self._swap is not None:
                raise SchedulerError("another probe-bank reload is in progress", grpc.StatusCode.ABORTED)
            self._swap = swap
            self._cv.notify()
        if not swap.finished.wait(timeout):
            raise SchedulerError("the reload waits for requests in flight to finish; it will complete later",
                                 grpc.StatusCode.DEADLINE_EXCEEDED)
        if swap.error is not None:
            raise swap.error
        return swap.previous or ""

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the thread: after the queue and batch empty (drain) or at once (their requests fail)."""
        with self._cv:
            self._stopping = True
            self._abort = self._abort or not drain
            self._cv.notify()
        if self._thread.ident is None:  # never started: nothing to drain, just take the hooks off the model
            self._steerer.close()
        elif self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._live)

    # -- the scheduler thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        try:
            while self._cycle():
                pass
        except BaseException:  # never leave RPC threads waiting forever on a dead scheduler
            log.exception("scheduler thread died")
            raise
        finally:
            with self._cv:
                self._stopping = True
                waiting, self._queue = list(self._queue), deque()
            for ticket in [*waiting, *self._live.values()]:
                self._fail(ticket, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            self._live.clear()
            self._steerer.close()
            self._gauges()

    def _cycle(self) -> bool:
        with self._cv:
            while not (self._queue or self._live or self._cancels or self._swap or self._stopping):
                self._cv.wait()
            if self._stopping and (self._abort or not (self._live or self._queue)):
                return False
            cancels, self._cancels = self._cancels, []
        for ticket in cancels:
            if self._live.pop(ticket.id, None) is not None:
                self._steerer.cancel(ticket.id)
                ticket.done = True
        self._expire()
        if self._swap is not None and not self._live:
            self._do_swap(self._swap)
        if self._swap is None:
            self._admit()
        if self._live:
            self.metrics.step_batch.observe(len(self._live))
            try:
                events, results = self._steerer.step()
            except Exception as exc:
                self._crash(exc)
            else:
                self._route(events, results)
        self._gauges()
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t in self._live.values() if t.deadline is not None and now >= t.deadline]:
            del self._live[ticket.id]
            self._steerer.cancel(ticket.id)
            self._fail(ticket, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded during generation")

    def _admit(self) -> None:
        room = self._steerer.free_slots
        if room <= 0:
            return
        with self._cv:
            if not self._queue:
                return
            if not self._live and self.batch_wait_s > 0:
                # Idle: clients that arrive together (a burst, or a wave of resubmissions) share one
                # prefill and then stay in step, instead of splitting into a batch of one and the rest.
                end = time.monotonic() + self.batch_wait_s
                while len(self._queue) < room and not self._stopping and not self._cancels:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            picked = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            self.metrics.queue_depth.set(len(self._queue))
        now = time.monotonic()
        ready = []
        for ticket in picked:
            if ticket.deadline is not None and now >= ticket.deadline:
                self._fail(ticket, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while queued")
                continue
            try:  # again: the bank may have changed since the RPC thread checked
                self._steerer.validate(ticket.request)
            except ValueError as exc:
                self._fail(ticket, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                continue
            ticket.bank_version = self._steerer.bank.version
            self._live[ticket.id] = ticket
            ready.append(ticket)
        if not ready:
            return
        try:
            results = self._steerer.admit([t.request for t in ready])
        except Exception as exc:
            self._crash(exc)
            return
        self._route(self._steerer.drain(), results)

    def _route(self, events: list[TokenEvent], results: list[Result]) -> None:
        live = self._live
        for event in events:
            ticket = live.get(event.request_id)
            if ticket is not None:
                ticket.out.put(event)
        for result in results:
            ticket = live.pop(result.request_id, None)
            if ticket is not None:
                ticket.done = True
                ticket.out.put(result)

    def _fail(self, ticket: Ticket, code: grpc.StatusCode, message: str) -> None:
        if not ticket.done:
            ticket.done = True
            ticket.out.put(Failure(code, message))

    def _crash(self, exc: Exception) -> None:
        """A pass failed: fail the requests in flight and start over with a fresh Steerer (same bank)."""
        log.error("generation pass failed; failing %d requests in flight", len(self._live), exc_info=exc)
        for ticket in self._live.values():
            self._fail(ticket, grpc.StatusCode.INTERNAL, f"generation failed: {type(exc).__name__}")
        self._live.clear()
        bank = self._steerer.bank
        self._steerer.close()
        self._steerer = Steerer(self.lm, bank, self.monitor_config, capacity=self.max_batch)

    def _do_swap(self, swap: _Swap) -> None:
        old = self._steerer
        old.close()  # its hooks must be off the model before the new Steerer attaches its own
        try:
            self._steerer = Steerer(self.lm, swap.bank, self.monitor_config, capacity=self.max_batch)
        except Exception as exc:
            swap.error = exc
            self._steerer = Steerer(self.lm, old.bank, self.monitor_config, capacity=self.max_batch)
            self.metrics.reloads.labels("error").inc()
        else:
            swap.previous = old.bank.version
            self.bank = swap.bank
            self.metrics.set_bank(swap.bank.version, swap.bank.model, swap.bank.tasks)
            self.metrics.reloads.labels("ok").inc()
            log.info("probe bank %s -> %s", old.bank.version, swap.bank.version)
        with self._cv:
            self._swap = None
        swap.finished.set()

    def _gauges(self) -> None:
        self.metrics.batch_size.set(len(self._live))
        self.metrics.queue_depth.set(len(self._queue))
