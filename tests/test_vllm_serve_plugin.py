"""steerer inside plain `vllm serve` (`steerer.engine.vllm.serve_plugin`), end to end: skipped unless vLLM is
installed (`scripts/setup-vllm`, then pytest with that venv's python; with STEERER_REQUIRE_VLLM=1, as
`scripts/test` sets it, a missing vLLM fails instead).

A real OpenAI-compatible vLLM server runs in a subprocess with the plugin (compiled, fp32, one torch thread);
the reference is `VLLMSteerer` in this process with the same engine settings (the op at every layer, as
`vllm serve` has it), built while the server starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("STEERER_REQUIRE_VLLM") == "1":  # CI: a missing vLLM is a failure, not a skip
        raise
    pytest.skip("vLLM is not installed here (scripts/setup-vllm)", allow_module_level=True)

from vllm_serve import VLLMServe  # noqa: E402
from vllm_serve import get as _get  # noqa: E402

from steerer import ProbeBank, Request, SamplingParams, SteeringPolicy  # noqa: E402
from steerer.controller import Result, TokenEvent  # noqa: E402
from steerer.engine.vllm import ARCHITECTURE  # noqa: E402
from steerer.engine.vllm.serve_plugin import CacheSalt, row_spec, steering_salt, validate  # noqa: E402
from steerer.model import chat_prompt, resolve_model_path  # noqa: E402
from steerer.policy import strength_bounds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe the ocean in two sentences."
SALT_PROMPT = "Write a haiku about autumn leaves, then explain in one sentence why you chose its images."
TASKS = ("lowercase", "json_format")
STEER = {"steerer_constraints": list(TASKS), "steerer_policy": "constant:24"}
MONITOR = {"steerer_constraints": list(TASKS)}
MAX_TOKENS = 16
RULE_FILE = ROOT / "examples" / "tasks" / "no_competitor.yaml"  # a rule the shipped bank has no probe for
# 32-token KV blocks (the salt check counts cached blocks) and only 8 of them (7 usable: 224 tokens), so four
# concurrent requests cannot all hold their KV and vLLM preempts some (the concurrency check).
ENGINE = {"max_num_seqs": 4, "max_model_len": 192, "block_size": 32, "num_gpu_blocks_override": 8}
CONCURRENT = ("Write a long story about a dragon who learns to bake bread.", "Explain in detail how a bicycle works.",
              "Write a long letter to a friend about your summer holiday.",
              "Describe, step by step, how to plant a vegetable garden.")
STARTUP_S = 900


def _metrics(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as printed)."""
    out = {}
    for line in _get(url).splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series `name` whose labels include `labels`."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


# -- no server: vLLM's side of the contract, request parsing, validation messages and the salt middleware ----------
def test_vllm_internals_the_plugin_relies_on():
    import inspect

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.v1.sample.logits_processor import LogitsProcessor
    from vllm.v1.worker.gpu_input_batch import CachedRequestState
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    init = inspect.getsource(GPUModelRunner.__init__)
    # The runner builds logits processors in its constructor (the plugin finds it up the stack) and keeps every
    # request it holds, preempted ones included, in `requests`.
    assert "build_logitsprocs(" in init and "self.requests: dict[str, CachedRequestState]" in init
    assert callable(GPUModelRunner.get_model)
    assert {"sampling_params", "output_token_ids"} <= set(CachedRequestState.__dataclass_fields__)
    assert "validate_params" in vars(LogitsProcessor)  # the API server's per-request check (HTTP 400)
    for request in (ChatCompletionRequest, CompletionRequest):
        assert {"vllm_xargs", "cache_salt"} <= set(request.model_fields)
    # Start-up checks (startup.py): vLLM's per-architecture config hook, run while VllmConfig is built (API server).
    from vllm.config import VllmConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    assert "self.try_verify_and_update_config()" in inspect.getsource(VllmConfig.__post_init__)
    assert "cls.verify_and_update_config(self)" in inspect.getsource(VllmConfig.try_verify_and_update_config)
    from steerer.engine.vllm.plugin import register

    register()
    assert issubclass(MODELS_CONFIG_MAP[ARCHITECTURE], VerifyAndUpdateConfig)


