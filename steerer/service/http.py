"""The OpenAI-compatible HTTP front of `steerer serve`: chat and text completions, models, health.

Why it is built this way: an OpenAI request is turned into the gRPC `GenerateRequest` and run through the
gRPC servicer's own request path (`SteererServicer._run`), on the same scheduler, in the same process. So
HTTP gets the same checks, limits and error messages, A/B arms and outcome log, token and verdict
metrics, and the same cancel-on-disconnect, with no second implementation; only the envelope differs. The
steerer fields (token risks, flags, detections, steering, verdicts) are the proto messages in protobuf's
JSON mapping (lowerCamelCase), under a `"steerer"` key beside OpenAI's fields.

The server is the standard library's threading HTTP/1.1 server: one thread per connection, like gRPC's
one thread per RPC, blocking on the ticket's queue as the gRPC threads do; keep-alive for plain
responses and chunked SSE for streams. Requests in flight are bounded like the gRPC RPCs (429 past it).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf import json_format

from steerer.policy import POLICY_KINDS, SteeringPolicy
from steerer.service.convert import struct_to_dict
from steerer.service.proto import pb2
from steerer.service.servicer import StatusError, SteererServicer

log = logging.getLogger("steerer.service.http")
MAX_BODY_BYTES = 4 * 1024 * 1024  # gRPC's default receive limit: the same bound on either front
IDLE_TIMEOUT_S = 75.0  # an idle keep-alive connection (or a send blocked this long) is closed
PEER_CHECK_S = 0.25  # how often a request that is not writing checks that its client is still connected
MAX_STOP = 4  # OpenAI's bound on stop sequences
ROUTES = {"/v1/chat/completions": "ChatCompletions", "/v1/completions": "Completions"}
MODELS_METHOD = "ListModels"
FINISH = {"eos": "stop", "length": "length"}  # steerer finish_reason -> OpenAI's
# gRPC status -> (HTTP status, OpenAI error type). The `code` of an error body is the gRPC status name in
# lower case, and the metrics' `code` label the gRPC name, so both fronts read the same on a dashboard.
HTTP_OF: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
    grpc.StatusCode.CANCELLED: (499, "server_error"),
    grpc.StatusCode.ABORTED: (409, "server_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNIMPLEMENTED: (404, "not_found_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
}
# Request fields this front refuses rather than silently ignores: the answer would not be what was asked.
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "response_format", "logit_bias", "suffix",
               "best_of", "echo", "audio", "modalities", "prediction")
EXTENSION_FIELDS = ("constraints", "policy", "request_id", "force_arms", "ignore_eos")


class HttpError(Exception):
    """A refusal with its OpenAI error body; `status` is the gRPC status it corresponds to."""

    def __init__(self, status: grpc.StatusCode, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": HTTP_OF[self.status][1], "param": self.param,
                          "code": self.status.name.lower()}}


def _invalid(message: str, param: str | None = None) -> HttpError:
    return HttpError(grpc.StatusCode.INVALID_ARGUMENT, message, param)


# -- OpenAI request -> GenerateRequest -----------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One parsed completion request: the gRPC message and what only the HTTP envelope needs."""

    message: pb2.GenerateRequest
    chat: bool
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]


