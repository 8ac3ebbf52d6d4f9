"""Continuous batching for the server: one thread owns the `Steerer`; RPC threads only talk to queues.

The `Steerer` is not thread-safe, so a single scheduler thread drives it. RPC threads `submit()` a
request to a bounded FIFO (once the batch is full and `max_queue` more wait, `QueueFull`: the servicer's
RESOURCE_EXHAUSTED) and read their ticket's output queue: `TokenEvent`s, then one `Result` or `Failure`.
Between two forward passes the scheduler admits waiting requests into free slots in one shared prefill,
and they join the running batch: concurrent clients share forward passes instead of queuing behind each
other. While rows decode, a prefill stalls them, so admissions come in chunks (`admission_size`).

Checkers (the verdict on the final text; topic runs a MiniLM embedder) do not run on the scheduler thread:
a finished `Result` goes to one checker thread, which fills in `Verdict.satisfied` and only then puts it on
the ticket's queue, so a slow check delays its own response, never the next forward pass.

Cancellation (the client went away, or its deadline passed) frees the request's slot before the next
pass. A probe-bank swap stops admission, lets the requests in flight finish on the old bank, then
replaces the `Steerer` and resumes, so every response is produced by exactly one bank version.

The scheduler knows nothing of gRPC: a refusal is a `SchedulerError` and a request that ends without a
result a `Failure`, each with a `Reason`; the servicer maps reasons to status codes. It builds its `Steerer`
through `steerer_factory(bank)` (by default the real one), so tests can drive a fake engine through the
crash, deadline and swap paths.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum

import torch

from steerer.backend import Backend
from steerer.bank import ProbeBank
from steerer.core import Request, Result, Steerer, TokenEvent, check_verdicts
from steerer.metrics import Metrics
from steerer.model import LoadedModel
from steerer.monitor import MonitorConfig

log = logging.getLogger("steerer.service")

# gRPC's own wording: the client reads the same phrase whether its deadline timer or our clock fires first.
DEADLINE_MESSAGE = "Deadline Exceeded"


class Reason(Enum):
    """Why the scheduler refused a request or ended it without a result (the servicer's status codes)."""

    BUSY = "busy"  # the admission queue is full
    SHUTTING_DOWN = "shutting_down"
    INVALID = "invalid"  # the request cannot run on the current bank
    DEADLINE = "deadline"  # the request's deadline passed (queued or generating), or a reload's wait did
    CANCELLED = "cancelled"
    INTERNAL = "internal"  # a generation pass failed
    ABORTED = "aborted"  # another probe-bank reload is in progress


class SchedulerError(Exception):
    """A request (or reload) the scheduler refuses, and why."""

    reason = Reason.SHUTTING_DOWN

    def __init__(self, message: str, reason: Reason | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class QueueFull(SchedulerError):
    reason = Reason.BUSY


@dataclass(frozen=True)
class Failure:
    """A request ended without a result."""

    reason: Reason
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
    finished_at: float | None = None  # time.monotonic() when its Result or Failure went on `out`

    def finish(self, item: Result | Failure) -> None:
        """Put the last item on `out`, noting when (the servicer cancels streams left undrained long after)."""
        self.finished_at = time.monotonic()
        self.out.put(item)

    @property
    def id(self) -> str:
        return self.request.id


# What the scheduler drives: a `steerer.backend.Backend` (`Steerer`, `VLLMSteerer`, or a fake with the same members
# in tests); `steerer_factory(bank)` makes one.
SteererFactory = Callable[[ProbeBank], Backend]


@dataclass
class _Swap:
    bank: ProbeBank
    finished: threading.Event = field(default_factory=threading.Event)
    previous: str | None = None
    error: BaseException | None = None


class Scheduler:
    def __init__(self, lm: LoadedModel, bank: ProbeBank, *, max_batch: int = 32, max_queue: int = 64,
                 batch_wait_s: float = 0.005, batch_wait_max_s: float = 0.05, prefill_chunk: int = 8,
                 admit_wait_s: float = 0.05,
                 metrics: Metrics | None = None,
                 monitor_config: MonitorConfig | None = None, threads: int | None = None,
                 use_unreliable_probes: bool = False, steerer_factory: SteererFactory | None = None,
                 stop_steering_on_detection: bool = False):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.lm = lm
        self.max_batch = max_batch
        self.max_queue = max_queue
        if prefill_chunk < 1 or admit_wait_s < 0:
            raise ValueError("prefill_chunk must be >= 1 and admit_wait_s >= 0")
        self.batch_wait_s = batch_wait_s
        self.batch_wait_max_s = batch_wait_max_s
        self.prefill_chunk = prefill_chunk
        self.admit_wait_s = admit_wait_s
        self.metrics = metrics or Metrics()
        self.monitor_config = monitor_config
        self.use_unreliable_probes = use_unreliable_probes  # else probes not marked reliable neither flag nor steer
        self.stop_steering_on_detection = stop_steering_on_detection  # a detected task's conditional steering ends
        # torch's intra-op thread count is per OS thread: the scheduler thread must set it itself, or it
        # runs with whatever a fresh thread gets instead of what the process was configured with.
        self.threads = threads or torch.get_num_threads()
        self._factory = steerer_factory or self._real_steerer
        self._steerer = self._new_steerer(bank)
        self.bank = bank  # the bank new requests will run on; replaced when a swap completes
        # One thread: checks are short next to a generation, and MiniLM's tokenizer must not run on two
        # threads at once. One torch thread there, so it does not take the model's cores.
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steerer-checker",
                                           initializer=torch.set_num_threads, initargs=(1,))
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
                raise SchedulerError("another probe-bank reload is in progress", Reason.ABORTED)
            self._swap = swap
            self.metrics.reload_pending.set(1)
            self._cv.notify()
        if not swap.finished.wait(timeout):
            raise SchedulerError("the reload waits for requests in flight to finish; it will complete later",
                                 Reason.DEADLINE)
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
            self._checker.shutdown()
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
                self._fail(ticket, Reason.SHUTTING_DOWN, "the server is shutting down")
            self._live.clear()
            self._steerer.close()
            self._checker.shutdown(wait=True)  # results being checked still reach their tickets
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
            self._fail(ticket, Reason.DEADLINE, DEADLINE_MESSAGE + " during generation")

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
                # Wait while arrivals keep coming (each resets a quiet gap of batch_wait_s), at most
                # batch_wait_max_s: a lone request waits one gap, a wave is taken whole.
                now = time.monotonic()
                end, quiet, seen = now + max(self.batch_wait_max_s, self.batch_wait_s), now + self.batch_wait_s, \
                    len(self._queue)
                while len(self._queue) < room and not self._stopping and not self._cancels:
                    left = min(end, quiet) - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                    if len(self._queue) != seen:
                        seen, quiet = len(self._queue), time.monotonic() + self.batch_wait_s
            take = admission_size(len(self._queue), room, bool(self._live), self.prefill_chunk,
                                  time.monotonic() - self._queue[0].arrived, self.admit_wait_s)
            picked = [self._queue.popleft() for _ in range(take)]
            # Picked requests count in the batch from here (until validation drops one), never in neither.
            self.metrics.batch_size.set(len(self._live) + len(picked))
            self.metrics.queue_depth.set(len(self._queue))
        if not picked:
            return
        now = time.monotonic()
        ready = []
        for ticket in picked:
            if ticket.deadline is not None and now >= ticket.deadline:
                self._fail(ticket, Reason.DEADLINE, DEADLINE_MESSAGE + " while queued")
                continue
            try:  # again: the bank may have changed since the RPC thread checked
                self._steerer.validate(ticket.request)
            except ValueError as exc:
                self._fail(ticket, Reason.INVALID, str(exc))
                continue
            ticket.bank_version = self._steerer.bank.version
            self._live[ticket.id] = ticket
            ready.append(ticket)
        if not ready:
            return
        self.metrics.prefill_rows.observe(len(ready))
        self._gauges()  # the wave being prefilled is in the batch now: a long admission must not read as idle
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
                ticket.done = True  # nothing else reaches the ticket: the checker thread delivers the result
                if result.verdicts:
                    self._checker.submit(self._deliver, ticket, result)
                else:  # nothing to check: not behind someone else's check
                    ticket.finish(result)

    def _deliver(self, ticket: Ticket, result: Result) -> None:
        """On the checker thread: the checkers' verdicts, then the result to the waiting RPC."""
        try:
            check_verdicts(result)
        except Exception:  # a checker bug must not lose the response; its verdicts stay unknown
            log.exception("checking the result of %s failed", ticket.id)
        finally:
            ticket.finish(result)

    def _fail(self, ticket: Ticket, reason: Reason, message: str) -> None:
        if not ticket.done:
            ticket.done = True
            ticket.finish(Failure(reason, message))

    def _crash(self, exc: Exception) -> None:
        """A pass failed: fail the requests in flight and start over with a fresh Steerer (same bank)."""
        log.error("generation pass failed; failing %d requests in flight", len(self._live), exc_info=exc)
        for ticket in self._live.values():
            self._fail(ticket, Reason.INTERNAL, f"generation failed: {type(exc).__name__}")
        self._live.clear()
        bank = self._steerer.bank
        self._steerer.close()
        self._steerer = self._new_steerer(bank)

    def _do_swap(self, swap: _Swap) -> None:
        old = self._steerer
        old.close()  # its hooks must be off the model before the new Steerer attaches its own
        try:
            self._steerer = self._new_steerer(swap.bank)
        except Exception as exc:
            swap.error = exc
            self._steerer = self._new_steerer(old.bank)
            self.metrics.reloads.labels("error").inc()
        else:
            swap.previous = old.bank.version
            self.bank = swap.bank
            self.metrics.set_bank(swap.bank.version, swap.bank.model, swap.bank.tasks)
            self.metrics.reloads.labels("ok").inc()
            log.info("probe bank %s -> %s", old.bank.version, swap.bank.version)
        with self._cv:
            self._swap = None
            self.metrics.reload_pending.set(0)
        swap.finished.set()

    def _new_steerer(self, bank: ProbeBank) -> Backend:
        return self._factory(bank)

    def _real_steerer(self, bank: ProbeBank) -> Steerer:
        return Steerer(self.lm, bank, self.monitor_config, capacity=self.max_batch, check=False,
                       use_unreliable_probes=self.use_unreliable_probes,
                       stop_steering_on_detection=self.stop_steering_on_detection)

    def _gauges(self) -> None:
        """`steerer_batch_size` is every request admitted, including a wave still being prefilled;
        `steerer_queue_depth` every request waiting for a slot."""
        self.metrics.batch_size.set(len(self._live))
        self.metrics.queue_depth.set(len(self._queue))


def admission_size(waiting: int, room: int, decoding: bool, chunk: int, oldest_wait_s: float,
                   admit_wait_s: float) -> int:
    """How many waiting requests join the batch at this step boundary.

    Idle, a whole wave joins in one prefill: nobody is stalled by it. While rows decode, each prefill
    stalls them for its length, so at most `chunk` join per boundary; and a partial chunk waits until its
    oldest request has waited `admit_wait_s`, so a wave of resubmissions arriving over a few milliseconds
    joins as one prefill (one cache merge) instead of a prefill per step, which keeps rows in step.
    """
    if waiting <= 0 or room <= 0:
        return 0
    if not decoding:
        return min(room, waiting)
    take = min(room, waiting, chunk)
    if take < min(room, chunk) and oldest_wait_s < admit_wait_s:
        return 0
    return take
