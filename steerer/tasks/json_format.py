"""json_format: IFEval ``detectable_format:json_format``.

Strip, drop one leading fence marker of each kind in IFEval's order and a trailing fence, strip again, then
``json.loads``. Bare scalars (``42``, ``"hi"``, even ``NaN``) are valid JSON there, so they are here. The
detector (and so the onset rule) asks whether a prefix can still become a text the checker accepts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from steerer.tasks import common
from steerer.tasks.base import Task

# IFEval removes each of these in turn (each at most once, in this order), then one trailing fence.
FENCES: tuple[str, ...] = ("```json", "```Json", "```JSON", "```")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")


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


# -- JSON prefixes -----------------------------------------------------------------------------------------
_JSON_WS = " \t\n\r"  # whitespace json.loads allows inside a value
_NUMBER_CHARS = "0123456789+-.eE"
_HEX = "0123456789abcdefABCDEF"
# Python's json.loads (the checker) also takes NaN, Infinity and -Infinity as values.
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
_LITERAL_BY_FIRST = {w[0]: w for w in _LITERALS if w[0] != "-"}


def _after_fences(s: str) -> str | None:
    """IFEval's leading-fence removal on a text that starts with `s` (leading whitespace already stripped):
    the rest of `s` after it, or None while `s` is too short to say (a fence may still be being written)."""
    for fence in FENCES:
        if s.startswith(fence):
            s = s[len(fence):]
        elif fence.startswith(s):
            return None
    return s


class JsonDetector:
    """Decided at the first character after which no continuation passes the json checker (`check`): an
    incremental scanner of the checker's pipeline (strip, leading fences in IFEval's order, one JSON value
    as `json.loads` reads it -- scalars, NaN and Infinity included --, an optional closing fence). Each
    character is looked at once (O(delta) per token; the state is a stack of open containers and the token
    being read). Not modelled: nesting deep enough for `json.loads` to hit Python's recursion limit."""

    def __init__(self) -> None:
        self.length = 0
        self.lead: str | None = ""  # text from the first non-whitespace character until the fences are known
        self.stack: list[str] = []
        self.expect = "value"  # value | value_or_end | key | key_or_end | colon | comma_or_end | after
        self.top = True  # no value started yet (whitespace here: any Unicode space, as str.strip drops it)
        self.string: str | None = None  # "key" or "value" while inside a string
        self.escape = -1  # -1: not in an escape; 0: after a backslash; 1..4: hex digits of \u read so far
        self.number: str | None = None
        self.literal: tuple[str, int] | None = None
        self.ticks = 0  # backticks of a closing fence after the value

    def feed(self, delta: str, final: bool = False) -> int | None:
        for c in delta:
            self.length += 1
            if self.lead is not None:
                if not self.lead and c.isspace():
                    continue
                self.lead += c
                rest = _after_fences(self.lead)
                if rest is None:
                    continue
                self.lead = None
                if not all(self._char(r) for r in rest):
                    return self.length
            elif not self._char(c):
                return self.length
        return None

    # one character of the text after the leading fences; False: no JSON can follow
    def _char(self, c: str) -> bool:
        if self.string is not None:
            return self._string_char(c)
        if self.number is not None:
            if c in _NUMBER_CHARS:
                self.number += c
                return any(_NUMBER.fullmatch(self.number + x) for x in ("", "0"))
            if self.number == "-" and c == "I":
                self.number, self.literal = None, ("-Infinity", 2)
                return True
            complete = _NUMBER.fullmatch(self.number)
            self.number = None
            if not complete:
                return False
            self._value_done()
        if self.literal is not None:
            word, i = self.literal
            if c != word[i]:
                return False
            self.literal = (word, i + 1) if i + 1 < len(word) else None
            if self.literal is None:
                self._value_done()
            return True
        expect = self.expect
        if expect == "after":
            if c.isspace():
                return self.ticks in (0, 3)
            if c == "`" and self.ticks < 3:
                self.ticks += 1
                return True
            return False
        if c in _JSON_WS or (self.top and c.isspace()):
            return True
        if expect in ("value", "value_or_end"):
            self.top = False
            if c == "]" and expect == "value_or_end":
                self._close()
            elif c in "{[":
                self.stack.append(c)
                self.expect = "key_or_end" if c == "{" else "value_or_end"
            elif c == '"':
                self.string = "value"
            elif c == "-" or c.isdigit():
                self.number = c
            elif c in _LITERAL_BY_FIRST:
                self.literal = (_LITERAL_BY_FIRST[c], 1)
            else:
                return False
            return True
        if expect in ("key", "key_or_end"):
            if c == "}" and expect == "key_or_end":
                self._close()
            elif c == '"':
                self.string = "key"
            else:
                return False
            return True
        if expect == "colon":
            if c != ":":
                return False
            self.expect = "value"
            return True
        # comma_or_end
        if c == ",":
            self.expect = "key" if self.stack[-1] == "{" else "value"
        elif c == ("}" if self.stack[-1] == "{" else "]"):
            self._close()
        else:
            return False
        return True

    def _string_char(self, c: str) -> bool:
        if self.escape == 0:
            if c == "u":
                self.escape = 1
            elif c in '"\\/bfnrt':
                self.escape = -1
            else:
                return False
        elif self.escape > 0:
            if c not in _HEX:
                return False
            self.escape = self.escape + 1 if self.escape < 4 else -1
        elif c == "\\":
            self.escape = 0
        elif c == '"':
            if self.string == "key":
                self.expect = "colon"
            else:
                self._value_done()
            self.string = None
        elif ord(c) < 0x20:  # raw control characters (a newline) are not allowed inside JSON strings
            return False
        return True

    def _value_done(self) -> None:
        self.expect = "after" if not self.stack else "comma_or_end"

    def _close(self) -> None:
        self.stack.pop()
        self._value_done()


def detector(params: Mapping[str, Any]) -> JsonDetector:
    return JsonDetector()


def json_prefix_ok(text: str) -> bool:
    """Whether `text` can still be extended into a response the json checker accepts."""
    return JsonDetector().feed(text) is None


def demo(params: Mapping[str, Any]) -> str:
    return json.dumps({"topic": "public library", "answer": " ".join(common.DEMO_SENTENCES[:3])}, indent=2)


TASK = Task(
    id="json_format", kind="structural", summary="the whole response is valid JSON (IFEval json_format)",
    checker=check, validator=validate, render=lambda p: "Reply only with valid JSON.", sampler=common.no_params,
    demo_text=demo, detector=detector, order=30,
)
