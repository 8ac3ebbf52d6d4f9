"""`GET /steerer/v1/results/{response_id}` under plain `vllm serve` (`steerer.engine.vllm.results_route`): a client
reads its request's verdicts, flag changes, detections and steering by the id of the response it received.

The store and the route's answers are checked without a server; then a real eager `vllm serve` with the plugin
and `--api-key` (VLLM_API_KEY) is driven with the official `openai` client, non-streamed and streamed, and the
route is read with the ids the client saw. The bank is a stand-in whose word_count probe always reads risk 0.98,
so flags are raised and conditional steering applies. Skipped unless vLLM is installed (STEERER_REQUIRE_VLLM=1:
a failure).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("STEERER_REQUIRE_VLLM") == "1":
        raise
    pytest.skip("vLLM is not installed here (scripts/setup-vllm)", allow_module_level=True)

from test_vllm_serve_startup import Serve  # noqa: E402

from steerer import ProbeBank  # noqa: E402
from steerer.engine.vllm import results_route  # noqa: E402
from steerer.engine.vllm.results_route import ROUTE, ResultsStore, Trail, answer, response_id  # noqa: E402
from steerer.model import resolve_model_path  # noqa: E402
from steerer.monitor import FlagEvent  # noqa: E402
from steerer.request import Detection, Result, TokenEvent, Verdict  # noqa: E402
from steerer.service.testing import placeholder_bank  # noqa: E402

KEY = "sk-steerer-test"
XARGS = {"steerer_constraints": ["lowercase", 'word_count:{"relation": "at most", "limit": 40}'],
         "steerer_policy": "conditional:4"}
TASKS = ["lowercase", "word_count"]


# -- no server ----------------------------------------------------------------------------------------------------
def test_vllm_runs_a_response_id_as_that_id_plus_8_characters():
    """The relation `response_id` undoes: an upgrade that changes it fails here."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.v1.engine.input_processor import InputProcessor

    assert 'f"chatcmpl-{self._base_request_id(' in inspect.getsource(OpenAIServingChat)
    completion = inspect.getsource(OpenAIServingCompletion)
    assert 'f"cmpl-{self._base_request_id(' in completion
    assert 'request_id_item = f"{request_id}-{i}"' in completion  # prompt i, a single one too: `lookup`'s `-0`
    request = SimpleNamespace(request_id="chatcmpl-1f2e-x", external_req_id=None)
    InputProcessor.assign_request_id(request)  # what the engine does to every request the API server sends
    assert request.request_id != "chatcmpl-1f2e-x" and request.external_req_id == "chatcmpl-1f2e-x"
    assert response_id(request.request_id) == "chatcmpl-1f2e-x"
    assert response_id("cmpl-abc") == "cmpl-abc"  # no suffix (VLLM_DISABLE_REQUEST_ID_RANDOMIZATION): unchanged


def _result(rid: str) -> Result:
    verdict = Verdict("lowercase", {}, True, 0.02, True, 1, False, detected_at=2)
    return Result(rid, "a B", [1, 2, 3], "length", [verdict], 5, {"lowercase": 2}, "p1")


def _get(scope_path: str, api_key: list[str] | None = None, token: str | None = None) -> tuple[int, dict]:
    path, _, query = scope_path.partition("?")
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    app = SimpleNamespace(state=SimpleNamespace(args=SimpleNamespace(api_key=api_key)))
    return asyncio.run(answer({"type": "http", "method": "GET", "path": path, "query_string": query.encode(),
                               "headers": headers, "app": app}))


def test_store_records_trail_retention_and_answers(tmp_path, monkeypatch):
    monkeypatch.setenv(results_route.RESULTS_DIR_ENV, str(tmp_path / "store"))
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    store = ResultsStore(tmp_path / "store", keep=2)
    trail = Trail()
    for index, (flags, detections, steering) in enumerate([
            ([FlagEvent(0, 0, "lowercase", 0.9, True)], [], {"lowercase": 0.0}),
            ([], [Detection("lowercase", 1)], {"lowercase": 4.0}),
            ([FlagEvent(0, 2, "lowercase", 0.1, False)], [], {"lowercase": 4.0})]):
        trail.add(TokenEvent("x", index, 7, "t", {"lowercase": 0.5}, steering, flags, detections))
    assert _get(ROUTE + "chatcmpl-a")[0] == 404
    store.running("chatcmpl-a-0123abcd")
    status, body = _get(ROUTE + "chatcmpl-a")
    assert (status, body["status"], body["requestId"]) == (202, "running", "chatcmpl-a-0123abcd")
    store.finished(_result("chatcmpl-a-0123abcd"), trail)
    status, body = _get(ROUTE + "chatcmpl-a?wait=5")
    assert status == 200 and body["status"] == "finished" and body["id"] == "chatcmpl-a"
    assert body["verdicts"][0] == {"task": "lowercase", "params": {}, "predictedViolation": True,
                                   "pSatisfiedEnd": 0.02, "flagged": True, "firstFlagToken": 1, "satisfied": False,
                                   "probeReliable": True, "probeMuted": False, "detectedAt": 2, "probeNote": ""}
    assert body["flags"] == [{"task": "lowercase", "tokenIndex": 0, "risk": 0.9, "raised": True},
                             {"task": "lowercase", "tokenIndex": 2, "risk": 0.1, "raised": False}]
    assert body["detections"] == [{"task": "lowercase", "tokenIndex": 1}]
    assert body["steering"] == {"steeredTokens": {"lowercase": 2},
                                "changes": [{"task": "lowercase", "tokenIndex": 1, "alpha": 4.0}]}
    store.cancelled("cmpl-b-0-0123abcd")  # a completion's first prompt
    status, body = _get(ROUTE + "cmpl-b")
    assert (status, body["status"], body["id"], body["requestId"]) == (200, "cancelled", "cmpl-b", "cmpl-b-0-0123abcd")
    store.running("cmpl-c-0123abcd")  # a third record: the oldest goes (keep=2)
    status, body = _get(ROUTE + "chatcmpl-a")
    assert status == 404 and body["error"]["code"] == "result_not_found" and "chatcmpl-a" in body["error"]["message"]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(
        results_route._file(tmp_path / "store", r).name for r in ("cmpl-b-0", "cmpl-c"))
    status, body = _get(ROUTE + "cmpl-c?wait=abc")
    assert status == 400 and "wait must be" in body["error"]["message"]
    assert _get(ROUTE + "cmpl-b", api_key=[KEY])[0] == 401
    assert _get(ROUTE + "cmpl-b", api_key=[KEY], token="wrong")[0] == 401
    assert _get(ROUTE + "cmpl-b", api_key=[KEY], token=KEY)[0] == 200
    monkeypatch.setenv(results_route.KEEP_ENV, "0")
    with pytest.raises(ValueError, match="STEERER_RESULTS_KEEP must be a positive integer"):
        ResultsStore.from_env()


