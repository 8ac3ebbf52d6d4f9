"""Build and run the gRPC server: the Steerer service, grpc.health.v1, reflection, metrics, TLS, auth.

Shutdown is graceful: health flips to NOT_SERVING, the server stops taking RPCs, streams in flight get
`grace_s` to finish (the scheduler keeps generating for them), then whatever is left is cancelled.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from steerer.ab.experiments import ExperimentError, ExperimentSet, LiveExperiments
from steerer.ab.outcomes import SYNC_MODES, OutcomeLog
from steerer.bank import ProbeBank
from steerer.model import LoadedModel
from steerer.service.convert import Limits
from steerer.service.metrics import Metrics
from steerer.service.proto import SERVICE_NAME, pb2_grpc
from steerer.service.scheduler import Scheduler, SteererFactory
from steerer.service.servicer import SteererServicer, Undecodable

log = logging.getLogger("steerer.service")
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
AUTH_EXEMPT = (f"/{HEALTH_SERVICE}/",)  # load balancers and orchestrators probe health without a token
STEERER = f"/{SERVICE_NAME}/"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9464  # None: no metrics endpoint
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
    use_unreliable_probes: bool = False  # flag and steer with probes whose measured AUROC reaches chance too
    stop_steering_on_detection: bool = False  # a task's conditional steering ends once its violation is detected
    experiments: str | None = None  # experiments file (steerer/ab); reloaded on SIGHUP
    outcome_log: str | None = None  # SQLite outcome log; None: none (the CLI defaults it with --experiments)
    outcome_sync: str = "normal"  # SQLite synchronous: normal (safe against a process kill) or full (power loss)

    def validate(self) -> None:
        if not 0 <= self.port <= 65535 or (self.metrics_port is not None and not 0 <= self.metrics_port <= 65535):
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


class _BearerToken(grpc.ServerInterceptor):
    """Reject RPCs without `authorization: Bearer <token>` (health checks excepted) with UNAUTHENTICATED."""

    def __init__(self, token: str, metrics: Metrics):
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(AUTH_EXEMPT):
            return continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        self._metrics.request_done(details.method.rsplit("/", 1)[-1], grpc.StatusCode.UNAUTHENTICATED)

        def deny(request, context: grpc.ServicerContext):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

        wrap = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
            (handler.request_streaming, handler.response_streaming)]
        return wrap(deny, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


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

        kind = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary",
                (True, True): "stream_stream"}[(handler.request_streaming, handler.response_streaming)]
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
        self.servicer = SteererServicer(self.scheduler, self.metrics, limits, self.experiments, self.outcome_log)
        # One thread per RPC in flight: the batch, the queue and some room for quick RPCs and health checks.
        # Past that gRPC itself answers RESOURCE_EXHAUSTED.
        workers = config.max_batch + config.max_queue + 16
        interceptors = [_BearerToken(config.auth_token, self.metrics)] if config.auth_token else []
        interceptors.append(_DecodeGuard())  # inside the token check, whose deny handlers then decode safely too
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                                  interceptors=interceptors, maximum_concurrent_rpcs=workers,
                                  options=[("grpc.so_reuseport", 0)])
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
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new RPCs, give the ones in flight `grace_s`, then stop everything."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
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
