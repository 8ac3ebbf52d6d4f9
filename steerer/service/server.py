"""Build and run the gRPC server: the Steerer service, grpc.health.v1, reflection, metrics, TLS, auth.

Shutdown is graceful: health flips to NOT_SERVING, the server stops taking RPCs, streams in flight get
`grace_s` to finish (the scheduler keeps generating for them), then whatever is left is cancelled.

Under load: `_Admission` bounds the RPCs in flight (RESOURCE_EXHAUSTED past it, counted) and runs health
checks on their own threads outside that bound, so health answers whatever the load; the servicer cancels
finished streams their clients leave unread (`UnreadStreams`). Credentials (`_Auth`): one `authorization`
header at most, the auth token when set, the admin token for admin RPCs (refused without one).
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from steerer.ab.experiments import ExperimentError, ExperimentSet, LiveExperiments
from steerer.ab.outcomes import SYNC_MODES, OutcomeLog
from steerer.bank import ProbeBank
from steerer.metrics import Metrics
from steerer.model import LoadedModel
from steerer.service.convert import Limits
from steerer.service.http import HttpConfig, HttpFront
from steerer.service.proto import SERVICE_NAME, pb2_grpc
from steerer.service.scheduler import Scheduler, SteererFactory
from steerer.service.servicer import SteererServicer, Undecodable

log = logging.getLogger("steerer.service")
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
AUTH_EXEMPT = (f"/{HEALTH_SERVICE}/",)  # load balancers and orchestrators probe health without a token
HEALTH_CHECK = f"/{HEALTH_SERVICE}/Check"
STEERER = f"/{SERVICE_NAME}/"
ADMIN_METHODS = ("ReloadProbeBank",)  # need the admin token; refused when the server has none
ADMIN_ENV = "STEERER_ADMIN_TOKEN"
HEALTH_THREADS = 4  # health checks' own threads: never behind generation RPCs
RPC_HEADROOM = 16  # RPCs beyond the batch and the queue: quick ones (ListProbes, reflection), refusals


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9464  # None: no metrics endpoint
    http_port: int | None = None  # the OpenAI-compatible HTTP front (steerer/service/http.py); None: off
    max_batch: int = 32
    max_queue: int = 64
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024
    batch_wait_ms: float = 5.0
    batch_wait_max_ms: float = 50.0
    prefill_chunk: int = 8
    admit_wait_ms: float = 50.0
    grace_s: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None
    admin_token: str | None = None  # admin RPCs (ReloadProbeBank); None: they are refused
    unread_stream_timeout_s: float = 30.0  # a finished stream the client has not drained by then is cancelled
    use_unreliable_probes: bool = False  # flag and steer with probes whose measured AUROC reaches chance too
    stop_steering_on_detection: bool = False  # a task's conditional steering ends once its violation is detected
    experiments: str | None = None  # experiments file (steerer/ab); reloaded on SIGHUP
    outcome_log: str | None = None  # SQLite outcome log; None: none (the CLI defaults it with --experiments)
    outcome_sync: str = "normal"  # SQLite synchronous: normal (safe against a process kill) or full (power loss)

    def validate(self) -> None:
        if not 0 <= self.port <= 65535 or any(p is not None and not 0 <= p <= 65535
                                               for p in (self.metrics_port, self.http_port)):
            raise ValueError("ports must be in 0..65535")
        for name in ("max_batch", "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1")
        if self.prefill_chunk < 1:
            raise ValueError("prefill-chunk must be >= 1")
        if self.max_queue < 0 or self.batch_wait_ms < 0 or self.batch_wait_max_ms < 0 or self.admit_wait_ms < 0 or self.grace_s < 0:
            raise ValueError("max-queue, batch-wait-ms and grace must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file not found: {path}")
        if self.outcome_sync not in SYNC_MODES:
            raise ValueError(f"outcome-sync must be one of {', '.join(SYNC_MODES)}")
        if self.experiments is not None and not Path(self.experiments).is_file():
            raise ValueError(f"experiments file not found: {self.experiments}")
        if self.outcome_log is not None and not Path(self.outcome_log).resolve().parent.is_dir():
            raise ValueError(f"the outcome log's folder does not exist: {Path(self.outcome_log).parent}")
        if not self.unread_stream_timeout_s > 0:
            raise ValueError("unread-stream-timeout must be > 0 seconds")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError(f"the admin token is empty (--admin-token or ${ADMIN_ENV}); give a token, or leave "
                             f"both unset to refuse admin RPCs")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("the auth token is empty (--auth-token or $STEERER_AUTH_TOKEN); give a token, or "
                             "leave both unset to serve without authentication")

    def check_context(self, max_positions: int | None) -> None:
        """Refuse limits the model cannot serve: past its context a model produces garbage, not errors.

        Each limit alone must leave room for at least one token of the other; whether a request's prompt
        plus its max_new_tokens fit is checked per request (INVALID_ARGUMENT)."""
        if max_positions is None:
            return
        for name in ("max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) >= max_positions:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} does not fit the model's context "
                                 f"of {max_positions} positions (prompt + response); at most {max_positions - 1}")


def _kind(handler: grpc.RpcMethodHandler) -> str:
    """'unary_unary', 'unary_stream', 'stream_unary' or 'stream_stream': the handler's arity."""
    return (f"{'stream' if handler.request_streaming else 'unary'}_"
            f"{'stream' if handler.response_streaming else 'unary'}")


