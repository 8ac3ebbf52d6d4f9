"""line_length: every line of the answer is at most ``limit`` characters (a fixed-width display, an SMS
gateway, a terminal). An example of a task plugin: anything a YAML file cannot say, written as a `Task`.

A line that passes the limit is certain the moment its ``limit + 1``-th character arrives, so the task has a
detector; its verdict does not depend on how the text is cut into deltas (one counter per line).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from steerer.tasks import Task, common
from steerer.tasks.base import PhrasingFamily


def validate(params: Any) -> None:
    params = common.require_mapping("line_length", params)
    common.check_keys("line_length", params, ("limit",))
    limit = params["limit"]
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"line_length: limit must be an integer >= 1, got {limit!r}")


def check(response: str, params: Mapping[str, Any]) -> bool:
    validate(params)
    return all(len(line) <= params["limit"] for line in common.require_text("line_length", response).split("\n"))


class LineDetector:
    """Characters on the current line; decided at the character that passes the limit."""

    def __init__(self, limit: int) -> None:
        self.limit, self.column, self.length = limit, 0, 0

    def feed(self, delta: str, final: bool = False) -> int | None:
        for i, c in enumerate(delta):
            self.column = 0 if c == "\n" else self.column + 1
            if self.column > self.limit:
                return self.length + i + 1
        self.length += len(delta)
        return None


def detector(params: Mapping[str, Any]) -> LineDetector:
    return LineDetector(params["limit"])


def sample(rng: random.Random, d: float) -> dict[str, int]:
    return {"limit": common.round_nice(common.loglerp(200, 30, common.jitter(rng, d)))}


def render(params: Mapping[str, Any]) -> str:
    return f"Keep every line at most {params['limit']} characters long."


def demo(params: Mapping[str, Any]) -> str:
    words, lines, line = " ".join(common.DEMO_SENTENCES[:2]).split(), [], ""
    for word in words:
        if len(word) > params["limit"]:
            continue
        if line and len(line) + 1 + len(word) > params["limit"]:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def _say(template: str):
    return lambda p: template.format(**p)


PHRASINGS = (
    PhrasingFamily("plain", "after", (_say("Keep every line at most {limit} characters long."),
                                      _say("No line may be longer than {limit} characters."))),
    PhrasingFamily("system", "system", (_say("Your replies are shown on a {limit}-column display: "
                                             "wrap lines at {limit} characters."),)),
    PhrasingFamily("requirements", "list", (_say("Lines of at most {limit} characters"),)),
    PhrasingFamily("upfront", "before", (_say("Wrap your answer so no line exceeds {limit} characters."),),
                   heldout=True),
)

TASK = Task(id="line_length", kind="structural", summary="every line at most the given number of characters",
            checker=check, validator=validate, render=render, sampler=sample, demo_text=demo, detector=detector,
            order=3000, phrasings=PHRASINGS)
