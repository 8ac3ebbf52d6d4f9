"""json_format: IFEval ``detectable_format:json_format``.

Strip, drop one leading fence marker of each kind in IFEval's order and a trailing fence, strip again, then
``json.loads``. Bare scalars (``42``, ``"hi"``) are valid JSON there, so they are here. The onset rule asks
whether a prefix can still become an object or array the checker accepts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from steerer.tasks import common
from steerer.tasks.base import Task, first_index

# IFEval removes each of these in turn (each at most once, in this order), then one trailing fence.
FENCES: tuple[str, ...] = ("```json", "```Json", "```JSON", "```")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LITERALS = ("true", "false", "null")


def validate(params: Any) -> None:
    common.validate_empty("json_format", params)


def strip_json_fence(text: str) -> str:
    """The text IFEval hands to ``json.loads``: a ```json ... ``` fence around the payload is dropped."""
    text = text.strip()
    for prefix in FENCES:
        if text.startswith(prefix):
            text = text[len(prefix) :]
    if text.endswith("```"):
        text = text[: -len("```")]
    return text.strip()


def check(response: str, params: Mapping[str, Any]) -> bool:
    """The whole response (optionally in a markdown fence) parses as JSON."""
    validate(params)
    payload = strip_json_fence(common.require_text("json_format", response))
    try:
        json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return True


def onset(params: Mapping[str, Any], prefixes: Sequence[str]) -> int | None:
    """The first token after which the text can no longer be the start of a JSON object or array."""
    return first_index(prefixes, lambda prefix: not json_prefix_ok(prefix))


# -- JSON prefixes -----------------------------------------------------------------------------------------
def json_prefix_ok(text: str) -> bool:
    """Whether `text` can still be extended into a response the json checker accepts, given that it must
    be an object or array: optional whitespace and ```json fence, the value, optional closing fence."""
    s = text.lstrip()
    if any(len(s) < len(f) and f.startswith(s) for f in FENCES):
        return True  # empty, or a fence still being written
    for fence in FENCES:
        if s.startswith(fence):
            s = s[len(fence):].lstrip()
            break
    if not s:
        return True
    if s[0] not in "{[":
        return False
    rest = _scan_json(s)
    if rest is None:
        return False
    return "```".startswith(rest.strip())  # nothing, or (the start of) a closing fence


def _scan_json(s: str) -> str | None:
    """Scan a JSON value prefix. None if it is broken; else the text after the top-level value closed
    ("" if the value is still open)."""
    stack: list[str] = []  # "{" or "["
    expect = "value"  # value | value_or_end | key | key_or_end | colon | comma_or_end
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in " \t\r\n":
            i += 1
            continue
        if expect in ("value", "value_or_end"):
            if c == "]" and expect == "value_or_end":
                i, expect = i + 1, _close(stack, "[")
            elif c in "{[":
                stack.append(c)
                i, expect = i + 1, "key_or_end" if c == "{" else "value_or_end"
            elif c == '"':
                end = _scan_string(s, i)
                if end is None:
                    return ""  # string still open: fine so far
                if end < 0:
                    return None
                i, expect = end, "comma_or_end"
            elif c == "-" or c.isdigit():
                j = i
                while j < n and s[j] in "0123456789+-.eE":
                    j += 1
                number = s[i:j]
                if j == n:
                    return "" if any(_NUMBER.fullmatch(number + x) for x in ("", "0")) else None
                if not _NUMBER.fullmatch(number):
                    return None
                i, expect = j, "comma_or_end"
            elif c in "tfn":
                word = next((w for w in _LITERALS if w[0] == c), "")
                chunk = s[i:i + len(word)]
                if not word.startswith(chunk):
                    return None
                if len(chunk) < len(word):
                    return ""
                i, expect = i + len(word), "comma_or_end"
            else:
                return None
        elif expect in ("key", "key_or_end"):
            if c == "}" and expect == "key_or_end":
                i, expect = i + 1, _close(stack, "{")
            elif c == '"':
                end = _scan_string(s, i)
                if end is None:
                    return ""
                if end < 0:
                    return None
                i, expect = end, "colon"
            else:
                return None
        elif expect == "colon":
            if c != ":":
                return None
            i, expect = i + 1, "value"
        elif expect == "comma_or_end":
            if c == ",":
                i, expect = i + 1, "key" if stack[-1] == "{" else "value"
            elif c == ("}" if stack[-1] == "{" else "]"):
                i, expect = i + 1, _close(stack, stack[-1])
            else:
                return None
        if expect == "done":
            return s[i:]
    return ""


def _close(stack: list[str], opener: str) -> str:
    stack.pop()
    return "done" if not stack else "comma_or_end"


def _scan_string(s: str, start: int) -> int | None:
    """Index after the closing quote of the string opening at `start`; None if still open; -1 if broken."""
    i = start + 1
    while i < len(s):
        c = s[i]
        if c == "\\":
            if i + 1 >= len(s):
                return None
            esc = s[i + 1]
            if esc == "u":
                digits = s[i + 2:i + 6]
                if not all(d in "0123456789abcdefABCDEF" for d in digits):
                    return -1
                if len(digits) < 4:
                    return None
                i += 6
                continue
            if esc not in '"\\/bfnrt':
                return -1
            i += 2
            continue
        if c == '"':
            return i + 1
        if ord(c) < 0x20:  # raw control characters (a newline) are not allowed inside JSON strings
            return -1
        i += 1
    return None


def demo(params: Mapping[str, Any]) -> str:
    return json.dumps({"topic": "public library", "answer": " ".join(common.DEMO_SENTENCES[:3])}, indent=2)


TASK = Task(
    id="json_format", kind="structural", summary="the whole response is valid JSON (IFEval json_format)",
    checker=check, validator=validate, render=lambda p: "Reply only with valid JSON.", sampler=common.no_params,
    demo_text=demo, onset_rule=onset, order=30,
)
