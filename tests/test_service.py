"""The gRPC service end to end: a real `steerer serve` child process, real clients, the real model.

The server runs a placeholder bank (zero probe weights, so P(satisfied) = sigmoid(bias) exactly): on bank
v1 the `lowercase` probe always reads risk ~0.98 (it flags and steers), on v2 ~0.02, so a token's risk
says which bank produced it. Token counts stay small: the machine is a shared 2-core CPU.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from steerer.service.client import SteererClient, build_request
from steerer.service.proto import pb2, pb2_grpc
from steerer.service.testing import ServerProcess, broken_bank, free_port, metric_value, placeholder_bank

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "SERVICE.md"
PROMPT = "Name three colors."
ADMIN = "adm1n-t0ken"  # the module server's admin token (ReloadProbeBank)
WORDS = ("word_count", {"relation": "at most", "limit": 40})


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def banks(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("banks")
    paths = {
        "v1": placeholder_bank(lm.fingerprint, lm.hidden_size, "v1", {"lowercase": -4.0}).save(root / "v1"),
        "v2": placeholder_bank(lm.fingerprint, lm.hidden_size, "v2", {"lowercase": 4.0}).save(root / "v2"),
        "other": placeholder_bank("0123456789abcdef", lm.hidden_size, "other").save(root / "other"),
    }
    malformed = root / "malformed"
    malformed.mkdir()
    (malformed / "manifest.json").write_text("{not json")
    (malformed / "probes.safetensors").write_bytes(b"")
    paths["malformed"] = malformed
    v1 = placeholder_bank(lm.fingerprint, lm.hidden_size, "muted", {"lowercase": -4.0})
    unreliable = {"reliable": False, "metrics": {"test_auroc": 0.42, "test_auroc_ci": [0.3, 0.55], "n_test": 30}}
    v1.probes = [replace(p, **unreliable) if p.task == "lowercase" else p for p in v1.probes]
    paths["muted"] = v1.save(root / "muted")
    for how in ("manifest-list", "truncated", "nan-directions"):
        paths[how] = broken_bank(paths["v1"], root / how, how)
    paths["missing"] = root / "does-not-exist"
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def server(banks):
    rule = {"STEERER_TASK_FILES": str(REPO / "examples" / "tasks" / "no_competitor.yaml")}  # no probe in the banks
    with ServerProcess("--bank", banks["v1"], "--max-batch", "2", "--max-queue", "2", "--admin-token", ADMIN,
                       env=rule) as proc:
        yield proc


@pytest.fixture
def client(server):
    with SteererClient(server.target) as c:
        yield c


@pytest.fixture
def admin(server):
    with SteererClient(server.target, token=ADMIN) as c:
        yield c


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    return metric_value(server, name, **labels)


def wait_for(predicate, timeout: float = 30.0, every: float = 0.05) -> float:
    """Seconds until predicate() held; fails the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(every)
    return time.monotonic() - start


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerer.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def long_stream(client: SteererClient, tokens: int = 1000, **kwargs):
    return client.stream(PROMPT, max_new_tokens=tokens, ignore_eos=True, **kwargs)


# -- the basics ----------------------------------------------------------------------------------------------
def test_health_from_another_process(server):
    ok = cli("client", "health", "--target", server.target, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok.stderr
    unknown = cli("client", "health", "--target", server.target, "--service", "no.such.Service", timeout=120)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_health_of_nothing_listening_exits_nonzero(server):
    down = cli("client", "health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2", timeout=120)
    assert down.returncode == 1 and ("UNAVAILABLE" in down.stderr or "DEADLINE_EXCEEDED" in down.stderr)


def test_reflection_lists_the_services(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"steerer.v1.Steerer", "grpc.health.v1.Health"} <= services
        service = DescriptorPool(database).FindServiceByName("steerer.v1.Steerer")
        methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "GenerateStream", "ListProbes", "GetModelInfo", "ReloadProbeBank"}
    assert methods["GenerateStream"].server_streaming and not methods["Generate"].server_streaming


def test_model_info_and_probes(client, lm):
    info = client.model_info()
    assert (info.fingerprint, info.hidden_size, info.num_layers) == (lm.fingerprint, lm.hidden_size, lm.num_layers)
    assert info.bank_version == "v1" and "lowercase" in info.tasks
    assert (info.max_batch, info.max_queue, info.max_new_tokens, info.max_prompt_tokens) == (2, 2, 1024, 2048)
    probes = client.list_probes()
    assert probes.bank_version == "v1" and {p.task for p in probes.probes} == set(info.tasks)
    assert all(p.reliable and not p.muted for p in probes.probes)


