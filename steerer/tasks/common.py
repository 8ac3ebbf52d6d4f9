"""Helpers the task modules share: parameter validation, word counting, relations, parameter sampling,
detectors for bounds that only grow, and the material for one-shot demonstrations.

Validators raise ``ValueError`` with a one-line message that starts with the task id, so a bad request or
dataset row never silently becomes a label.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from steerer.tasks.base import Params

# --------------------------------------------------------------------------------------------------
# parameter validation
# --------------------------------------------------------------------------------------------------

RELATIONS: tuple[str, ...] = ("less than", "at most", "at least")
# Term lists are user input the checker turns into one regex per term: bounded so that a request (or a
# verify row) cannot make a check arbitrarily slow. IFEval's lists have at most a handful of words.
MAX_TERMS = 64
MAX_TERM_CHARS = 64


def require_mapping(task: str, params: Any) -> Mapping[str, Any]:
    if not isinstance(params, Mapping):
        raise ValueError(f"{task}: params must be an object/dict, got {type(params).__name__}")
    return params


def check_keys(task: str, params: Mapping[str, Any], required: Sequence[str]) -> None:
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(f"{task}: missing param(s) {missing}; expected keys {list(required)}")
    extra = sorted(str(k) for k in params if k not in required)
    if extra:
        raise ValueError(f"{task}: unexpected param(s) {extra}; expected keys {list(required)}")


def validate_length(task: str, params: Any) -> tuple[str, int]:
    params = require_mapping(task, params)
    check_keys(task, params, ("relation", "limit"))
    relation, limit = params["relation"], params["limit"]
    if not isinstance(relation, str) or relation not in RELATIONS:
        raise ValueError(f"{task}: unknown relation {relation!r}; expected one of {list(RELATIONS)}")
    # bool is an int subclass; True as a limit is certainly a caller bug.
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValueError(f"{task}: limit must be an integer, got {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"{task}: limit must be >= 0, got {limit}")
    return relation, limit


def validate_empty(task: str, params: Any) -> None:
    params = require_mapping(task, params)
    check_keys(task, params, ())


def validate_terms(task: str, params: Any) -> list[str]:
    params = require_mapping(task, params)
    check_keys(task, params, ("terms",))
    terms = params["terms"]
    if isinstance(terms, str) or not isinstance(terms, Sequence):
        raise ValueError(f"{task}: terms must be a list of strings, got {type(terms).__name__}")
    if not terms:
        raise ValueError(f"{task}: terms must not be empty")
    if len(terms) > MAX_TERMS:
        raise ValueError(f"{task}: at most {MAX_TERMS} terms, got {len(terms)}")
    for term in terms:
        if not isinstance(term, str):
            raise ValueError(f"{task}: every term must be a string, got {type(term).__name__}")
        if not term.strip():
            raise ValueError(f"{task}: terms must not be blank")
        if len(term) > MAX_TERM_CHARS:
            raise ValueError(f"{task}: every term must be at most {MAX_TERM_CHARS} characters")
    return list(terms)


def validate_choice(task: str, params: Any, key: str, choices: Sequence[str]) -> str:
    params = require_mapping(task, params)
    check_keys(task, params, (key,))
    value = params[key]
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{task}: unknown {key} {value!r}; expected one of {list(choices)}")
    return value


def require_text(task: str, response: Any) -> str:
    if not isinstance(response, str):
        raise ValueError(f"{task}: response must be a string, got {type(response).__name__}")
    return response


# --------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------

WORD_RE = re.compile(r"\w+")


def count_words(text: str) -> int:
    """IFEval's word count: maximal runs of Unicode word characters (so "don't" is 2, "e-mail" is 2)."""
    return sum(1 for _ in WORD_RE.finditer(text))


def compare(value: int, relation: str, limit: int) -> bool:
    if relation == "less than":
        return value < limit
    if relation == "at most":
        return value <= limit
    return value >= limit  # "at least"; relation was validated


def wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


def whole_word_pattern(term: str) -> re.Pattern[str]:
    # For a term with word characters at both ends this is exactly IFEval's r"\b" + term + r"\b".
    # At a non-word edge (e.g. "c++") \b would demand a *word* neighbour; "not glued to a word
    # character" is what "whole word" means there.
    left = r"\b" if WORD_RE.match(term[0]) else r"(?<!\w)"
    right = r"\b" if WORD_RE.match(term[-1]) else r"(?!\w)"
    return re.compile(left + re.escape(term) + right, re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# instruction text
# --------------------------------------------------------------------------------------------------

RELATION_TEXT = {"less than": "fewer than", "at most": "at most", "at least": "at least"}


def quoted_list(terms: Sequence[str], conj: str) -> str:
    quoted = [f"'{t}'" for t in terms]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + f" {conj} " + quoted[-1]


# --------------------------------------------------------------------------------------------------
# parameter sampling
# --------------------------------------------------------------------------------------------------


def loglerp(lo: float, hi: float, t: float) -> float:
    return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * t)


def jitter(rng: random.Random, d: float, spread: float = 0.15) -> float:
    """Difficulty with noise, clipped to [0, 1], so neighbouring difficulties overlap."""
    return min(1.0, max(0.0, d + rng.uniform(-spread, spread)))


def round_nice(x: float) -> int:
    step = 1 if x < 20 else 5 if x < 200 else 10 if x < 1000 else 50
    return max(step, int(round(x / step) * step))


def length_sampler(upper_easy: float, upper_hard: float, lower_easy: float, lower_hard: float):
    """Upper bounds shrink and lower bounds grow with difficulty (log scale: a small model's lengths vary
    over an order of magnitude). Lower bounds stay reachable within the length tasks' 160-token budget, so
    a response cut off by the budget is not labelled a failure the model would not have made."""

    def sample(rng: random.Random, d: float) -> Params:
        relation = rng.choices(RELATIONS, weights=(0.4, 0.3, 0.3))[0]
        t = jitter(rng, d)
        if relation == "at least":
            limit = loglerp(lower_easy, lower_hard, t)
        else:
            limit = loglerp(upper_easy, upper_hard, t)
        return {"relation": relation, "limit": round_nice(limit)}

    return sample


def no_params(rng: random.Random, d: float) -> Params:
    return {}


def tiered_terms(tiers: tuple[tuple[str, ...], ...]):
    """1-3 terms from a tier chosen by (jittered) difficulty; harder prompts also ask for more terms."""

    def sample(rng: random.Random, d: float) -> Params:
        t = jitter(rng, d, 0.2)
        tier = tiers[min(len(tiers) - 1, int(t * len(tiers)))]
        n = 1 + (rng.random() < d) + (rng.random() < d / 2)
        return {"terms": rng.sample(tier, k=min(n, len(tier)))}

    return sample


# --------------------------------------------------------------------------------------------------
# detection of a length violation
# --------------------------------------------------------------------------------------------------


class CharCounter:
    """Characters so far (code points, whitespace included), by delta."""

    def __init__(self) -> None:
        self.count = 0

    def first_break(self, delta: str, most: int) -> int | None:
        """Add `delta`; if the count passes `most`, the offset in `delta` just after the character that
        passed it (0 if it was passed before any character)."""
        if self.count + len(delta) > most:
            return max(most + 1 - self.count, 0)
        self.count += len(delta)
        return None


class WordCounter:
    """`count_words` of the text so far, by delta: runs of word characters in the delta, less one when the
    delta continues a word the text so far ended in."""

    def __init__(self) -> None:
        self.count = 0
        self.in_word = False

    def first_break(self, delta: str, most: int) -> int | None:
        """Add `delta`; if the count passes `most`, the offset in `delta` just after the first character of
        the word that passed it (0 if it was passed before any character)."""
        if self.count > most:
            return 0
        for m in WORD_RE.finditer(delta):
            if m.start() == 0 and self.in_word:
                continue  # the word the text so far ended in goes on
            self.count += 1
            if self.count > most:
                return m.start() + 1
        if delta:
            self.in_word = bool(WORD_RE.match(delta[-1]))
        return None


