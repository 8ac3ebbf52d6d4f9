"""The guard on vLLM's offline engine (steerer/engine/vllm/guard.py): the issue's Bar on `VLLMSteerer` (no
forbidden term, no capital, at most 12 words), vetoes on the token events and in the metric, and rows without a
guard untouched in the same batch. One eager engine, the default model (skipped unless vLLM is installed; with
STEERER_REQUIRE_VLLM=1 a missing vLLM fails). The serve plugin's guard is checked in test_vllm_serve_plugin.py.
"""

from __future__ import annotations

import os
import re

import pytest

REQUIRED = os.environ.get("STEERER_REQUIRE_VLLM") == "1"
try:
    import vllm  # noqa: F401
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("vLLM is not installed here (scripts/setup-vllm)", allow_module_level=True)

from steerer import Constraint, ProbeBank, Request, SamplingParams, SteeringPolicy  # noqa: E402
from steerer.guard import repeating  # noqa: E402
from steerer.request import Result, TokenEvent  # noqa: E402
from steerer.service.testing import split_stream  # noqa: E402
from steerer.tasks.common import count_words  # noqa: E402

TERMS = ["the", "ocean", "water"]
EXCLUDE = Constraint("term_exclusion", {"terms": TERMS})
LOWER = Constraint("lowercase", {})
AT_MOST_12 = Constraint("word_count", {"relation": "at most", "limit": 12})
GUARD = SteeringPolicy.parse("guard")
TERM_RE = re.compile(r"\b(" + "|".join(TERMS) + r")\b", re.IGNORECASE)
TOKENS = 32
CASES = {  # id -> prompt, guarded constraints
    "terms": ("Write two sentences about the ocean and its water.", (EXCLUDE,)),
    "lower": ("Describe Paris in two sentences.", (LOWER,)),
    "words": ("Explain in detail how rain forms.", (AT_MOST_12,)),
    "both": ("Write a sentence about the ocean.", (EXCLUDE, LOWER)),
}
PLAIN = "Write two sentences about the ocean and its water."  # the unguarded row shares the guarded one's prompt


@pytest.fixture(scope="module")
def steerer():
    from steerer.engine.vllm.driver import VLLMSteerer

    engine = VLLMSteerer(ProbeBank.load(), enforce_eager=True, max_num_seqs=8, max_model_len=512, threads=1)
    yield engine
    engine.close()


def _run(engine, requests: list[Request]) -> tuple[dict[str, list[TokenEvent]], dict[str, Result]]:
    results, events = split_stream(engine.generate(requests))
    return {r.id: events.get(r.id, []) for r in requests}, results


def _greedy(rid: str, prompt: str, constraints: tuple[Constraint, ...], policy: SteeringPolicy) -> Request:
    return Request(prompt, constraints, policy, sampling=SamplingParams(max_new_tokens=TOKENS), id=rid)


@pytest.fixture(scope="module")
def runs(steerer):
    """The unguarded reference (each case alone, off), then one batch: every case guarded, a sampled guarded row
    and an unguarded row."""
    off = {rid: _run(steerer, [_greedy(rid, prompt, cs, SteeringPolicy())])[1][rid]
           for rid, (prompt, cs) in CASES.items()}
    batch = [_greedy(rid, prompt, cs, GUARD) for rid, (prompt, cs) in CASES.items()]
    batch.append(Request(CASES["terms"][0], (EXCLUDE,), GUARD, id="sampled",
                         sampling=SamplingParams(max_new_tokens=TOKENS, temperature=1.0, seed=3)))
    batch.append(_greedy("plain", PLAIN, (), SteeringPolicy()))
    events, results = _run(steerer, batch)
    return off, events, results


