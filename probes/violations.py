"""Where in a response a constraint was broken: the index of the *violating token*.

The early-warning benchmark compares it with the token at which the monitor first flagged the response,
so "lead" = violating token - first flag token (positive = the flag came first). Everything here is pure:
inputs are the decoded prefixes of the response (`prefixes[i]` = text of tokens 0..i) and whether it ended
with EOS; the caller has already established (with the checker) that the response violates.

Token indices follow `TokenEvent.index`: generated tokens are 0..n-1 and an EOS that ended the response is
n. Constraints that can only fail at the end (too short, keyword never mentioned, semantic tasks) and any
task whose rule finds nothing point at the *end index*: the EOS, or the last token when cut off by length.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from probes.checkers import _compare, _whole_word_pattern, count_words

FENCES: tuple[str, ...] = ("```json", "```Json", "```JSON", "```")  # longest first: IFEval's fence markers
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LITERALS = ("true", "false", "null")


def end_index(n_tokens: int, ended_by_eos: bool) -> int:
    """The EOS token's index if the response ended with one, else the last generated token's."""
    return n_tokens if ended_by_eos else max(n_tokens - 1, 0)


def first_index(prefixes: Sequence[str], broken: Callable[[str], bool]) -> int | None:
    """The first i with `broken(prefixes[i])`, for a property that stays broken once broken."""
    return next((i for i, prefix in enumerate(prefixes) if broken(prefix)), None)


# -- per task ----------------------------------------------------------------------------------------------
def term_exclusion_token(prefixes: Sequence[str], terms: Sequence[str]) -> int | None:
    """The token that completes the first forbidden word (whole word, any case) of the final text.

    Matched on the final text, not on each prefix: a prefix ending in "ocean" is not yet a violation if
    the next token makes it "oceans".
    """
    if not prefixes:
        return None
    text = prefixes[-1]
    ends = [m.end() for term in terms for m in [_whole_word_pattern(term).search(text)] if m]
    if not ends:
        return None
    return first_index(prefixes, lambda prefix: len(prefix) >= min(ends))


def length_token(prefixes: Sequence[str], relation: str, limit: int, measure: Callable[[str], int]) -> int | None:
    """For an upper bound, the first token at which the prefix's count breaks it (counts only grow);
    None for `at least`, which can only fail at the end."""
    if relation == "at least":
        return None
    return first_index(prefixes, lambda prefix: not _compare(measure(prefix), relation, limit))


def uppercase_token(prefixes: Sequence[str]) -> int | None:
    """The first token that brings an uppercase (or titlecase) letter."""
    return first_index(prefixes, lambda prefix: any(c.isupper() or c.istitle() for c in prefix))


def json_token(prefixes: Sequence[str]) -> int | None:
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


# -- dispatch ----------------------------------------------------------------------------------------------
def violating_token(task_id: str, params: Mapping[str, Any], prefixes: Sequence[str], ended_by_eos: bool) -> int:
    """The index of the token at which a violating response broke its constraint (see the module doc)."""
    found: int | None = None
    if task_id == "term_exclusion":
        found = term_exclusion_token(prefixes, params["terms"])
    elif task_id == "char_count":
        found = length_token(prefixes, params["relation"], params["limit"], len)
    elif task_id == "word_count":
        found = length_token(prefixes, params["relation"], params["limit"], count_words)
    elif task_id == "lowercase":
        found = uppercase_token(prefixes)
    elif task_id == "json_format":
        found = json_token(prefixes)
    return end_index(len(prefixes), ended_by_eos) if found is None else found


def token_prefixes(decode: Callable[[list[int]], str], tokens: Sequence[int]) -> list[str]:
    """`prefixes[i]` = decode(tokens[:i+1]), the input `violating_token` expects."""
    return [decode(list(tokens[: i + 1])) for i in range(len(tokens))]

