"""steerer inside plain `vllm serve`: monitoring and per-request steering behind vLLM's OpenAI-compatible API.

    VLLM_USE_V2_MODEL_RUNNER=0 STEERER_METRICS_PORT=9464 vllm serve MODEL \\
        --hf-overrides '{"architectures": ["SteererLlamaForCausalLM"]}' \\
        --logits-processors steerer.engine.vllm.serve_plugin:SteererServe \\
        --middleware steerer.engine.vllm.serve_plugin.CacheSalt

A request opts in through `vllm_xargs` (vLLM copies them into `SamplingParams.extra_args`):
    steerer_constraints  'TASK' or 'TASK:{json params}' (the CLI's --constraint), or a list of them
    steerer_policy       'kind:alpha' for every constraint (default off: monitoring only)
    steerer_policies     'TASK=kind:alpha', or a list of them: per-task policies that override steerer_policy
Requests without these keys are plain vLLM traffic (never steered, never tapped).

Where it runs. `SteererServe` is a V1 logits processor, built by the model runner in the worker process, where
the model's custom op and its `WorkerState` (`state.py`) live: it owns a `steerer.controller.Controller` and
drives it through the `steerer.driver.Driver` every engine uses, from `update_state(BatchUpdate)`, which vLLM
calls before every forward pass (also after the last one: the step that clears finished requests calls it with
their removal). There it
  - reads the previous pass: rows whose vLLM output list grew sampled a token in it; their tapped residuals are
    scored (`observe`/`settle`) and the token goes to the controller (`token`, a `TokenEvent`);
  - applies the batch update: an added row's `extra_args` become a controller row (the output list in
    `BatchUpdate.added` is vLLM's live list, appended to after each pass); a managed request out of the batch
    that vLLM's model runner still holds (preempted, or not scheduled this step) keeps its slot and comes back
    with the same `SamplingParams` object; any other is finished: its `Result` and verdicts are built;
  - writes every row's coefficients into the steering tables the op reads in the next pass.
Its `apply` changes logits only for rows with a guarded constraint (`guard` policies: `guard.py`, docs/GUARD.md
"vLLM"), masking the tokens the guard vetoes before vLLM's sampler draws; without one it returns them at once.
What vLLM decides outside the worker it cannot see: the end reading is the last sampled token's (there is no
extra pass over EOS as in `VLLMSteerer`), and a stop string or an abort only shows as a removal (a request with
stop strings whose text contains one is finished as "stop"; others are cancelled: counted, no verdicts).

Validation: `validate_params` runs in the API server for every request; malformed steerer keys are a
ValueError, which vLLM answers with HTTP 400 and the message. `CacheSalt` (an ASGI middleware, `--middleware`)
gives requests that steer the `cache_salt` the offline driver gives them (`salt.py`), so prefix caching never
shares KV between steering configurations; a client's own salt is combined with it. Without the middleware a
client must send that salt itself (`steering_salt(vllm_xargs)`).

Start-up: the bank and the checkpoint's architecture are checked in the API server before the engine starts
(`startup.py`: exit with one line, or STEERER_ON_BANK_MISMATCH=off: steerer off, plain traffic served).

Metrics: the service's Prometheus metrics (`steerer.metrics.Metrics`, without the gRPC method labels and without
the latency/batch series vLLM exports itself), published from the worker
process on `STEERER_METRICS_PORT` (+ the data-parallel rank; unset: not served) at `STEERER_METRICS_HOST`
(default 127.0.0.1); `steerer_requests{method="vllm"}` counts finished (OK) and cancelled requests.
Environment: `STEERER_BANK` (default: the packaged bank), `STEERER_USE_UNRELIABLE_PROBES=1`,
`STEERER_STOP_STEERING_ON_DETECTION=1` (as the library's option), `STEERER_RESULTS_LOG` (append each `Result` as a
JSON line). Tensor parallel: every rank runs a controller on rank 0's taps (`ranks.py`), so all add the same
steering; only rank 0 publishes (metrics, results log, results store). Pipeline parallel size 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from steerer.bank import BankError, ProbeBank
from steerer.constraints import Constraint, validate_request
from steerer.controller import Controller, Result, RowSpec, check_verdicts
from steerer.driver import Driver, Stop
from steerer.engine.vllm.guard import Hook, guard_logits
from steerer.engine.vllm.ranks import agree, publishes, tp_rank, tp_size
from steerer.engine.vllm.results_route import ResultsStore, Trail, is_route, serve_results
from steerer.engine.vllm.startup import bank_problem, load_bank, off_reason
from steerer.engine.vllm.state import STATE, UNMANAGED
from steerer.policy import SteeringPolicy, check_strengths

CONSTRAINTS_KEY, POLICY_KEY, POLICIES_KEY = "steerer_constraints", "steerer_policy", "steerer_policies"
KEYS = (CONSTRAINTS_KEY, POLICY_KEY, POLICIES_KEY)
METHOD = "vllm"  # steerer_requests{method} of the requests this plugin serves

log = logging.getLogger("vllm.steerer")  # under vLLM's logger: its handler, format and VLLM_LOGGING_LEVEL


# -- requests ------------------------------------------------------------------------------------------------
def _strings(extra: dict, key: str) -> list[str]:
    value = extra.get(key, [])
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"vllm_xargs.{key} must be a string or a list of strings, got {value!r}")


def row_spec(extra_args: dict | None) -> RowSpec | None:
    """The steerer part of a request's `vllm_xargs` as a `RowSpec`; None when it has no `steerer_` key.
    ValueError (a message for the client) when it is malformed; bank-independent (see `validate`)."""
    extra = {k: v for k, v in (extra_args or {}).items() if isinstance(k, str) and k.startswith("steerer_")}
    if not extra:
        return None
    unknown = sorted(set(extra) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown vllm_xargs key {', '.join(unknown)}; steerer reads {', '.join(KEYS)}")
    constraints = tuple(Constraint.parse(text) for text in _strings(extra, CONSTRAINTS_KEY))
    if not constraints:
        raise ValueError(f"vllm_xargs.{CONSTRAINTS_KEY}: name at least one constraint, e.g. 'lowercase' or "
                         "'word_count:{\"relation\": \"at most\", \"limit\": 20}'")
    policy = _strings(extra, POLICY_KEY) or ["off"]
    if len(policy) != 1:
        raise ValueError(f"vllm_xargs.{POLICY_KEY} is one 'kind:alpha' for every constraint; per task, use "
                         f"{POLICIES_KEY}")
    policies = {}
    for text in _strings(extra, POLICIES_KEY):
        task, sep, own = text.partition("=")
        if not sep:
            raise ValueError(f"vllm_xargs.{POLICIES_KEY}: {text!r} is not 'TASK=kind:alpha'")
        policies[task.strip()] = SteeringPolicy.parse(own)
    return RowSpec(constraints, SteeringPolicy.parse(policy[0]), policies)


def use_unreliable_probes() -> bool:
    return os.environ.get("STEERER_USE_UNRELIABLE_PROBES", "") not in ("", "0", "false", "False")


def stop_steering_on_detection() -> bool:
    """`STEERER_STOP_STEERING_ON_DETECTION=1`: as the library's option (a detected task's conditional steering ends)."""
    return os.environ.get("STEERER_STOP_STEERING_ON_DETECTION", "") not in ("", "0", "false", "False")


def validate(extra_args: dict | None) -> RowSpec | None:
    """`row_spec`, then the library's request validation against the bank and its strength bound (ValueError for
    the client); refused outright while steerer is off (the start-up check found a bank that does not fit)."""
    spec = row_spec(extra_args)
    if spec is not None:
        reason = off_reason()
        if reason:
            raise ValueError(f"steerer is off on this server ({reason}); send the request without steerer_ keys")
        bank = load_bank()
        validate_request(spec, bank.tasks)
        check_strengths(spec, bank)
    return spec


def steering_salt(extra_args: dict | None, client_salt: Any = None) -> str | None:
    """The `cache_salt` a request's steering needs (None: it steers nothing, or it is invalid and will be
    refused), combined with the client's own salt if it sent one."""
    from steerer.engine.vllm.salt import cache_salt
    from steerer.taps import Where

    try:
        spec = validate(extra_args)
        bank = load_bank()
        salt = None if spec is None else cache_salt(spec, bank, bank.muted(use_unreliable_probes()).tolist(),
                                                    Where.GENERATED.value)
    except (ValueError, KeyError):
        return None
    if salt is not None and isinstance(client_salt, str) and client_salt:
        salt = "steerer-" + hashlib.sha256(f"{client_salt}\0{salt}".encode()).hexdigest()[:24]
    return salt


