"""char_count: ``len(response)`` (code points, whitespace included) against a limit. No IFEval equivalent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerer.tasks import common
from steerer.tasks.base import LONG_TOKEN_BUDGET, Task


def validate(params: Any) -> tuple[str, int]:
    return common.validate_length("char_count", params)


def check(response: str, params: Mapping[str, Any]) -> bool:
    """``len(response)`` (code points, whitespace included) against the limit."""
    relation, limit = validate(params)
    return common.compare(len(common.require_text("char_count", response)), relation, limit)


TASK = Task(
    id="char_count", kind="structural", summary="response length in characters against a limit",
    checker=check, validator=validate,
    render=lambda p: f"Answer in {common.RELATION_TEXT[p['relation']]} {p['limit']} characters.",
    sampler=common.length_sampler(600, 30, 40, 500),
    demo_text=lambda p: common.fit_demo(len, p["relation"], p["limit"]),
    detector=common.length_detector(common.CharCounter), progress=common.length_progress(common.CharCounter),
    token_budget=LONG_TOKEN_BUDGET, order=10,
)
