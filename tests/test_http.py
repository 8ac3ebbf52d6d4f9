"""The OpenAI-compatible HTTP front of `steerer serve --http-port`: a real server (real default model and
bank) in a child process, driven by the official `openai` client, curl and raw sockets, over TLS with a
bearer token (so every test also covers TLS and auth).

Kept cheap: a handful of short greedy generations."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import time

import openai
import pytest

from steerer.service.testing import ServerProcess, free_port, metric_value

TOKEN = "http-test-token"
MODEL = "smollm2-135m-instruct"
CONSTRAINTS = {"constraints": [{"task": "lowercase", "policy": {"kind": "conditional", "alpha": 8}},
                               {"task": "word_count", "params": {"relation": "at most", "limit": 30}}]}
MESSAGES = [{"role": "user", "content": "Describe the moon in two sentences."}]
HTTP_LINE = re.compile(r", http (?P<url>https://\S+/v1)")


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def server(cert):
    port = free_port()
    with ServerProcess("--http-port", str(port), "--auth-token", TOKEN, "--tls-cert", cert[0], "--tls-key", cert[1],
                       "--max-batch", "4", "--threads", "1") as proc:
        proc.base_url = HTTP_LINE.search(proc.lines[0])["url"]
        assert proc.base_url == f"https://127.0.0.1:{port}/v1"
        proc.cert = cert[0]
        yield proc


def openai_client(server, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=token, max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=server.cert)))


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_chat_completion_and_stream_carry_steerer_fields(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                           user="user-42", extra_body={"steerer": CONSTRAINTS})
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1
    verdicts = reply.model_extra["steerer"]["verdicts"]
    assert {v["task"] for v in verdicts} == {"lowercase", "word_count"}
    assert all("satisfied" in v and "predictedViolation" in v and "flagged" in v for v in verdicts)
    assert next(v for v in verdicts if v["task"] == "word_count")["params"] == {"relation": "at most", "limit": 30}
    assert reply.model_extra["steerer"]["experimentKey"] == "user-42"  # `user` is the A/B key (no experiments here)
    assert reply.model_extra["steerer"]["arms"] == []

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, extra_body={"steerer": CONSTRAINTS}))
    steerer = [c.model_extra["steerer"] for c in chunks if c.model_extra.get("steerer")]
    tokens = [s for s in steerer if "tokenId" in s]
    assert len(tokens) >= 5
    assert all(set(s["risk"]) == {"lowercase", "word_count"} and "steering" in s for s in tokens)
    assert "verdicts" in chunks[-1].model_extra["steerer"]
    assert {v["task"] for v in chunks[-1].model_extra["steerer"]["verdicts"]} == {"lowercase", "word_count"}
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same text either way
    assert chunks[0].id == chunks[-1].id == chunks[-1].model_extra["steerer"]["requestId"]


def test_text_completion_models_and_stop(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    whole = client.completions.create(model=MODEL, prompt="Name three colors.", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(model=MODEL, prompt="Name three colors.", max_tokens=12, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.model_extra["steerer"]["fullText"] == text


def test_curl_and_health(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    health = subprocess.run(["curl", "-s", "--cacert", server.cert, f"{server.base_url.removesuffix('/v1')}/health"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(health) == {"status": "SERVING"}  # no token needed, as gRPC health
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True,
            "steerer": {"constraints": [{"task": "lowercase"}]}}
    out = subprocess.run(["curl", "-sN", "--fail-with-body", "--cacert", server.cert, f"{server.base_url}/chat/completions",
                          "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body)], capture_output=True, text=True, timeout=120, check=True).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2 and all("steerer" in c for c in chunks)
    assert chunks[-1]["steerer"]["verdicts"][0]["task"] == "lowercase"


def test_errors(server, client):
    with pytest.raises(openai.BadRequestError) as bad_task:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                       extra_body={"steerer": {"constraints": [{"task": "nope"}]}})
    error = bad_task.value.body
    assert bad_task.value.status_code == 400
    assert error["message"].startswith("unknown task 'nope'; known tasks: char_count")  # the gRPC message
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_argument"
    with pytest.raises(openai.BadRequestError) as two:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=2)
    assert two.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError) as denied:
        openai_client(server, "wrong").chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert denied.value.status_code == 401 and "bearer token" in denied.value.body["message"]
    host, port = server.base_url.removeprefix("https://").removesuffix("/v1").split(":")
    connection = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=server.cert))
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 4}).encode()
    connection.putrequest("POST", "/v1/chat/completions")
    for header, value in (("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}"),
                          ("Content-Type", "application/json"), ("Content-Length", str(len(body)))):
        connection.putheader(header, value)
    connection.endheaders(body)
    twice = connection.getresponse()
    assert twice.status == 401 and "send exactly one" in json.loads(twice.read())["error"]["message"]
    connection.close()
    assert metric_value(server, "steerer_requests_total", method="ChatCompletions", code="UNAUTHENTICATED") >= 1
    assert metric_value(server, "steerer_requests_total", method="ChatCompletions", code="INVALID_ARGUMENT") >= 2


def test_client_leaving_mid_stream_frees_its_slot(server):
    host, port = server.base_url.removeprefix("https://").removesuffix("/v1").split(":")
    cancelled = metric_value(server, "steerer_requests_total", method="ChatCompletions", code="CANCELLED")
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 1000, "stream": True,
                       "steerer": {"constraints": [{"task": "lowercase"}], "ignore_eos": True}}).encode()
    tls = ssl.create_default_context(cafile=server.cert)
    with socket.create_connection((host, int(port))) as raw, tls.wrap_socket(raw, server_hostname=host) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        seen = b""
        while seen.count(b"data: ") < 3:  # it is generating
            seen += sock.recv(65536)
        assert b" 200 " in seen.split(b"\r\n", 1)[0]
        wait_for(lambda: metric_value(server, "steerer_batch_size") == 1, what="the request in the batch")
    # The client left after 3 of 1000 tokens: its row must leave the batch long before it could finish.
    wait_for(lambda: metric_value(server, "steerer_batch_size") == 0, timeout=10, what="the slot to be freed")
    wait_for(lambda: metric_value(server, "steerer_requests_total", method="ChatCompletions",
                                  code="CANCELLED") == cancelled + 1, what="the request counted CANCELLED")


def _hold_stream(host: str, port: int) -> socket.socket:
    """A streamed chat completion (1000 tokens, EOS ignored) that keeps its batch slot: 3 events read, then the
    socket is left open and unread."""
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 1000, "stream": True,
                       "steerer": {"constraints": [{"task": "lowercase"}], "ignore_eos": True}}).encode()
    sock = socket.create_connection((host, port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    seen = b""
    while seen.count(b"data: ") < 3:
        seen += sock.recv(65536)
    assert b" 200 " in seen.split(b"\r\n", 1)[0]
    return sock


def _post(connection: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict]:
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_queue_full_is_429_and_draining_is_503():
    """One batch slot, no queue: while a held stream has the slot, a second request is refused (429); after
    SIGTERM the server drains the held stream, and a request on a connection it already had open gets 503."""
    port = free_port()
    with ServerProcess("--http-port", str(port), "--max-batch", "1", "--max-queue", "0", "--threads", "1") as proc:
        plain = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        assert _post(connection, "/v1/chat/completions", plain)[0] == 200  # a kept-alive connection
        held = _hold_stream("127.0.0.1", port)
        try:
            wait_for(lambda: metric_value(proc, "steerer_batch_size") == 1, what="the held request in the batch")
            status, body = _post(connection, "/v1/chat/completions", plain)
            assert status == 429 and body["error"]["type"] == "rate_limit_error", body
            assert body["error"]["code"] == "resource_exhausted" and "server busy" in body["error"]["message"]
            # Counted after the answer is sent: wait for it.
            wait_for(lambda: metric_value(proc, "steerer_requests_total", method="ChatCompletions",
                                          code="RESOURCE_EXHAUSTED") == 1, what="the 429 counted")

            proc.signal()  # SIGTERM: drain (the held stream keeps it draining for up to its grace)

            def refused() -> bool:
                connection.request("GET", "/health")
                response = connection.getresponse()
                body = json.loads(response.read())  # read whole: the connection is reused
                return response.status == 503 and body == {"status": "NOT_SERVING"}

            wait_for(refused, what="health NOT_SERVING")
            status, body = _post(connection, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert status == 503 and body["error"]["type"] == "server_error", body
            assert body["error"]["message"] == "the server is shutting down"
            wait_for(lambda: metric_value(proc, "steerer_requests_total", method="Completions",
                                          code="UNAVAILABLE") == 1, what="the 503 counted")
        finally:
            held.close()
            connection.close()


# -- request conversion and stop sequences: pure functions, no server ---------------------------------------------
def test_parse_call_maps_openai_fields_onto_the_grpc_request():
    from steerer.service.http import parse_call

    call = parse_call({"model": MODEL, "messages": [{"role": "developer", "content": "Be brief."},
                                                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                       "max_tokens": 99, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                       "stop": "\n", "user": "k1", "stream": True, "stream_options": {"include_usage": True},
                       "steerer": {"constraints": [{"task": "lowercase", "policy": {"kind": "constant", "alpha": 2}}],
                                   "policy": {"kind": "conditional", "alpha": 8}, "requestId": "r1"}},
                      chat=True, model=MODEL)
    m = call.message
    assert [(x.role, x.content) for x in m.messages.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert (m.sampling.max_new_tokens, m.sampling.temperature, m.sampling.top_p, m.sampling.seed) == (7, 0.5, 0.9, 3)
    assert (m.experiment_key, m.request_id, call.stop, call.stream, call.include_usage) == ("k1", "r1", ("\n",),
                                                                                          True, True)
    assert m.constraints[0].policy.alpha == 2 and m.policy.alpha == 8 and m.policy.kind != 0


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"prompt": "x", "n": 3}, "n", "n must be 1"),
    ({"prompt": "x", "max_tokens": "7"}, "max_tokens", "max_tokens must be an integer"),
    ({"prompt": "x", "temperature": True}, "temperature", "temperature must be a number"),
    ({"prompt": ["a", "b"]}, "prompt", "prompt must be a string"),
    ({"prompt": "x", "stop": ["a"] * 5}, "stop", "at most 4"),
    ({"prompt": "x", "tools": [{"type": "function"}]}, "tools", "tools is not supported"),
    ({"prompt": "x", "model": "gpt-4o"}, "model", "does not exist"),
    ({"prompt": "x", "steerer": {"constraint": []}}, "steerer.constraint", "not a known field"),
    ({"prompt": "x", "steerer": {"policy": {"kind": "sideways"}}}, "steerer", "steerer:"),
])
def test_parse_call_refuses_bad_fields(body, param, message):
    from steerer.service.http import HttpError, parse_call

    with pytest.raises(HttpError) as refused:
        parse_call(body, chat=False, model=MODEL)
    assert refused.value.param == param and message in refused.value.message
    assert set(refused.value.body()["error"]) == {"message", "type", "param", "code"}


def test_stop_scan_holds_back_a_possible_stop_prefix():
    from steerer.service.http import StopScan

    scan = StopScan(("END",))
    assert [scan.feed(p) for p in ("ab", "cE", "N", "x", "yE", "ND", "zz")] == ["ab", "c", "", "ENx", "y", "", ""]
    assert scan.hit and scan.text == "abcENxy"
    free = StopScan(("END",))
    assert free.feed("abE") == "ab" and free.rest() == "E" and not free.hit


def test_parse_call_refuses_values_protobuf_cannot_hold():
    from steerer.service.http import HttpError, parse_call

    for body in ({"prompt": "x", "seed": 2**70}, {"prompt": "x\ud800"}):
        with pytest.raises(HttpError) as refused:
            parse_call(body, chat=False, model=MODEL)
        assert refused.value.status.name == "INVALID_ARGUMENT"


def test_exchange_cancel_wakes_a_send_blocked_on_a_client_that_does_not_read():
    """What the unread-stream watchdog relies on: `cancel()` frees the thread stuck in a send."""
    import threading

    from steerer.service.http import Exchange

    server_side, client_side = socket.socketpair()
    errors: list[BaseException] = []

    def send_forever() -> None:
        try:
            while True:
                server_side.sendall(b"x" * 65536)  # the client never reads: blocks once the buffers are full
        except OSError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send_forever, daemon=True)
    sender.start()
    sender.join(0.5)
    assert sender.is_alive()  # blocked in sendall
    exchange = Exchange(server_side)
    assert exchange.is_active()
    exchange.cancel()
    sender.join(10)
    assert not sender.is_alive() and errors and not exchange.is_active()
    server_side.close()
    client_side.close()


def test_exchange_sees_a_closed_peer_and_runs_callbacks_once():
    from steerer.service.http import Exchange

    server_side, client_side = socket.socketpair()
    exchange = Exchange(server_side)
    calls: list[int] = []
    assert exchange.add_callback(lambda: calls.append(1))
    assert exchange.is_active()
    client_side.close()
    assert not exchange.is_active()
    exchange.end()
    exchange.end()
    assert calls == [1] and not exchange.add_callback(lambda: calls.append(2))
    server_side.close()
