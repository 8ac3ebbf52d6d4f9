"""The task object: one constraint's checker, parameter validation, instruction text, parameter sampler,
compliant demonstration, violation-onset rule and token budget, as one frozen value.

Token indices in the onset rule follow `TokenEvent.index`: generated tokens are 0..n-1 and an EOS that
ended the response is n. `prefixes[i]` is the decoded text of tokens 0..i. A rule returns the index of the
token at which a violating response broke the constraint, or None where it can only fail at the end (too
short, a keyword never mentioned, a tone): the violation then sits at the *end index* (the EOS, or the
last token when the response was cut off by its length limit).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["structural", "lexical", "semantic"]
Params = dict[str, Any]

TOKEN_BUDGET = 112  # new tokens enough to judge format, words and tone
LONG_TOKEN_BUDGET = 160  # for tasks whose label needs the whole response (the length tasks)

Checker = Callable[[str, Mapping[str, Any]], bool]
OnsetRule = Callable[[Mapping[str, Any], Sequence[str]], "int | None"]


def end_index(n_tokens: int, ended_by_eos: bool) -> int:
    """The EOS token's index if the response ended with one, else the last generated token's."""
    return n_tokens if ended_by_eos else max(n_tokens - 1, 0)


def first_index(prefixes: Sequence[str], broken: Callable[[str], bool]) -> int | None:
    """The first i with `broken(prefixes[i])`, for a property that stays broken once broken."""
    return next((i for i, prefix in enumerate(prefixes) if broken(prefix)), None)


def at_the_end(params: Mapping[str, Any], prefixes: Sequence[str]) -> None:
    """The onset rule of a constraint that can only be judged on the whole response."""
    return None


@dataclass(frozen=True)
class Task:
    """One constraint. Use the methods; the callables behind them are fields so a task stays data."""

    id: str
    kind: Kind
    summary: str
    checker: Checker
    validator: Callable[[Any], object]
    render: Callable[[Mapping[str, Any]], str]  # the canonical instruction text (params already valid)
    sampler: Callable[[random.Random, float], Params]
    demo_text: Callable[[Mapping[str, Any]], str]  # a compliant answer to `common.DEMO_REQUEST`
    onset_rule: OnsetRule = at_the_end
    token_budget: int = TOKEN_BUDGET  # new tokens a response needs for its label (dataset building)
    order: int = 1000  # position in the registry (`TASKS` is sorted by it, then by id)

    def validate(self, params: Any) -> None:
        """Raise ``ValueError`` (one line) if ``params`` are malformed for this task."""
        self.validator(params)

    def instruction(self, params: Mapping[str, Any]) -> str:
        """The natural-language instruction added to a prompt, e.g. "Use at most 25 words."."""
        self.validate(params)
        return self.render(params)

    def check(self, response: str, params: Mapping[str, Any]) -> bool:
        """Whether ``response`` satisfies the constraint (the probe's label)."""
        return self.checker(response, params)

    def sample_params(self, rng: random.Random, difficulty: float) -> Params:
        """Random parameters; ``difficulty`` 0 is easy for a small model, 1 hard."""
        if isinstance(difficulty, bool) or not isinstance(difficulty, int | float) or not 0 <= difficulty <= 1:
            raise ValueError(f"difficulty must be a number in [0, 1], got {difficulty!r}")
        params = self.sampler(rng, float(difficulty))
        self.validate(params)
        return params

    def demo(self, params: Mapping[str, Any]) -> str:
        """A compliant answer to ``DEMO_REQUEST`` for the one-shot aid (checked before it is returned)."""
        self.validate(params)
        return _demo_cached(self, json.dumps(params, sort_keys=True))

    def onset(self, params: Mapping[str, Any], prefixes: Sequence[str], ended_by_eos: bool) -> int:
        """The index of the token at which a violating response broke the constraint (see the module doc).

        The caller has established with the checker that the response violates."""
        found = self.onset_rule(params, prefixes)
        return end_index(len(prefixes), ended_by_eos) if found is None else found


@functools.lru_cache(maxsize=1024)
def _demo_cached(task: Task, params_json: str) -> str:
    # Cached: the topic demo is checked with the embedding model, and datasets reuse parameters.
    params = json.loads(params_json)
    text = task.demo_text(params)
    if not text or not task.check(text, params):
        raise ValueError(f"{task.id}: no compliant demonstration for params {dict(params)}")
    return text
