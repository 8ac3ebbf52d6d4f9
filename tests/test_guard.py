"""The guard policy (steerer/guard.py): vetoed tokens never reach the text or the stream, greedy rows take the
next best, at-most limits end at a word boundary, the fronts and the metric carry it. Real default model."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from steerer import guard
from steerer.constraints import Constraint
from steerer.policy import POLICY_CHOICES, SteeringPolicy
from steerer.request import Request, Result, SamplingParams, TokenEvent
from steerer.service.testing import split_stream
from steerer.tasks import get_task
from steerer.tasks.common import count_words

TERMS = ["the", "ocean", "water"]
EXCLUDE = Constraint("term_exclusion", {"terms": TERMS})
LOWER = Constraint("lowercase", {})
AT_MOST_12 = Constraint("word_count", {"relation": "at most", "limit": 12})
GUARD = SteeringPolicy.parse("guard")
TERM_RE = re.compile(r"\b(" + "|".join(TERMS) + r")\b", re.IGNORECASE)


def test_policy_vocabulary_reads_guard_alone_and_with_steering():
    assert SteeringPolicy.parse("guard") == SteeringPolicy("off", 0.0, guard=True)
    assert SteeringPolicy.parse(" Guard + conditional:8 ") == SteeringPolicy("conditional", 8.0, guard=True)
    assert SteeringPolicy.parse("constant:3+guard").spec() == "guard+constant:3"
    assert SteeringPolicy.named("guard+proportional", 5).spec() == "guard+proportional:5"
    assert {"guard", "guard+conditional"} <= set(POLICY_CHOICES)
    for bad in ("guard+guard", "guard:3", "constant:1+off", "guardian"):
        with pytest.raises(ValueError, match="policy"):
            SteeringPolicy.parse(bad)


def _detectors(constraint: Constraint, text: str = "") -> dict:
    detector = get_task(constraint.task).detect(constraint.params)
    assert detector is not None and detector.feed(text) is None
    return {constraint.task: detector}


def test_vetoes_judge_a_word_as_written_and_leave_the_live_detector_alone():
    live = _detectors(EXCLUDE, "A calm")
    assert guard.vetoes(live, " The", 6, False) == ["term_exclusion"]  # case variant, whole word once it ends
    assert guard.vetoes(live, " oce", 6, False) == []  # may still become "ocelot"
    assert guard.vetoes(live, " theory", 6, False) == []
    assert live["term_exclusion"].feed(" sea") is None  # the copies were fed, not the live one
    lower = _detectors(LOWER, "a calm")
    assert guard.vetoes(lower, " Sea", 6, False) == ["lowercase"]
    words = _detectors(AT_MOST_12, " ".join(["word"] * 12))
    assert guard.vetoes(words, " more", 59, False) == ["word_count"]
    assert guard.vetoes(words, "s.", 59, False) == []  # the twelfth word goes on: not a new word
    assert guard.ends_at_limit(words, ["word_count"]) and not guard.ends_at_limit(lower, ["lowercase"])
    json_live = _detectors(Constraint("json_format", {}), '{"a": ')
    assert guard.vetoes(json_live, "", 6, True) == []  # its detector judges dead prefixes, not the end
    assert guard.vetoes(json_live, "x", 6, False) == ["json_format"]  # text no JSON can follow
    assert guard.vetoes(json_live, "1}", 6, False) == []


def test_lowercase_repairs_a_vetoed_capital_and_the_repair_must_pass_every_guard(lm):
    lower = _detectors(LOWER, "a calm")
    assert guard.repairs(lower, ["lowercase"], " The") == [" the"]
    (the,) = guard.repair_tokens(lower, ["lowercase"], " The", lm.tokenizer)
    assert lm.tokenizer.decode([the]) == " the" and guard.vetoes(lower, " the", 6, False) == []
    assert guard.single_token(lm.tokenizer, " the") == the  # cached per tokenizer, same answer
    assert guard.repair_tokens(lower, ["lowercase"], " the", lm.tokenizer) == []  # nothing to repair
    assert guard.single_token(lm.tokenizer, " hello world") is None  # two tokens: no repair, draw again
    terms = _detectors(EXCLUDE, "A calm")
    assert guard.repairs(terms, ["term_exclusion"], " The") == []  # term_exclusion proposes none
    both = {**lower, **terms}
    assert guard.repair_tokens(both, ["lowercase", "term_exclusion"], " The", lm.tokenizer) == [the]
    assert guard.vetoes(both, " the", 6, False) == ["term_exclusion"]  # so the driver draws again instead


def test_end_and_loop_vetoes_are_a_detectors_to_ask_for():
    """lowercase asks for both: EOS vetoed while IFEval's whole check would fail (no cased letter, not English),
    and a token that repeats a 3-token n-gram vetoed; a detector that asks for neither gets neither."""
    lower = _detectors(LOWER)
    assert guard.end_vetoes(lower, "1. 2. 3.") == ["lowercase"]  # no cased letter: str.islower() is False
    assert guard.end_vetoes(lower, "a calm sea under a clear sky, with the wind in the sails.") == []
    assert guard.end_vetoes(_detectors(EXCLUDE), "1. 2. 3.") == []
    assert guard.loop_rules(lower) == {"lowercase": (3, 2)} and guard.loop_rules(_detectors(EXCLUDE)) == {}
    assert guard.loop_rules(_detectors(Constraint("lowercase", {"loop_ngram": 0}))) == {}  # 0: no loop veto
    third = Constraint("lowercase", {"loop_ngram": 4, "loop_occurrence": 3})
    assert guard.loop_rules(_detectors(third)) == {"lowercase": (4, 3)}
    assert guard.repeating([5, 6, 7, 8, 9, 5, 6, 7], 4, 3) == frozenset()  # a repeat, not yet a third occurrence
    assert guard.repeating([5, 6, 7, 1, 5, 6, 7, 2, 5, 6], 3, 3) == {7}
    cache: guard.LoopCache = {}
    assert guard.loop_vetoes(lower, [5, 6, 7, 5, 6], 7, cache) == ["lowercase"] and cache == {(3, 2): (5, {7})}
    assert guard.repeating([5, 6, 7, 8, 9, 5, 6, 7], 4) == {8}  # 5 6 7 8 again
    assert guard.repeating([5, 6, 7, 8, 9, 5, 6, 7], 3) == {8}
    assert guard.repeating([1, 2, 1, 3, 1], 2) == {2, 3}
    assert guard.repeating([5, 6, 7], 4) == frozenset() and guard.repeating([5, 6, 7, 8], 4) == frozenset()


def _repairs_taken(lm, prompt: str, tokens: list[int], events: list[TokenEvent]) -> int:
    """At each token the guard changed under lowercase: where the unguarded model's first choice has a one-token
    lower-cased form, that form was taken (repair before redraw); returns how many such repairs were seen."""
    from steerer.model import chat_prompt

    ids = chat_prompt(lm.tokenizer, prompt)
    taken = 0
    for event in events:
        if not event.redrawn.get("lowercase") or event.index >= len(tokens):
            continue
        with torch.no_grad():
            best = int(lm.model(torch.tensor([ids + tokens[:event.index]])).logits[0, -1].argmax())
        text = lm.tokenizer.decode([best])
        fixed = guard.single_token(lm.tokenizer, text.lower())
        if fixed is not None and text.lower() != text:
            assert event.token_id == fixed, (text, lm.tokenizer.decode([event.token_id]))
            taken += 1
    return taken


@pytest.fixture(scope="module")
def steerer(lm):
    from steerer.bank import DEFAULT_BANK, ProbeBank
    from steerer.core import Steerer

    with Steerer(lm, ProbeBank.load(DEFAULT_BANK)) as s:
        yield s


def _run(steerer, requests: list[Request]) -> tuple[dict[str, list[TokenEvent]], dict[str, Result]]:
    results, events = split_stream(steerer.generate(requests))
    return {r.id: events.get(r.id, []) for r in requests}, results


def _request(rid: str, prompt: str, *constraints: Constraint, policy: SteeringPolicy = GUARD,
             tokens: int = 32) -> Request:
    return Request(prompt, constraints, policy, sampling=SamplingParams(max_new_tokens=tokens), id=rid)


@pytest.fixture(scope="module")
def guarded_runs(steerer):
    """One batch: the Bar's three constraints, two of them combined, and a sampled row (each row's vetoes show
    the guard had work to do: unguarded, the model would have written the vetoed token)."""
    cases = {
        "terms": ("Write two sentences about the ocean and its water.", (EXCLUDE,)),
        "lower": ("Describe the ocean in two sentences.", (LOWER,)),
        "words": ("Explain in detail how rain forms.", (AT_MOST_12,)),
        "both": ("Write a sentence about the ocean.", (EXCLUDE, LOWER)),
    }
    requests = [_request(name, prompt, *cs) for name, (prompt, cs) in cases.items()]
    requests.append(Request(cases["terms"][0], (EXCLUDE,), GUARD, id="sampled",
                            sampling=SamplingParams(max_new_tokens=32, temperature=1.0, seed=3)))
    return _run(steerer, requests)


def test_the_bar_no_term_no_capital_at_most_12_words(guarded_runs):
    events, results = guarded_runs
    for rid in ("terms", "both", "sampled"):
        assert not TERM_RE.search(results[rid].text), results[rid].text
    for rid in ("lower", "both"):
        assert results[rid].text.strip() and not any(c.isupper() for c in results[rid].text), results[rid].text
    assert count_words(results["words"].text) <= 12, results["words"].text
    assert results["words"].finish_reason == "eos"  # ended at the limit, not cut off by the token budget
    # the guard had work to do: each row vetoed what its constraint forbids
    for rid, task in (("terms", "term_exclusion"), ("lower", "lowercase"), ("words", "word_count"),
                      ("both", "term_exclusion"), ("both", "lowercase")):
        assert any(e.redrawn.get(task) for e in events[rid]), (rid, task)
    for rid in ("lower", "both"):  # lowercase's loop veto: no 3-token n-gram written twice
        tokens = results[rid].tokens
        assert not any(t in guard.repeating(tokens[:i], 3) for i, t in enumerate(tokens)), results[rid].text
    for rid in ("terms", "lower", "words", "both"):
        assert all(v.satisfied is not False or v.task == "lowercase" for v in results[rid].verdicts)
        assert all(v.detected_at is None for v in results[rid].verdicts), rid


def test_streamed_events_never_carry_a_vetoed_token(guarded_runs):
    events, results = guarded_runs
    for rid in ("terms", "lower", "words", "both", "sampled"):
        stream = "".join(e.text for e in events[rid])
        assert stream == results[rid].text
        assert not any(e.detections for e in events[rid])  # no prefix of the stream breaks a constraint
    redrawn = [e for rid in ("terms", "lower", "both") for e in events[rid] if e.redrawn]
    assert redrawn, "the guard never vetoed a token: the test proves nothing"


def test_a_greedy_row_takes_the_next_best_token(steerer, lm, guarded_runs):
    """At each re-drawn token, the unguarded model's ranking: every candidate above the chosen one is vetoed."""
    from steerer.detokenize import IncrementalDetokenizer
    from steerer.model import chat_prompt

    events, results = guarded_runs
    checked = 0
    for rid, prompt in (("terms", "Write two sentences about the ocean and its water."),):
        result = results[rid]
        prompt_ids = chat_prompt(lm.tokenizer, prompt)
        for event in events[rid]:
            if not event.redrawn or event.index >= len(result.tokens):
                continue
            prefix = result.tokens[:event.index]
            with torch.no_grad():
                logits = lm.model(torch.tensor([prompt_ids + prefix])).logits[0, -1]
            order = logits.argsort(descending=True).tolist()
            rank = order.index(event.token_id)
            assert 1 <= rank <= guard.MAX_VETOES
            detok = IncrementalDetokenizer(lm.tokenizer)
            text = "".join(detok.add(t) for t in prefix)
            for better in order[:rank]:
                live = _detectors(EXCLUDE, text)
                assert guard.vetoes(live, guard.peek(detok, better), len(text), False), lm.tokenizer.decode([better])
            checked += 1
    assert checked