def test_vllm_xargs_key_scheme_and_messages():
    spec = row_spec({"steerer_constraints": ["lowercase", 'word_count:{"relation": "at most", "limit": 20}'],
                     "steerer_policy": "conditional:12", "steerer_policies": "lowercase=constant:24",
                     "other_plugin_key": 1})
    assert [c.task for c in spec.constraints] == ["lowercase", "word_count"]
    assert spec.constraints[1].params == {"relation": "at most", "limit": 20}
    assert spec.policy_for("word_count") == SteeringPolicy("conditional", 12.0)
    assert spec.policy_for("lowercase") == SteeringPolicy("constant", 24.0)
    assert row_spec({"other_plugin_key": 1}) is None and row_spec(None) is None
    for bad, message in [({"steerer_constraints": "lowercase:{bad"}, "not valid JSON"),
                         ({"steerer_constraint": "lowercase"}, "unknown vllm_xargs key steerer_constraint"),
                         ({"steerer_policy": "constant:24"}, "name at least one constraint"),
                         ({"steerer_constraints": 3}, "a string or a list of strings"),
                         ({"steerer_constraints": "lowercase", "steerer_policy": "wild:2"}, "unknown steering policy"),
                         ({"steerer_constraints": "lowercase", "steerer_policies": "lowercase:2"}, "TASK=kind:alpha")]:
        with pytest.raises(ValueError, match=message):
            row_spec(bad)
    bound = strength_bounds(ProbeBank.load())["lowercase"]  # the bank's strength bound, in the API server's check
    with pytest.raises(ValueError, match=rf"^steering strength 1000 for lowercase is above this bank's bound {bound:g}"):
        validate({"steerer_constraints": "lowercase", "steerer_policies": "lowercase=constant:1000"})
    assert validate({"steerer_constraints": "lowercase", "steerer_policy": f"constant:{bound:g}"}) is not None
    assert validate({"steerer_constraints": "lowercase", "steerer_policy": "guard+constant:4"}).policy.guard


def test_cache_salt_middleware_sets_the_steering_salt():
    seen = []

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append((dict(scope["headers"]), json.loads(body)))

    def call(payload: dict, path: str = "/v1/chat/completions") -> tuple[dict, dict]:
        raw = json.dumps(payload).encode()
        chunks = [raw[:10], raw[10:]]  # a body in two messages

        async def receive():
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", str(len(raw)).encode())]}
        asyncio.run(CacheSalt(app)(scope, receive, None))
        return seen[-1]

    headers, body = call({"messages": [], "vllm_xargs": STEER})
    assert body["cache_salt"] == steering_salt(STEER) and body["cache_salt"].startswith("steerer-")
    assert int(headers[b"content-length"]) == len(json.dumps(body).encode())
    _, tenant = call({"messages": [], "vllm_xargs": STEER, "cache_salt": "tenant-a"})
    assert tenant["cache_salt"] not in (body["cache_salt"], "tenant-a")  # combined with the client's own
    for untouched in ({"messages": [], "vllm_xargs": MONITOR},  # monitoring only: shares plain traffic's cache
                      {"messages": [], "vllm_xargs": {"steerer_constraints": "nope", "steerer_policy": "constant:2"}},
                      {"messages": []}):
        assert "cache_salt" not in call(untouched)[1]
    assert "cache_salt" not in call({"vllm_xargs": STEER}, path="/v1/embeddings")[1]


# -- the reference: VLLMSteerer in this process ---------------------------------------------------------------------
def _request(xargs: dict | None, rid: str) -> Request:
    spec = row_spec(xargs)
    return Request(PROMPT, spec.constraints if spec else (), spec.policy if spec else SteeringPolicy(),
                   sampling=SamplingParams(max_new_tokens=MAX_TOKENS), id=rid)


@pytest.fixture(scope="module")
def reference(server_process):
    """Plain, monitored and steered results, each run alone and in the order the server gets them (the plain
    request's cached prompt serves the monitored one in both), with their token events; and the salt the driver
    gives the steered request."""
    from steerer.engine.vllm.driver import VLLMSteerer

    env = dict(os.environ)
    engine = VLLMSteerer(ProbeBank.load(), threads=1, layers="all", max_num_seqs=ENGINE["max_num_seqs"],
                         max_model_len=ENGINE["max_model_len"],
                         llm_kwargs={k: ENGINE[k] for k in ("block_size", "num_gpu_blocks_override")})
    try:
        out = {}
        for name, xargs in (("plain", None), ("monitor", MONITOR), ("steer", STEER)):
            items = list(engine.generate([_request(xargs, name)]))
            (result,) = [i for i in items if isinstance(i, Result)]
            out[name] = (result, [i for i in items if isinstance(i, TokenEvent)])
        out["salt"] = engine.salt(_request(STEER, "salt"))
        out["prompt_ids"] = chat_prompt(engine.tokenizer, PROMPT)
        out["eos"] = set(engine.eos_token_ids)
    finally:
        engine.close()
        del engine
        os.environ.clear()
        os.environ.update(env)  # VLLMSteerer sets vLLM variables; the server gets its own
    return out


