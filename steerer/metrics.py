"""Prometheus metric definitions of every front (gRPC service, `vllm serve` plugin), in their own registry,
served on the metrics port at `/metrics`. No grpc here: the vLLM plugin imports this without the service
(`steerer.service.metrics` re-exports it under the old names); a status code is a name ("OK") or an enum
with `.name` (grpc.StatusCode).

Labels are bounded: `method` is one of the five RPCs or three HTTP routes (anything else, e.g. reflection
or an unknown method, is "other"), `code` a gRPC status name, `task` one of the constraint tasks the server knows (validated before
any metric sees it), and the verdict labels take two or three values each. No prompt or response text,
request id or experiment key is ever a label. `experiment`/`arm` label values come only from the
experiments file, at most `MAX_ARM_LABELS` pairs over the process's life (reloads included); past that,
and for anything not configured, the pair is ("other", "other").
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

METHODS = ("Generate", "GenerateStream", "ListProbes", "GetModelInfo", "ReloadProbeBank",
           "ChatCompletions", "Completions", "ListModels")  # the last three: HTTP routes (service/http.py)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
RISK_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
REQUEST_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
# Flag lead over detection in tokens (detection index - first flag index): > 0 the flag came first.
LEAD_BUCKETS = (-64, -16, -8, -4, -2, -1, 0, 1, 2, 3, 4, 8, 16, 32, 64, 128)
MAX_ARM_LABELS = 32
OTHER = ("other", "other")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("steerer_requests", "RPCs finished, by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.tokens = Counter("steerer_tokens_generated", "Response tokens generated (all requests)", registry=r)
        self.ttft = Histogram("steerer_time_to_first_token_seconds", "Request arrival to its first token event",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("steerer_inter_token_latency_seconds", "Time between consecutive token events of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Gauge("steerer_batch_size", "Requests in the running batch", registry=r)
        self.queue_depth = Gauge("steerer_queue_depth", "Requests waiting for a slot in the batch", registry=r)
        self.step_batch = Histogram("steerer_step_batch_size", "Rows per forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.prefill_rows = Histogram("steerer_prefill_rows", "Requests admitted per prefill (admission chunk)",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.risk = Histogram("steerer_probe_risk", "Smoothed probe risk (1 - P(satisfied)) per token, by task",
                              ["task"], buckets=RISK_BUCKETS, registry=r)
        self.flags = Counter("steerer_flags_raised", "Violation flags raised during generation, by task",
                             ["task"], registry=r)
        self.detected = Counter("steerer_violations_detected", "Violations a prefix of the response already "
                                "decided (certain, from incremental checks on the text), by task", ["task"],
                                registry=r)
        self.guard_vetoes = Counter("steerer_guard_vetoes", "Candidate tokens a guarded constraint vetoed at "
                                    "sampling (each redrawn; steerer.guard), by task", ["task"], registry=r)
        self.lead = Histogram("steerer_flag_lead_tokens", "For violations both flagged and detected: detection "
                              "token minus first flag token (> 0: the flag predicted it; < 0: it came late)",
                              ["task"], buckets=LEAD_BUCKETS, registry=r)
        self.verdicts = Counter(
            "steerer_verdicts", "Constraints at the end of a response: the probe's prediction vs the checker "
            "(violation=unknown where the task has no checker), and whether a flag was ever raised",
            ["task", "predicted_violation", "violation", "flagged"], registry=r)
        self.steered = Counter("steerer_steered_tokens", "Tokens generated with non-zero steering, by task",
                               ["task"], registry=r)
        self.reloads = Counter("steerer_bank_reloads", "Probe-bank reloads by result", ["result"], registry=r)
        self.reload_pending = Gauge("steerer_bank_reload_pending",
                                    "1 while a probe-bank reload waits for the requests in flight to finish",
                                    registry=r)
        self.bank = Info("steerer_bank", "The probe bank in use", registry=r)
        arm = ["experiment", "arm"]
        self.arm_requests = Counter("steerer_experiment_requests", "Finished responses per experiment arm "
                                    "(randomized; forced QA requests are not counted)", arm, registry=r)
        self.arm_verdicts = Counter("steerer_experiment_verdicts", "Checker verdicts per experiment arm and task "
                                    "(violation=unknown where not checkable)", [*arm, "task", "violation"],
                                    registry=r)
        self.arm_latency = Histogram("steerer_experiment_request_latency_seconds", "RPC arrival to the finished "
                                     "result, per experiment arm", arm, buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.arm_share = Gauge("steerer_experiment_arm_share", "Configured traffic share of each arm of a running "
                               "experiment (0 once stopped or removed)", arm, registry=r)
        self.experiment_reloads = Counter("steerer_experiment_reloads", "Experiments-file loads and reloads by "
                                          "result", ["result"], registry=r)
        self.outcome_records = Counter("steerer_outcome_records", "Records committed to the outcome log",
                                       registry=r)
        self.outcome_errors = Counter("steerer_outcome_log_errors", "Records the outcome log failed to write",
                                      registry=r)
        self._arm_labels: set[tuple[str, str]] = set()  # every pair ever used: bounded by MAX_ARM_LABELS
        self._configured: set[tuple[str, str]] = set()
        self._labels_lock = threading.Lock()
        self._server = None

    def prepare(self, tasks: Iterable[str]) -> None:
        """Create every bounded series at zero so rates exist before the first event."""
        for method in METHODS:
            self.requests.labels(method, "OK")
        for task in tasks:
            self.risk.labels(task)
            self.flags.labels(task)
            self.detected.labels(task)
            self.guard_vetoes.labels(task)
            self.lead.labels(task)
            self.steered.labels(task)
            for predicted in ("yes", "no"):
                for flagged in ("yes", "no"):
                    self.verdicts.labels(task, predicted, "no", flagged)
        for result in ("ok", "error"):
            self.reloads.labels(result)

    def set_bank(self, version: str, model: str, tasks: Iterable[str]) -> None:
        self.bank.info({"version": version, "model": model})
        self.prepare(tasks)

    def set_experiments(self, experiments, tasks: Iterable[str]) -> None:
        """Label values for the arms of `experiments` (an `ExperimentSet`), created at zero; shares updated."""
        configured = set(experiments.labels())
        with self._labels_lock:
            gone = sorted((self._configured - configured) & self._arm_labels)
            self._configured = configured
        for pair in gone:
            self.arm_share.labels(*pair).set(0)
        for exp in experiments.experiments:
            shares = exp.shares
            for a in exp.arms:
                pair = self.arm_label(exp.name, a.name)
                if pair == OTHER:
                    continue
                self.arm_share.labels(*pair).set(shares[a.name] if exp.running else 0)
                self.arm_requests.labels(*pair)
                self.arm_latency.labels(*pair)
                for task in set(tasks) & exp.tasks:
                    for violation in ("yes", "no"):
                        self.arm_verdicts.labels(*pair, task, violation)

    def arm_label(self, experiment: str, arm: str) -> tuple[str, str]:
        """The label pair for an arm: itself if configured and within the cap, else ("other", "other")."""
        pair = (experiment, arm)
        with self._labels_lock:
            if pair not in self._configured:
                return OTHER
            if pair not in self._arm_labels:
                if len(self._arm_labels) >= MAX_ARM_LABELS:
                    return OTHER
                self._arm_labels.add(pair)
        return pair

    def token_event(self, event) -> None:
        """A `TokenEvent`'s readings, the flags it raised and the violations it made certain (any engine's)."""
        for task, risk in event.risks.items():
            self.risk.labels(task).observe(risk)
        for flag in event.flags:
            if flag.raised:
                self.flags.labels(flag.task).inc()
        for detection in event.detections:
            self.detected.labels(detection.task).inc()
        for task, vetoed in event.redrawn.items():
            self.guard_vetoes.labels(task).inc(vetoed)

    def result(self, result) -> None:
        """A finished `Result`: its tokens, verdicts (prediction vs checker, flagged), flag lead and steered tokens."""
        self.tokens.inc(len(result.tokens))
        for v in result.verdicts:
            violation = "unknown" if v.satisfied is None else ("no" if v.satisfied else "yes")
            # A muted probe made no prediction: "muted", so it never reads as "predicted OK" on a dashboard.
            predicted = "muted" if v.probe_muted else ("yes" if v.predicted_violation else "no")
            self.verdicts.labels(v.task, predicted, violation, "yes" if v.flagged else "no").inc()
            if v.detected_at is not None and v.first_flag_token is not None:
                self.lead.labels(v.task).observe(v.detected_at - v.first_flag_token)
        for task, n in result.steered_tokens.items():
            if n:
                self.steered.labels(task).inc(n)

    def request_done(self, method: str, code) -> None:
        """One finished (or refused) RPC; `code` is a status name or an enum with `.name` (grpc.StatusCode)."""
        name = getattr(code, "name", code)
        self.requests.labels(method if method in METHODS else "other", str(name)).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the `/metrics` HTTP server; returns the bound port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