def _with_behavior(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable], Callable]) -> grpc.RpcMethodHandler:
    """`handler` with its behavior replaced by `wrap(behavior)`, same arity and (de)serializers."""
    kind = _kind(handler)
    return getattr(grpc, f"{kind}_rpc_method_handler")(wrap(getattr(handler, kind)),
                                                        request_deserializer=handler.request_deserializer,
                                                        response_serializer=handler.response_serializer)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses the RPC with `code` (the request still decodes through the real deserializer)."""

    def deny(request, context: grpc.ServicerContext):
        context.abort(code, message)

    return _with_behavior(handler, lambda _behavior: deny)


class _Auth(grpc.ServerInterceptor):
    """Credentials, checked before any work: at most one `authorization` header (with two, which one decides
    would depend on the proxy in front); admin RPCs (`ADMIN_METHODS`) need the admin token and are refused
    when none is configured; the others need the auth token when one is set (the admin token also works).
    Health checks are exempt: orchestrators probe them without credentials. Every refusal is counted."""

    def __init__(self, token: str | None, admin_token: str | None, metrics: Metrics):
        self._expected = f"Bearer {token}".encode() if token else None
        self._admin = f"Bearer {admin_token}".encode() if admin_token else None
        self._metrics = metrics

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(AUTH_EXEMPT):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        refusal = self._refusal(details, method)
        if refusal is None:
            return handler
        code, message = refusal
        self._metrics.request_done(method, code)
        return _refusal(handler, code, message)

    def _refusal(self, details: grpc.HandlerCallDetails, method: str) -> tuple[grpc.StatusCode, str] | None:
        given = [str(v) for k, v in details.invocation_metadata or () if k == "authorization"]
        if len(given) > 1:
            return grpc.StatusCode.UNAUTHENTICATED, (f"{len(given)} authorization headers: send exactly one "
                                                     f"'authorization: Bearer <token>'")
        token = given[0].encode() if given else b""
        admin = self._admin is not None and hmac.compare_digest(token, self._admin)
        if details.method.startswith(STEERER) and method in ADMIN_METHODS:
            if self._admin is None:
                return grpc.StatusCode.PERMISSION_DENIED, (f"{method} is an admin RPC and this server has no admin "
                                                           f"token: start it with --admin-token (or ${ADMIN_ENV})")
            if not admin:
                return grpc.StatusCode.UNAUTHENTICATED, (f"{method} is an admin RPC: send 'authorization: Bearer "
                                                         f"<admin token>'")
            return None
        if self._expected is None or admin or hmac.compare_digest(token, self._expected):
            return None
        return grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)"


class _Admission(grpc.ServerInterceptor):
    """At most `limit` RPCs run at once; past it RESOURCE_EXHAUSTED, counted. Health checks are outside the
    limit and run on their own small thread pool, so they answer whatever the load.

    This replaces grpc's `maximum_concurrent_rpcs`, which refused health checks along with everything else
    and counted none of its refusals. A slot is taken when the RPC's behavior starts and given back when it
    returns or the RPC terminates (whichever comes first: a stream cancelled while blocked in a send never
    returns to its generator). Unknown methods are counted as UNIMPLEMENTED."""

    def __init__(self, limit: int, metrics: Metrics, health_pool: futures.ThreadPoolExecutor):
        self.limit = limit
        self._metrics = metrics
        self._health_pool = health_pool
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        if handler is None:
            self._metrics.request_done(method, grpc.StatusCode.UNIMPLEMENTED)
            return None
        if details.method == HEALTH_CHECK:
            return _with_behavior(handler, self._on_health_pool)
        return _with_behavior(handler, lambda behavior: self._admitted(behavior, method,
                                                                       handler.response_streaming))

    def _on_health_pool(self, behavior: Callable) -> Callable:
        def check(request, context):
            return behavior(request, context)

        check.experimental_thread_pool = self._health_pool  # grpc runs a behavior with this on that pool
        return check

    def _enter(self, context: grpc.ServicerContext, method: str) -> Callable[[], None]:
        with self._lock:
            if self._active >= self.limit:
                busy = True
            else:
                busy = False
                self._active += 1
        if busy:
            self._metrics.request_done(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {self.limit} RPCs in flight; "
                          f"retry later")
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self._active -= 1

        if not context.add_callback(release):  # already terminated
            release()
        return release

    def _admitted(self, behavior: Callable, method: str, streaming: bool) -> Callable:
        if streaming:
            def stream(request, context):
                release = self._enter(context, method)
                try:
                    yield from behavior(request, context)
                finally:
                    release()

            return stream

        def unary(request, context):
            release = self._enter(context, method)
            try:
                return behavior(request, context)
            finally:
                release()

        return unary


class _DecodeGuard(grpc.ServerInterceptor):
    """Hand a request that does not parse to the servicer as `Undecodable`, which refuses it with
    INVALID_ARGUMENT and counts it; gRPC itself would answer INTERNAL, log a traceback and count nothing."""

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None or not details.method.startswith(STEERER):
            return handler  # only the Steerer servicer knows what to do with `Undecodable`
        deserialize = handler.request_deserializer

        def guarded(data: bytes):
            try:
                return deserialize(data)
            except Exception as exc:  # DecodeError: bad UTF-8, nesting past protobuf's limit, truncation
                return Undecodable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

        kind = _kind(handler)
        return getattr(grpc, f"{kind}_rpc_method_handler")(getattr(handler, kind), request_deserializer=guarded,
                                                            response_serializer=handler.response_serializer)


class SteererServer:
    """A running server around one model and bank. `start()`, then `stop()` (or `serve_forever()`)."""

    def __init__(self, lm: LoadedModel, bank: ProbeBank, config: ServerConfig, metrics: Metrics | None = None,
                 steerer_factory: SteererFactory | None = None):
        config.validate()
        config.check_context(lm.max_positions)
        self.config = config
        self.metrics = metrics or Metrics()
        self.scheduler = Scheduler(lm, bank, max_batch=config.max_batch, max_queue=config.max_queue,
                                   batch_wait_s=config.batch_wait_ms / 1000,
                                   batch_wait_max_s=config.batch_wait_max_ms / 1000,
                                   prefill_chunk=config.prefill_chunk, admit_wait_s=config.admit_wait_ms / 1000,
                                   metrics=self.metrics,
                                   use_unreliable_probes=config.use_unreliable_probes, steerer_factory=steerer_factory,
                                   stop_steering_on_detection=config.stop_steering_on_detection)
        limits = Limits(config.max_prompt_tokens, config.max_new_tokens, min(128, config.max_new_tokens))
        try:
            self.experiments = LiveExperiments(config.experiments) if config.experiments else None
            self.outcome_log = OutcomeLog(config.outcome_log, config.outcome_sync) if config.outcome_log else None
        except Exception:
            self.scheduler.stop(drain=False)
            raise
        if self.experiments is not None:
            self._experiments_loaded(self.experiments.current)
        self.servicer = SteererServicer(self.scheduler, self.metrics, limits, self.experiments, self.outcome_log,
                                        unread_stream_timeout_s=config.unread_stream_timeout_s)
        # One thread per RPC in flight: the batch, the queue and some headroom, counted by `_Admission` (past
        # it RESOURCE_EXHAUSTED); the pool has room for the admission's own refusals beyond that, and health
        # checks have a pool of their own.
        limit = config.max_batch + config.max_queue + RPC_HEADROOM
        self._health_pool = futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="health")
        self.admission = _Admission(limit, self.metrics, self._health_pool)
        interceptors = [_Auth(config.auth_token, config.admin_token, self.metrics), self.admission,
                        _DecodeGuard()]  # credentials first; the deny handlers decode safely too
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=limit + RPC_HEADROOM,
                                                             thread_name_prefix="rpc"),
                                  interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        pb2_grpc.add_SteererServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), self.server)
        address = f"{_host(config.host)}:{config.port}"
        try:
            if config.tls_cert:
                credentials = grpc.ssl_server_credentials(
                    [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc's way of saying the bind failed
            self.port = 0
        if self.port == 0:
            self.scheduler.stop(drain=False)
            raise OSError(f"cannot listen on {address} (address in use or not available)")
        self.http: HttpFront | None = None
        if config.http_port is not None:
            try:
                self.http = HttpFront(self.servicer, HttpConfig(
                    config.host, config.http_port, config.auth_token, config.admin_token, config.tls_cert,
                    config.tls_key, limit))
            except OSError as exc:
                self.scheduler.stop(drain=False)
                raise OSError(f"cannot serve HTTP on {_host(config.host)}:{config.http_port}: "
                              f"{exc.strerror or exc}") from None
        self.metrics_port: int | None = None
        self._stopped = threading.Event()

    def start(self) -> SteererServer:
        if self.config.metrics_port is not None:  # first: the likeliest to fail (port in use)
            try:
                self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
            except OSError as exc:
                self.scheduler.stop(drain=False)
                raise OSError(f"cannot serve metrics on {_host(self.config.host)}:{self.config.metrics_port}: "
                              f"{exc.strerror or exc}") from None
        self.scheduler.start()
        self.server.start()
        if self.http is not None:
            self.http.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new RPCs, give the ones in flight `grace_s`, then stop everything."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        self.health.enter_graceful_shutdown()
        started = time.monotonic()
        if self.http is not None:
            self.http.close()  # no new connections or requests; those in flight go on
        self.server.stop(grace).wait()
        if self.http is not None:
            self.http.drain(max(0.0, grace - (time.monotonic() - started)))
        self.servicer.close()
        self._health_pool.shutdown(wait=False)
        self.scheduler.stop(drain=False, timeout=30)
        if self.outcome_log is not None:  # every finished response has committed its record by now
            self.outcome_log.close()
        self.metrics.shutdown()
        self._stopped.set()

    def reload_experiments(self) -> bool:
        """Re-read the experiments file (SIGHUP). A bad file is refused, logged and counted; the experiments
        in force stay. Requests already assigned keep their arm; later ones use the new file."""
        if self.experiments is None:
            log.warning("SIGHUP: no --experiments file to reload")
            return False
        try:
            experiments = self.experiments.reload()
        except ExperimentError as exc:
            self.metrics.experiment_reloads.labels("error").inc()
            log.error("experiments not reloaded, the previous ones stay in force: %s", exc)
            return False
        self._experiments_loaded(experiments)
        log.info("experiments reloaded from %s: %s", experiments.source, _describe(experiments))
        return True

    def _experiments_loaded(self, experiments: ExperimentSet) -> None:
        self.metrics.set_experiments(experiments, self.scheduler.bank.tasks)
        self.metrics.experiment_reloads.labels("ok").inc()
        self.metrics.experiment_reloads.labels("error")
        if self.outcome_log is not None:
            self.outcome_log.note_experiments(experiments.experiments)

    def serve_forever(self) -> None:
        """Block until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the experiments file."""
        requested, reload = threading.Event(), threading.Event()
        signals = {signal.SIGTERM: requested.set, signal.SIGINT: requested.set}
        if self.experiments is not None:
            signals[signal.SIGHUP] = reload.set
        previous = {sig: signal.signal(sig, lambda *_, act=act: act()) for sig, act in signals.items()}
        try:
            while not requested.wait(0.2):
                if reload.is_set():
                    reload.clear()
                    self.reload_experiments()
            log.info("shutting down: draining streams in flight (grace %.0f s)", self.config.grace_s)
            self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def model_info_line(server: SteererServer) -> str:
    """The one line `steerer serve` prints once it listens (tests and scripts wait for it)."""
    c = server.config
    scheme = "tls" if c.tls_cert else "insecure"
    metrics = f"http://{_host(c.host)}:{server.metrics_port}/metrics" if server.metrics_port is not None else "off"
    bank = server.scheduler.bank
    line = (f"steerer: serving {SERVICE_NAME} on {_host(c.host)}:{server.port} ({scheme}), metrics {metrics}, "
            f"model {server.servicer.lm.name}, bank {bank.version}")
    if server.http is not None:
        line += f", http {server.http.scheme}://{_host(c.host)}:{server.http.port}/v1"
    if server.experiments is not None:
        line += f", experiments {_describe(server.experiments.current)}"
    if server.outcome_log is not None:
        line += f", outcome log {server.outcome_log.path}"
    return line


def _describe(experiments: ExperimentSet) -> str:
    running = [e.name for e in experiments.running]
    return f"{len(experiments.experiments)} ({len(running)} running: {', '.join(running) or 'none'})"



def _host(host: str) -> str:
    """An IPv6 literal in brackets, as gRPC and URLs want it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