def test_a_vetoed_capital_is_repaired_before_the_next_best(lm, guarded_runs):
    events, results = guarded_runs
    assert _repairs_taken(lm, "Describe the ocean in two sentences.", results["lower"].tokens, events["lower"]) >= 1


def test_guard_with_steering_runs_and_the_metric_counts_vetoes(steerer, guarded_runs):
    from steerer.metrics import Metrics

    events, _ = guarded_runs
    metrics = Metrics()
    metrics.prepare(["term_exclusion", "lowercase"])
    expected = 0
    for event in events["terms"]:
        metrics.token_event(event)
        expected += event.redrawn.get("term_exclusion", 0)
    assert expected > 0
    assert metrics.registry.get_sample_value("steerer_guard_vetoes_total", {"task": "term_exclusion"}) == expected
    request = _request("steered", "Write a sentence about the ocean.", LOWER,
                       policy=SteeringPolicy.parse("guard+constant:4"), tokens=16)
    _, results = _run(steerer, [request])
    assert not any(c.isupper() for c in results["steered"].text)


def test_an_engine_that_cannot_guard_refuses_the_policy(steerer):
    driver = steerer.driver
    driver.can_guard = False
    try:
        with pytest.raises(ValueError, match="cannot guard"):
            driver.validate(_request("x", "Hi.", LOWER))
    finally:
        driver.can_guard = True