class UpperBoundDetector:
    """An at-most / less-than limit on a count that only grows: decided once the count passes it, at the
    character that passed it."""

    def __init__(self, counter, relation: str, limit: int) -> None:
        self.counter = counter
        self.most = limit if relation == "at most" else limit - 1  # the largest count that complies
        self.length = 0

    def feed(self, delta: str, final: bool = False) -> int | None:
        offset = self.counter.first_break(delta, self.most)
        if offset is not None:
            return self.length + offset
        self.length += len(delta)
        return None


class LengthProgress:
    """How far the text has come towards a count limit: count so far / limit, by delta (either bound)."""

    def __init__(self, counter, limit: int) -> None:
        self.counter = counter
        self.limit = max(int(limit), 1)

    def feed(self, delta: str) -> float:
        self.counter.first_break(delta, math.inf)  # never breaks: only counts
        return self.counter.count / self.limit


def length_progress(counter: Callable[[], Any]):
    """The progress tracker factory of a count task (`Task.progress`)."""

    def make(params: Mapping[str, Any]) -> LengthProgress:
        return LengthProgress(counter(), params["limit"])

    return make


def length_detector(counter: Callable[[], Any]):
    """For an upper bound, a detector of the first prefix whose count breaks it (counts only grow: O(delta)
    per token); None for `at least`, which can only fail at the end."""

    def make(params: Mapping[str, Any]) -> UpperBoundDetector | None:
        relation, limit = params["relation"], params["limit"]
        if relation == "at least":
            return None
        return UpperBoundDetector(counter(), relation, limit)

    return make


# --------------------------------------------------------------------------------------------------
# one-shot demonstrations: answers to DEMO_REQUEST that satisfy a constraint
# --------------------------------------------------------------------------------------------------

DEMO_REQUEST = "Describe what a public library is."
DEMO_SENTENCES: tuple[str, ...] = (
    "A public library is a place where anyone can borrow books for free.",
    "Libraries lend novels, comics, films and music.",
    "Librarians help visitors find information.",
    "Most libraries offer quiet rooms for reading and study.",
    "Many also provide computers, printers and free internet access.",
    "Children can join story hours and reading clubs.",
    "Adults can attend talks, language classes and workshops.",
    "A library card is usually free for local residents.",
    "Borrowed items must be returned by a due date.",
    "Some libraries keep rare maps, old newspapers and local archives.",
    "Digital collections let members read e-books at home.",
    "Libraries are paid for by local governments and serve everyone equally.",
)
# For short forbidden-word cases: no articles, no "is", no "and", no "it".
DEMO_PLAIN = ("Libraries lend books.", "Librarians help visitors.", "Members borrow novels, films, music.")


def fit_demo(measure: Callable[[str], int], relation: str, limit: int) -> str:
    """Demo sentences joined to satisfy a length constraint under ``measure``."""
    if relation == "at least":
        parts: list[str] = []
        i = 0
        while measure(" ".join(parts)) < limit:
            parts.append(DEMO_SENTENCES[i % len(DEMO_SENTENCES)])
            i += 1
        return " ".join(parts)
    parts = []
    for sentence in (*DEMO_SENTENCES, *DEMO_PLAIN):
        candidate = " ".join([*parts, sentence])
        if compare(measure(candidate), relation, limit):
            parts.append(sentence)
    if parts:
        return " ".join(parts)
    for short in ("Books.", "Books", ""):
        if compare(measure(short), relation, limit):
            return short
    raise ValueError(f"no demonstration fits {relation} {limit}")