def test_generate_reports_verdicts_flags_and_steering(client):
    reply = client.generate(PROMPT, constraints=[("lowercase", {}), WORDS], policy="conditional:4",
                            max_new_tokens=6, ignore_eos=True, request_id="mine-1", experiment_key="arm-b")
    assert (reply.request_id, reply.experiment_key, reply.bank_version) == ("mine-1", "arm-b", "v1")
    assert reply.usage.completion_tokens == len(reply.token_ids) == 6 and reply.finish_reason == "length"
    assert reply.usage.prompt_tokens > 5 and reply.text.strip()
    verdicts = {v.task: v for v in reply.verdicts}
    assert set(verdicts) == {"lowercase", "word_count"}
    low, words = verdicts["lowercase"], verdicts["word_count"]
    # bias -4: P(satisfied) = sigmoid(-4) at every token, so the flag would rise on reading token 2 (the end of
    # the 2-token warm-up); but token 2 ("Red") wrote a capital, and the detection settles the task first: no
    # flag (a forecast after the fact predicts nothing), and the steering gate is up from that reading on, so
    # the conditional policy steers the passes after it, which pick tokens 4 and 5. Bias +4 never flags nor steers.
    assert low.predicted_violation and not low.flagged and low.detected_at == 2
    assert math.isclose(low.p_satisfied_end, 1 / (1 + math.exp(4)), rel_tol=1e-3)
    assert not words.predicted_violation and not words.flagged and not words.HasField("first_flag_token")
    assert low.probe_reliable and not low.probe_muted
    assert words.satisfied  # six tokens are at most 40 words: the checker ran on the final text
    assert dict(reply.usage.steered_tokens) == {"lowercase": 2, "word_count": 0}


def test_a_rule_the_bank_has_no_probe_for_is_served_on_its_detector(client):
    """A YAML forbid rule the bank has no probe for: guarded, the names stay out and the checker's verdict comes
    back (no probe reading); steering it is refused in one line (docs/TASKS.md, "Detector-only constraints")."""
    rule = ("no_competitor", {"competitors": ["red", "blue"]}, "guard")
    reply = client.generate(PROMPT, constraints=[rule], max_new_tokens=12)
    (verdict,) = reply.verdicts
    assert verdict.task == "no_competitor" and verdict.satisfied and not verdict.HasField("detected_at")
    assert verdict.probe_muted and not verdict.HasField("p_satisfied_end") and not verdict.flagged
    assert reply.text.strip() and not re.search(r"\b(red|blue)\b", reply.text, re.IGNORECASE), reply.text
    with pytest.raises(grpc.RpcError) as refused:
        client.generate(PROMPT, constraints=[(*rule[:2], "conditional:4")], max_new_tokens=4)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "no probe for no_competitor: only `off` or `guard`"


def test_stream_from_another_process(server):
    proc = cli("client", "generate", "--target", server.target, "--prompt", PROMPT, "--stream", "--json",
               "--max-new-tokens", "5", "--constraint", "lowercase", "--policy", "constant", "--alpha", "2")
    assert proc.returncode == 0, proc.stderr
    messages = [json.loads(line) for line in proc.stdout.splitlines()]
    tokens, final = [m["token"] for m in messages[:-1]], messages[-1]["final"]
    assert all("token" in m for m in messages[:-1]) and tokens
    assert "".join(t.get("text", "") for t in tokens) == final["text"]
    assert [t.get("index", 0) for t in tokens] == list(range(len(tokens)))
    assert all(t["risk"]["lowercase"] > 0.9 for t in tokens)
    assert all(t["steering"]["lowercase"] == 2.0 for t in tokens[1:])  # constant from the first generated token
    raised = [f for t in tokens for f in t.get("flags", []) if f.get("raised")]
    detected = [d["task"] for t in tokens for d in t.get("detections", [])]
    assert detected == ["lowercase"] and raised == []  # the capital at token 2 settled it before a flag could rise
    assert final["bank_version"] == "v1" and final["verdicts"][0]["task"] == "lowercase"


def test_stream_cli_prints_text_and_a_summary(server):
    proc = cli("client", "generate", "--target", server.target, "--prompt", PROMPT, "--stream",
               "--max-new-tokens", "4", "--constraint", 'word_count:{"relation": "at most", "limit": 40}')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "word_count: predicted ok" in proc.stderr and "bank v1" in proc.stderr


# -- flow control --------------------------------------------------------------------------------------------
def test_cancelled_stream_frees_its_slot_at_once(client, server):
    cancelled = metric(server, "steerer_requests_total", method="GenerateStream", code="CANCELLED")
    stream = long_stream(client)
    for i, _ in enumerate(stream):
        if i == 1:
            break
    assert metric(server, "steerer_batch_size") == 1
    stream.cancel()
    # Conditions, not timings: a slot held until the 1000-token stream ended would take minutes.
    wait_for(lambda: metric(server, "steerer_batch_size") == 0, timeout=30)
    wait_for(lambda: metric(server, "steerer_requests_total", method="GenerateStream", code="CANCELLED")
             == cancelled + 1, timeout=30)
    assert client.generate(PROMPT, max_new_tokens=2).usage.completion_tokens >= 1