def test_grpc_messages_carry_guard_and_redrawn():
    from steerer.service.client import policy_message
    from steerer.service.convert import policy_from_pb, token_to_pb

    message = policy_message("guard+conditional:8")
    assert message.guard and policy_from_pb(message, "policy") == SteeringPolicy("conditional", 8.0, guard=True)
    assert policy_from_pb(policy_message("guard", check=True), "policy").guard
    event = TokenEvent("r", 0, 5, "a", {}, {}, redrawn={"lowercase": 2})
    assert dict(token_to_pb(event).redrawn) == {"lowercase": 2}


def test_cli_generate_policy_guard_keeps_the_terms_out():
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", "generate", "--prompt",
                           "Write two sentences about the ocean and its water.", "--max-new-tokens", "24",
                           "--constraint", 'term_exclusion:{"terms": ["the", "ocean", "water"]}', "--policy", "guard"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and not TERM_RE.search(proc.stdout), proc.stdout
    assert "term_exclusion" in proc.stderr and "checker: satisfied" in proc.stderr


def test_the_drop_in_guards_greedy_generate(lm, steerer):
    from transformers import LogitsProcessorList

    from steerer.hf_processor import attach_steerer
    from steerer.model import chat_prompt

    ids = torch.tensor([chat_prompt(lm.tokenizer, "Describe the ocean in two sentences.")])
    with attach_steerer(lm.model, lm.tokenizer, steerer.bank, constraints=(LOWER,), policy=GUARD) as proc:
        out = lm.model.generate(ids, max_new_tokens=16, do_sample=False, logits_processor=LogitsProcessorList([proc]))
        (result,) = proc.finish(out)
        events = proc.events()
    assert result.text.strip() and not any(c.isupper() for c in result.text), result.text
    assert any(e.redrawn.get("lowercase") for e in events)
    assert _repairs_taken(lm, "Describe the ocean in two sentences.", result.tokens, events) >= 1  # as the loop


