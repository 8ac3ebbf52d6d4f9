"""A `vllm serve` client reads its request's verdicts and flag events by the response id it received.

    GET /steerer/v1/results/{response_id}[?wait=SECONDS]     (e.g. chatcmpl-..., cmpl-...)

Why a store: the verdicts are built in the worker process (`serve_plugin.SteererServe`), the HTTP request is
answered by the API server, another process. The worker writes one small JSON file per monitored request into
a per-server folder (`ResultsStore`): "running" when the request joins the batch, then its record when it leaves
(finished, or cancelled). `CacheSalt`, the plugin's middleware in the API server, answers the route from it
(`answer`).

Ids: vLLM's API server names a request `chatcmpl-<X>` / `cmpl-<X>` (X: a uuid, or the client's X-Request-Id) and
answers with that id. A completion's prompt i becomes `<that id>-<i>` (even a single prompt: `-0`); a chat
request with several inputs `<that id>_<i>`. The engine then runs it as `<...>-<8 random characters>`
(`vllm.v1.engine.input_processor.InputProcessor.assign_request_id`), the id the worker sees. `response_id`
undoes the last step and records are stored under the result; `lookup` finds a completion's under `-0`.
tests/test_vllm_serve_results.py asserts these relations against vLLM's source.

Folder: `STEERER_RESULTS_DIR`, else one the API server names at plugin load (`share_store`, inherited by the
engine core and worker it starts) under the temp dir, removed when the API server exits. Retention: the newest
`STEERER_RESULTS_KEEP` (default 1000) records per worker; older ones are deleted (404 afterwards).
Answers (after waiting up to `wait` seconds, at most 60, default 0, for a record that is not "running"): 200 a
finished or cancelled record, 202 `"status": "running"`, 404 an OpenAI-style error for an id the store does not
hold (yet: a request's "running" record is written when it joins the batch, from the worker's results thread).
The route checks vLLM's Bearer token (`--api-key` / VLLM_API_KEY) as vLLM's own routes do.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

RESULTS_DIR_ENV, KEEP_ENV = "STEERER_RESULTS_DIR", "STEERER_RESULTS_KEEP"
DEFAULT_KEEP = 1000
ROUTE = "/steerer/v1/results/"
MAX_WAIT_S = 60.0
POLL_S = 0.05  # how often a waiting GET re-reads the store

log = logging.getLogger("vllm.steerer")


def response_id(internal_id: str) -> str:
    """The id the client received for the engine's request id: vLLM appends `-` and 8 random characters."""
    head, sep, tail = internal_id.rpartition("-")
    return head if sep and len(tail) == 8 else internal_id


def share_store() -> None:
    """In the API server (the process that starts vLLM's engine core): name this server's results folder in the
    environment its children inherit, unless STEERER_RESULTS_DIR chose one; removed at exit."""
    from steerer.engine.vllm.startup import in_child_process

    if in_child_process() or os.environ.get(RESULTS_DIR_ENV):
        return
    folder = Path(tempfile.gettempdir()) / f"steerer-results-{os.getpid()}-{os.urandom(4).hex()}"
    os.environ[RESULTS_DIR_ENV] = str(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def _file(folder: Path, rid: str) -> Path:
    return folder / (hashlib.sha256(rid.encode()).hexdigest()[:32] + ".json")


def keep() -> int:
    raw = os.environ.get(KEEP_ENV, "")
    try:
        value = int(raw) if raw else DEFAULT_KEEP
    except ValueError:
        raise ValueError(f"{KEEP_ENV} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{KEEP_ENV} must be a positive integer, got {raw!r}")
    return value


# -- the worker side -----------------------------------------------------------------------------------------
@dataclass
class Trail:
    """What a request's token events said, kept until its record is written: flag changes, detections, and the
    steering strengths as they changed (one entry per change, not per token)."""

    flags: list[dict] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)
    steering: list[dict] = field(default_factory=list)
    _alphas: dict[str, float] = field(default_factory=dict)

    def add(self, event) -> None:
        """A `steerer.request.TokenEvent` of this request."""
        self.flags += [{"task": f.task, "tokenIndex": f.token_index, "risk": f.risk, "raised": f.raised}
                       for f in event.flags]
        self.detections += [{"task": d.task, "tokenIndex": d.token_index} for d in event.detections]
        for task, alpha in event.steering.items():
            if self._alphas.get(task, 0.0) != alpha:
                self.steering.append({"task": task, "tokenIndex": event.index, "alpha": alpha})
                self._alphas[task] = alpha


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def verdict_json(verdict) -> dict[str, Any]:
    """A `Verdict` with the proto's JSON field names (as the HTTP front's); `params` as the request had them."""
    return {_camel(k): v for k, v in asdict(verdict).items()}