# -- the server -----------------------------------------------------------------------------------------------------
class Server(VLLMServe):
    """The default model compiled, `ENGINE`'s KV blocks, results to a JSON-lines log."""

    startup_s = STARTUP_S

    def __init__(self, tmp: Path):
        assert any(e.value == "steerer.engine.vllm.plugin:register" for e in entry_points(group="vllm.general_plugins")), \
            "the vllm.general_plugins entry point is not installed in this venv: rerun scripts/setup-vllm"
        self.results = tmp / "results.jsonl"
        super().__init__(resolve_model_path(None), tmp / "server.log", [
            "--seed", "0", "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
            "--block-size", str(ENGINE["block_size"]), "--gpu-memory-utilization", "0.3",
            "--num-gpu-blocks-override", str(ENGINE["num_gpu_blocks_override"])],
            {"STEERER_RESULTS_LOG": str(self.results), "STEERER_TASK_FILES": str(RULE_FILE)})

    def chat(self, prompt: str, xargs: dict | None = None, **extra):
        from openai import OpenAI

        client = OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=300)
        body = {"return_token_ids": True, **({"vllm_xargs": xargs} if xargs is not None else {}), **extra}
        return client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=MAX_TOKENS, temperature=0.0, extra_body=body)

    def wait_metric(self, name: str, value: float, timeout: float = 120, **labels: str) -> dict[str, float]:
        """Metrics once `name{labels}` reached `value` (results are published off the engine's thread)."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = _metrics(self.metrics_url)
            if _sum(metrics, name, **labels) >= value or time.monotonic() > deadline:
                return metrics
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """Started first, so the server's start-up (its compile) overlaps the reference's."""
    srv = Server(tmp_path_factory.mktemp("vllm-serve"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def server(server_process, reference):
    server_process.wait_ready()
    return server_process


def _tokens(choice) -> list[int]:
    return list(choice.token_ids)


def test_plain_vllm_serve_monitors_and_steers_per_request(server, reference):
    """(a) unsteered requests (plain and monitored) give the driver's unsteered tokens, (b) the steered one its
    steered tokens, (c) the metrics moved by what the driver's events and results say."""
    mon, mon_events = reference["monitor"]
    steer, steer_events = reference["steer"]
    assert steer.tokens[:len(mon.tokens)] != mon.tokens  # steering at 24 changes this answer

    plain = server.chat(PROMPT)
    assert plain.prompt_token_ids == reference["prompt_ids"]  # the chat template renders alike
    replies = {name: server.chat(PROMPT, xargs) for name, xargs in (("monitor", MONITOR), ("steer", STEER))}
    eos = reference["eos"]
    assert [t for t in _tokens(plain.choices[0]) if t not in eos] == reference["plain"][0].tokens == mon.tokens
    for name, result in (("monitor", mon), ("steer", steer)):
        choice = replies[name].choices[0]
        assert [t for t in _tokens(choice) if t not in eos] == result.tokens, name
        assert choice.message.content == result.text, name

    metrics = server.wait_metric("steerer_requests_total", 2, method="vllm", code="OK")
    assert _sum(metrics, "steerer_requests_total", method="vllm", code="OK") == 2
    assert _sum(metrics, "steerer_requests_total", method="vllm", code="CANCELLED") == 0
    assert _sum(metrics, "steerer_tokens_generated_total") == len(mon.tokens) + len(steer.tokens)
    events = mon_events + steer_events
    for task in TASKS:
        assert _sum(metrics, "steerer_steered_tokens_total", task=task) == steer.steered_tokens[task] > 0
        assert _sum(metrics, "steerer_flags_raised_total", task=task) == sum(
            f.raised and f.task == task for e in events for f in e.flags)
        assert _sum(metrics, "steerer_violations_detected_total", task=task) == sum(
            d.task == task for e in events for d in e.detections)
        assert _sum(metrics, "steerer_probe_risk_count", task=task) == len(events)
        assert _sum(metrics, "steerer_verdicts_total", task=task) == 2
    # Per request (the results log): the same verdicts, except that the end reading is the last token's where the
    # driver reads one more pass over EOS; for a response cut at max_tokens both read the last token.
    logged = {r["request_id"].split("-")[1]: r for r in map(json.loads, server.results.read_text().splitlines())}
    by_id = {replies[n].id.split("-")[1]: (n, r) for n, r in (("monitor", mon), ("steer", steer))}
    assert set(by_id) <= set(logged)
    for rid, (name, ref) in by_id.items():
        got = logged[rid]
        assert got["tokens"] == ref.tokens and got["steered_tokens"] == ref.steered_tokens, name
        assert got["finish_reason"] == ref.finish_reason, name
        for v, r in zip(got["verdicts"], ref.verdicts, strict=True):
            assert (v["task"], v["satisfied"], v["flagged"], v["first_flag_token"], v["detected_at"]) == \
                (r.task, r.satisfied, r.flagged, r.first_flag_token, r.detected_at), name
            if ref.finish_reason == "length":
                assert abs(v["p_satisfied_end"] - r.p_satisfied_end) < 1e-4, name
                assert v["predicted_violation"] == r.predicted_violation, name
        labels = {(v["task"], "yes" if v["predicted_violation"] else "no",
                   "unknown" if v["satisfied"] is None else "no" if v["satisfied"] else "yes",
                   "yes" if v["flagged"] else "no") for v in got["verdicts"]}
        for task, predicted, violation, flagged in labels:
            assert _sum(metrics, "steerer_verdicts_total", task=task, predicted_violation=predicted,
                        violation=violation, flagged=flagged) >= 1


