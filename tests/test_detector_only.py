"""Detector-only constraints: a task the bank has no probe for, but whose violation a prefix decides (a YAML
forbid rule, word_count "at most"), is served on its detector alone: detection events, the checker's verdict
and the guard work; steering it is refused in one line, and a task with neither probe nor detector stays
refused. Real default model and shipped bank (which has no probe for the example YAML task)."""

from __future__ import annotations

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
