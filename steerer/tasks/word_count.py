"""word_count: IFEval ``length_constraints:number_words``.

IFEval counts maximal runs of word characters (nltk ``RegexpTokenizer(r"\\w+")``); no punkt. ``less than``
is ``n < limit``, ``at least`` is ``n >= limit``; ``at most`` (ours) is ``n <= limit``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerer.tasks import common
from steerer.tasks.base import LONG_TOKEN_BUDGET, Task


def validate(params: Any) -> tuple[str, int]:
    return common.validate_length("word_count", params)


def check(response: str, params: Mapping[str, Any]) -> bool:
    """Word count (IFEval ``length_constraints:number_words``) against the limit."""
    relation, limit = validate(params)
    return common.compare(common.count_words(common.require_text("word_count", response)), relation, limit)


TASK = Task(
    id="word_count", kind="structural", summary="word count against a limit (IFEval number_words)",
    checker=check, validator=validate,
    render=lambda p: f"Answer in {common.RELATION_TEXT[p['relation']]} {p['limit']} words.",
    sampler=common.length_sampler(120, 8, 10, 90),
    demo_text=lambda p: common.fit_demo(common.count_words, p["relation"], p["limit"]),
    detector=common.length_detector(common.WordCounter), progress=common.length_progress(common.WordCounter),
    token_budget=LONG_TOKEN_BUDGET, order=20,
)