def test_malformed_vllm_xargs_get_400_and_the_server_keeps_serving(server, reference):
    from openai import BadRequestError

    for xargs, message in [({"steerer_constraints": "lowercase:{bad"}, "params are not valid JSON"),
                           ({"steerer_constraints": "no_such_task"}, "unknown task 'no_such_task'"),
                           ({"steerer_constraints": "lowercase", "steerer_policy": "constant:5000"}, "outside"),
                           ({"steerer_constraintz": "lowercase"}, "unknown vllm_xargs key")]:
        with pytest.raises(BadRequestError, match=re.escape(message)) as caught:
            server.chat(PROMPT, xargs)
        assert caught.value.status_code == 400
    assert server.proc.poll() is None
    ok = server.chat(PROMPT, MONITOR).choices[0]
    assert [t for t in _tokens(ok) if t not in reference["eos"]] == reference["monitor"][0].tokens


def test_steered_kv_is_never_shared_with_other_configurations(server, reference):
    """The middleware salts steered requests as the driver does: the same steered request hits its own cached
    blocks; the same prompt unsteered does not hit them (and hits its own the second time)."""
    assert steering_salt(STEER) == reference["salt"]

    def hits(xargs: dict | None) -> float:
        before = _sum(_metrics(server.url + "/metrics"), "vllm:prefix_cache_hits_total")
        server.chat(SALT_PROMPT, xargs, max_tokens=1)
        return _sum(_metrics(server.url + "/metrics"), "vllm:prefix_cache_hits_total") - before

    assert len(server.chat(SALT_PROMPT, STEER, max_tokens=1).prompt_token_ids) >= ENGINE["block_size"]  # a full block
    assert hits(STEER) >= ENGINE["block_size"]  # its own cached blocks
    assert hits(MONITOR) == 0  # never the steered ones
    assert hits(None) >= ENGINE["block_size"]  # monitoring-only and plain requests share the plain cache


