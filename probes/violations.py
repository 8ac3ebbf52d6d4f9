"""Where in a response a constraint was broken: the index of the *violating token*.

The early-warning benchmark compares it with the token at which the monitor first flagged the response,
so "lead" = violating token - first flag token (positive = the flag came first). Everything here is pure:
inputs are the decoded prefixes of the response (`prefixes[i]` = text of tokens 0..i) and whether it ended
with EOS; the caller has already established (with the checker) that the response violates.

Each task's rule is its `Task.onset` (`steerer.tasks`); token indices follow `TokenEvent.index`: generated
tokens are 0..n-1 and an EOS that ended the response is n. Constraints that can only fail at the end (too
short, keyword never mentioned, semantic tasks) and any task whose rule finds nothing point at the *end
index*: the EOS, or the last token when cut off by length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from steerer.tasks import get_task
from steerer.tasks.base import end_index, first_index
from steerer.tasks.json_format import FENCES, json_prefix_ok

__all__ = ["FENCES", "end_index", "first_index", "json_prefix_ok", "token_prefixes", "violating_token"]


def violating_token(task_id: str, params: Mapping[str, Any], prefixes: Sequence[str], ended_by_eos: bool) -> int:
    """The index of the token at which a violating response broke its constraint (see the module doc)."""
    return get_task(task_id).onset(params, prefixes, ended_by_eos)


def token_prefixes(decode: Callable[[list[int]], str], tokens: Sequence[int]) -> list[str]:
    """`prefixes[i]` = decode(tokens[:i+1]), the input `violating_token` expects."""
    return [decode(list(tokens[: i + 1])) for i in range(len(tokens))]