def test_deadline_exceeded_ends_the_request(client, server):
    with pytest.raises(grpc.RpcError) as err:
        client.generate(PROMPT, max_new_tokens=1000, ignore_eos=True, timeout=1.5)
    status, message = documented_cases()["deadline"]
    assert err.value.code().name == status and message in err.value.details()
    wait_for(lambda: metric(server, "steerer_batch_size") == 0, timeout=30)
    wait_for(lambda: metric(server, "steerer_requests_total", method="Generate", code="DEADLINE_EXCEEDED") >= 1,
             timeout=30)


def test_queue_full_is_resource_exhausted(client, server):
    streams = [long_stream(client) for _ in range(4)]  # two in the batch, two queued
    try:
        wait_for(lambda: metric(server, "steerer_batch_size") == 2 and metric(server, "steerer_queue_depth") == 2,
                 timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            client.generate(PROMPT, max_new_tokens=2)
        status, message = documented_cases()["queue-full"]
        assert err.value.code().name == status and message in err.value.details()
    finally:
        for stream in streams:
            stream.cancel()
    wait_for(lambda: metric(server, "steerer_batch_size") == 0 and metric(server, "steerer_queue_depth") == 0,
             timeout=30)
    assert client.health() == "SERVING"


def test_requests_share_forward_passes(client, server):
    """A request arriving while another decodes joins its batch: the step-batch histogram sees rows of 2.

    The first request is a long stream already decoding when the second arrives, so the overlap is a
    condition the test sets up, not a race two threads might lose on a busy machine."""
    stream = long_stream(client)
    next(stream)  # decoding now
    before = metric(server, "steerer_step_batch_size_bucket", le="1.0"), metric(server, "steerer_step_batch_size_count")
    try:
        reply = client.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
    finally:
        stream.cancel()
    assert reply.usage.completion_tokens == 6
    ones = metric(server, "steerer_step_batch_size_bucket", le="1.0") - before[0]
    steps = metric(server, "steerer_step_batch_size_count") - before[1]
    assert steps - ones >= 5, (steps, ones)  # the second request's decode passes all carried both rows
    wait_for(lambda: metric(server, "steerer_batch_size") == 0, timeout=30)


def test_reload_under_load_is_atomic(client, admin, server, banks):
    """Requests in flight finish on v1, later ones run on v2; no response mixes the two."""
    def run(out: list, **kwargs) -> None:
        messages = list(client.stream(PROMPT, constraints=["lowercase"], ignore_eos=True, **kwargs))
        out.append(messages)

    early: list = []
    first = [threading.Thread(target=run, args=(early,), kwargs={"max_new_tokens": 48}) for _ in range(2)]
    for t in first:
        t.start()
    wait_for(lambda: metric(server, "steerer_batch_size") == 2, timeout=60)
    swaps = metric(server, "steerer_bank_reloads_total", result="ok")
    reply = {}
    reloader = threading.Thread(target=lambda: reply.update(r=admin.reload_bank(banks["v2"])))
    reloader.start()
    late: list = []
    second = [threading.Thread(target=run, args=(late,), kwargs={"max_new_tokens": 4}) for _ in range(2)]
    # Later arrivals must come once the reload is registered (pending, or already done): they run on v2.
    wait_for(lambda: metric(server, "steerer_bank_reload_pending") == 1
             or metric(server, "steerer_bank_reloads_total", result="ok") > swaps, timeout=60)
    for t in second:
        t.start()
    for t in (*first, reloader, *second):
        t.join(300)
    try:
        assert (reply["r"].previous_version, reply["r"].bank_version) == ("v1", "v2")
        assert len(early) == len(late) == 2
        for messages, version in [(m, "v1") for m in early] + [(m, "v2") for m in late]:
            final = messages[-1].final
            risks = [m.token.risk["lowercase"] for m in messages[:-1]]
            assert final.bank_version == version and risks
            assert all((r > 0.5) == (version == "v1") for r in risks), (version, risks)
        assert client.model_info().bank_version == "v2"
    finally:
        admin.reload_bank(banks["v1"])


# -- bad input ------------------------------------------------------------------------------------------------
def _with(**sampling) -> pb2.GenerateRequest:
    request = build_request(PROMPT)
    for key, value in sampling.items():
        setattr(request.sampling, key, value)
    return request


def _messages(*pairs: tuple[str, str]) -> pb2.GenerateRequest:
    return build_request([{"role": r, "content": c} for r, c in pairs])


def _no_input() -> pb2.GenerateRequest:
    return pb2.GenerateRequest(sampling=pb2.SamplingParams(max_new_tokens=2))


def _empty_messages() -> pb2.GenerateRequest:
    request = pb2.GenerateRequest()
    request.messages.SetInParent()
    return request


def _policy(kind: int, alpha: float) -> pb2.GenerateRequest:
    request = build_request(PROMPT, constraints=["lowercase"])
    request.policy.kind, request.policy.alpha = kind, alpha
    return request


def _task_policy(alpha: float) -> pb2.GenerateRequest:
    return build_request(PROMPT, constraints=[("lowercase", {}, f"constant:{alpha}")])


def _terms(n: int, width: int = 5) -> pb2.GenerateRequest:
    return build_request(PROMPT, constraints=[("term_exclusion", {"terms": [f"w{i:0{width - 1}d}" for i in range(n)]})])


def _nested(depth: int) -> pb2.GenerateRequest:
    params: dict = {"topic": "chess"}
    for _ in range(depth - 1):
        params = {"a": params}
    return build_request(PROMPT, constraints=[("topic", params)])


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: raw bytes the Python protobuf library would refuse to write."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _raw_nested(depth: int) -> bytes:
    """A GenerateRequest whose constraint params are a Struct nested `depth` deep (past protobuf's limit)."""
    struct = b""
    for _ in range(depth):  # Struct.fields {key: "a", value: Value.struct_value = struct}
        struct = _field(1, _field(1, b"a") + _field(2, _field(5, struct)))
    return _field(1, PROMPT.encode()) + _field(4, _field(1, b"topic") + _field(2, struct))


GEN, RAW = "generate", "raw"  # RAW: bytes sent as a Generate request as they are
BAD_INPUT = {  # case (as in docs/SERVICE.md) -> (RPC, request or bank name, or a function making one)
    "empty-prompt": (GEN, build_request("")),
    "blank-prompt": (GEN, build_request("  \n\t ")),
    "no-input": (GEN, _no_input()),
    "empty-messages": (GEN, _empty_messages()),
    "bad-role": (GEN, _messages(("robot", "hi"))),
    "blank-messages": (GEN, _messages(("user", "  "))),
    "long-prompt-tokens": (GEN, build_request("hello " * 2500)),
    "long-prompt-chars": (GEN, build_request("x" * 40000)),
    "unknown-task": (GEN, build_request(PROMPT, constraints=["no_such_task"])),
    "empty-task": (GEN, build_request(PROMPT, constraints=[""])),
    "duplicate-task": (GEN, build_request(PROMPT, constraints=["lowercase", "lowercase"])),
    "bad-params-type": (GEN, build_request(PROMPT, constraints=[("word_count", {"relation": "at most",
                                                                                "limit": "ten"})])),
    "bad-params-fraction": (GEN, build_request(PROMPT, constraints=[("word_count", {"relation": "at most",
                                                                                    "limit": 2.5})])),
    "bad-params-keys": (GEN, build_request(PROMPT, constraints=[("word_count", {"limit": 3})])),
    "alpha-nan": (GEN, _policy(pb2.POLICY_KIND_CONSTANT, float("nan"))),
    "alpha-inf": (GEN, _policy(pb2.POLICY_KIND_CONDITIONAL, float("inf"))),
    "alpha-huge": (GEN, _policy(pb2.POLICY_KIND_PROPORTIONAL, 1e6)),
    "task-alpha-inf": (GEN, _task_policy(float("-inf"))),
    "unknown-policy-kind": (GEN, _policy(99, 1.0)),
    "max-tokens-zero": (GEN, _with(max_new_tokens=0)),
    "max-tokens-negative": (GEN, _with(max_new_tokens=-5)),
    "max-tokens-huge": (GEN, _with(max_new_tokens=10**12)),
    "temperature-nan": (GEN, _with(temperature=float("nan"))),
    "temperature-negative": (GEN, _with(temperature=-1.0)),
    "top-p-zero": (GEN, _with(top_p=0.0)),
    "request-id-too-long": (GEN, build_request(PROMPT, request_id="r" * 200)),
    "too-many-terms": (GEN, _terms(65)),
    "long-term": (GEN, build_request(PROMPT, constraints=[("keyword_inclusion", {"terms": ["x" * 65]})])),
    "params-too-large": (GEN, lambda: _terms(330_000, width=7)),
    "params-too-deep": (GEN, _nested(20)),
    "too-many-constraints": (GEN, build_request(PROMPT, constraints=["lowercase"] * 32)),  # > every task known
    "too-many-messages": (GEN, _messages(*[("user", "hi")] * 2049)),
    "undecodable-utf8": (RAW, _field(1, b"caf\xc3(")),
    "undecodable-nesting": (RAW, _raw_nested(60)),
    "reload-other-model": ("reload", "other"),
    "reload-missing": ("reload", "missing"),
    "reload-malformed": ("reload", "malformed"),
    "reload-manifest-list": ("reload", "manifest-list"),
    "reload-truncated": ("reload", "truncated"),
    "reload-nan-directions": ("reload", "nan-directions"),
    "reload-empty-path": ("reload", ""),
    "force-arms-unknown": (GEN, build_request(PROMPT, constraints=["lowercase"], force_arms={"x": "y"})),
}
# Rows of the table that need a situation rather than a request; each has its own test.
DEDICATED = {"queue-full": "test_queue_full_is_resource_exhausted", "deadline": "test_deadline_exceeded_ends_the_request",
             "bad-token": "test_auth_token_is_required", "context-overflow": "test_prompt_and_response_must_fit_the_context",
             "two-auth-headers": "test_one_authorization_header_at_most",
             "admin-no-token": "test_admin_rpcs_need_the_admin_token",
             "admin-disabled": "test_auth_token_is_required",
             "rpc-limit": "test_unread_streams_are_cancelled_and_health_answers_whatever_the_load"}


def documented_cases() -> dict[str, tuple[str, str]]:
    """case -> (status, message) from the bad-input table in docs/SERVICE.md."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        m = re.match(r"^\|\s*`([a-z0-9-]+)`\s*\|[^|]*\|\s*`?([A-Z_]+)`?\s*\|\s*(.*?)\s*\|\s*$", line)
        if m:
            rows[m[1]] = (m[2], m[3].strip("`").strip())
    return rows


def test_every_documented_case_has_a_test():
    assert set(documented_cases()) == set(BAD_INPUT) | set(DEDICATED)
    assert all(callable(globals().get(name)) for name in DEDICATED.values())


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(case, client, admin, banks, server):
    status, message = documented_cases()[case]
    kind, what = BAD_INPUT[case]
    what = what() if callable(what) else what
    method = "ReloadProbeBank" if kind == "reload" else "Generate"
    counted = metric(server, "steerer_requests_total", method=method, code=status)
    with pytest.raises(grpc.RpcError) as err:
        if kind == GEN:
            client.generate(what, timeout=60)
        elif kind == RAW:
            generate = client.channel.unary_unary("/steerer.v1.Steerer/Generate",
                                                  response_deserializer=pb2.GenerateResponse.FromString)
            generate(what, timeout=60)
        else:
            admin.reload_bank(banks.get(what, what), timeout=60)
    assert err.value.code().name == status, err.value.details()
    assert message in err.value.details()
    assert metric(server, "steerer_requests_total", method=method, code=status) == counted + 1  # and counted


def test_bad_input_on_the_stream_too(client):
    with pytest.raises(grpc.RpcError) as err:
        list(client.stream(_policy(pb2.POLICY_KIND_CONSTANT, float("nan"))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_healthy_after_bad_input(client, server):
    assert client.health() == "SERVING"
    assert metric(server, "steerer_requests_total", method="Generate", code="INVALID_ARGUMENT") >= 20
    assert client.model_info().bank_version == "v1"
    assert client.generate(PROMPT, max_new_tokens=3).usage.completion_tokens >= 1


def test_a_huge_refused_request_does_not_stall_other_streams(client, server):
    """330k terms (3.5 MB) once held a concurrent stream up for 3.5 s; now the size bound refuses them on the
    protobuf message, before any Python walks the list, and the stream's tokens keep coming meanwhile."""
    huge = _terms(330_000, width=7)
    assert huge.ByteSize() > 3_000_000
    refused: dict = {}

    def refuse() -> None:
        refused["start"] = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.generate(huge, timeout=60)
        refused["end"], refused["error"] = time.monotonic(), err.value

    stream = long_stream(client, tokens=400)
    stamps = []
    for _ in range(2):  # decoding now
        next(stream)
        stamps.append(time.monotonic())
    sender = threading.Thread(target=refuse)
    sender.start()
    try:
        while "end" not in refused or stamps[-1] < refused["end"] + 0.5:  # tokens past the refusal too
            assert next(stream).HasField("token")
            stamps.append(time.monotonic())
    finally:
        stream.cancel()
        sender.join(60)
    error = refused["error"]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "params is too large" in error.details()
    during = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b >= refused["start"]]
    assert during and max(during) < 1.5, during  # a generous bound: tokens come every ~0.1 s here
    wait_for(lambda: metric(server, "steerer_batch_size") == 0, timeout=30)