def test_lowercase_loop_rule_is_a_request_param_with_one_line_errors():
    lower = get_task("lowercase")
    assert lower.detect({"loop_ngram": 4, "loop_occurrence": 3}).loop_ngram == 4
    assert lower.check("a calm sea under a clear sky.", {"loop_ngram": 0})  # the checker accepts the params too
    Constraint.parse('lowercase:{"loop_ngram": 0}').validate()
    for params, message in [({"loop_ngram": -1}, "loop_ngram must be an integer from 0 to 16, got -1"),
                            ({"loop_ngram": True}, "loop_ngram must be an integer"),
                            ({"loop_ngram": "3"}, "loop_ngram must be an integer"),
                            ({"loop_occurrence": 1}, "loop_occurrence must be an integer from 2 to 8, got 1"),
                            ({"loop": 3}, r"unexpected param\(s\) \['loop'\]")]:
        with pytest.raises(ValueError, match=f"^lowercase: {message}") as info:
            Constraint("lowercase", params).validate()
        assert "\n" not in str(info.value)


def test_the_loop_rule_param_changes_what_the_guard_vetoes(steerer):
    """One batch, one prompt that loops: `loop_ngram` 0 lets the model repeat a 3-token n-gram, the default (3)
    vetoes every repeat, and `loop_occurrence` 3 lets a phrase come back once but never a third time."""
    prompt = "Repeat the phrase 'keep it simple' five times."
    rules = {"off": {"loop_ngram": 0}, "default": {}, "third": {"loop_ngram": 3, "loop_occurrence": 3}}
    events, results = _run(steerer, [_request(rid, prompt, Constraint("lowercase", params), tokens=24)
                                     for rid, params in rules.items()])
    tokens = {rid: results[rid].tokens for rid in rules}

    def made(rid: str, occurrence: int) -> int:  # tokens that made an n-gram's `occurrence`-th occurrence
        return sum(t in guard.repeating(tokens[rid][:i], 3, occurrence) for i, t in enumerate(tokens[rid]))

    assert made("off", 2) >= 3, results["off"].text  # "keep it simple" written again: nothing vetoed it
    assert made("default", 2) == 0, results["default"].text
    assert made("third", 3) == 0 and made("third", 2) > 0, results["third"].text
    assert sum(sum(e.redrawn.values()) for e in events["default"]) > sum(sum(e.redrawn.values()) for e in events["off"])
    for rid in rules:
        assert not any(c.isupper() for c in results[rid].text), results[rid].text