def test_concurrent_requests_through_preemption(server, reference):
    """Four requests at once (two monitored, two steered) on a KV cache too small for them: vLLM preempts and
    resumes rows, and every response's tokens are the ones its result was built from, each token read once."""
    from concurrent.futures import ThreadPoolExecutor

    def vllm_metric(name: str) -> float:
        return _sum(_metrics(server.url + "/metrics"), name)

    before = _metrics(server.metrics_url)
    preemptions = vllm_metric("vllm:num_preemptions_total")
    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        replies = list(pool.map(lambda i: server.chat(CONCURRENT[i], STEER if i % 2 else MONITOR, max_tokens=100),
                                range(len(CONCURRENT))))
    assert vllm_metric("vllm:num_preemptions_total") > preemptions, "no preemption: the check needs a smaller cache"
    ok = _sum(before, "steerer_requests_total", method="vllm", code="OK") + len(CONCURRENT)
    after = server.wait_metric("steerer_requests_total", ok, method="vllm", code="OK")
    assert _sum(after, "steerer_requests_total", method="vllm", code="OK") == ok
    logged = {r["request_id"].split("-")[1]: r for r in map(json.loads, server.results.read_text().splitlines())}
    events = 0
    for i, reply in enumerate(replies):
        got = logged[reply.id.split("-")[1]]
        tokens = [t for t in _tokens(reply.choices[0]) if t not in reference["eos"]]
        assert got["tokens"] == tokens, i
        eos = got["finish_reason"] == "eos"
        events += len(tokens) + eos
        assert got["steered_tokens"] == dict.fromkeys(TASKS, (len(tokens) - 1 + eos) if i % 2 else 0), i
    for task in TASKS:
        assert _sum(after, "steerer_probe_risk_count", task=task) - _sum(before, "steerer_probe_risk_count",
                                                                           task=task) == events


def test_plain_vllm_serve_guards_a_request(server, reference):
    """A guarded request through plain `vllm serve` (SteererServe masks vetoed tokens before vLLM draws): none of
    the terms the unguarded answer wrote, and the vetoes in steerer_guard_vetoes_total."""
    terms = ["the", "ocean", "water"]
    written = re.compile(r"\b(" + "|".join(terms) + r")\b", re.IGNORECASE)
    assert written.search(reference["plain"][0].text)  # unguarded, the model writes them
    before = _sum(_metrics(server.metrics_url), "steerer_guard_vetoes_total", task="term_exclusion")
    reply = server.chat(PROMPT, {"steerer_constraints": "term_exclusion:" + json.dumps({"terms": terms}),
                                 "steerer_policy": "guard"})
    text = reply.choices[0].message.content
    assert text.strip() and not written.search(text), text
    after = server.wait_metric("steerer_guard_vetoes_total", before + 1, task="term_exclusion")
    assert _sum(after, "steerer_guard_vetoes_total", task="term_exclusion") > before


def test_plain_vllm_serve_serves_a_rule_without_a_probe_on_its_detector(server):
    """Detector-only through plain `vllm serve` (the server registers `no_competitor` from STEERER_TASK_FILES):
    unguarded it is detected and checked, guarded the names stay out, steering it is a 400 in one line."""
    from openai import BadRequestError

    rule = "no_competitor:" + json.dumps({"competitors": ["ocean", "water"]})
    written = re.compile(r"\b(ocean|water)\b", re.IGNORECASE)
    replies = {name: server.chat(PROMPT, {"steerer_constraints": rule, **extra})
               for name, extra in (("open", {}), ("kept", {"steerer_policy": "guard"}))}
    assert written.search(replies["open"].choices[0].message.content)
    text = replies["kept"].choices[0].message.content
    assert text.strip() and not written.search(text), text
    ids = {reply.id.split("-")[1]: name for name, reply in replies.items()}
    deadline = time.monotonic() + 120  # results are published off the engine's thread
    while not ids.keys() <= {json.loads(line)["request_id"].split("-")[1] for line in
                             (server.results.read_text().splitlines() if server.results.exists() else [])}:
        assert time.monotonic() < deadline, "the results log lacks the detector-only requests"
        time.sleep(0.2)
    logged = {ids[r["request_id"].split("-")[1]]: r["verdicts"] for r in map(json.loads, server.results.read_text(
        ).splitlines()) if r["request_id"].split("-")[1] in ids}
    for name, satisfied in (("open", False), ("kept", True)):
        (verdict,) = logged[name]
        assert verdict["task"] == "no_competitor" and verdict["satisfied"] is satisfied, name
        assert verdict["p_satisfied_end"] is None and verdict["probe_note"] == "no probe in the bank: detector only"
        assert (verdict["detected_at"] is None) is satisfied, name
    with pytest.raises(BadRequestError, match="no probe for no_competitor: only `off` or `guard`"):
        server.chat(PROMPT, {"steerer_constraints": rule, "steerer_policy": "conditional:4"})