def record(result, trail: Trail) -> dict[str, Any]:
    """A finished request's record: its verdicts, flag changes, detections and the steering applied."""
    return {"object": "steerer.result", "id": response_id(result.request_id), "requestId": result.request_id,
            "status": "finished", "finishReason": result.finish_reason, "text": result.text,
            "promptTokens": result.prompt_tokens, "completionTokens": len(result.tokens),
            "bankVersion": result.bank_version, "verdicts": [verdict_json(v) for v in result.verdicts],
            "flags": trail.flags, "detections": trail.detections,
            "steering": {"steeredTokens": result.steered_tokens, "changes": trail.steering}}


class ResultsStore:
    """The worker's writer: one JSON file per request (written whole, then renamed: a reader never sees half),
    the newest `keep` kept. Used from one thread (the plugin's results thread)."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = folder, keep
        self._written: deque[str] = deque()
        self._ids: set[str] = set()

    @classmethod
    def from_env(cls) -> ResultsStore | None:
        folder = os.environ.get(RESULTS_DIR_ENV)
        return None if not folder else cls(Path(folder), keep())

    def running(self, internal_id: str) -> None:
        self._status(internal_id, "running")

    def cancelled(self, internal_id: str) -> None:
        self._status(internal_id, "cancelled")

    def _status(self, internal_id: str, status: str) -> None:
        rid = response_id(internal_id)
        try:  # run on the plugin's results thread: nothing else would see the error
            self._write(rid, {"object": "steerer.result", "id": rid, "requestId": internal_id, "status": status})
        except OSError:
            log.exception("steerer: could not store the %s record of %s", status, internal_id)

    def finished(self, result, trail: Trail) -> None:
        self._write(response_id(result.request_id), record(result, trail))

    def _write(self, rid: str, body: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = _file(self.folder, rid)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body), encoding="utf-8")
        os.replace(tmp, path)
        if rid not in self._ids:
            self._ids.add(rid)
            self._written.append(rid)
        while len(self._written) > self.keep:
            old = self._written.popleft()
            self._ids.discard(old)
            with contextlib.suppress(FileNotFoundError):
                _file(self.folder, old).unlink()


# -- the API server side ---------------------------------------------------------------------------------------
def read(rid: str) -> dict | None:
    folder = os.environ.get(RESULTS_DIR_ENV)
    if not folder:
        return None
    try:
        return json.loads(_file(Path(folder), rid).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def lookup(rid: str) -> dict | None:
    """The record of response `rid`: stored under it (chat), or under `<rid>-0` (a completion: vLLM runs its
    prompt i as `<rid>-<i>`, even when there is one); its `id` is then the one asked for."""
    body = read(rid) or read(f"{rid}-0")
    return None if body is None else {**body, "id": rid}


def _error(status: int, message: str, kind: str, code: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _authorized(scope: dict) -> bool:
    """vLLM's own rule (AuthenticationMiddleware): `Authorization: Bearer <one of the --api-key tokens>`."""
    from vllm import envs

    args = getattr(getattr(scope.get("app"), "state", None), "args", None)
    tokens = [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]
    if isinstance(tokens, str):
        tokens = [tokens]
    if not tokens:
        return True
    header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(given.encode(), t.encode()) for t in tokens)


async def answer(scope: dict) -> tuple[int, dict]:
    """The route's status and JSON body for a GET on ROUTE + id."""
    if not _authorized(scope):
        return _error(401, "Unauthorized: send Authorization: Bearer <the server's --api-key>",
                      "authentication_error", "invalid_api_key")
    rid = scope["path"][len(ROUTE):]
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    try:
        wait = float(query.get("wait", ["0"])[-1])
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT_S:
        return _error(400, f"wait must be a number of seconds in [0, {MAX_WAIT_S:g}]", "invalid_request_error",
                      "invalid_value")
    deadline = time.monotonic() + wait
    while True:
        body = await asyncio.to_thread(lookup, rid) if rid else None
        if body is not None and body.get("status") != "running":
            return 200, body
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    if body is not None:
        return 202, body
    return _error(404, f"no steerer result for response id {rid!r}: not a monitored request of this server, or "
                       f"older than the newest {keep()} kept", "invalid_request_error", "result_not_found")


async def serve_results(scope: dict, send) -> None:
    """Answer the route over ASGI."""
    status, body = await answer(scope)
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def is_route(scope: dict) -> bool:
    return scope.get("type") == "http" and scope.get("method") == "GET" and scope.get("path", "").startswith(ROUTE)