def test_prompt_and_response_must_fit_the_context(lm):
    """Prompt tokens + max_new_tokens past the model's context (8192 for SmolLM2) are refused. In-process:
    the shared server's limits (2048 + 1024) cannot reach the context."""
    from types import SimpleNamespace

    from steerer.service.convert import Limits
    from steerer.service.metrics import Metrics
    from steerer.service.servicer import StatusError, SteererServicer

    status, message = documented_cases()["context-overflow"]
    scheduler = SimpleNamespace(lm=lm, validate=lambda request: None)
    servicer = SteererServicer(scheduler, Metrics(), Limits(max_prompt_tokens=8000, max_new_tokens=4000))
    prompt = "hello " * 7000
    with pytest.raises(StatusError) as err:
        servicer._check(build_request(prompt, max_new_tokens=2000))
    assert err.value.code.name == status and message in err.value.message, err.value.message
    room = int(re.search(r"ask for at most (\d+) new tokens", err.value.message)[1])
    assert 0 < room < 2000 and lm.max_positions == 8192
    assert servicer._check(build_request(prompt, max_new_tokens=room)).sampling.max_new_tokens == room
    with pytest.raises(StatusError):
        servicer._check(build_request(prompt, max_new_tokens=room + 1))


# -- TLS, auth, shutdown ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


