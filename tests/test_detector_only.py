"""Detector-only constraints: a task the bank has no probe for, but whose violation a prefix decides (a YAML
forbid rule, word_count "at most"), is served on its detector alone: detection events, the checker's verdict
and the guard work; steering it is refused in one line, and a task with neither probe nor detector stays
refused. Real default model and shipped bank (which has no probe for the example YAML task)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from steerer.constraints import Constraint, validate_request
from steerer.policy import OFF, SteeringPolicy
from steerer.request import Request, SamplingParams
from steerer.service.testing import split_stream
from steerer.tasks import load_task_file, registry

REPO = Path(__file__).resolve().parents[1]
TASK_FILE = REPO / "examples" / "tasks" / "no_competitor.yaml"
NAMES = ["ocean", "water"]
RIVAL = Constraint("no_competitor", {"competitors": NAMES})
WORDS = Constraint("word_count", {"relation": "at most", "limit": 60})
NAME_RE = re.compile(r"\b(" + "|".join(NAMES) + r")\b", re.IGNORECASE)
PROMPT = "Write two sentences about the ocean and its water."
GUARD = SteeringPolicy.parse("guard")


@pytest.fixture(scope="module")
def bank():
    from steerer.bank import DEFAULT_BANK, ProbeBank

    load_task_file(TASK_FILE)
    bank = ProbeBank.load(DEFAULT_BANK)
    assert "no_competitor" not in bank.tasks and "word_count" in bank.tasks
    yield bank
    registry.unregister("no_competitor")


@pytest.fixture(scope="module")
def runs(lm, bank):
    """One batch: the rule unguarded (off) and guarded, each beside a probed constraint."""
    from steerer.core import Steerer

    sampling = SamplingParams(max_new_tokens=16)
    requests = [Request(PROMPT, (RIVAL, WORDS), OFF, sampling=sampling, id="open"),
                Request(PROMPT, (WORDS, RIVAL), OFF, {"no_competitor": GUARD}, sampling=sampling, id="guarded")]
    with Steerer(lm, bank) as steerer:
        results, events = split_stream(steerer.generate(requests))
    return results, events


def test_detection_and_verdict_without_a_probe(runs, lm):
    results, events = runs
    open_ = results["open"]
    assert NAME_RE.search(open_.text), open_.text  # unguarded, the model writes a forbidden name
    rival, words = open_.verdicts
    assert (rival.task, words.task) == ("no_competitor", "word_count")  # the request's order
    assert rival.satisfied is False and rival.detected_at is not None
    detected = [(d.task, d.token_index) for e in events["open"] for d in e.detections]
    assert ("no_competitor", rival.detected_at) in detected
    assert NAME_RE.search(lm.tokenizer.decode(open_.tokens[:rival.detected_at + 1]))  # the token that broke it
    assert rival.p_satisfied_end is None and rival.probe_muted and not rival.flagged
    assert rival.probe_note == "no probe in the bank: detector only"
    assert words.p_satisfied_end is not None  # the probed constraint beside it still reads
    assert all("no_competitor" not in e.risks for e in events["open"])  # no column: no risk reported
    assert open_.steered_tokens == {"no_competitor": 0, "word_count": 0}


def test_the_guard_keeps_the_rule_without_a_probe(runs):
    results, events = runs
    guarded = results["guarded"]
    assert guarded.text.strip() and not NAME_RE.search(guarded.text), guarded.text
    words, rival = guarded.verdicts
    assert (words.task, rival.task) == ("word_count", "no_competitor")
    assert rival.satisfied is True and rival.detected_at is None
    assert any(e.redrawn.get("no_competitor") for e in events["guarded"])  # the guard had work to do
    assert "".join(e.text for e in events["guarded"]) == guarded.text  # no vetoed token reached the stream


def test_steering_or_no_detector_is_refused_in_one_line(bank):
    for request in (Request(PROMPT, (RIVAL,), SteeringPolicy("conditional", 4.0)),
                    Request(PROMPT, (RIVAL, WORDS), OFF, {"no_competitor": SteeringPolicy.parse("guard+constant:2")})):
        with pytest.raises(ValueError, match="^no probe for no_competitor: only `off` or `guard`$"):
            validate_request(request, bank.tasks)
    without_words = bank.subset([t for t in bank.tasks if t != "word_count"]).tasks
    validate_request(Request(PROMPT, (WORDS,), GUARD), without_words)  # a built-in task on its detector: served
    at_least = Constraint("word_count", {"relation": "at least", "limit": 60})  # no prefix decides it
    with pytest.raises(ValueError, match="no probe for task 'word_count', and no detector can decide it"):
        validate_request(Request(PROMPT, (at_least,)), without_words)


def test_the_cli_serves_a_rule_the_bank_has_no_probe_for():
    env = {**os.environ, registry.FILES_ENV: str(TASK_FILE)}
    done = subprocess.run(
        [sys.executable, "-m", "steerer.cli", "generate", "--constraint", 'no_competitor:{"competitors": ["ocean"]}',
         "--policy", "guard", "--max-new-tokens", "12", "--prompt", "Describe the ocean in one sentence."],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert not re.search(r"\bocean\b", done.stdout, re.IGNORECASE), done.stdout
    assert "[no_competitor: no probe in the bank: detector only (no reading), checker: satisfied" in done.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "steerer.cli", "generate", "--constraint", 'no_competitor:{"competitors": ["ocean"]}',
         "--policy", "conditional", "--alpha", "4", "--prompt", "Hi."],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "steerer: error: no probe for no_competitor: only `off` or `guard`")


# -- the fronts: one `steerer serve` child (gRPC, the OpenAI HTTP front, A/B experiments, an outcome log) --------
RULE = {"task": "no_competitor", "params": {"competitors": NAMES}}
REFUSED = "no probe for no_competitor: only `off` or `guard`"
EXPERIMENTS = {"experiments": [  # the treatments a detector-only rule allows: guard against off
    {"name": "rule-guard", "salt": "ci", "arms": [{"name": "control", "policies": {"no_competitor": "off"}},
                                                 {"name": "guarded", "policies": {"no_competitor": "guard"}}]},
    {"name": "rule-steer", "status": "stopped", "arms": [  # a misconfigured one (forced only: QA)
        {"name": "control", "policies": {"no_competitor": "off"}},
        {"name": "steered", "policies": {"no_competitor": "constant:4"}}]}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from steerer.service.testing import ServerProcess, free_port

    folder = tmp_path_factory.mktemp("rule-fronts")
    (folder / "experiments.json").write_text(json.dumps(EXPERIMENTS))
    port = free_port()
    with ServerProcess("--http-port", str(port), "--experiments", str(folder / "experiments.json"),
                       "--outcome-log", str(folder / "outcomes.sqlite"), "--max-batch", "2", "--threads", "1",
                       env={registry.FILES_ENV: str(TASK_FILE)}) as proc:
        proc.base_url, proc.log = f"http://127.0.0.1:{port}/v1", folder / "outcomes.sqlite"
        yield proc


def test_the_openai_front_serves_a_rule_on_its_detector(server):
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": PROMPT}]
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"steerer": {"constraints": [RULE]}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert NAME_RE.search(text), text  # unguarded, the model writes a forbidden name
    fields = [c.model_extra["steerer"] for c in chunks if c.model_extra.get("steerer")]
    tokens = [f for f in fields if "tokenId" in f]
    assert tokens and all("no_competitor" not in f.get("risk", {}) for f in tokens)  # no column: no risk
    (verdict,) = fields[-1]["verdicts"]
    assert verdict["task"] == "no_competitor" and verdict["satisfied"] is False
    assert verdict["probeMuted"] and verdict["probeNote"] == "no probe in the bank: detector only"
    assert "pSatisfiedEnd" not in verdict and not verdict.get("flagged")
    detected = [d for f in tokens for d in f.get("detections", [])]
    assert detected == [{"task": "no_competitor", "tokenIndex": verdict["detectedAt"]}]

    guarded = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                             extra_body={"steerer": {"constraints": [RULE | {"policy": "guard"}]}})
    text = guarded.choices[0].message.content
    assert text.strip() and not NAME_RE.search(text), text
    (verdict,) = guarded.model_extra["steerer"]["verdicts"]
    assert verdict["satisfied"] is True and "detectedAt" not in verdict and "pSatisfiedEnd" not in verdict
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=messages, max_tokens=4, extra_body={
            "steerer": {"constraints": [RULE | {"policy": "conditional:4"}]}})
    assert refused.value.status_code == 400 and refused.value.body["message"] == REFUSED


def keys_by_arm(name: str) -> dict[str, str]:
    """The first key `assign` puts in each arm of experiment `name` (the server's own rule)."""
    from steerer.ab.experiments import assign, parse

    exp = next(e for e in parse(EXPERIMENTS, known_tasks={"no_competitor"}) if e.name == name)
    out: dict[str, str] = {}
    for i in range(1000):
        out.setdefault(assign(exp, f"user-{i}"), f"user-{i}")
    return out


def test_ab_arms_guard_a_rule_without_a_probe_and_log_its_verdicts(server):
    import sqlite3

    import grpc

    from steerer.service.client import SteererClient

    keys = keys_by_arm("rule-guard")
    rule = (RULE["task"], RULE["params"])
    with SteererClient(server.target) as client:
        replies = {arm: client.generate(PROMPT, constraints=[rule], max_new_tokens=16, experiment_key=key,
                                        request_id=f"ab-{arm}") for arm, key in keys.items()}
        for arm, reply in replies.items():
            assert [(a.experiment, a.arm, a.forced) for a in reply.arms] == [("rule-guard", arm, False)]
            (verdict,) = reply.verdicts
            assert verdict.probe_note == "no probe in the bank: detector only"
            assert not verdict.HasField("p_satisfied_end") and verdict.probe_muted
        assert NAME_RE.search(replies["control"].text) and not replies["control"].verdicts[0].satisfied
        assert not NAME_RE.search(replies["guarded"].text) and replies["guarded"].verdicts[0].satisfied
        with pytest.raises(grpc.RpcError) as refused:  # an arm may not steer a task the bank has no probe for
            client.generate(PROMPT, constraints=[rule], max_new_tokens=4, force_arms={"rule-steer": "steered"})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == f"experiment 'rule-steer' arm 'steered': {REFUSED}"
    db = sqlite3.connect(server.log)
    try:
        logged = {arm: (satisfied, policy) for arm, satisfied, policy in db.execute(
            "SELECT a.arm, v.satisfied, v.policy FROM verdicts v JOIN assignments a USING (outcome_id) JOIN outcomes o "
            "ON o.id = v.outcome_id WHERE o.request_id LIKE 'ab-%' AND v.task = 'no_competitor' "
            "AND v.p_satisfied_end IS NULL")}
        configs = {json.loads(c)["name"]: json.loads(c) for (c,) in db.execute("SELECT config FROM experiments")}
    finally:
        db.close()
    assert logged == {"control": (0, "off"), "guarded": (1, "guard+off")}  # committed before each reply went out
    arms = {a["name"]: a["policies"]["no_competitor"] for a in configs["rule-guard"]["arms"]}
    assert arms == {"control": {"kind": "off", "alpha": 0.0}, "guarded": {"kind": "off", "alpha": 0.0, "guard": True}}