def _optional(body: dict, name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _invalid(f"{name} must be {what}, got {json.dumps(value)}", name)
    if not isinstance(value, kind):
        raise _invalid(f"{name} must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (what newer clients send)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise _invalid(f"{where}.content must be a string or a list of text parts", where)


def _messages(value: Any) -> list[pb2.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise _invalid("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _invalid(f"messages[{i}] must be an object with a role and a content", "messages")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for the system role
        out.append(pb2.ChatMessage(role=role, content=_content(m.get("content"), f"messages[{i}]")))
    return out


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise _invalid("prompt must be a string (one prompt per request; token ids are not accepted)", "prompt")
    return value


def _policy(value: Any) -> Any:
    """Accept a policy kind as OpenAI-style lower case ("conditional") as well as the proto enum name, and a
    policy string as the CLI takes it ("guard+conditional:8", `SteeringPolicy.parse`)."""
    if isinstance(value, str):
        try:
            parsed = SteeringPolicy.parse(value)
        except ValueError as exc:
            raise _invalid(str(exc), "policy") from None
        return {"kind": f"POLICY_KIND_{parsed.kind.upper()}", "alpha": parsed.alpha, "guard": parsed.guard}
    if isinstance(value, dict) and isinstance(value.get("kind"), str) and value["kind"].lower() in POLICY_KINDS:
        return {**value, "kind": f"POLICY_KIND_{value['kind'].upper()}"}
    return value


def _extension(value: Any) -> dict[str, Any]:
    """The `steerer` object as a dict for `json_format.ParseDict` into a GenerateRequest (field names as in
    the proto's JSON mapping; snake_case accepted too). Its content is checked by the gRPC path."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("steerer must be an object: {\"constraints\": [...], \"policy\": {...}}", "steerer")
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = {"requestId": "request_id", "forceArms": "force_arms", "ignoreEos": "ignore_eos"}.get(key, key)
        if name not in EXTENSION_FIELDS:
            raise _invalid(f"steerer.{key} is not a known field; known: {', '.join(EXTENSION_FIELDS)}",
                           f"steerer.{key}")
        out[name] = item
    if isinstance(out.get("constraints"), list):
        out["constraints"] = [{**c, "policy": _policy(c["policy"])} if isinstance(c, dict) and "policy" in c
                              else c for c in out["constraints"]]
    if "policy" in out:
        out["policy"] = _policy(out["policy"])
    return out


def _stop(value: Any) -> tuple[str, ...]:
    stops = (value,) if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP:
        raise _invalid(f"stop has {len(stops)} sequences; at most {MAX_STOP}", "stop")
    return tuple(stops)


def parse_call(body: Any, chat: bool, model: str) -> Call:
    """An OpenAI (chat) completion request as a `Call`; bad input is an `HttpError` (400) naming its field."""
    try:
        return _parse_call(body, chat, model)
    except (ValueError, TypeError, OverflowError) as exc:  # protobuf refusing a value: out of int64, bad UTF-16
        raise _invalid(f"the request has a value this server cannot take: {exc}") from None


def _parse_call(body: Any, chat: bool, model: str) -> Call:
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}, False):
            raise _invalid(f"{name} is not supported by this server", name)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise _invalid("logprobs are not supported by this server", "logprobs")
    if _optional(body, "n", int, "an integer") not in (None, 1):
        raise _invalid(f"n must be 1: this server returns one choice per request, got {body['n']}", "n")
    name = _optional(body, "model", str, "a string")
    if name is not None and name != model:
        raise HttpError(grpc.StatusCode.NOT_FOUND, f"the model {name!r} does not exist; this server serves "
                        f"{model!r} (GET /v1/models)", "model")
    message = pb2.GenerateRequest()
    extension = _extension(body.get("steerer"))
    ignore_eos = extension.pop("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _invalid("steerer.ignore_eos must be true or false", "steerer.ignore_eos")
    try:
        json_format.ParseDict(extension, message)
    except json_format.ParseError as exc:
        raise _invalid(f"steerer: {exc}", "steerer") from None
    if chat:
        message.messages.messages.extend(_messages(body.get("messages")))
    else:
        message.prompt = _prompt(body.get("prompt"))
    tokens = _optional(body, "max_completion_tokens", int, "an integer")
    tokens = _optional(body, "max_tokens", int, "an integer") if tokens is None else tokens
    if tokens is not None:
        message.sampling.max_new_tokens = tokens
    for name, field in (("temperature", "temperature"), ("top_p", "top_p")):
        value = _optional(body, name, (int, float), "a number")
        if value is not None:
            setattr(message.sampling, field, float(value))
    seed = _optional(body, "seed", int, "an integer")
    if seed is not None:
        message.sampling.seed = seed
    message.sampling.ignore_eos = ignore_eos
    user = _optional(body, "user", str, "a string")
    if user:
        message.experiment_key = user  # the A/B key; bounds and rules as gRPC's experiment_key
    if not message.request_id:
        message.request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    stream = _optional(body, "stream", bool, "true or false") or False
    options = _optional(body, "stream_options", dict, "an object") or {}
    return Call(message, chat, stream, bool(options.get("include_usage")), _stop(body.get("stop")))


# -- the servicer's context, over one HTTP connection ---------------------------------------------------------
def _peer_open(sock: socket.socket) -> bool:
    """False once the client has closed its side (a read would return EOF); never blocks."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return True
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""  # raw bytes, even under TLS
    except BlockingIOError:
        return True
    except (OSError, ValueError):
        return False


class Exchange:
    """The part of `grpc.ServicerContext` that `SteererServicer._run` uses, for one HTTP request: callbacks
    at its end (the servicer frees the scheduler slot there), liveness (the client's socket) and cancel (the
    unread-stream watchdog: shutting the socket down wakes a thread blocked sending to it)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._ended = False
        self.cancelled = False

    def time_remaining(self) -> float | None:
        return None  # HTTP has no deadline; a client that gives up closes its connection

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
            return True

    def is_active(self) -> bool:
        return not self.cancelled and not self._ended and _peer_open(self._sock)

    def cancel(self) -> None:
        self.cancelled = True
        with contextlib.suppress(OSError):  # the raw socket's: never the TLS object another thread is writing
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def end(self) -> None:
        with self._lock:
            self._ended, callbacks = True, self._callbacks
            self._callbacks = []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("end-of-request callback failed")


# -- GenerateResponse / TokenEvent -> OpenAI JSON -------------------------------------------------------------
def _to_dict(message) -> dict[str, Any]:
    """The proto JSON mapping, false and zero fields included: a client can read `flagged` without a default."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def steerer_final(final: pb2.GenerateResponse) -> dict[str, Any]:
    """The `steerer` object of a whole response: verdicts, usage with steered tokens, bank, arms, ids."""
    out = _to_dict(final)
    for key in ("text", "tokenIds", "finishReason", "model"):
        out.pop(key, None)
    for verdict, message in zip(out["verdicts"], final.verdicts, strict=True):
        verdict["params"] = struct_to_dict(message.params)  # {"limit": 30}, not 30.0, as the request had it
    return out


def usage(final: pb2.GenerateResponse) -> dict[str, int]:
    u = final.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def completion_body(call: Call, final: pb2.GenerateResponse, text: str, finish: str, created: int) -> dict:
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if call.chat:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    return {"id": call.message.request_id, "object": "chat.completion" if call.chat else "text_completion",
            "created": created, "model": final.model, "choices": [choice], "usage": usage(final),
            "steerer": steerer_final(final)}


def chunk_body(call: Call, model: str, created: int, text: str | None, finish: str | None,
               steerer: dict | None, first: bool = False) -> dict:
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if call.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    out = {"id": call.message.request_id, "object": "chat.completion.chunk" if call.chat else "text_completion",
           "created": created, "model": model, "choices": [choice]}
    if steerer is not None:
        out["steerer"] = steerer
    return out


class StopScan:
    """Cut the text at the first stop sequence. Text that could still be the start of one is held back, so a
    stream never sends what the cut would remove."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.hit = False

    def feed(self, piece: str) -> str:
        """The new text that can be sent now."""
        if self.hit:
            return ""
        self.text += piece
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.text = True, self.text[:cut]
            safe = cut
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            safe = len(self.text) - hold
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out

    def rest(self) -> str:
        """What was held back, at the end of a response that met no stop sequence."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# -- the server -----------------------------------------------------------------------------------------------
@dataclass
class HttpConfig:
    host: str
    port: int
    auth_token: str | None = None
    admin_token: str | None = None  # also serves every route, as on gRPC
    tls_cert: str | None = None
    tls_key: str | None = None
    limit: int = 112  # requests in flight (the gRPC RPC limit); past it 429


class HttpFront:
    """The HTTP front of one `SteererServer`: `start()`, `close()` (stop listening), `drain(timeout)`."""

    def __init__(self, servicer: SteererServicer, config: HttpConfig):
        self.servicer = servicer
        self.config = config
        self.metrics = servicer.metrics
        self.created = int(time.time())
        self.serving = True
        self._active = 0
        self._lock = threading.Condition()
        # As gRPC: a token only where --auth-token is set (the admin token then works too); admin alone guards
        # admin RPCs, which HTTP has none of.
        self._expected = [f"Bearer {t}".encode() for t in (config.auth_token, config.admin_token) if t] \
            if config.auth_token else []
        handler = type("Handler", (_Handler,), {"front": self})
        host = config.host.strip("[]")
        server = type("Server", (_Server,), {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self.httpd = server((host, config.port), handler)
        if config.tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(config.tls_cert, config.tls_key)
            # The handshake runs on the connection's thread (`_Handler.setup`), not in the accept loop.
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True,
                                                    do_handshake_on_connect=False)
        self.port: int = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls_cert else "http"

    def start(self) -> HttpFront:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="steerer-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop taking connections and requests; requests in flight go on (see `drain`)."""
        self.serving = False
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the requests in flight to end; True when none is left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    # -- per request --------------------------------------------------------------------------------------
    def authorize(self, headers) -> None:
        given = headers.get_all("authorization") or []
        if len(given) > 1:
            raise HttpError(grpc.StatusCode.UNAUTHENTICATED, f"{len(given)} authorization headers: send exactly "
                            f"one 'authorization: Bearer <token>'")
        if not self._expected:
            return
        token = given[0].encode() if given else b""
        if not any(hmac.compare_digest(token, e) for e in self._expected):
            raise HttpError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization header)")

    def admit(self) -> None:
        with self._lock:
            if self._active >= self.config.limit:
                raise HttpError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {self.config.limit} HTTP "
                                f"requests in flight; retry later")
            self._active += 1

    def release(self) -> None:
        with self._lock:
            self._active -= 1
            self._lock.notify_all()

    def models(self) -> dict:
        bank = self.servicer.scheduler.bank
        return {"object": "list", "data": [{"id": self.servicer.lm.name, "object": "model", "created": self.created,
                                            "owned_by": "steerer",
                                            "steerer": {"bankVersion": bank.version, "tasks": list(bank.tasks)}}]}

    def items(self, call: Call, exchange: Exchange) -> Iterator:
        """The servicer's request path: pb2.TokenEvent messages, then the pb2.GenerateResponse."""
        return self.servicer._run(call.message, exchange, stream=call.stream)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: a wave of clients connecting at once (the default is 5)
    allow_reuse_address = False  # as gRPC's so_reuseport 0: a port in use is an error, not shared

    def handle_error(self, request, client_address) -> None:
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)


def _frame(data: bytes) -> bytes:
    """One chunk of a chunked HTTP/1.1 body (an empty one ends the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(body: dict | str) -> bytes:
    """One Server-Sent Event in its chunk."""
    return _frame(b"data: " + (body if isinstance(body, str) else json.dumps(body)).encode() + b"\n\n")


class _ClientGone(Exception):
    """The client closed its connection (or stopped reading past the timeout) mid-request."""


class _Handler(BaseHTTPRequestHandler):
    front: HttpFront
    protocol_version = "HTTP/1.1"  # keep-alive; streams are sent chunked
    disable_nagle_algorithm = True  # a token's event goes out now, not after the previous one's ACK
    server_version = "steerer"
    timeout = IDLE_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s " + format, self.address_string(), *args)

    # -- plumbing -----------------------------------------------------------------------------------------
    def _send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: HttpError) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == grpc.StatusCode.UNAUTHENTICATED else None
        self._send_json(HTTP_OF[error.status][0], error.body(), headers)

    def _write(self, data: bytes) -> None:
        """Send stream frames in one write (one TCP segment where they fit: no Nagle, no delayed-ACK wait)."""
        try:
            self.wfile.write(data)
        except (OSError, ValueError) as exc:  # EPIPE, ECONNRESET, a shut-down socket, a timed-out send
            raise _ClientGone() from exc

    def _read_json(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HttpError(grpc.StatusCode.INVALID_ARGUMENT, "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise _invalid("Content-Length is not a number") from None
        if length < 0:
            raise _invalid("Content-Length is negative")
        if length > MAX_BODY_BYTES:
            raise HttpError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request body is {length} bytes; at most "
                            f"{MAX_BODY_BYTES}")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _invalid(f"the request body is not valid JSON: {exc}") from None

    # -- routes -------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        front = self.front
        if path == "/health":
            self._send_json(200 if front.serving else 503, {"status": "SERVING" if front.serving else "NOT_SERVING"})
            return
        if path not in ("/v1/models", f"/v1/models/{front.servicer.lm.name}"):
            self._refuse_unknown()
            return
        code = grpc.StatusCode.OK
        try:
            front.authorize(self.headers)
            models = front.models()
            self._send_json(200, models if path == "/v1/models" else models["data"][0])
        except HttpError as exc:
            code = exc.status
            self._send_error(exc)
        finally:
            front.metrics.request_done(MODELS_METHOD, code)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        method = ROUTES.get(path)
        if method is None:
            self._refuse_unknown()
            return
        front = self.front
        code = grpc.StatusCode.OK
        admitted = read = False
        try:
            front.authorize(self.headers)
            body, read = self._read_json(), True
            if not front.serving:
                raise HttpError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            call = parse_call(body, path == "/v1/chat/completions", front.servicer.lm.name)
            front.admit()
            admitted = True
            code = self._complete(call)
        except HttpError as exc:
            code = exc.status
            self.close_connection = self.close_connection or not read  # an unread body would be the next request
            self._send_error(exc)
        except StatusError as exc:  # refused before anything was sent: the gRPC path's own status and message
            code = exc.code
            self._send_error(HttpError(exc.code, exc.message))
        except (_ClientGone, ConnectionError, TimeoutError):  # the client left, or stopped reading
            code = grpc.StatusCode.CANCELLED
            self.close_connection = True
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_error(HttpError(code, "internal error"))
        finally:
            if admitted:
                front.release()
            front.metrics.request_done(method, code)

    def _refuse_unknown(self) -> None:
        self.front.metrics.request_done("other", grpc.StatusCode.UNIMPLEMENTED)
        self._send_error(HttpError(grpc.StatusCode.UNIMPLEMENTED, f"no route {self.command} {self.path[:200]}; "
                                   f"this server has POST /v1/chat/completions, POST /v1/completions, "
                                   f"GET /v1/models, GET /health"))

    def _complete(self, call: Call) -> grpc.StatusCode:
        """Run one request; the status it ended with. Refusals before the first token raise (HTTP status)."""
        exchange = Exchange(self.connection)
        items = self.front.items(call, exchange)
        try:
            first = next(items)  # validation, the queue, the first token: a refusal is still an HTTP status
            if call.stream:
                return self._stream(call, first, items, exchange)
            return self._whole(call, first, items, exchange)
        finally:
            items.close()  # unfinished: GeneratorExit in the servicer's path, which cancels the ticket (slot freed)
            exchange.end()

    def _whole(self, call: Call, item, items: Iterator, exchange: Exchange) -> grpc.StatusCode:
        scan = StopScan(call.stop)
        checked = time.monotonic()
        while isinstance(item, pb2.TokenEvent):
            scan.feed(item.text)
            now = time.monotonic()
            if now - checked > PEER_CHECK_S:  # tokens keep coming, so the servicer's idle check never runs
                checked = now
                if not exchange.is_active():
                    raise _ClientGone()
            item = next(items)
        text = scan.text if scan.hit else item.text
        finish = "stop" if scan.hit else FINISH.get(item.finish_reason, item.finish_reason)
        body = completion_body(call, item, text, finish, int(time.time()))
        if scan.hit:
            body["steerer"]["fullText"] = item.text  # what the verdicts judged: generation ran to its end
        self._send_json(200, body)
        return grpc.StatusCode.OK

    def _stream(self, call: Call, item, items: Iterator, exchange: Exchange) -> grpc.StatusCode:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        model, created = self.front.servicer.lm.name, int(time.time())
        scan = StopScan(call.stop)
        first = True
        try:
            while isinstance(item, pb2.TokenEvent):
                text = scan.feed(item.text)
                if not scan.hit or text:
                    self._write(_sse(chunk_body(call, model, created, text, None, _to_dict(item), first)))
                    first = False
                item = next(items)  # the servicer's path ends with the GenerateResponse, or raises
        except StatusError as exc:  # failed mid-stream (shutdown, internal): an error event, then the end
            self._write(_sse(HttpError(exc.code, exc.message).body()) + _frame(b""))
            return exc.code
        rest = "" if scan.hit else scan.rest()
        finish = "stop" if scan.hit else FINISH.get(item.finish_reason, item.finish_reason)
        final = steerer_final(item)
        if scan.hit:
            final["fullText"] = item.text  # what the verdicts judged: generation ran to its end
        frames = [_sse(chunk_body(call, model, created, rest or None, finish, final, first))]
        if call.include_usage:
            body = chunk_body(call, model, created, None, None, final)
            body["choices"], body["usage"] = [], usage(item)
            frames.append(_sse(body))
        self._write(b"".join([*frames, _sse("[DONE]"), _frame(b"")]))  # the end in one write: the client's
        return grpc.StatusCode.OK                                       # next request follows at once
