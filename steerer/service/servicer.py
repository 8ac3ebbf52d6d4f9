"""The `steerer.v1.Steerer` gRPC servicer: request checks, status codes, streaming and metrics.

Each RPC runs on a server thread, turns the request into a library `Request` (bad input fails here, before
it queues, with INVALID_ARGUMENT), submits it to the `Scheduler` and relays the ticket's output. Status
codes: INVALID_ARGUMENT for bad input, RESOURCE_EXHAUSTED when the admission queue is full,
DEADLINE_EXCEEDED / CANCELLED when the client's deadline passes or it goes away (its slot is freed at
once) or leaves a finished stream unread past the server's timeout (`UnreadStreams`), NOT_FOUND / FAILED_PRECONDITION for a missing bank or one made for another model (any other problem
with a bank's files or content is INVALID_ARGUMENT), UNAVAILABLE while shutting down, INTERNAL for a failed
forward pass.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from steerer.ab.experiments import Assignment, ExperimentSet, LiveExperiments, assignments, key_hash
from steerer.ab.outcomes import ArmRecord, OutcomeLog, OutcomeRecord, VerdictRecord
from steerer.bank import MANIFEST, BankError, ProbeBank, muted_notice
from steerer.core import Request, Result, TokenEvent
from steerer.metrics import Metrics
from steerer.model import chat_prompt
from steerer.service import convert
from steerer.service.proto import pb2, pb2_grpc
from steerer.service.scheduler import Failure, Reason, Scheduler, SchedulerError, Ticket

log = logging.getLogger("steerer.service")
NO_EXPERIMENTS = ExperimentSet(source="(none: the server runs without --experiments)")
POLL_S = 0.25  # how often a waiting RPC thread checks that its client is still there
# The status code for each reason the scheduler refuses or fails a request: the one place they meet.
STATUS_OF: dict[Reason, grpc.StatusCode] = {
    Reason.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
    Reason.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.CANCELLED: grpc.StatusCode.CANCELLED,
    Reason.INTERNAL: grpc.StatusCode.INTERNAL,
    Reason.ABORTED: grpc.StatusCode.ABORTED,
}


class StatusError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """What an RPC method receives instead of a request whose bytes did not parse (invalid UTF-8 in a string,
    nesting past protobuf's depth limit). gRPC would answer INTERNAL before the servicer ran, uncounted; the
    server's deserializers return this instead (see `server._DecodeGuard`) and `_rpc` refuses it."""

    reason: str


def _refuse_undecodable(request) -> None:
    if isinstance(request, Undecodable):
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"the request cannot be decoded: {request.reason}")


