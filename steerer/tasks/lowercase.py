"""lowercase: IFEval ``change_case:english_lowercase``.

``str.islower()`` (at least one cased letter, none upper/title case) **and** the text reads as English.
IFEval asks langdetect; we use a dependency-free stand-in (an English function word must occur), which also
says "not confirmed English" for a bare noun phrase such as "etchings", as langdetect does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerer.tasks import common
from steerer.tasks.base import Task

# Frequent English function words: a text with none of them cannot be confirmed as English prose.
ENGLISH_FUNCTION_WORDS = common.wordset(
    """
    a an the and or but nor of to in on at for with by from into onto about as than then so if
    is are was were be been being am do does did have has had will would can could should may might must
    it its this that these those there here i me my mine you your yours he him his she her hers we us our
    they them their what which who whom whose how when where why not no all some any each every more most
    very just also only too up out over under after before because while although though until
    """
)


def looks_english(text: str) -> bool:
    """Cheap stand-in for IFEval's ``langdetect.detect(text) == "en"``: some English function word occurs.

    Real English prose of more than a few words always has one; bare noun phrases, other languages and
    other scripts do not. (langdetect is a statistical guesser that also rejects such short phrases.)
    """
    return any(tok in ENGLISH_FUNCTION_WORDS for tok in common.WORD_RE.findall(text.lower()))


def validate(params: Any) -> None:
    common.validate_empty("lowercase", params)


def check(response: str, params: Mapping[str, Any]) -> bool:
    """No uppercase letters (and at least one letter), in English: IFEval ``english_lowercase``."""
    validate(params)
    text = common.require_text("lowercase", response)
    return text.islower() and looks_english(text)


class CapitalDetector:
    """Decided at the first uppercase or titlecase letter (then ``str.islower()`` is False whatever follows):
    O(delta) per token. No letter at all, or text that is not English, is only known at the end."""

    def __init__(self) -> None:
        self.length = 0

    def feed(self, delta: str, final: bool = False) -> int | None:
        for i, c in enumerate(delta):
            if c.isupper() or c.istitle():
                return self.length + i + 1
        self.length += len(delta)
        return None

    def repair(self, delta: str) -> str | None:
        """The guard's fix for a vetoed token: the same text lower-cased (" The" -> " the")."""
        fixed = delta.lower()
        return fixed if fixed != delta else None


def detector(params: Mapping[str, Any]) -> CapitalDetector:
    return CapitalDetector()


TASK = Task(
    id="lowercase", kind="structural", summary="no capital letters (IFEval english_lowercase)",
    checker=check, validator=validate,
    render=lambda p: "Write everything in lowercase letters; do not use any capital letters.",
    sampler=common.no_params,
    demo_text=lambda p: " ".join(common.DEMO_SENTENCES[:3]).lower(),
    detector=detector, order=40,
)
