"""Checkers (edge cases, param validation, hand-labelled semantic set), tasks and prompt templates."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import pytest

from probes import checkers
from probes.tasks import TASKS, UnknownTaskError, get_task
from probes.templates import (
    AIDS,
    BASE_REQUESTS,
    build_prompt,
    demo_response,
    prompt_messages,
    split_base_requests,
)

LABELS = Path(__file__).resolve().parent / "data" / "semantic_labels.jsonl"
IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "ifeval"

# --------------------------------------------------------------------------------------------------
# structural
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("", 0),
        ("one", 1),
        ("Hello, world!", 2),
        ("don't", 2),  # IFEval's \w+ runs split at the apostrophe
        ("e-mail me at a.b@c.org", 8),
        ("café naïve façade", 3),
        ("你好 世界", 2),
        ("  spaced\n\nout\t words ", 3),
        ("**bold** _under_score_", 2),  # "_" is a word character
        ("3.14 is pi", 4),
    ],
)
def test_count_words_matches_ifeval_rule(text: str, n: int) -> None:
    assert checkers.count_words(text) == n


@pytest.mark.parametrize(
    ("relation", "n", "expected"),
    [
        ("less than", 4, True), ("less than", 5, False), ("less than", 6, False),
        ("at most", 4, True), ("at most", 5, True), ("at most", 6, False),
        ("at least", 4, False), ("at least", 5, True), ("at least", 6, True),
    ],
)
def test_exact_limits_each_relation(relation: str, n: int, expected: bool) -> None:
    words = " ".join(["word"] * n)
    assert checkers.word_count(words, {"relation": relation, "limit": 5}) is expected
    chars = "x" * n
    assert checkers.char_count(chars, {"relation": relation, "limit": 5}) is expected


def test_length_edge_cases() -> None:
    assert checkers.char_count("", {"relation": "less than", "limit": 1})
    assert not checkers.char_count("", {"relation": "at least", "limit": 1})
    assert checkers.char_count("é" * 3, {"relation": "at most", "limit": 3})  # code points, not bytes
    assert checkers.word_count("", {"relation": "at most", "limit": 0})
    assert not checkers.word_count("", {"relation": "at least", "limit": 1})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', True),
        ('```json\n{"a": 1}\n```', True),
        ('```JSON\n[1, 2]\n```', True),
        ('```Json {"a": [1, {"b": null}]}```', True),
        ('```\n{"a": 1}\n```', True),
        ('  \n{"a": 1}\n  ', True),
        ("42", True),  # a bare scalar is valid JSON, as in IFEval
        ('"just a string"', True),
        ('Here is the JSON:\n```json\n{"a": 1}\n```', False),
        ('```python\n{"a": 1}\n```', False),
        ('{"a": 1,}', False),
        ("{'a': 1}", False),
        ('```json\n{"a": 1}\n```\nHope this helps!', False),
        ("", False),
        ("```json\n```", False),
        ('{"emoji": "😀", "ünï": "çødé"}', True),
    ],
)
def test_json_format(text: str, expected: bool) -> None:
    assert checkers.json_format(text, {}) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("this is all lowercase, with punctuation! and numbers 123.", True),
        ("This starts with a capital.", False),
        ("everything is lowercase except I", False),
        ("the nasa mission was a success", True),
        ("the NASA mission", False),
        ("", False),  # no letters at all: str.islower() is False, as in IFEval
        ("123 !!!", False),
        ("my naïve friend went to the café with me", True),
        ("ÜBER is the word", False),
        ("etchings", False),  # langdetect (seeded) says "de": not English
        ("über straße ist das wort hier", False),  # another language
        ("привет как дела", False),  # another script
        ("it's a fine day 😀", True),
        ("electric car\nelectric car battery\nelectric car charger", True),  # a noun list langdetect calls "en"
        ("ⲁⲃ", True),  # langdetect has no features for it: IFEval counts that as followed
    ],
)
def test_lowercase(text: str, expected: bool) -> None:
    assert checkers.lowercase(text, {}) is expected


def test_lowercase_language_verdicts_are_seeded() -> None:
    """Unseeded langdetect flips on "hello world" between calls ("en" or "nl"; IFEval's is unseeded); ours is
    a fixed function of the text."""
    assert {checkers.detect_language("hello world") for _ in range(50)} == {"en"}


# --------------------------------------------------------------------------------------------------
# lexical
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "terms", "expected"),
    [
        ("The oceans are vast.", ["ocean"], True),  # plural is another word (IFEval: \b...\b)
        ("The ocean is vast.", ["ocean"], False),
        ("The Ocean is vast.", ["ocean"], False),
        ("OCEAN!", ["ocean"], False),
        ("oceanic trenches", ["ocean"], True),
        ("a sub-ocean vent", ["ocean"], False),  # the hyphen is a word boundary
        ("the ocean's edge", ["ocean"], False),
        ("Le café est bon", ["café"], False),
        ("Les cafés sont bons", ["café"], True),
        ("Then there was nothing.", ["the"], True),
        ("Nothing here", ["ocean", "sea"], True),
        ("Sea breeze", ["ocean", "sea"], False),
        ("I write C++ daily", ["c++"], False),  # literal term, not a regex
        ("I write C daily", ["c++"], True),
        ("", ["ocean"], True),
    ],
)
def test_term_exclusion(text: str, terms: list[str], expected: bool) -> None:
    assert checkers.term_exclusion(text, {"terms": terms}) is expected


@pytest.mark.parametrize(
    ("text", "terms", "expected"),
    [
        ("Lanterns glowed in the dark.", ["lantern"], True),  # substring: plurals count (IFEval)
        ("A lanternfish swims by.", ["lantern"], True),
        ("A LANTERN.", ["lantern"], True),
        ("A candle.", ["lantern"], False),
        ("A lantern by the river.", ["lantern", "river"], True),
        ("A lantern by the sea.", ["lantern", "river"], False),
        ("There it is.", ["the"], True),
        ("Un café, s'il vous plaît.", ["CAFÉ"], True),
        ("I write C++ daily", ["c++"], True),
        ("I write C daily", ["c++"], False),
        ("", ["lantern"], False),
    ],
)
def test_keyword_inclusion(text: str, terms: list[str], expected: bool) -> None:
    assert checkers.keyword_inclusion(text, {"terms": terms}) is expected


# --------------------------------------------------------------------------------------------------
# parameter validation
# --------------------------------------------------------------------------------------------------

BAD_PARAMS = [
    ("word_count", {}, "missing"),
    ("word_count", {"relation": "at most"}, "missing"),
    ("word_count", {"relation": "more than", "limit": 3}, "unknown relation"),
    ("word_count", {"relation": "at most", "limit": -1}, ">= 0"),
    ("word_count", {"relation": "at most", "limit": "5"}, "integer"),
    ("char_count", {"relation": "at most", "limit": 5.0}, "integer"),
    ("char_count", {"relation": "at most", "limit": True}, "integer"),
    ("char_count", {"relation": "at most", "limit": 5, "unit": "bytes"}, "unexpected"),
    ("char_count", [("relation", "at most")], "object"),
    ("json_format", {"strict": True}, "unexpected"),
    ("lowercase", None, "object"),
    ("term_exclusion", {"terms": []}, "empty"),
    ("term_exclusion", {"terms": "ocean"}, "list"),
    ("term_exclusion", {"terms": [1]}, "string"),
    ("keyword_inclusion", {"terms": ["  "]}, "blank"),
    ("term_exclusion", {"terms": [f"w{i}" for i in range(65)]}, "at most 64 terms"),
    ("keyword_inclusion", {"terms": ["x" * 65]}, "at most 64 characters"),
    ("keyword_inclusion", {}, "missing"),
    ("sentiment", {"polarity": "neutral"}, "unknown polarity"),
    ("sentiment", {"polarity": None}, "unknown polarity"),
    ("topic", {"topic": ""}, "non-empty"),
    ("topic", {"topic": 5}, "non-empty"),
    ("topic", {"topic": "x" * 500}, "at most"),
    ("register", {"register": "casual"}, "unknown register"),
    ("register", {"tone": "formal"}, "missing"),
]


@pytest.mark.parametrize(("task_id", "params", "message"), BAD_PARAMS)
def test_bad_params_raise_one_line_value_error(task_id: str, params: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        checkers.CHECKERS[task_id]("some response", params)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(task_id)
    with pytest.raises(ValueError, match=message):
        get_task(task_id).validate(params)


def test_non_string_response_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="response must be a string"):
        checkers.word_count(None, {"relation": "at most", "limit": 3})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# semantic checkers against the hand-labelled set
# --------------------------------------------------------------------------------------------------


def _labelled() -> dict[str, list[dict]]:
    by_task: dict[str, list[dict]] = defaultdict(list)
    with open(LABELS, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                by_task[row["task"]].append(row)
    return by_task


@pytest.mark.parametrize("task_id", ["sentiment", "topic", "register"])
def test_semantic_checker_agrees_with_hand_labels(task_id: str) -> None:
    rows = _labelled()[task_id]
    assert len(rows) >= 30
    assert {r["label"] for r in rows} == {True, False}
    wrong = [r for r in rows if checkers.CHECKERS[task_id](r["response"], r["params"]) != r["label"]]
    agreement = 1 - len(wrong) / len(rows)
    print(f"\n{task_id}: agreement {agreement:.3f} ({len(rows) - len(wrong)}/{len(rows)})")
    for r in wrong:
        print(f"  disagree: label={r['label']} params={r['params']} {r['response'][:70]!r}")
    assert agreement >= 0.85


def test_sentiment_neutral_satisfies_neither() -> None:
    text = "The train leaves at nine. It stops at four stations and arrives at noon."
    assert not checkers.sentiment(text, {"polarity": "positive"})
    assert not checkers.sentiment(text, {"polarity": "negative"})
    assert not checkers.sentiment("", {"polarity": "positive"})


def test_register_plain_text_satisfies_neither() -> None:
    text = "You can make cold brew by mixing ground coffee with cold water and leaving it overnight."
    assert not checkers.register(text, {"register": "formal"})
    assert not checkers.register(text, {"register": "informal"})


def test_semantic_checkers_write_nothing_to_stderr(capfd, caplog, monkeypatch) -> None:
    """At INFO (as under `steerer serve`) sentence-transformers drew a progress bar per request."""
    import logging

    caplog.set_level(logging.INFO)
    from steerer.tasks import semantic, topic

    monkeypatch.setattr(semantic, "_embedder", None)  # the first use loads MiniLM: no bar there either
    monkeypatch.setattr(topic, "_topic_cache", {})
    text = "The telescope shows the rings of Saturn and the moons of Jupiter on a clear night."
    capfd.readouterr()
    assert checkers.topic(text, {"topic": "astronomy"})
    first = capfd.readouterr().err
    assert "it/s" not in first and "\r" not in first, first
    for _ in range(2):
        checkers.topic(text, {"topic": "astronomy"})
        checkers.sentiment("What a wonderful, lovely day!", {"polarity": "positive"})
    assert capfd.readouterr().err == ""


def test_topic_accepts_any_named_topic() -> None:
    text = ("Honeybees live in colonies with one queen and thousands of workers. The beekeeper opens the hive, "
            "checks the frames of comb and harvests honey in late summer.")
    assert checkers.topic(text, {"topic": "beekeeping"})
    assert checkers.topic(text, {"topic": "Beekeeping "})
    assert not checkers.topic(text, {"topic": "personal finance"})
    assert not checkers.topic("", {"topic": "beekeeping"})



def test_batched_checks_give_the_one_by_one_verdicts() -> None:
    """`Task.check_many` (one MiniLM encode for every topic response) and `check_results` (a pass's finished
    rows checked together) give exactly the verdicts of checking each response alone."""
    from steerer.controller import check_results, check_verdicts
    from steerer.request import Result, Verdict
    from steerer.tasks import topic

    rows = [r for rows in _labelled().values() for r in rows]
    long = " ".join(["Honeybees build comb, the queen lays eggs and the workers bring nectar home."] * 30)
    rows += [{"task": "topic", "params": {"topic": "beekeeping"}, "response": long},  # several chunks
             {"task": "topic", "params": {"topic": "beekeeping"}, "response": ""},
             {"task": "topic", "params": {"topic": "cooking"}, "response": "Sure!\nBoil the pasta, then add salt."}]
    for task_id in ("sentiment", "topic", "register"):
        mine = [r for r in rows if r["task"] == task_id]
        one_by_one = [get_task(task_id).check(r["response"], r["params"]) for r in mine]
        assert get_task(task_id).check_many([r["response"] for r in mine], [r["params"] for r in mine]) == one_by_one
    texts = [r["response"] for r in rows if r["task"] == "topic"]
    alone = [topic._response_vector(t) for t in texts]
    for a, b in zip(alone, topic._response_vectors(texts), strict=True):  # batching moves floats by ~1e-7 at most
        assert abs(a - b).max() < 1e-5

    def result(row: dict, i: int) -> Result:
        verdict = Verdict(row["task"], row["params"], False, None, False, None, None)
        return Result(f"r{i}", row["response"], [], "eos", [verdict], 0, {}, "v")

    batched = check_results([result(r, i) for i, r in enumerate(rows)])
    single = [check_verdicts(result(r, i)) for i, r in enumerate(rows)]
    assert [r.verdicts[0].satisfied for r in batched] == [r.verdicts[0].satisfied for r in single]
    assert {r.verdicts[0].satisfied for r in batched} == {True, False}
    with pytest.raises(ValueError, match="2 responses but 1"):
        get_task("topic").check_many(["a", "b"], [{"topic": "cooking"}])


# --------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------


def test_registry_order_kinds_and_lookup() -> None:
    assert list(TASKS) == ["char_count", "word_count", "json_format", "lowercase", "term_exclusion",
                           "keyword_inclusion", "sentiment", "topic", "register"]
    assert [t.kind for t in TASKS.values()] == ["structural"] * 4 + ["lexical"] * 2 + ["semantic"] * 3
    with pytest.raises(UnknownTaskError, match="known tasks: char_count") as info:
        get_task("haiku")
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("unknown task 'haiku'")


@pytest.mark.parametrize(
    ("task_id", "params", "text"),
    [
        ("char_count", {"relation": "less than", "limit": 120}, "Answer in fewer than 120 characters."),
        ("word_count", {"relation": "at most", "limit": 25}, "Answer in at most 25 words."),
        ("json_format", {}, "Reply only with valid JSON."),
        ("term_exclusion", {"terms": ["ocean"]}, "Do not use the word 'ocean'."),
        ("term_exclusion", {"terms": ["a", "b", "c"]}, "Do not use the words 'a', 'b' or 'c'."),
        ("keyword_inclusion", {"terms": ["lantern", "river"]}, "Mention the words 'lantern' and 'river'."),
        ("sentiment", {"polarity": "negative"}, "Write in a clearly negative tone."),
        ("topic", {"topic": "astronomy"}, "Talk only about astronomy."),
        ("register", {"register": "formal"}, "Use a formal register."),
    ],
)
def test_instruction_text(task_id: str, params: dict, text: str) -> None:
    assert get_task(task_id).instruction(params) == text


def test_instruction_validates_params() -> None:
    with pytest.raises(ValueError):
        get_task("word_count").instruction({"relation": "about", "limit": 3})


def test_sample_params_are_valid_and_move_with_difficulty() -> None:
    rng = random.Random(0)
    for task in TASKS.values():
        for d in (0.0, 0.5, 1.0):
            for _ in range(20):
                task.validate(task.sample_params(rng, d))
    with pytest.raises(ValueError):
        get_task("word_count").sample_params(rng, 1.5)

    def mean_upper_limit(d: float) -> float:
        limits = []
        while len(limits) < 200:
            p = get_task("word_count").sample_params(rng, d)
            if p["relation"] != "at least":
                limits.append(p["limit"])
        return sum(limits) / len(limits)

    assert mean_upper_limit(0.0) > 3 * mean_upper_limit(1.0)
    negatives = {d: sum(get_task("sentiment").sample_params(rng, d)["polarity"] == "negative"
                        for _ in range(400)) for d in (0.0, 1.0)}
    assert negatives[1.0] > negatives[0.0] > 0
    easy = [get_task("term_exclusion").sample_params(rng, 0.0)["terms"] for _ in range(50)]
    hard = [get_task("term_exclusion").sample_params(rng, 1.0)["terms"] for _ in range(50)]
    assert sum(map(len, hard)) > sum(map(len, easy))
    assert sum("the" in t for t in easy) == 0 and any("the" in t or "a" in t for t in hard)


# --------------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------------


def test_base_requests_are_many_varied_and_unique() -> None:
    assert len(BASE_REQUESTS) >= 120
    assert len({b.id for b in BASE_REQUESTS}) == len(BASE_REQUESTS)
    assert len({b.text for b in BASE_REQUESTS}) == len(BASE_REQUESTS)
    assert len({b.domain for b in BASE_REQUESTS}) >= 10


def test_base_requests_are_not_ifeval_prompts() -> None:
    path = IFEVAL / "input_data.jsonl"
    assert path.exists(), f"missing {path}"
    with open(path, encoding="utf-8") as fh:
        prompts = " ".join(json.loads(line)["prompt"].lower() for line in fh if line.strip())
    assert [b.text for b in BASE_REQUESTS if b.text.lower().rstrip(".") in prompts] == []


def test_split_by_base_request() -> None:
    train, test = split_base_requests(0)
    assert set(train).isdisjoint(test)
    assert set(train) | set(test) == {b.id for b in BASE_REQUESTS}
    assert 0.2 <= len(test) / len(BASE_REQUESTS) <= 0.3
    assert split_base_requests(0) == (train, test)
    assert split_base_requests(1) != (train, test)
    domains = {b.id: b.domain for b in BASE_REQUESTS}
    assert {domains[i] for i in test} == {domains[i] for i in train}
    texts = {b.id: b.text for b in BASE_REQUESTS}
    params = {"relation": "at most", "limit": 20}
    train_prompts = {build_prompt("word_count", texts[i], params) for i in train}
    assert not train_prompts & {build_prompt("word_count", texts[i], params) for i in test}


def test_build_prompt_and_messages() -> None:
    params = {"terms": ["the"]}
    prompt = build_prompt("term_exclusion", "transport-01", params)
    assert prompt == "Describe how a bicycle works. Do not use the word 'the'."
    assert build_prompt("term_exclusion", BASE_REQUESTS[0], params).startswith(BASE_REQUESTS[0].text)
    assert build_prompt("term_exclusion", "Tell me a joke.", params).startswith("Tell me a joke.")

    plain = prompt_messages("term_exclusion", "transport-01", params, None)
    assert plain == [{"role": "user", "content": prompt}]
    system = prompt_messages("term_exclusion", "transport-01", params, "system")
    assert [m["role"] for m in system] == ["system", "user"]
    assert "Do not use the word 'the'." in system[0]["content"]
    repeat = prompt_messages("term_exclusion", "transport-01", params, "repeat")
    assert repeat[-1]["content"].count("Do not use the word 'the'.") == 3
    oneshot = prompt_messages("term_exclusion", "transport-01", params, "oneshot")
    assert [m["role"] for m in oneshot] == ["user", "assistant", "user"]
    assert checkers.term_exclusion(oneshot[1]["content"], params)
    assert oneshot[-1]["content"] == prompt
    with pytest.raises(ValueError, match="unknown aid"):
        prompt_messages("term_exclusion", "transport-01", params, "bribe")
    with pytest.raises(UnknownTaskError):
        build_prompt("haiku", "transport-01", {})


def test_oneshot_demonstrations_comply() -> None:
    rng = random.Random(3)
    for task_id, task in TASKS.items():
        n = 3 if task_id == "topic" else 40  # topic demos need the embedding model
        for i in range(n):
            params = task.sample_params(rng, i / max(1, n - 1))
            assert task.check(demo_response(task_id, params), params), (task_id, params)
    assert set(AIDS) == {"system", "repeat", "oneshot"}