class CacheSalt:
    """ASGI middleware (`vllm serve --middleware steerer.engine.vllm.serve_plugin.CacheSalt`): sets the
    `cache_salt` of completion, chat, responses and messages requests whose `vllm_xargs` steer, so their steered
    KV blocks are never served to requests with another steering configuration (or none). Others pass untouched.
    It also answers `GET /steerer/v1/results/{response_id}` (`results_route.py`): a request's verdicts and flags."""

    PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"})

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if is_route(scope):  # GET /steerer/v1/results/{response_id}: results_route.py
            await serve_results(scope, send)
            return
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in self.PATHS:
            await self.app(scope, receive, send)
            return
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if messages[-1]["type"] == "http.request":
            body = salted(b"".join(m.get("body", b"") for m in messages))
            if body is not None:
                messages = [{"type": "http.request", "body": body, "more_body": False}]
                headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
                scope = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def salted(body: bytes) -> bytes | None:
    """A JSON request body with the steering `cache_salt` set, or None where nothing changes."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("vllm_xargs"), dict):
        return None
    salt = steering_salt(payload["vllm_xargs"], payload.get("cache_salt"))
    if salt is None:
        return None
    payload["cache_salt"] = salt
    return json.dumps(payload).encode()


# -- metrics (one registry and HTTP server per process) ----------------------------------------------------------
_metrics = None
_metrics_lock = threading.Lock()


def process_metrics(bank: ProbeBank | None, offset: int = 0):
    """This process's `Metrics` (`steerer.metrics`: no grpc), created once with the series this front exports (no
    gRPC method labels); served on STEERER_METRICS_PORT + `offset` when set (`startup.serve_metrics`: a taken
    port is retried a while, then logged, not fatal). `bank` None: steerer is off in this server."""
    global _metrics
    from steerer.engine.vllm.startup import serve_metrics
    from steerer.metrics import METHODS, Metrics

    with _metrics_lock:
        if _metrics is None:
            metrics = Metrics()
            if bank is None:
                metrics.bank.info({"version": "off", "model": "steerer off: the bank does not fit this model"})
            else:
                metrics.set_bank(bank.version, bank.model, bank.tasks)
            for method in METHODS:  # the gRPC service's series, which `set_bank` creates: none here
                with contextlib.suppress(KeyError):
                    metrics.requests.remove(method, "OK")
            # vLLM exports these itself (vllm:time_to_first_token_seconds, vllm:num_requests_running, ...), which
            # the dashboard reads under `vllm serve`: steerer's copies would only ever read 0.
            for metric in (metrics.ttft, metrics.itl, metrics.batch_size, metrics.queue_depth, metrics.step_batch,
                           metrics.prefill_rows):
                metrics.registry.unregister(metric)
            for code in ("OK", "CANCELLED"):
                metrics.requests.labels(METHOD, code)
            serve_metrics(metrics, offset)
            _metrics = metrics
        return _metrics


# -- the worker side -----------------------------------------------------------------------------------------
@dataclass
class _Row:
    """A request steerer manages, from its first pass to its removal (in the batch, or out of it for a while)."""

    request_id: str
    params: Any  # vLLM's SamplingParams: a resumed request brings the same object back
    prompt_tokens: int
    output: list[int]  # vLLM's live list of the request's generated tokens
    seen: int = 0  # of `output`, the tokens given to the controller
    finish: str | None = None  # "eos" / "length": its last token ended it (vLLM's own stop rule)
    trail: Trail = field(default_factory=Trail)  # its flag changes, detections and steering, for the results store


def _building_runner():
    """The V1 model runner constructing this logits processor (up the call stack): the plugin reads its
    `requests` (the requests it holds, preempted ones included) and its model (fingerprint, lens weights)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), GPUModelRunner):
            return frame.f_locals["self"]
        frame = frame.f_back
    raise RuntimeError("steerer's vllm serve plugin runs on vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")


