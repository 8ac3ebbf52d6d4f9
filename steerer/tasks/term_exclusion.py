"""term_exclusion: IFEval ``keywords:forbidden_words``.

A case-insensitive whole-word match (``\\b`` both sides), so "oceans" does not violate "ocean".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerer.tasks import common
from steerer.tasks.base import Task

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


class TermDetector:
    """Decided when a forbidden word is known to be whole: the character after it has arrived (not a word
    character, or the match would not be whole), or the response ended with it. A prefix ending in "ocean"
    is not yet a violation: the next token may make it "oceans". The position reported is the match's end,
    so the violation is attributed to the token that completed the word (usually one token before the one
    that made it certain).

    Per token it searches only a tail: the new text plus the last (longest term + 2) characters before it,
    enough to hold a match still waiting for its next character and the character before that match. Cost:
    one regex search per term over that tail."""

    def __init__(self, terms: list[str]) -> None:
        self.patterns = [common.whole_word_pattern(term) for term in terms]
        self.keep = max(len(term) for term in terms) + 2
        self.tail = ""  # the last `keep` characters of the text so far
        self.start = 0  # position of `tail` in the whole text

    def feed(self, delta: str, final: bool = False) -> int | None:
        text = self.tail + delta
        # From position 1 of a cut tail: the boundary checks still see the character before it.
        begin = 1 if self.start else 0
        ends = [m.end() for pattern in self.patterns for m in pattern.finditer(text, begin)
                if m.end() < len(text) or final]
        if ends:
            return self.start + min(ends)
        cut = max(0, len(text) - self.keep)
        self.tail, self.start = text[cut:], self.start + cut
        return None


def detector(params: Mapping[str, Any]) -> TermDetector:
    return TermDetector(list(params["terms"]))


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
    demo_text=demo, detector=detector, order=50,
)