def test_auth_token_is_required(banks, tls):
    cert, key = tls
    status, message = documented_cases()["bad-token"]
    with ServerProcess("--bank", banks["v1"], "--tls-cert", cert, "--tls-key", key,
                       env={"STEERER_AUTH_TOKEN": "s3cret"}) as server:
        with SteererClient(server.target, tls_ca=cert) as anonymous:
            assert anonymous.health() == "SERVING"  # health is exempt: orchestrators probe without a token
            with pytest.raises(grpc.RpcError) as err:
                anonymous.generate(PROMPT, max_new_tokens=2)
            assert err.value.code().name == status and message in err.value.details()
        with SteererClient(server.target, tls_ca=cert, token="wrong") as wrong, pytest.raises(grpc.RpcError) as err:
            wrong.model_info()
        assert err.value.code().name == status
        with SteererClient(server.target, tls_ca=cert, token="s3cret") as good:
            assert good.generate(PROMPT, max_new_tokens=2).bank_version == "v1"
            # No --admin-token: admin RPCs are refused even with the right auth token, whatever the path.
            disabled, reason = documented_cases()["admin-disabled"]
            for path in (banks["v2"], "/no/such/folder"):
                with pytest.raises(grpc.RpcError) as err:
                    good.reload_bank(path)
                assert err.value.code().name == disabled and reason in err.value.details()
                assert "--admin-token" in err.value.details() and path not in err.value.details()
            assert good.model_info().bank_version == "v1"
        assert metric(server, "steerer_requests_total", method="ReloadProbeBank", code=disabled) == 2
        with SteererClient(server.target) as plaintext, pytest.raises(grpc.RpcError) as err:
            plaintext.health(timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        ok = cli("client", "health", "--target", server.target, "--tls-ca", cert, timeout=120)
        assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
        proc = cli("client", "generate", "--target", server.target, "--tls-ca", cert, "--prompt", PROMPT,
                   "--max-new-tokens", "2", timeout=120)
        assert proc.returncode == 1 and "UNAUTHENTICATED" in proc.stderr
        assert metric(server, "steerer_requests_total", method="Generate", code="UNAUTHENTICATED") == 2


def test_sigterm_drains_streams_in_flight(banks):
    with ServerProcess("--bank", banks["v1"], "--grace", "120") as server, SteererClient(server.target) as client:
        stream = client.stream(PROMPT, max_new_tokens=24, ignore_eos=True)
        first = next(stream)
        server.signal()
        rest = list(stream)
        assert server.proc.wait(120) == 0
    assert first.HasField("token") and rest[-1].HasField("final")
    assert rest[-1].final.usage.completion_tokens == 24 and len(rest) == 24  # 23 more tokens, then the final
    assert "steerer: stopped" in server.lines


def test_serve_refuses_an_empty_token_and_limits_past_the_context(banks):
    """`--auth-token ""` used to serve without authentication; limits past the model's context served
    garbage. Both exit 2 with one line (the token before the model loads)."""
    cases = [
        (["--auth-token", ""], {}, "the auth token is empty"),
        (["--auth-token", " \t"], {}, "the auth token is empty"),
        ([], {"STEERER_AUTH_TOKEN": ""}, "the auth token is empty"),
        (["--max-prompt-tokens", "12000"], {}, "--max-prompt-tokens 12000 does not fit the model's context of 8192"),
    ]
    for args, env, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "steerer.cli", "serve", "--port", "0", "--metrics-port", "-1",
                               "--bank", banks["v1"], *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})
        errors = [line for line in proc.stderr.splitlines() if line.startswith("steerer: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], (args, env, proc.stderr)


def test_serve_refuses_bad_setups_with_one_line(banks):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            (["--bank", banks["other"]], "the loaded model's fingerprint is"),
            (["--bank", banks["missing"]], "no probe bank at"),
            (["--bank", banks["nan-directions"]], "bank directions has non-finite values (NaN or inf)"),
            (["--bank", banks["truncated"]], "not a readable safetensors file"),
            (["--bank", banks["v1"], "--tls-cert", banks["v1"]], "--tls-cert and --tls-key go together"),
            (["--bank", banks["v1"], "--max-batch", "0"], "max-batch must be >= 1"),
            (["--bank", banks["v1"], "--port", port, "--metrics-port", "-1"], f"cannot listen on 127.0.0.1:{port}"),
            (["--bank", banks["v1"], "--port", "0", "--metrics-port", port], "cannot serve metrics"),
        ]
        for args, needle in cases:
            proc = cli("serve", "--host", "127.0.0.1", *args)
            errors = [line for line in proc.stderr.splitlines() if line.startswith("steerer: error:")]
            assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], (args, proc.stderr)