# -- a real vllm serve ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-results")
    default = ProbeBank.load()
    placeholder_bank(default.fingerprint, default.hidden_size, "p1", {"word_count": -4.0}).save(folder / "bank")
    srv = Serve(Path(resolve_model_path(None)), folder / "server.log", STEERER_BANK=str(folder / "bank"),
                VLLM_API_KEY=KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


def _client(server: Serve):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _results(server: Serve, rid: str, wait: float = 60, token: str | None = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.url}{ROUTE}{rid}?wait={wait:g}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _check(body: dict, rid: str, completion_tokens: int, text: str) -> None:
    assert body["status"] == "finished" and body["id"] == rid and body["requestId"].startswith(rid + "-")
    assert body["completionTokens"] == completion_tokens and body["text"] == text
    assert [v["task"] for v in body["verdicts"]] == TASKS
    counted = body["verdicts"][1]  # word_count: the stand-in probe always at risk, never detected in 12 tokens
    assert counted["flagged"] and counted["firstFlagToken"] is not None and counted["detectedAt"] is None
    raised = [f for f in body["flags"] if f["task"] == "word_count" and f["raised"]]
    assert raised and raised[0]["tokenIndex"] == counted["firstFlagToken"]
    assert body["steering"]["steeredTokens"]["word_count"] > 0  # conditional:4 on a flagged task
    change = next(c for c in body["steering"]["changes"] if c["task"] == "word_count")
    assert change["alpha"] == 4.0 and change["tokenIndex"] > raised[0]["tokenIndex"]  # from the next pass on
    assert {d["task"]: d["tokenIndex"] for d in body["detections"]} == {
        v["task"]: v["detectedAt"] for v in body["verdicts"] if v["detectedAt"] is not None}


def test_openai_client_reads_its_results_by_the_response_id(server):
    client = _client(server)
    messages = [{"role": "user", "content": "Name three colors."}]
    reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"vllm_xargs": XARGS})
    assert reply.id.startswith("chatcmpl-")
    status, body = _results(server, reply.id)
    assert status == 200, body
    eos = reply.choices[0].finish_reason == "stop"  # vLLM counts the EOS token; a Result's tokens do not
    _check(body, reply.id, reply.usage.completion_tokens - eos, reply.choices[0].message.content)
    assert body["finishReason"] == ("eos" if eos else "length")

    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=12,
                                                 temperature=0, stream=True, extra_body={"vllm_xargs": XARGS}))
    (rid,) = {c.id for c in chunks}
    status, streamed = _results(server, rid)
    assert status == 200 and rid != reply.id
    _check(streamed, rid, body["completionTokens"], "".join(c.choices[0].delta.content or "" for c in chunks
                                                             if c.choices))
    assert streamed["verdicts"] == body["verdicts"]  # greedy: the same answer, the same verdicts

    completion = client.completions.create(model=server.model, prompt="The ocean is", max_tokens=6, temperature=0,
                                           extra_body={"vllm_xargs": XARGS})
    assert completion.id.startswith("cmpl-")
    status, body = _results(server, completion.id)
    assert status == 200 and body["id"] == completion.id and body["text"] == completion.choices[0].text
    assert body["requestId"].startswith(completion.id + "-0-")  # vLLM's name for the completion's prompt 0


def test_running_cancelled_unknown_and_unauthorized(server):
    client = _client(server)
    stream = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=200, temperature=0, stream=True, extra_body={"vllm_xargs": XARGS, "ignore_eos": True})
    first = next(iter(stream))
    status, body = _results(server, first.id, wait=0)
    assert (status, body["status"]) == (202, "running")  # 200 tokens at most 1 read: still generating
    stream.close()  # the client leaves: vLLM aborts the request
    status, body = _results(server, first.id)
    assert (status, body["status"]) == (200, "cancelled")

    plain = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=2, temperature=0)
    status, body = _results(server, plain.id, wait=0)  # not monitored: nothing stored
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "result_not_found"
    assert _results(server, "chatcmpl-nope", wait=0, token=None)[0] == 401
    assert _results(server, "chatcmpl-nope", wait=0, token="wrong")[0] == 401
