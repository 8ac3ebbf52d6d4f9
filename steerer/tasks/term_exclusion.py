"""term_exclusion: IFEval ``keywords:forbidden_words``.

A case-insensitive whole-word match (``\\b`` both sides), so "oceans" does not violate "ocean".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from steerer.tasks import common
from steerer.tasks.base import Task, first_index

# Words to avoid, by how hard they are to avoid in an ordinary answer.
EXCLUSION_TIERS: tuple[tuple[str, ...], ...] = (
    ("ocean", "lantern", "volcano", "penguin", "castle", "dragon", "violin", "glacier", "umbrella", "pirate",
     "rainbow", "cactus"),
    ("very", "also", "important", "many", "people", "time", "way", "help", "make", "good", "can", "use",
     "like", "example"),
    ("the", "a", "and", "is", "of", "to", "in", "it", "you", "that", "for", "are"),
)


def validate(params: Any) -> list[str]:
    return common.validate_terms("term_exclusion", params)


def check(response: str, params: Mapping[str, Any]) -> bool:
    """None of the terms occurs as a whole word, case-insensitively (IFEval ``keywords:forbidden_words``).

    Whole word means an inflected form is a different word: "oceans" does not break "ocean".
    """
    terms = validate(params)
    text = common.require_text("term_exclusion", response)
    return not any(common.whole_word_pattern(term).search(text) for term in terms)


def onset(params: Mapping[str, Any], prefixes: Sequence[str]) -> int | None:
    """The token that completes the first forbidden word (whole word, any case) of the final text.

    Matched on the final text, not on each prefix: a prefix ending in "ocean" is not yet a violation if
    the next token makes it "oceans".
    """
    if not prefixes:
        return None
    text = prefixes[-1]
    ends = [m.end() for term in params["terms"] for m in [common.whole_word_pattern(term).search(text)] if m]
    if not ends:
        return None
    return first_index(prefixes, lambda prefix: len(prefix) >= min(ends))


def render(p: Mapping[str, Any]) -> str:
    terms = list(p["terms"])
    noun = "word" if len(terms) == 1 else "words"
    return f"Do not use the {noun} {common.quoted_list(terms, 'or')}."


def demo(params: Mapping[str, Any]) -> str:
    ok = [s for s in (*common.DEMO_SENTENCES, *common.DEMO_PLAIN) if check(s, params)]
    return " ".join(ok[:3])


TASK = Task(
    id="term_exclusion", kind="lexical", summary="none of the words occurs (IFEval forbidden_words)",
    checker=check, validator=validate, render=render, sampler=common.tiered_terms(EXCLUSION_TIERS),
    demo_text=demo, onset_rule=onset, order=50,
)