def test_serve_mutes_unreliable_probes_and_says_so(banks):
    """A probe whose AUROC interval reaches chance neither flags nor steers by default; start-up names it."""
    with ServerProcess("--bank", banks["muted"]) as server, SteererClient(server.target) as client:
        notice = [line for line in server.stderr().splitlines() if "muted probes" in line]
        assert len(notice) == 1 and "lowercase (95% AUROC interval [0.30, 0.55] reaches chance)" in notice[0]
        assert "--use-unreliable-probes" in notice[0] and "word_count" not in notice[0]
        probes = {p.task: p for p in client.list_probes().probes}
        assert probes["lowercase"].muted and not probes["lowercase"].reliable
        assert list(probes["lowercase"].metrics["test_auroc_ci"]) == [0.3, 0.55]
        assert probes["word_count"].reliable and not probes["word_count"].muted
        reply = client.generate(PROMPT, constraints=[("lowercase", {})], policy="constant:50", max_new_tokens=5,
                                ignore_eos=True)
    (verdict,) = reply.verdicts
    assert verdict.probe_muted and not verdict.probe_reliable
    assert not verdict.flagged and not verdict.predicted_violation  # risk ~0.98, but no prediction is made
    assert verdict.HasField("p_satisfied_end") and verdict.p_satisfied_end < 0.05
    assert dict(reply.usage.steered_tokens) == {"lowercase": 0}