class SteererServe(LogitsProcessor):
    """`--logits-processors steerer.engine.vllm.serve_plugin:SteererServe`: see the module docstring."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate(sampling_params.extra_args)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        from steerer.engine.vllm import ARCHITECTURE, STEERER_ARCHITECTURES
        from steerer.engine.vllm.driver import check_version

        check_version()
        STATE.new_batch()  # a new engine's batch: no rows of an engine shut down earlier in this process
        self.runner = _building_runner()
        parallel, model_config = vllm_config.parallel_config, vllm_config.model_config
        if parallel.pipeline_parallel_size != 1:  # tensor parallel: every rank holds the full residual (ranks.py)
            raise RuntimeError("steerer's vllm serve plugin runs at pipeline parallel size 1 (tensor parallel is "
                               "supported)")
        self.publisher = publishes()  # rank 0 of tensor parallel: metrics, results log, results store
        if not set(STEERER_ARCHITECTURES) & set(model_config.architectures or []):  # the family's Steerer<Arch>
            raise RuntimeError(f"steerer's logits processor needs its model class: --hf-overrides "
                               f"'{{\"architectures\": [\"{ARCHITECTURE}\"]}}' (or the Steerer<Arch> of "
                               f"the checkpoint's family: {', '.join(STEERER_ARCHITECTURES)})")
        if vllm_config.scheduler_config.async_scheduling:
            raise RuntimeError("steerer's vllm serve plugin reads each pass's tokens before the next one: run vLLM "
                               "with --no-async-scheduling")
        if STATE.installed:
            raise RuntimeError("another steerer engine holds this process's vLLM plugin state")
        if off_reason() is not None:  # the start-up check refused the bank (STEERER_ON_BANK_MISMATCH=off)
            self.metrics = process_metrics(None, parallel.data_parallel_rank) if self.publisher else None
            self._failed = True  # `update_state` does nothing: plain vLLM
            log.warning("steerer: off in this worker (%s); serving plain traffic", off_reason())
            return
        self.bank = load_bank()
        problem = bank_problem(self.bank, model_config.hf_config, None)  # as at start-up (fingerprint: `_start`)
        if problem is not None:
            raise BankError(problem)
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer,
                                                       revision=model_config.tokenizer_revision)
        self.capacity = 2 * vllm_config.scheduler_config.max_num_seqs  # room for preempted requests' slots
        self.max_model_len = model_config.max_model_len
        self.metrics = process_metrics(self.bank, parallel.data_parallel_rank) if self.publisher else None
        self.results_log = os.environ.get("STEERER_RESULTS_LOG") if self.publisher else None
        # read by GET /steerer/v1/results/{id} in the API server
        self.store = ResultsStore.from_env() if self.publisher else None
        self.controller: Controller | None = None  # built at the first batch update (the model is loaded then)
        self.rows: dict[int, _Row] = {}  # slot -> managed request
        self._by_params: dict[int, int] = {}  # id(SamplingParams) -> slot (the object is held in `rows`)
        self._seen_pass = STATE.passes
        self._failed = False
        # Checkers (a MiniLM embedding for `topic`), metrics and the results log run off the engine's thread.
        self._post = ThreadPoolExecutor(1, thread_name_prefix="steerer-results")

    def is_argmax_invariant(self) -> bool:
        return False  # the guard masks vetoed tokens (greedy too); without a guarded row `apply` returns at once

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._failed or getattr(self, "driver", None) is None:
            return logits
        try:
            return guard_logits(Hook(self.driver, self._outputs, self._temperature), logits)
        except Exception:  # as `update_state`: turn steerer off, keep serving
            log.exception("steerer: internal error in the guard; monitoring and steering are off for this engine "
                          "from now on")
            self._failed = True
            STATE.uninstall()
            return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self._failed:
            return
        if self.controller is None:
            self._start()  # a bank for another model fails here, loudly (the first request's step)
        try:
            self._update(batch_update)
        except Exception:  # monitoring must not take the endpoint down: turn steerer off, keep serving
            log.exception("steerer: internal error; monitoring and steering are off for this engine from now on")
            self._failed = True
            STATE.uninstall()

    # -- internals -------------------------------------------------------------------------------------------
    def _start(self) -> None:
        from steerer.engine.vllm.weights import fingerprint, lens_weights

        model = self.runner.get_model()
        if tp_rank() == 0:  # another rank's embedding is another slice of the vocabulary (rank 0's failure ends all)
            self.bank.check_model(fingerprint(model), int(model.config.hidden_size))
        if any(self.bank.lens_params) and tp_size() > 1:  # each rank holds a slice of the unembedding
            raise BankError("a bank whose probes read the logit lens needs tensor parallel size 1")
        lens = lens_weights(model) if any(self.bank.lens_params) else None
        self.controller = Controller(self.bank, self.tokenizer, capacity=self.capacity, device=self.device,
                                     check=False, use_unreliable_probes=use_unreliable_probes(), lens=lens,
                                     stop_steering_on_detection=stop_steering_on_detection())
        self._all = torch.arange(self.capacity, device=self.device)
        STATE.install(self.capacity, self.controller.tap_layers, self.controller.steering)
        log.info("steerer: monitoring with bank %s (%d probes) in this worker", self.bank.version,
                 len(self.bank.probes))

    def _update(self, batch_update: BatchUpdate | None) -> None:
        if getattr(self, "driver", None) is None or self.driver.controller is not self.controller:
            self.driver = Driver(self.controller)  # over this engine's controller; stop rules per request (`_stop`)
        self._read_pass()
        if batch_update is not None:
            added = [(row, self._joined(params, prompt, output), len(prompt or ()))
                     for row, params, prompt, output in batch_update.added]
            moved = [(a, b, direction == MoveDirectionality.SWAP) for a, b, direction in batch_update.moved]
            STATE.update_rows(batch_update.batch_size, batch_update.removed, added, moved)
        # Managed requests out of the batch: just removed (`removed` lists only rows left empty; a row that an
        # added or moved one took over is gone too), or out for a while (preempted), or aborted while out.
        present = set(STATE.rows.slots)
        for slot in [s for s in self.rows if s not in present]:
            self._left(slot)
        self._coefficients()

    def _read_pass(self) -> None:
        """The last forward pass: score the taps of rows that sampled a token in it, then hand over the tokens."""
        info = STATE.last_pass()
        if info is None or info.number == self._seen_pass:
            return
        self._seen_pass = info.number
        picked, slots, index = [], [], []
        for row, slot in enumerate(info.slots):
            live = self.rows.get(slot)
            if live is not None and len(live.output) > live.seen:  # else a prefill chunk: nothing sampled
                picked.append(row)
                slots.append(slot)
                index.append(live.seen - 1)  # the pass read the token before the new one (-1: the prompt's end)
        if not picked:
            return
        rows = torch.tensor(picked, device=self.device)
        # rank 0's taps on every tensor-parallel rank (ranks.py): the controllers score the same numbers
        residuals = agree({layer: STATE.captured[layer][rows] for layer in self.controller.tap_layers})
        self.driver.read(slots, index, residuals)  # no closing pass: vLLM stops a row at its EOS itself
        for slot in slots:
            live = self.rows[slot]
            token = live.output[live.seen]
            live.seen += 1
            event = self.driver.token(slot, token)  # the row's stop rule (vLLM's, `_stop`) decides its end
            live.trail.add(event)
            live.finish = self.driver.ending(slot)
            if self.publisher:
                self.metrics.token_event(event)

    def _outputs(self, slot: int) -> int | None:
        """For the guard: the tokens vLLM generated for the slot's request, all given to the controller (None:
        not so, or its last token ended it)."""
        live = self.rows.get(slot)
        if live is None or live.finish is not None or live.seen != len(live.output):
            return None
        return live.seen

    def _temperature(self, slot: int) -> float:
        return float(self.rows[slot].params.temperature)

    def _stop(self, params, prompt_tokens: int) -> Stop:
        """vLLM's own stop rule for a request, as the driver applies it: its EOS and stop token ids, and its
        token budget (`max_tokens`, and what the context leaves after the prompt)."""
        eos = frozenset(t for t in (params.eos_token_id, *(params.stop_token_ids or ())) if t is not None)
        budget = min(params.max_tokens or sys.maxsize, self.max_model_len - prompt_tokens)
        return Stop(eos, max(budget, 1))

    def _joined(self, params, prompt, output) -> int:
        """A row added to the batch: a managed request coming back, a new one (its slot), or plain traffic."""
        slot = self._by_params.get(id(params))
        if slot is not None and self.rows[slot].params is params:
            return slot  # resumed (preempted, or not scheduled for a step)
        try:  # the worker's one validation (the API server's `validate_params` ran in another process)
            spec = validate(params.extra_args)
        except ValueError as exc:  # refused at the API already; an engine fed directly gets no steering
            log.warning("steerer: request not monitored: %s", exc)
            return UNMANAGED
        if spec is None:
            return UNMANAGED
        if not self.driver.free_slots:
            log.warning("steerer: all %d slots in use; a request goes unmonitored", self.capacity)
            return UNMANAGED
        request_id = next((rid for rid, state in self.runner.requests.items() if state.output_token_ids is output),
                          None) or f"vllm-{id(output):x}"
        slot = self.driver.join(spec, request_id, self._stop(params, len(prompt or ())), validated=True)
        self.rows[slot] = _Row(request_id, params, len(prompt or ()), output, seen=len(output))
        self._by_params[id(params)] = slot
        if self.store is not None:
            self._post.submit(self.store.running, request_id)
        return slot

    def _left(self, slot: int) -> None:
        """A row out of the batch: finished, unless vLLM still holds its request (preempted, or not scheduled)."""
        live = self.rows[slot]
        if live.request_id in self.runner.requests:
            return
        del self.rows[slot]
        del self._by_params[id(live.params)]
        result = self.driver.finish(slot, live.finish or "stop", live.prompt_tokens)
        if not self.publisher:  # rank 0 of tensor parallel publishes (the same result) for every rank
            return
        if live.finish is None and not any(s in result.text for s in (live.params.stop or ())):
            self.metrics.requests.labels(METHOD, "CANCELLED").inc()  # aborted (e.g. the client went away)
            if self.store is not None:
                self._post.submit(self.store.cancelled, live.request_id)
            return
        self._post.submit(self._publish, result, live.trail)

    def _publish(self, result: Result, trail: Trail) -> None:
        try:
            check_verdicts(result)
            self.metrics.result(result)
            if self.store is not None:
                self.store.finished(result, trail)
            if self.results_log:
                with open(self.results_log, "a", encoding="utf-8") as out:
                    out.write(json.dumps(asdict(result)) + "\n")
            self.metrics.requests.labels(METHOD, "OK").inc()
        except Exception:
            log.exception("steerer: could not publish the result of %s", result.request_id)

    def _coefficients(self) -> None:
        """Every managed slot's alphas for the next pass; a row that has not sampled yet gets zeros (as the
        driver: `where=generated` starts with the first generated token)."""
        self.driver.before_slots()