def _ended_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """Why an RPC ended without us finishing it: its deadline passed, or the client cancelled."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
        else grpc.StatusCode.CANCELLED


@contextlib.contextmanager
def _outcome(servicer: SteererServicer, method: str, context: grpc.ServicerContext) -> Iterator[None]:
    """Map what ended an RPC to its gRPC status, and record it in the metrics exactly once."""
    code = grpc.StatusCode.OK
    try:
        yield
    except StatusError as exc:
        code = exc.code
        context.abort(exc.code, exc.message)
    except GeneratorExit:  # the client went away mid-stream
        code = _ended_code(context)
        raise
    except Exception:
        if not context.is_active():
            code = _ended_code(context)
            raise
        code = grpc.StatusCode.INTERNAL
        log.exception("%s failed", method)
        context.abort(code, "internal error")
    finally:
        servicer.metrics.request_done(method, code)


def _rpc(method: str, streaming: bool = False) -> Callable:
    """Record the outcome of an RPC in the metrics and turn StatusError into the gRPC status."""

    def decorate(fn: Callable) -> Callable:
        if streaming:
            @functools.wraps(fn)
            def stream(self: SteererServicer, request, context: grpc.ServicerContext) -> Iterator:
                with _outcome(self, method, context):
                    _refuse_undecodable(request)
                    yield from fn(self, request, context)

            return stream

        @functools.wraps(fn)
        def unary(self: SteererServicer, request, context: grpc.ServicerContext):
            with _outcome(self, method, context):
                _refuse_undecodable(request)
                return fn(self, request, context)

        return unary

    return decorate


class UnreadStreams:
    """Cancels streams whose response is finished but whose client has not drained it within `timeout_s`.

    Why: a stream's messages wait in HTTP/2 flow control until the client reads them, and its server thread
    waits with them; a client that never reads would hold that thread (and its admission slot) for ever,
    and enough of them take the server down. The clock starts when the scheduler finished the response
    (its row is free by then), so a slow generation is never cut short, only an undrained one."""

    def __init__(self, timeout_s: float):
        if not timeout_s > 0:
            raise ValueError("the unread-stream timeout must be > 0 seconds")
        self.timeout_s = timeout_s
        self._streams: dict[int, tuple[Ticket, grpc.ServicerContext]] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, ticket: Ticket, context: grpc.ServicerContext) -> Callable[[], None]:
        """Watch a stream until the returned function is called (also called when the RPC terminates)."""
        key = next(self._keys)
        with self._lock:
            self._streams[key] = (ticket, context)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="steerer-unread-streams", daemon=True)
                self._thread.start()

        def forget() -> None:
            with self._lock:
                self._streams.pop(key, None)

        context.add_callback(forget)
        return forget

    def overdue(self, now: float) -> list[tuple[Ticket, grpc.ServicerContext]]:
        """Streams finished more than `timeout_s` before `now`, forgotten as they are returned."""
        with self._lock:
            keys = [k for k, (t, _) in self._streams.items()
                    if t.finished_at is not None and now - t.finished_at > self.timeout_s]
            return [self._streams.pop(k) for k in keys]

    def _run(self) -> None:
        period = min(1.0, max(self.timeout_s / 4, 0.05))
        while not self._stop.wait(period):
            for ticket, context in self.overdue(time.monotonic()):
                log.warning("cancelling stream %s: finished %.0f s ago and its client has not read it", ticket.id,
                            time.monotonic() - ticket.finished_at)
                try:
                    context.cancel()  # wakes its thread blocked in a send; the RPC ends CANCELLED
                except Exception:  # the call ended meanwhile: nothing to free
                    log.debug("stream %s already ended", ticket.id, exc_info=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


class SteererServicer(pb2_grpc.SteererServicer):
    def __init__(self, scheduler: Scheduler, metrics: Metrics, limits: convert.Limits,
                 experiments: LiveExperiments | None = None, outcome_log: OutcomeLog | None = None,
                 unread_stream_timeout_s: float = 30.0):
        self.scheduler = scheduler
        self.unread = UnreadStreams(unread_stream_timeout_s)
        self.metrics = metrics
        self.limits = limits
        self.experiments = experiments  # A/B arms for requests with an experiment key (steerer/ab)
        self.outcome_log = outcome_log  # one record per finished response, committed before it is sent
        self.lm = scheduler.lm
        # Prompts are tokenized on RPC threads, with a private tokenizer: the scheduler thread uses the
        # model's own, and a Rust tokenizer must not be used from two threads at once.
        self._tokenizer = copy.deepcopy(self.lm.tokenizer)
        self._tokenizer_lock = threading.Lock()

    # -- RPCs ------------------------------------------------------------------------------------------
    @_rpc("Generate")
    def Generate(self, request: pb2.GenerateRequest, context: grpc.ServicerContext) -> pb2.GenerateResponse:
        for item in self._run(request, context):
            if isinstance(item, pb2.GenerateResponse):
                return item
        raise StatusError(grpc.StatusCode.INTERNAL, "the request ended without a result")

    @_rpc("GenerateStream", streaming=True)
    def GenerateStream(self, request: pb2.GenerateRequest, context: grpc.ServicerContext) -> Iterator:
        for item in self._run(request, context, stream=True):
            if isinstance(item, pb2.GenerateResponse):
                yield pb2.GenerateStreamResponse(final=item)
            else:
                yield pb2.GenerateStreamResponse(token=item)

    @_rpc("ListProbes")
    def ListProbes(self, request: pb2.ListProbesRequest, context: grpc.ServicerContext) -> pb2.ListProbesResponse:
        bank = self.scheduler.bank
        out = pb2.ListProbesResponse(bank_version=bank.version, model=bank.model)
        muted = bank.muted(self.scheduler.use_unreliable_probes).tolist()
        out.probes.extend(convert.probe_info(probe, mute) for probe, mute in zip(bank.probes, muted, strict=True))
        return out

    @_rpc("GetModelInfo")
    def GetModelInfo(self, request: pb2.GetModelInfoRequest, context: grpc.ServicerContext) -> pb2.ModelInfo:
        bank = self.scheduler.bank
        return pb2.ModelInfo(model=self.lm.name, fingerprint=self.lm.fingerprint, num_layers=self.lm.num_layers,
                             hidden_size=self.lm.hidden_size, bank_version=bank.version, tasks=bank.tasks,
                             max_batch=self.scheduler.max_batch, max_queue=self.scheduler.max_queue,
                             max_prompt_tokens=self.limits.max_prompt_tokens,
                             max_new_tokens=self.limits.max_new_tokens)

    @_rpc("ReloadProbeBank")
    def ReloadProbeBank(self, request: pb2.ReloadProbeBankRequest,
                        context: grpc.ServicerContext) -> pb2.ReloadProbeBankResponse:
        try:
            bank = self._load_bank(request.path)
            previous = self.scheduler.reload(bank, timeout=context.time_remaining())
        except StatusError:
            self.metrics.reloads.labels("error").inc()
            raise
        except BankError as exc:
            self.metrics.reloads.labels("error").inc()
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        except SchedulerError as exc:
            raise StatusError(STATUS_OF[exc.reason], str(exc)) from None
        notice = None if self.scheduler.use_unreliable_probes else muted_notice(bank)
        if notice:
            log.warning("bank %s: %s", bank.version, notice.removeprefix("steerer: "))
        return pb2.ReloadProbeBankResponse(previous_version=previous, bank_version=bank.version,
                                           probes=len(bank.probes))

    # -- internals -------------------------------------------------------------------------------------
    def _load_bank(self, path: str) -> ProbeBank:
        if not path.strip():
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "path is empty: name a probe-bank folder")
        folder = Path(path)
        if not (folder / MANIFEST).is_file():
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"no probe bank at {path} (no {MANIFEST})")
        try:
            bank = ProbeBank.load(folder)  # validates the files and their content; any problem is a BankError
        except (BankError, OSError) as exc:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot load the probe bank at {path}: {exc}") \
                from None
        return bank  # check_model (FAILED_PRECONDITION) happens in Scheduler.reload

    def _check(self, message: pb2.GenerateRequest) -> Request:
        try:
            request = convert.request_from_pb(message, self.limits)
            self.scheduler.validate(request)
        except ValueError as exc:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        with self._tokenizer_lock:
            n = len(chat_prompt(self._tokenizer, request.prompt, request.system))
        if n > self.limits.max_prompt_tokens:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"prompt is too long: {n} tokens; this server "
                              f"accepts at most {self.limits.max_prompt_tokens}")
        context = self.lm.max_positions
        if context is not None and n + request.sampling.max_new_tokens > context:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"prompt and response exceed the model's "
                              f"context: {n} prompt tokens + max_new_tokens {request.sampling.max_new_tokens} > "
                              f"{context} positions; ask for at most {max(context - n, 0)} new tokens")
        return request

    def _assign(self, message: pb2.GenerateRequest, request: Request) -> tuple[list[Assignment], Request]:
        """The request's experiment arms, and the request with their policies in place of its own.

        One rule with or without an experiments file (a server without one has none): `experiment_key` joins
        every running experiment that steers one of the request's tasks, possibly none (the reply's `arms`
        is then empty: an experiment ending must not break the clients that send keys); `force_arms` names
        an experiment and arm that must exist, else the request is refused with the same line either way."""
        forced = dict(message.force_arms)
        current = self.experiments.current if self.experiments is not None else NO_EXPERIMENTS
        tasks = [c.task for c in request.constraints]
        try:
            arms = assignments(current, message.experiment_key, tasks, forced)
        except (KeyError, ValueError) as exc:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"force_arms: {exc.args[0]}") from None
        if not arms:
            return arms, request
        policies = {t: p for a in arms for t, p in a.policies.items() if t in tasks}
        request = dataclasses.replace(request, policies={**request.policies, **policies})
        try:  # an arm's policy must suit the bank too (no steering a task the bank has no probe for)
            self.scheduler.validate(request)
        except ValueError as exc:
            where = ", ".join(f"experiment {a.experiment!r} arm {a.arm!r}" for a in arms
                              if any(t in tasks for t in a.policies))
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {exc}") from None
        return arms, request

    def close(self) -> None:
        self.unread.close()

    def _run(self, message: pb2.GenerateRequest, context: grpc.ServicerContext, stream: bool = False) -> Iterator:
        """Check, queue, and relay one request: TokenEvent messages, then the GenerateResponse. A stream is
        watched for a client that stops reading (`UnreadStreams`)."""
        arrived = time.monotonic()
        request = self._check(message)
        arms, request = self._assign(message, request)
        remaining = context.time_remaining()
        deadline = arrived + remaining if remaining is not None and remaining < 10**8 else None
        try:
            ticket = self.scheduler.submit(request, arrived, deadline)
        except SchedulerError as exc:
            raise StatusError(STATUS_OF[exc.reason], str(exc)) from None
        client_id = message.request_id or f"{ticket.id}-{int(time.time() * 1000)}"
        finished = False
        context.add_callback(lambda: self.scheduler.cancel(ticket))  # client gone or deadline: free the slot
        forget = self.unread.watch(ticket, context) if stream else None
        try:
            last = first = None
            flags: collections.Counter[str] = collections.Counter()
            for item in self._items(ticket, context):
                if isinstance(item, TokenEvent):
                    now = time.monotonic()
                    self._observe_token(item, ticket, last, now)
                    first = first or now
                    last = now
                    flags.update(f.task for f in item.flags if f.raised)
                    yield convert.token_to_pb(item)
                elif isinstance(item, Result):
                    finished = True
                    self._observe_result(item)
                    latency = time.monotonic() - arrived
                    self._observe_arms(item, arms, latency)
                    if self.outcome_log is not None:  # before the response goes out: see steerer/ab/outcomes.py
                        self._record(message, request, item, arms, client_id, latency,
                                     None if first is None else first - arrived, flags)
                    yield convert.result_to_pb(item, client_id, message.experiment_key, self.lm.name, arms)
                    return
                else:
                    finished = True
                    raise StatusError(STATUS_OF[item.reason], item.message)
        finally:
            if forget is not None:
                forget()
            if not finished:
                self.scheduler.cancel(ticket)

    def _items(self, ticket: Ticket, context: grpc.ServicerContext) -> Iterator[TokenEvent | Result | Failure]:
        while True:
            try:
                item = ticket.out.get(timeout=POLL_S)
            except queue.Empty:
                if not context.is_active():
                    self.scheduler.cancel(ticket)
                    raise StatusError(_ended_code(context), "the client went away") from None
                continue
            yield item
            if not isinstance(item, TokenEvent):
                return

    def _observe_token(self, event: TokenEvent, ticket: Ticket, last: float | None, now: float) -> None:
        m = self.metrics
        if last is None:
            m.ttft.observe(now - ticket.arrived)
        else:
            m.itl.observe(now - last)
        m.token_event(event)

    def _observe_arms(self, result: Result, arms: list[Assignment], latency: float) -> None:
        m = self.metrics
        for a in arms:
            if a.forced:  # QA traffic: not part of the randomized comparison the arm panels show
                continue
            pair = m.arm_label(a.experiment, a.arm)
            m.arm_requests.labels(*pair).inc()
            m.arm_latency.labels(*pair).observe(latency)
            for v in result.verdicts:
                m.arm_verdicts.labels(*pair, v.task, "unknown" if v.satisfied is None else
                                      ("no" if v.satisfied else "yes")).inc()

    def _record(self, message: pb2.GenerateRequest, request: Request, result: Result, arms: list[Assignment],
                request_id: str, latency: float, ttft: float | None, flags: collections.Counter[str]) -> None:
        """Commit the response's outcome record; a failure is logged and counted, the response still goes out."""
        try:
            record = OutcomeRecord(
                request_id=request_id, key_hash=key_hash(message.experiment_key) if message.experiment_key else None,
                model=self.lm.name, bank_version=result.bank_version, prompt=request.prompt, system=request.system,
                response=result.text, token_ids=list(result.tokens), finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens, latency_s=latency, ttft_s=ttft,
                verdicts=[VerdictRecord(v.task, v.params, request.policy_for(v.task).kind_name(),
                                        float(request.policy_for(v.task).alpha), v.satisfied, v.predicted_violation,
                                        v.p_satisfied_end if v.p_satisfied_end is None
                                        or math.isfinite(v.p_satisfied_end) else None,
                                        v.probe_muted, v.flagged, v.first_flag_token, flags[v.task],
                                        int(result.steered_tokens.get(v.task, 0))) for v in result.verdicts],
                arms=[ArmRecord(a.experiment, a.arm, a.forced, a.version) for a in arms])
            self.outcome_log.write(record)
            self.metrics.outcome_records.inc()
        except Exception:
            self.metrics.outcome_errors.inc()
            log.exception("could not write the outcome record of %s", request_id)

    def _observe_result(self, result: Result) -> None:
        self.metrics.result(result)