# -- generated code --------------------------------------------------------------------------------------------
def test_generated_code_is_not_committed_and_follows_the_proto(tmp_path):
    from steerer.service import proto

    ignored = subprocess.run(["git", "check-ignore", "-q", "steerer/service/_gen/steerer/v1/steerer_pb2.py"],
                             cwd=REPO)
    assert ignored.returncode == 0
    root = tmp_path / "proto"
    (root / "steerer" / "v1").mkdir(parents=True)
    source = (proto.PROTO_ROOT / proto.PROTO_FILE).read_text()
    (root / proto.PROTO_FILE).write_text(source)
    gen = tmp_path / "gen"
    # Four processes race to generate the same modules; the lock makes one write, the rest reuse.
    code = ("import sys; from pathlib import Path; from steerer.service.proto import ensure_generated; "
            "ensure_generated(Path(sys.argv[1]), Path(sys.argv[2]), 'gen.steerer.v1')")
    racers = [subprocess.Popen([sys.executable, "-c", code, str(root), str(gen)]) for _ in range(4)]
    assert [p.wait(120) for p in racers] == [0] * 4
    out = gen / "steerer" / "v1"
    stamp = (out / ".stamp").read_text()
    assert "from gen.steerer.v1 import steerer_pb2" in (out / "steerer_pb2_grpc.py").read_text()
    assert not [p for p in gen.iterdir() if p.name.startswith(".gen-")]  # no temp folders left behind
    (root / proto.PROTO_FILE).write_text(source.replace("message Usage {", "message Usage {\n  int32 regenerated_marker = 99;"))
    proto.ensure_generated(root, gen, "gen.steerer.v1")
    assert (out / ".stamp").read_text() != stamp and "regenerated_marker" in (out / "steerer_pb2.py").read_text()


