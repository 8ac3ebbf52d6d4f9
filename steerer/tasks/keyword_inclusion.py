"""keyword_inclusion: IFEval ``keywords:existence``.

A case-insensitive *substring* search (no word boundaries), so "lanterns" and "lanternfish" both satisfy
"lantern". IFEval passes the term to ``re.search`` as a pattern; we escape it, which is identical for plain
words and avoids regex injection (and crashes) for terms such as "c++".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from steerer.tasks import common
from steerer.tasks.base import Task

# Words to include, by how unlikely an ordinary answer is to contain them anyway (substring match).
INCLUSION_TIERS: tuple[tuple[str, ...], ...] = (
    ("the", "and", "is", "use", "can", "make", "time", "also"),
    ("example", "simple", "history", "future", "friend", "journey", "balance", "energy", "secret", "color"),
    ("lantern", "marmalade", "zeppelin", "kaleidoscope", "accordion", "walrus", "origami", "tambourine",
     "cinnamon", "lighthouse", "pelican", "velvet"),
)


def validate(params: Any) -> list[str]:
    return common.validate_terms("keyword_inclusion", params)


def check(response: str, params: Mapping[str, Any]) -> bool:
    """Every term occurs, case-insensitively, anywhere: a substring, so plurals and compounds count.

    This is IFEval ``keywords:existence`` (``re.search(term, text, re.I)``), with the term taken literally.
    """
    terms = validate(params)
    text = common.require_text("keyword_inclusion", response)
    return all(re.search(re.escape(term), text, re.IGNORECASE) for term in terms)


def render(p: Mapping[str, Any]) -> str:
    terms = list(p["terms"])
    noun = "word" if len(terms) == 1 else "words"
    return f"Mention the {noun} {common.quoted_list(terms, 'and')}."


def demo(params: Mapping[str, Any]) -> str:
    extra = " ".join(f"You can even find a book about {t} there." for t in params["terms"])
    return f"{common.DEMO_SENTENCES[0]} {common.DEMO_SENTENCES[1]} {extra}"


TASK = Task(
    id="keyword_inclusion", kind="lexical", summary="every word occurs (IFEval keywords:existence)",
    checker=check, validator=validate, render=render, sampler=common.tiered_terms(INCLUSION_TIERS),
    demo_text=demo, order=60,
)
