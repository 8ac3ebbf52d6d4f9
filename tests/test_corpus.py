"""The probe corpus: phrasing families state exactly the task's parameters, the new base requests split
like the old ones, the storage survives truncation, and a tiny real build labels, resumes and dedupes."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import re
from pathlib import Path

import pytest

from probes import corpus, phrasings
from probes.requests import ALL_REQUESTS, NEW_REQUESTS, base_splits, split_requests
from probes.tasks import TASKS
from probes.templates import BASE_REQUESTS, split_base_requests

SHARED = Path(__file__).resolve().parents[2] / "shared"
LENGTH = ("char_count", "word_count")


def _every_rendering(samples: int = 6):
    """(task, family, variant, params, instruction) over sampled params, difficulty spread over [0, 1]."""
    rng = random.Random(7)
    for task_id in TASKS:
        for family in phrasings.families(task_id):
            for variant in range(len(family.sentences)):
                for k in range(samples):
                    params = corpus.sample_params(task_id, rng, k / max(samples - 1, 1))
                    yield task_id, family, variant, params, phrasings.instruction(task_id, family.name, variant,
                                                                                  params)


# -- families ----------------------------------------------------------------------------------------------
def test_every_task_has_eight_families_with_variants_and_two_held_out():
    for task_id in TASKS:
        fams = phrasings.families(task_id)
        names = [f.name for f in fams]
        assert len(fams) >= 8 and len(set(names)) == len(names), task_id
        assert all(len(f.sentences) >= 2 for f in fams), task_id
        assert {f.placement for f in fams} == set(phrasings.PLACEMENTS), task_id
        heldout = set(phrasings.HELDOUT[task_id])
        assert len(heldout) == 2 and heldout <= set(names)
        train = {n for n in names if phrasings.family_split(task_id, n) == "train"}
        assert train.isdisjoint(heldout) and train | heldout == set(names)
        # one structural (placement) family and one wording family are held out
        placements = {f.name: f.placement for f in fams}
        assert sorted(placements[n] == "after" for n in heldout) == [False, True], task_id


def test_variants_within_a_family_differ():
    for task_id in TASKS:
        rng = random.Random(1)
        params = corpus.sample_params(task_id, rng, 0.5)
        for family in phrasings.families(task_id):
            texts = {phrasings.instruction(task_id, family.name, v, params) for v in range(len(family.sentences))}
            assert len(texts) == len(family.sentences), (task_id, family.name)


# Length phrasings -> relation. Patterns are tried in order and the matched span removed, so "no fewer than
# N" is read before "fewer than N", and negations before the phrases they negate.
_N = r"(?P<n>\d+)"
_RELATION_PATTERNS: tuple[tuple[str, str], ...] = (
    ("less than", rf"(?:not|n't|never)\b[^.?!]*?\breach {_N}\b"),
    ("less than", rf"(?:not|n't|never)\b[^.?!]*?\b{_N} [\w ,()]*?or more\b"),
    ("less than", rf"never use as many as {_N}\b"),
    ("at least", rf"(?:not|n't|never)\b[^.?!]*?\b(?:fewer|less|shorter) than {_N}\b"),
    ("at least", rf"(?:not|n't|never)\b[^.?!]*?\bgo below {_N}\b"),
    ("at most", rf"(?:not|n't|never)\b[^.?!]*?\b(?:exceed|go over|more than) {_N}\b"),
    ("at least", rf"\bno fewer than {_N}\b"), ("at least", rf"\bat least {_N}\b"),
    ("at least", rf"\ba minimum (?:length )?of {_N}\b"), ("at least", rf"\bmin {_N}\b"),
    ("at least", rf"\b{_N}\+"), ("at least", rf"\b{_N} \w+ minimum\b"),
    ("at most", rf"\bno more than {_N}\b"), ("at most", rf"\bat most {_N}\b"),
    ("at most", rf"\b{_N} [\w ,()]*?at most\b"), ("at most", rf"\ba maximum of {_N}\b"),
    ("at most", rf"\bmax {_N}\b"), ("at most", rf"\b{_N} \w+ max\b"), ("at most", rf"\b{_N} \w+ or fewer\b"),
    ("at most", rf"\blimit of {_N}\b[^.]*; do not exceed it"),
    ("less than", rf"\b(?:fewer|less|shorter) than {_N}\b"), ("less than", rf"\bunder {_N}\b"),
    ("less than", rf"\bbelow {_N}\b"),
)
_LEFTOVER = re.compile(r"\b(fewer|less|more|least|most|under|below|over|maximum|minimum|max|min|exceed\w*|limit)\b")


def read_relation(text: str) -> tuple[set[str], set[int], str]:
    """(relations stated, numbers they bind, the text left over) for a length instruction."""
    rest, found, numbers = text.lower(), set(), set()
    for relation, pattern in _RELATION_PATTERNS:
        while m := re.search(pattern, rest):
            found.add(relation)
            numbers.add(int(m.group("n")))
            rest = rest[: m.start()] + " " + rest[m.end():]
    return found, numbers, rest


def test_length_instructions_state_exactly_the_relation_and_limit():
    seen = 0
    for task_id, family, _variant, params, text in _every_rendering():
        if task_id not in LENGTH:
            continue
        relations, numbers, rest = read_relation(text)
        assert relations == {params["relation"]}, (family.name, text)
        assert numbers == {params["limit"]}, (family.name, text)
        assert not _LEFTOVER.search(rest), (family.name, text, rest)
        unit = r"\bchar" if task_id == "char_count" else r"\bwords?\b"
        assert re.search(unit, text.lower()), text
        if task_id == "word_count":
            assert "char" not in text.lower()
        seen += 1
    assert seen > 100


_NEGATIVE = re.compile(r"\b(not|never|avoid|without|ban\w*|forbidden|leave out|steer clear|no|don't|didn't)\b|n't\b",
                       re.IGNORECASE)
_POSITIVE_WORDS = {"positive", "upbeat", "cheerful", "optimistic", "enthusiastic", "sunny", "happy", "warm",
                   "cheering"}
_NEGATIVE_WORDS = {"negative", "gloomy", "pessimistic", "downbeat", "critical", "bleak", "dismal", "grumpy", "sour",
                   "fed"}
_FORMAL_WORDS = {"formal", "formally", "academic", "professional", "official", "scholarly", "polished", "business"}
_INFORMAL_WORDS = {"informal", "informally", "casual", "casually", "chatty", "relaxed", "texting", "laid", "chill",
                   "conversational", "buddy", "chatting", "friend", "friends"}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_other_instructions_state_their_parameters():
    for task_id, family, _variant, params, text in _every_rendering():
        where = (task_id, family.name, text)
        words = _words(text)
        if task_id == "json_format":
            assert "json" in text.lower(), where
        elif task_id == "lowercase":
            assert re.search(r"lower ?case|small letters|capital|uppercase|caps", text, re.IGNORECASE), where
        elif task_id in ("term_exclusion", "keyword_inclusion"):
            terms = params["terms"]
            patterns = [re.compile(rf"(?<!\w){re.escape(term)}(?!\w)") for term in terms]
            spans = [p.search(text) for p in patterns]
            assert all(spans), where
            # the connective between the terms, with the terms themselves ("and", "or") masked
            masked = text
            for p in patterns:
                masked = p.sub(lambda m: "T" * len(m.group()), masked)
            between = masked[min(m.start() for m in spans):max(m.end() for m in spans)]
            text = masked
            if task_id == "term_exclusion":
                assert _NEGATIVE.search(text), where
                assert not re.search(r"\band\b", between), where  # "not a and b" would allow either alone
            else:
                assert not _NEGATIVE.search(text), where
                assert not re.search(r"\bor\b", between), where
                assert re.search(r"mention|includ|use|contain|work|required|appear|keyword", text, re.I), where
        elif task_id == "sentiment":
            own, other = ((_POSITIVE_WORDS, _NEGATIVE_WORDS) if params["polarity"] == "positive"
                          else (_NEGATIVE_WORDS, _POSITIVE_WORDS))
            assert words & own and not words & other, where
        elif task_id == "topic":
            assert params["topic"].strip() in text, where
        elif task_id == "register":
            own, other = ((_FORMAL_WORDS, _INFORMAL_WORDS) if params["register"] == "formal"
                          else (_INFORMAL_WORDS, _FORMAL_WORDS))
            assert words & own and not words & other, where


def test_list_items_are_neutral_and_render_places_the_instruction():
    for item in phrasings.NEUTRAL_ITEMS:  # nothing about length, case, format, words, tone, topic, register
        assert not re.search(r"short|brief|long|concise|detail|word|lower|upper|capital|json|format|tone|"
                             r"positive|negative|topic|subject|formal|casual|friendly", item, re.I), item
    params = {"relation": "at most", "limit": 20}
    request = "Why do cats purr?"
    for layout in range(40):
        for family in phrasings.families("word_count"):
            p = phrasings.render("word_count", family.name, 0, request, params, layout)
            assert request in p.user and p.instruction in (p.system or "") + p.user
            if family.placement == "system":
                assert p.system == p.instruction and p.user == request
            else:
                assert p.system is None
            if family.placement == "after":
                assert p.user.startswith(request) and p.user.endswith(p.instruction)
            if family.placement == "before":
                assert p.user.startswith(p.instruction) and p.user.endswith(request)
            if family.placement == "list":
                lines = p.user.splitlines()
                assert sum(p.instruction in line for line in lines) == 1
                assert 2 <= sum(bool(re.match(r"(\d+\.|-|\*) ", line)) for line in lines) <= 4


def test_aids_apply_on_top_of_the_family():
    params = {"terms": ["ocean"]}
    request = "How do petitions work?"
    for family in phrasings.families("term_exclusion"):
        text = phrasings.instruction("term_exclusion", family.name, 1, params)
        plain = corpus.prompt_messages("term_exclusion", family.name, 1, request, params, None, 5)
        system = corpus.prompt_messages("term_exclusion", family.name, 1, request, params, "system", 5)
        repeat = corpus.prompt_messages("term_exclusion", family.name, 1, request, params, "repeat", 5)
        oneshot = corpus.prompt_messages("term_exclusion", family.name, 1, request, params, "oneshot", 5)
        assert system[0]["role"] == "system" and text in system[0]["content"] and system[-1] == plain[-1]
        assert [m["role"] for m in oneshot][-3:] == ["user", "assistant", "user"]
        assert TASKS["term_exclusion"].check(oneshot[-2]["content"], params)
        assert repeat[-1]["content"].count(text) + (repeat[0]["content"].count(text) if family.placement == "system"
                                                    else 0) >= 2
        if family.placement == "system":  # the system family keeps its instruction out of the user turn
            assert all(text not in m["content"] for m in (*repeat, *oneshot, *plain) if m["role"] == "user")


# -- base requests -----------------------------------------------------------------------------------------
def test_new_requests_are_many_new_and_split_like_the_old_ones():
    old_domains = {b.domain for b in BASE_REQUESTS}
    new_domains = {b.domain for b in NEW_REQUESTS}
    assert len(NEW_REQUESTS) >= 120 and len(new_domains) >= 8 and new_domains.isdisjoint(old_domains)
    ids = [b.id for b in ALL_REQUESTS]
    texts = [b.text for b in ALL_REQUESTS]
    assert len(set(ids)) == len(ids) and len(set(texts)) == len(texts)
    assert split_requests(BASE_REQUESTS, 13) == split_base_requests(13)  # the same algorithm
    splits = base_splits()
    assert set(splits) == set(ids)
    for domain in new_domains:
        assert {splits[b.id] for b in NEW_REQUESTS if b.domain == domain} == {"train", "test"}
    share = sum(v == "test" for v in splits.values()) / len(splits)
    assert 0.2 < share < 0.3
    # more than one style: questions and first-person situations, not only imperatives
    assert sum(b.text.endswith("?") for b in NEW_REQUESTS) >= 60
    assert sum(bool(re.search(r"\b(I|my|we|our)\b", b.text)) for b in NEW_REQUESTS) >= 20


@pytest.mark.skipif(not (SHARED / "ifeval" / "input_data.jsonl").exists(), reason="IFEval data not present")
def test_nothing_is_copied_from_ifeval():
    prompts = " ".join(json.loads(line)["prompt"].lower() for line in
                       (SHARED / "ifeval" / "input_data.jsonl").read_text().splitlines() if line.strip())
    prompts = re.sub(r"\s+", " ", prompts)
    texts = [b.text for b in NEW_REQUESTS] + [text for *_, text in _every_rendering(samples=1)]

    def grams(text: str, n: int = 7):
        w = re.findall(r"[a-z']+", text.lower())
        return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}

    ifeval_grams = grams(prompts)
    for text in texts:
        assert not grams(text) & ifeval_grams, text


# -- storage -----------------------------------------------------------------------------------------------
def test_a_truncated_last_member_loses_only_that_member(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    corpus.append_member(path, [json.dumps({"id": i, "round": 0, "satisfied": True}) + "\n" for i in range(3)])
    corpus.append_member(path, [json.dumps({"id": i, "round": 1, "satisfied": False}) + "\n" for i in range(3, 6)])
    with gzip.open(path, "rt") as f:  # plain gzip reads the concatenated members
        assert len(f.read().splitlines()) == 6
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # cut inside the last member
    assert [r["id"] for r in corpus.load_corpus(tmp_path, "t")] == [0, 1, 2]
    corpus.append_member(path, [json.dumps({"id": 9, "round": 2, "satisfied": True}) + "\n"])
    assert [r["id"] for r in corpus.load_corpus(tmp_path, "t")] == [0, 1, 2, 9]
    with gzip.open(path, "rt") as f:  # the broken tail was dropped, so the file is valid gzip again
        assert len(f.read().splitlines()) == 4


def test_round_log_survives_a_cut_line(tmp_path):
    path = tmp_path / "rounds.jsonl"
    corpus._append_line(path, json.dumps({"round": 0}))
    with open(path, "a") as f:
        f.write('{"round": 1, "tru')  # interrupted mid-line
    corpus._append_line(path, json.dumps({"round": 2}))
    assert [r["round"] for r in corpus.load_rounds(tmp_path)] == [0, 2]


def test_rejection_caps_each_class_and_strategy_follows_the_balance():
    config = corpus.CorpusConfig(per_task=10, round_size=4)  # class cap 7, (class, aid) cell cap 5
    state = corpus.TaskState()
    for _ in range(6):
        state.keep({"satisfied": True, "aid": "oneshot" if _ < 4 else None})
    state.keep({"satisfied": False, "aid": None})
    rows = [{"satisfied": s, "aid": a} for s, a in ((True, None), (True, None), (False, None), (False, "system"),
                                                     (False, None), (False, None), (False, None), (False, None))]
    kept, discarded = corpus.select_rows(rows, state, config)
    assert [(r["satisfied"], r["aid"]) for r in kept] == [(True, None), (False, None), (False, "system"),
                                                         (False, None), (False, None), (False, None)]
    assert discarded == 2  # a satisfied row over the class cap, a violated no-aid row over its cell cap
    assert corpus.choose_strategy(corpus.TaskState(), config) == "plain"
    assert corpus.choose_strategy(corpus.TaskState(satisfied=1, violated=5), config) == "aid"
    assert corpus.choose_strategy(corpus.TaskState(satisfied=5, violated=1), config) == "hard-params"
    assert corpus.choose_strategy(corpus.TaskState(satisfied=3, violated=3), config) == "plain"
    assert corpus.choose_strategy(corpus.TaskState(satisfied=1, violated=7), config) == "aid+rejection"
    assert corpus.choose_strategy(corpus.TaskState(satisfied=7, violated=2), config) == "hard-params+rejection"


# -- a tiny real build -------------------------------------------------------------------------------------
def test_tiny_build_labels_resumes_and_never_duplicates(lm, tmp_path):
    tasks = ("word_count", "term_exclusion")
    # batch_size 2 < 6 rows per round: rows join the running batch as others finish
    config = corpus.CorpusConfig(tasks=tasks, per_task=3, round_size=3, batch_size=2, max_new_tokens=6,
                                 max_new_tokens_other=6, max_rounds=1, class_cap=1.0, aid_cap=1.0)
    manifest = corpus.build_corpus(lm, tmp_path, config, progress=False, command="test")
    rows = corpus.load_corpus(tmp_path)
    assert len(rows) == 6 and {r["task"] for r in rows} == set(tasks)
    for row in rows:
        assert row["satisfied"] == TASKS[row["task"]].check(row["response"], row["params"])
        assert (row["onset"] is None) == row["satisfied"]
        if row["onset"] is not None:
            assert 0 <= row["onset"] <= row["n_tokens"]
        assert row["n_tokens"] == len(row["token_ids"]) <= 6
        assert row["response"] == lm.tokenizer.decode(row["token_ids"], skip_special_tokens=True)
        assert row["family_split"] == phrasings.family_split(row["task"], row["family"])
        assert row["base_split"] in ("train", "test") and row["round"] == 0
        assert row["messages"][-1]["role"] == "user"
    assert manifest["fingerprint"] == lm.fingerprint and manifest["command"] == "test"
    assert all(manifest["tasks"][t]["complete"] for t in tasks)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.jsonl.gz")}

    corpus.build_corpus(lm, tmp_path, config, progress=False)  # done: a rerun adds nothing
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.jsonl.gz")} == before

    more = dataclasses.replace(config, per_task=6, tasks=("word_count",), batch_size=1)
    manifest = corpus.build_corpus(lm, tmp_path, more, progress=False)  # resume: the next round, new ids
    rows = corpus.load_corpus(tmp_path, "word_count")
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert [r["round"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert manifest["tasks"]["word_count"]["generated"] == 6
    rounds = corpus.load_rounds(tmp_path)
    assert [(r["task"], r["round"]) for r in rounds] == [("word_count", 0), ("term_exclusion", 0), ("word_count", 1)]


def test_relabel_recomputes_labels_and_onsets_in_place(lm, tmp_path):
    config = corpus.CorpusConfig(tasks=("lowercase",), per_task=3, round_size=3, batch_size=3, max_new_tokens=6,
                                 max_new_tokens_other=6, max_rounds=1, class_cap=1.0, aid_cap=1.0)
    corpus.build_corpus(lm, tmp_path, config, progress=False, command="test")
    rows = corpus.load_corpus(tmp_path)
    assert corpus.relabel_onsets(tmp_path, lm.tokenizer) == {"lowercase": 0}  # today's rules made them
    path = tmp_path / "lowercase.jsonl.gz"
    stale = [dict(r, onset=99, satisfied=False) for r in rows]
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in stale).encode()))
    assert corpus.relabel_onsets(tmp_path, lm.tokenizer) == {"lowercase": len(rows)}
    assert corpus.load_corpus(tmp_path) == rows


# -- IFEval-range rows (issue 22) ----------------------------------------------------------------------------
RANGED = corpus.CorpusConfig(tasks=corpus.RANGE_TASKS, ranges="ifeval")


def test_ranged_rows_span_ifevals_ranges_with_one_to_three_instructions():
    rows = [r for t in corpus.RANGE_TASKS for k in range(4)
            for r in corpus.plan_round(t, k, corpus.TaskState(), RANGED)]
    words = [r["params"] for r in rows if r["task"] == "word_count"]
    assert {p["relation"] for p in words} == {"at least", "less than"}
    assert min(p["limit"] for p in words) <= 80 and max(p["limit"] for p in words) >= 600
    assert all(50 <= p["limit"] <= 800 for p in words)
    lists = [len(r["params"]["terms"]) for r in rows if r["task"] != "word_count"]
    assert max(lists) >= 4 and sum(n >= 2 for n in lists) > len(lists) / 2  # multi-word lists
    counts = {len(r["instructions"]) for r in rows}
    assert counts == {1, 2, 3}
    for r in rows:
        assert r["tag"] == corpus.RANGE_TAG and r["instructions"][0] == {"task": r["task"], "params": r["params"]}
        user = r["messages"][-1]["content"]
        terms = [set(i["params"].get("terms", ())) for i in r["instructions"]]
        assert sum(len(t) for t in terms) == len(set().union(*terms))  # required and forbidden words apart
        for extra in r["instructions"][1:]:
            assert extra["task"] in corpus.COMPANIONS[r["task"]]
            assert phrasings.family_split(extra["task"], extra["family"]) == "train"
            assert phrasings.instruction(extra["task"], extra["family"], extra["variant"], extra["params"]) in user
        budget = min(RANGED.range_budget_cap, -(-3 * r["params"]["limit"] // 2) + 16) \
            if r["task"] == "word_count" else RANGED.max_new_tokens_other
        assert r["max_new_tokens"] == budget
    assert "tag" not in corpus.plan_round("word_count", 0, corpus.TaskState(), corpus.CorpusConfig())[0]
    with pytest.raises(ValueError, match="covers word_count"):
        corpus.CorpusConfig(ranges="ifeval")
    with pytest.raises(ValueError, match="unknown ranges"):
        corpus.CorpusConfig(ranges="ifevals")


def test_a_length_verdict_the_budget_decided_is_censored_and_not_kept():
    least, less = {"relation": "at least", "limit": 300}, {"relation": "less than", "limit": 300}
    assert corpus.censored("word_count", least, False, "length") and corpus.censored("word_count", less, True, "length")
    assert not corpus.censored("word_count", least, True, "length")  # passed the floor before the cut: known
    assert not corpus.censored("word_count", less, False, "length")  # crossed the ceiling before the cut: known
    assert not corpus.censored("word_count", least, False, "eos")  # the model stopped: its own verdict
    assert not corpus.censored("term_exclusion", {"terms": ["a"]}, True, "length")
    rows = [{"satisfied": True, "aid": None, "censored": True}, {"satisfied": False, "aid": None, "censored": False}]
    kept, discarded = corpus.select_rows(rows, corpus.TaskState(), corpus.CorpusConfig(per_task=10))
    assert kept == rows[1:] and discarded == 1


def test_tiny_ranged_build_labels_every_instruction(lm, tmp_path):
    # 8 tokens cannot decide a limit of >= 50 words unless the model stops: those rows are censored, not kept
    config = dataclasses.replace(RANGED, tasks=("word_count", "term_exclusion"), per_task=3, round_size=3,
                                 batch_size=1, max_new_tokens_other=6, range_budget_cap=8, max_rounds=1,
                                 class_cap=1.0, aid_cap=1.0)
    manifest = corpus.build_corpus(lm, tmp_path, config, progress=False, command="test")
    rows = corpus.load_corpus(tmp_path)
    rounds = {r["task"]: r for r in corpus.load_rounds(tmp_path)}
    assert rounds["term_exclusion"]["kept"] == 3 and rounds["word_count"]["generated"] == 3
    words = [r for r in rows if r["task"] == "word_count"]
    assert len(words) == rounds["word_count"]["kept"] == 3 - rounds["word_count"]["discarded"]
    assert all(r["finish_reason"] == "eos" for r in words)
    for row in rows:
        assert row["tag"] == corpus.RANGE_TAG and row["censored"] is False and row["n_tokens"] <= 8
        assert list(row["labels"]) == [i["task"] for i in row["instructions"]]
        assert row["labels"][row["task"]] == row["satisfied"]
        for i in row["instructions"]:
            assert row["labels"][i["task"]] == TASKS[i["task"]].check(row["response"], i["params"])
    assert "labels" in manifest["row_fields"] and manifest["config"]["ranges"] == "ifeval"