def test_without_experiments_keys_join_nothing_and_forcing_is_refused(client):
    """One rule with or without --experiments: a key joins the running experiments that steer the request's
    tasks (here none: accepted, `arms` empty); a forced arm must exist (here it cannot: refused, the same
    line as for an experiment a configured server does not run)."""
    reply = client.generate(PROMPT, constraints=["lowercase"], max_new_tokens=2, experiment_key="user-1")
    assert list(reply.arms) == [] and reply.experiment_key == "user-1"
    with pytest.raises(grpc.RpcError) as err:
        client.generate(PROMPT, constraints=["lowercase"], max_new_tokens=2, force_arms={"x": "y"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "force_arms: no experiment 'x'; experiments: none"


# -- credentials: one authorization header, admin RPCs ----------------------------------------------------------
def test_one_authorization_header_at_most(client, server):
    """Two `authorization` headers: which one a server reads depends on the proxies in front of it; refused
    whatever their values (here the server has no auth token at all), counted, and health stays open."""
    status, message = documented_cases()["two-auth-headers"]
    before = metric(server, "steerer_requests_total", method="Generate", code=status)
    twice = (("authorization", "Bearer a"), ("authorization", f"Bearer {ADMIN}"))
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Generate(build_request(PROMPT, max_new_tokens=2), metadata=twice, timeout=60)
    assert err.value.code().name == status and message in err.value.details()
    assert "\n" not in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ReloadProbeBank(pb2.ReloadProbeBankRequest(path="/"), metadata=twice, timeout=60)
    assert err.value.code().name == status
    assert metric(server, "steerer_requests_total", method="Generate", code=status) == before + 1
    assert client.generate(PROMPT, max_new_tokens=2, timeout=60).usage.completion_tokens >= 1  # one header: fine


def test_admin_rpcs_need_the_admin_token(client, admin, server, banks, tmp_path):
    """Without the admin token a reload is refused before any path is looked at: the answer is the same for
    a bank that exists, a folder without one and a path that does not exist (nothing leaks to a non-admin).
    The admin token also serves the other RPCs."""
    status, message = documented_cases()["admin-no-token"]
    before = metric(server, "steerer_requests_total", method="ReloadProbeBank", code=status)
    answers = set()
    with SteererClient(server.target, token="not-the-admin") as wrong:
        for who in (client, wrong):
            for path in (banks["v2"], str(tmp_path), str(tmp_path / "nope")):
                with pytest.raises(grpc.RpcError) as err:
                    who.reload_bank(path, timeout=60)
                answers.add((err.value.code().name, err.value.details()))
    assert len(answers) == 1 and answers.pop()[0] == status
    assert message in err.value.details()
    assert metric(server, "steerer_requests_total", method="ReloadProbeBank", code=status) == before + 6
    assert client.model_info().bank_version == "v1"
    with pytest.raises(grpc.RpcError) as err:  # the admin sees NOT_FOUND for a missing path
        admin.reload_bank(str(tmp_path / "nope"), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert admin.generate(PROMPT, max_new_tokens=2, timeout=60).usage.completion_tokens >= 1


def test_serve_refuses_an_empty_admin_token_and_a_bad_unread_timeout(banks):
    for args, env, needle in [(["--admin-token", " "], {}, "the admin token is empty"),
                              ([], {"STEERER_ADMIN_TOKEN": ""}, "the admin token is empty"),
                              (["--unread-stream-timeout", "0"], {}, "unread-stream-timeout must be > 0")]:
        proc = subprocess.run([sys.executable, "-m", "steerer.cli", "serve", "--port", "0", "--metrics-port", "-1",
                               "--bank", banks["v1"], *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})
        errors = [line for line in proc.stderr.splitlines() if line.startswith("steerer: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], (args, env, proc.stderr)


# -- clients that never read ------------------------------------------------------------------------------------
# A tiny HTTP/2 window and no BDP probing: the server can send a stream a message or two, then its thread
# waits for a read that never comes (what one client did to the server in issue #18).
NEVER_READ = [("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0), ("grpc.http2.max_frame_size", 16384)]


def test_unread_streams_are_cancelled_and_health_answers_whatever_the_load(banks):
    """120 finished streams that one client never reads: health answers SERVING (on that client's own
    channel too) and a new Generate is served while they are held; 40 more streams pass the RPC limit
    (batch + queue + 16 = 152) and the 8 the client sees refused are the 8 the metrics count; after the
    documented 30 s each undrained stream is cancelled (its client sees CANCELLED, the metrics count it), and
    the server serves again. Before the fix health and Generate answered RESOURCE_EXHAUSTED, uncounted."""
    with ServerProcess("--bank", banks["v1"], "--max-batch", "32", "--max-queue", "104") as server:
        holder = grpc.insecure_channel(server.target, options=NEVER_READ)
        stub = pb2_grpc.SteererStub(holder)
        tiny = build_request("Hi", max_new_tokens=2, ignore_eos=True)
        held = [stub.GenerateStream(tiny, timeout=600) for _ in range(120)]
        wait_for(lambda: metric(server, "steerer_prefill_rows_sum") >= 120 and metric(server, "steerer_batch_size") == 0
                 and metric(server, "steerer_queue_depth") == 0, timeout=300, every=0.5)
        assert health_pb2_grpc.HealthStub(holder).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        with SteererClient(server.target) as other:
            assert other.health(timeout=10) == "SERVING"
            assert other.generate(PROMPT, max_new_tokens=2, timeout=120).usage.completion_tokens >= 1
            assert metric(server, "steerer_requests_total", method="GenerateStream", code="CANCELLED") == 0  # held
            refused_before = metric(server, "steerer_requests_total", method="GenerateStream", code="RESOURCE_EXHAUSTED")
            more = [stub.GenerateStream(tiny, timeout=600) for _ in range(40)]
            # A refused call ends at once on the client; an admitted one only once it is read (gRPC delivers
            # a stream's status after its messages), so the client's refusals are the calls done now.
            wait_for(lambda: sum(c.done() for c in more) >= 8, timeout=60)
            # 30 s after each finished, the server cancels all 152 held streams (120 + 32 admitted).
            wait_for(lambda: metric(server, "steerer_requests_total", method="GenerateStream", code="CANCELLED") == 152,
                     timeout=120, every=0.5)
            refused = [c.code() for c in held + more if c.done()]
            assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 8, collections.Counter(refused)
            assert metric(server, "steerer_requests_total", method="GenerateStream",
                          code="RESOURCE_EXHAUSTED") - refused_before == len(refused)
            with pytest.raises(grpc.RpcError) as err:  # reading one now: its messages, then CANCELLED
                list(held[0])
            assert err.value.code() == grpc.StatusCode.CANCELLED
            assert other.health(timeout=10) == "SERVING"
            assert other.generate(PROMPT, max_new_tokens=2, timeout=120).usage.completion_tokens >= 1
        for call in held + more:
            call.cancel()
        holder.close()