def test_the_bar_on_vllm_no_term_no_capital_at_most_12_words(runs):
    off, events, results = runs
    # unguarded, the model breaks each constraint (so the test can fail)
    assert TERM_RE.search(off["terms"].text) and TERM_RE.search(off["both"].text)
    assert any(c.isupper() for c in off["lower"].text)
    assert count_words(off["words"].text) > 12
    for rid in ("terms", "both", "sampled"):
        assert not TERM_RE.search(results[rid].text), results[rid].text
    for rid in ("lower", "both"):
        assert results[rid].text.strip() and not any(c.isupper() for c in results[rid].text), results[rid].text
    assert count_words(results["words"].text) <= 12, results["words"].text
    assert results["words"].finish_reason == "eos"  # ended at the limit, not by the token budget
    for rid in ("lower", "both"):  # lowercase's loop veto: no 3-token n-gram written twice
        tokens = results[rid].tokens
        assert not any(t in repeating(tokens[:i], 3) for i, t in enumerate(tokens)), results[rid].text
    for rid in CASES:
        assert all(v.detected_at is None for v in results[rid].verdicts), rid  # no prefix broke a constraint
        assert "".join(e.text for e in events[rid]) == results[rid].text  # the stream carries no vetoed token


def test_vetoes_show_on_token_events_and_in_the_metric(runs):
    from steerer.metrics import Metrics

    _, events, _ = runs
    for rid, task in (("terms", "term_exclusion"), ("lower", "lowercase"), ("words", "word_count"),
                      ("both", "term_exclusion"), ("both", "lowercase")):
        assert any(e.redrawn.get(task) for e in events[rid]), (rid, task)
    assert not any(e.redrawn for e in events["plain"])
    metrics = Metrics()
    for stream in events.values():
        for event in stream:
            metrics.token_event(event)
    expected = sum(e.redrawn.get("term_exclusion", 0) for stream in events.values() for e in stream)
    assert metrics.registry.get_sample_value("steerer_guard_vetoes_total", {"task": "term_exclusion"}) == expected


def test_a_row_without_guard_in_the_batch_keeps_its_tokens(steerer, runs):
    _, _, results = runs
    (alone,) = steerer.run([_greedy("alone", PLAIN, (), SteeringPolicy())])
    assert TERM_RE.search(alone.text)  # the guarded rows beside it had terms to veto
    assert results["plain"].tokens == alone.tokens


def test_a_rule_the_bank_has_no_probe_for_runs_on_its_detector(steerer):
    """Detector-only on vLLM (the `no_competitor` YAML rule, no probe in the shipped bank): detections and the
    checker's verdict unguarded, the guard keeps it, and steering it is refused in one line."""
    from pathlib import Path

    from steerer.tasks import load_task_file, registry

    load_task_file(Path(__file__).resolve().parents[1] / "examples" / "tasks" / "no_competitor.yaml")
    try:
        rule = Constraint("no_competitor", {"competitors": ["ocean", "water"]})
        events, results = _run(steerer, [_greedy("open", PLAIN, (rule, AT_MOST_12), SteeringPolicy()),
                                         _greedy("kept", PLAIN, (rule,), GUARD)])
        (open_, words), (kept,) = results["open"].verdicts, results["kept"].verdicts
        assert TERM_RE.search(results["open"].text) and open_.satisfied is False and open_.detected_at is not None
        assert ("no_competitor", open_.detected_at) in [(d.task, d.token_index) for e in events["open"]
                                                        for d in e.detections]
        assert open_.p_satisfied_end is None and open_.probe_note == "no probe in the bank: detector only"
        assert words.p_satisfied_end is not None  # the probed constraint beside it still reads
        assert all("no_competitor" not in e.risks for e in events["open"])
        text = results["kept"].text
        assert text.strip() and not re.search(r"\b(ocean|water)\b", text, re.IGNORECASE), text
        assert kept.satisfied is True and any(e.redrawn.get("no_competitor") for e in events["kept"])
        with pytest.raises(ValueError, match="^no probe for no_competitor: only `off` or `guard`$"):
            steerer.run([_greedy("steered", PLAIN, (rule,), SteeringPolicy("conditional", 4.0))])
    finally:
        registry.unregister("no_competitor")
