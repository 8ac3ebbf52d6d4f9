"""Detected and predicted, apart: the tasks' incremental violation detectors (certain, from the text so far),
the live detections of the controller on real generations, their agreement with the offline onset rule, the
choice about steering after detection, and detection events over gRPC and on the command line."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from steerer.tasks import TASKS, get_task

DETECTING = ("char_count", "word_count", "json_format", "lowercase", "term_exclusion")
NEVER = ("keyword_inclusion", "sentiment", "topic", "register")


def feed_all(task_id: str, params: dict, pieces: list[str], final: bool = True) -> int | None:
    """Feed pieces to a fresh detector (the last one final): the position it reports, or None."""
    detector = get_task(task_id).detect(params)
    for i, piece in enumerate(pieces):
        found = detector.feed(piece, final and i == len(pieces) - 1)
        if found is not None:
            return found
    return None


def chunkings(text: str, rng: random.Random) -> list[list[str]]:
    """The text whole, char by char, and cut at random points."""
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 6))) if len(text) > 1 else []
    random_cut = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    return [[text], list(text) or [""], random_cut or [text]]


CASES = [
    ("term_exclusion", {"terms": ["ocean"]}, "The deep ocean is blue."),
    ("term_exclusion", {"terms": ["ocean"]}, "Many oceans are deep. An Ocean"),
    ("term_exclusion", {"terms": ["c++", "dragon"]}, "I write c++c++ and C++; no dragons"),
    ("term_exclusion", {"terms": ["a-a"]}, "xa-a-a and a-a."),
    ("word_count", {"relation": "at most", "limit": 3}, "one two-three four"),
    ("word_count", {"relation": "less than", "limit": 3}, "don't stop"),
    ("char_count", {"relation": "at most", "limit": 10}, "exactly 10 and more"),
    ("lowercase", {}, "all lower, then ǅ title"),
    ("lowercase", {}, "all lower here"),
    ("json_format", {}, '```json\n{"a": [1, -2.5e+3, NaN, -Infinity, "x\\u00e9"]}\n```'),
    ("json_format", {}, '{"a": 1} and then text'),
    ("json_format", {}, "```json```JSON```[true]"),
    ("json_format", {}, "  42"),
    ("json_format", {}, "Sure! Here is your JSON: {}"),
]


@pytest.mark.parametrize("task_id, params, text", CASES)
def test_a_detector_depends_on_the_text_not_on_how_it_was_cut(task_id, params, text):
    rng = random.Random(len(text))
    results = {feed_all(task_id, params, pieces) for pieces in chunkings(text, rng)}
    assert len(results) == 1, results
    (found,) = results
    # certain: once a prefix decides it, the checker fails whatever follows
    if found is not None:
        # a word is known whole one character after its end (or at the end of the text)
        decided = text[:found + 1] if task_id == "term_exclusion" and found < len(text) else text[:found]
        at_the_end = task_id == "term_exclusion" and found == len(text)  # decided because the text ended
        for tail in ("",) if at_the_end else ("", "s", " ", "}", "\n```", " and more words here."):
            assert not get_task(task_id).check(decided + tail, params), (decided, tail)


def test_the_detector_reports_where_the_deciding_match_ends():
    assert feed_all("term_exclusion", {"terms": ["ocean"]}, ["The deep oce", "an", " is"]) == len("The deep ocean")
    # "ocean" at the end of the text so far waits for the next character
    detector = get_task("term_exclusion").detect({"terms": ["ocean"]})
    assert detector.feed("An ocean") is None
    assert detector.feed("s are deep") is None
    assert detector.feed(", Ocean") is None
    assert detector.feed("", final=True) == len("An oceans are deep, Ocean")
    assert feed_all("lowercase", {}, ["fine", " and Then"]) == len("fine and T")
    assert feed_all("word_count", {"relation": "at most", "limit": 2}, ["one", " two", " three"]) == len("one two t")
    assert feed_all("json_format", {}, ["{", '"a"', " 1"]) == len('{"a" 1')


def test_tasks_that_a_prefix_cannot_decide_have_no_detector():
    for task_id in NEVER:
        task = TASKS[task_id]
        assert task.detect(task.sample_params(random.Random(0), 0.5)) is None, task_id
    for task_id in ("word_count", "char_count"):
        assert TASKS[task_id].detect({"relation": "at least", "limit": 5}) is None
        assert TASKS[task_id].detect({"relation": "at most", "limit": 5}) is not None
    for task_id in ("json_format", "lowercase"):
        assert TASKS[task_id].detect({}) is not None


def test_the_json_detector_never_rejects_a_prefix_the_checker_could_still_accept():
    """Random texts over JSON's alphabet: a prefix the detector rejects has no completion (from a set of
    closers) the checker accepts; every prefix of an accepted text passes."""
    rng = random.Random(7)
    alphabet = ['{', '}', '[', ']', '"', ':', ',', ' ', '\n', '1', '0', '-', '.', 'e', 'a', 'true', 'null', 'NaN',
                'Infinity', '\\', 'u', '```', '```json', '`']
    closers = ["", "}", "]", '"}', "0}", "]}", '": 1}', "\n```", '"', "0", "}}", "]]", '"]}', "e1", "1]"]
    task = get_task("json_format")
    accepted = rejected = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        found = feed_all("json_format", {}, list(text), final=False)
        if task.check(text, {}):
            accepted += 1
            assert found is None, text
        if found is not None:
            rejected += 1
            prefix = text[:found]
            assert not any(task.check(prefix + tail, {}) for tail in closers), prefix
    assert accepted > 30 and rejected > 1000


# -- the controller on real generations ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def bank(lm):
    from steerer.service.testing import placeholder_bank

    # lowercase and term_exclusion read risk ~0.98 (flagged from the warm-up on, until detection settles the
    # task); the other probes ~0.02 (never flagged)
    return placeholder_bank(lm.fingerprint, lm.hidden_size, "det", {"lowercase": -4.0, "term_exclusion": -4.0})


def run(lm, bank, requests, **kwargs):
    from steerer.core import Steerer
    from steerer.service.testing import split_stream

    with Steerer(lm, bank, **kwargs) as steerer:
        return split_stream(steerer.generate(requests))


def request(rid, prompt, constraints, tokens=40, policy=None):
    from steerer.constraints import Constraint
    from steerer.core import Request
    from steerer.generation import SamplingParams
    from steerer.policy import OFF

    return Request(prompt, tuple(Constraint(t, p) for t, p in constraints), policy or OFF,
                   sampling=SamplingParams(max_new_tokens=tokens), id=rid)


def test_a_forbidden_word_the_model_writes_is_detected_once_at_the_token_that_completed_it(lm):
    from dataclasses import replace

    from steerer.service.testing import placeholder_bank

    # detection needs no probe: the term_exclusion probe here is unreliable, so muted
    muted = placeholder_bank(lm.fingerprint, lm.hidden_size, "muted")
    muted.probes = [replace(p, reliable=False) if p.task == "term_exclusion" else p for p in muted.probes]
    results, events = run(lm, muted, [request("paris", "What is the capital of France? Answer in one sentence.",
                                              [("term_exclusion", {"terms": ["Paris"]})])])
    result, trace = results["paris"], events["paris"]
    assert "Paris" in result.text and result.verdicts[0].satisfied is False
    detections = [(e.index, d) for e in trace for d in e.detections]
    assert len(detections) == 1
    carried_by, detection = detections[0]
    assert detection.task == "term_exclusion"
    text_through = "".join(e.text for e in trace[: detection.token_index + 1])
    assert text_through.endswith("Paris") or text_through.rstrip(".").endswith("Paris")
    assert "Paris" not in "".join(e.text for e in trace[: detection.token_index])
    assert carried_by >= detection.token_index  # certain once the next character shows the word is whole
    assert result.verdicts[0].detected_at == detection.token_index
    assert result.verdicts[0].probe_muted and result.verdicts[0].flagged is False  # no prediction, still detected


AGREEMENT_REQUESTS = [
    ("a", "What is the capital of France?", [("term_exclusion", {"terms": ["Paris", "capital"]})]),
    ("b", "Describe the ocean in three sentences.", [("word_count", {"relation": "at most", "limit": 12}),
                                                      ("lowercase", {})]),
    ("c", "Name three colors.", [("char_count", {"relation": "less than", "limit": 30}),
                                 ("json_format", {})]),
    ("d", "Reply only with valid JSON describing a cat with a name and an age.", [("json_format", {})]),
    ("e", "write one short sentence about the moon, all in lowercase.", [("lowercase", {}),
                                                                        ("term_exclusion", {"terms": ["moon"]})]),
    ("f", "List three fruits.", [("word_count", {"relation": "at least", "limit": 100}),
                                 ("keyword_inclusion", {"terms": ["banana"]}),
                                 ("char_count", {"relation": "at most", "limit": 400})]),
    ("g", "Say hello.", [("term_exclusion", {"terms": ["hello"]}), ("word_count", {"relation": "at most",
                                                                                    "limit": 50})]),
    ("h", "Give me a JSON array of two numbers.", [("json_format", {}), ("lowercase", {})]),
]


def test_live_detection_agrees_exactly_with_the_offline_onset_rule(lm, bank):
    from probes.violations import token_prefixes

    requests = [request(rid, prompt, cs, tokens=48) for rid, prompt, cs in AGREEMENT_REQUESTS]
    results, events = run(lm, bank, requests)

    def decode(ids):
        return lm.tokenizer.decode(ids, skip_special_tokens=True)

    compared = detected = 0
    for rid, _, _ in AGREEMENT_REQUESTS:
        result, trace = results[rid], events[rid]
        assert "".join(e.text for e in trace) == result.text
        prefixes = token_prefixes(decode, result.tokens)
        assert prefixes[-1] == result.text
        for verdict in result.verdicts:
            task = get_task(verdict.task)
            offline = task.onset_rule(verdict.params, prefixes)  # None: no prefix decides it
            assert verdict.detected_at == offline, (rid, verdict.task, result.text)
            live = [d for e in trace for d in e.detections if d.task == verdict.task]
            assert [d.token_index for d in live] == ([] if offline is None else [offline])
            if offline is not None:
                detected += 1
                assert verdict.satisfied is False  # certain: the checker agrees
                assert task.onset(verdict.params, prefixes, result.finish_reason == "eos") == offline
            if verdict.task in NEVER or verdict.params.get("relation") == "at least":
                assert verdict.detected_at is None
            compared += 1
    assert compared == sum(len(cs) for _, _, cs in AGREEMENT_REQUESTS)
    assert detected >= 5  # real violations were detected, not just agreed on None


def test_conditional_steering_goes_on_after_detection_unless_told_to_stop(lm, bank):
    from steerer.policy import SteeringPolicy

    policy = SteeringPolicy("conditional", 4.0)
    req = request("s", "Name three colors.", [("lowercase", {})], tokens=10, policy=policy)
    for stop in (False, True):
        results, events = run(lm, bank, [req], stop_steering_on_detection=stop)
        trace = events["s"]
        (at,) = [e.index for e in trace for d in e.detections]
        # the capital came at the warm-up's end: detection settled the task before its flag could rise, and
        # the steering gate stays up from there (the violation is certain)
        assert results["s"].verdicts[0].detected_at == at and not results["s"].verdicts[0].flagged
        after = [e.steering["lowercase"] for e in trace if e.index > at]
        assert after  # the response went on after the capital
        if stop:
            assert all(alpha == 0 for alpha in after)
            assert results["s"].steered_tokens["lowercase"] == sum(e.steering["lowercase"] != 0 for e in trace)
        else:  # the gate, up from the reading of the detected token, steers every pass after it
            assert set(after[1:]) == {4.0}  # (the token after it was chosen by that very reading's pass)


# -- the service and the command line --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(lm, bank, tmp_path_factory):
    from steerer.service.testing import ServerProcess

    folder = tmp_path_factory.mktemp("bank")
    bank.save(folder)
    with ServerProcess("--bank", str(folder), "--max-batch", "4") as proc:
        yield proc


def test_detections_stream_over_grpc_and_are_counted_apart_from_flags(server):
    from steerer.service.client import SteererClient, detection_note, event_lines

    with SteererClient(server.target) as client:
        messages = list(client.stream("What is the capital of France? Answer in one sentence.",
                                      constraints=[("term_exclusion", {"terms": ["Paris"]}), ("lowercase", {})],
                                      max_new_tokens=32))
    tokens = [m.token for m in messages if m.HasField("token")]
    final = messages[-1].final
    detections = {d.task: (t.index, d.token_index) for t in tokens for d in t.detections}
    assert set(detections) == {"term_exclusion", "lowercase"}  # "The capital ... is Paris."
    verdicts = {v.task: v for v in final.verdicts}
    for task, (carried_by, index) in detections.items():
        assert carried_by >= index and verdicts[task].HasField("detected_at")
        assert verdicts[task].detected_at == index and not verdicts[task].satisfied
    # term_exclusion was flagged (a prediction) before "Paris" was written; lowercase was detected at once
    # ("The"), which settled it before its flag could rise
    assert verdicts["term_exclusion"].flagged and not verdicts["lowercase"].flagged
    lines = [line for t in tokens for line in event_lines(t)]
    assert any(line.startswith("[DETECTED violation: term_exclusion") for line in lines)
    assert any(line.startswith("[flag raised: term_exclusion") for line in lines)
    assert detection_note(verdicts["term_exclusion"]) == f", detected at token {detections['term_exclusion'][1]}"

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("steerer_violations_detected_total", task="term_exclusion") == 1
    assert value("steerer_violations_detected_total", task="lowercase") == 1
    assert value("steerer_flags_raised_total", task="lowercase") == 0
    assert value("steerer_flag_lead_tokens_count", task="term_exclusion") == 1
    assert value("steerer_flag_lead_tokens_count", task="lowercase") == 0  # detected, never flagged
    lead = verdicts["term_exclusion"].detected_at - verdicts["term_exclusion"].first_flag_token
    assert lead > 0  # a forecast: the flag came before the word
    bounds = [float(le) for (name, labels), _ in samples.items() if name == "steerer_flag_lead_tokens_bucket"
              and dict(labels)["task"] == "term_exclusion" for le in [dict(labels)["le"]]]
    first_holding = min(b for b in bounds if value("steerer_flag_lead_tokens_bucket", task="term_exclusion",
                                                   le=str(b) if b != float("inf") else "+Inf") == 1)
    assert first_holding >= lead and not any(lead <= b < first_holding for b in bounds)


def test_steerer_generate_prints_detections_apart_from_flags(bank, tmp_path):
    folder = tmp_path / "bank"
    bank.save(folder)
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", "generate", "--prompt",
                           "What is the capital of France? Answer in one sentence.", "--bank", str(folder),
                           "--constraint", json.dumps({"terms": ["Paris"]}).join(["term_exclusion:", ""]),
                           "--constraint", "lowercase", "--max-new-tokens", "24"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "[DETECTED violation: term_exclusion broken at token" in proc.stderr
    assert "[flag raised: term_exclusion" in proc.stderr
    assert "checker: violated, detected at token" in proc.stderr
