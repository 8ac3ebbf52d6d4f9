"""The task object: one constraint's checker, parameter validation, instruction text, parameter sampler,
compliant demonstration, violation-onset rule and token budget, as one frozen value.

Token indices in the onset rule follow `TokenEvent.index`: generated tokens are 0..n-1 and an EOS that
ended the response is n. `prefixes[i]` is the decoded text of tokens 0..i. A rule returns the index of the
token at which a violating response broke the constraint, or None where it can only fail at the end (too
short, a keyword never mentioned, a tone): the violation then sits at the *end index* (the EOS, or the
last token when the response was cut off by its length limit).

Where a prefix already decides a violation (a forbidden word written, an at-most limit passed, a capital
letter, text no JSON can follow), the task has a *detector* (`Task.detect(params)`): an incremental check
fed the response's text as it grows, which reports the violation once it is certain. The task's onset rule
is that same detector run over the prefixes (`detector_onset`), so the live monitor (`Controller`) and
the offline labels cannot disagree. Tasks without a detector (lower limits, keywords, tone, topic,
register) can still be met later, so only the end decides them.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Kind = Literal["structural", "lexical", "semantic"]
Params = dict[str, Any]

TOKEN_BUDGET = 112  # new tokens enough to judge format, words and tone
LONG_TOKEN_BUDGET = 160  # for tasks whose label needs the whole response (the length tasks)

Checker = Callable[[str, Mapping[str, Any]], bool]
# Several responses at once (each with its own params): the same verdicts as the checker one by one, for a
# checker whose cost is mostly per call (the topic task's MiniLM embedding: one batched encode, not N).
BatchChecker = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], list[bool]]
OnsetRule = Callable[[Mapping[str, Any], Sequence[str]], "int | None"]


class Detector(Protocol):
    """An incremental violation check for one response, fed its text as it grows.

    `feed(delta, final)` appends `delta` (the text the latest token added; `final`: no text follows) and
    returns, once the text so far decides a violation, the character position in the whole text where the
    deciding match ends (the violation is attributed to the token that wrote that character); None while
    the response can still comply. After it has returned a position it is not fed again. Its result depends
    only on the whole text and `final`, not on how the text was cut into deltas (tested); its cost per call
    is bounded by the delta (plus a short tail for word matches), not by the text so far.
    """

    def feed(self, delta: str, final: bool = False) -> int | None: ...


class RepairingDetector(Detector, Protocol):
    """A detector that also knows the fix for a token the guard vetoes (`steerer.guard`): `repair(delta)`
    returns the text to write instead of `delta` (lowercase: `delta.lower()`), or None. Optional: the guard
    tries the repair (when it is one token that passes every guarded detector) before the next-best token,
    which after a vetoed " The" is rarely fluent."""

    def repair(self, delta: str) -> str | None: ...


class EndCheckingDetector(Detector, Protocol):
    """A detector that also judges what only the end decides, for the guard (`steerer.guard`): `end_ok(text)`
    says whether the response may end on `text` (EOS is vetoed while it says no, a bounded number of tokens);
    `loop_ngram` (optional, an int; 0: none) asks the guard to veto a token repeating an n-gram of that many tokens
    (`loop_occurrence`, optional: which occurrence is vetoed, default 2, the first repeat)."""

    def end_ok(self, text: str) -> bool: ...


DetectorFactory = Callable[[Mapping[str, Any]], "Detector | None"]


class Progress(Protocol):
    """How far a response has come towards its constraint's limit, fed its text as it grows: `feed(delta)`
    returns the fraction so far (count / limit for a count task). A forecast input, not a verdict."""

    def feed(self, delta: str) -> float: ...


ProgressFactory = Callable[[Mapping[str, Any]], Progress]


def end_index(n_tokens: int, ended_by_eos: bool) -> int:
    """The EOS token's index if the response ended with one, else the last generated token's."""
    return n_tokens if ended_by_eos else max(n_tokens - 1, 0)


def first_index(prefixes: Sequence[str], broken: Callable[[str], bool]) -> int | None:
    """The first i with `broken(prefixes[i])`, for a property that stays broken once broken."""
    return next((i for i, prefix in enumerate(prefixes) if broken(prefix)), None)


def detector_onset(make: DetectorFactory) -> OnsetRule:
    """The onset rule of a task with a detector: the detector run over the response's decoded prefixes,
    giving the index of the token that wrote the character deciding the violation (None if nothing does).
    The last prefix is fed as final (no text follows it: the response ended, by EOS or by its length
    limit). A prefix that does not extend the one before (a decode that changed its mind about an
    incomplete character) restarts the detector on it."""

    def onset(params: Mapping[str, Any], prefixes: Sequence[str]) -> int | None:
        detector = make(params)
        previous = ""
        for i, prefix in enumerate(prefixes):
            if detector is None:
                return None
            final = i == len(prefixes) - 1
            if prefix.startswith(previous):
                found = detector.feed(prefix[len(previous):], final)
            else:
                detector = make(params)
                found = detector.feed(prefix, final)
            if found is not None:
                return next(j for j, p in enumerate(prefixes) if len(p) >= found)
            previous = prefix
        return None

    return onset


def no_detector(params: Mapping[str, Any]) -> None:
    """The detector of a constraint no prefix can decide (it may still be met later)."""
    return None


def at_the_end(params: Mapping[str, Any], prefixes: Sequence[str]) -> None:
    """The onset rule of a constraint that can only be judged on the whole response."""
    return None


@dataclass(frozen=True)
class PhrasingFamily:
    """One way of stating a task's instruction for the probe corpus (`probes.phrasings`): where it sits
    (``placement``: after | before | system | list), its wording variants (params -> sentence) and whether it
    is held out of training. Built-in tasks keep theirs in `probes.phrasings`; task files and plugins carry
    their own here."""

    name: str
    placement: str
    sentences: tuple[Callable[[Mapping[str, Any]], str], ...]
    heldout: bool = False


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
    onset_rule: OnsetRule = at_the_end  # set from `detector` when the task has one
    detector: DetectorFactory = no_detector  # params -> a fresh Detector, or None (no prefix decides)
    progress: ProgressFactory | None = None  # params -> a fresh Progress (tasks with a count limit)
    batch_checker: BatchChecker | None = None  # several responses in one call (None: the checker, one by one)
    token_budget: int = TOKEN_BUDGET  # new tokens a response needs for its label (dataset building)
    order: int = 1000  # position in the registry (`TASKS` is sorted by it, then by id)
    phrasings: tuple[PhrasingFamily, ...] = ()  # a task file's or plugin's own (built-ins: `probes.phrasings`)

    def __post_init__(self) -> None:
        # A task with a detector takes its onset rule from it (whatever was passed: `dataclasses.replace`
        # hands the derived rule back in), so the live detector and the offline rule cannot disagree.
        if self.detector is not no_detector:
            object.__setattr__(self, "onset_rule", detector_onset(self.detector))

    def detect(self, params: Mapping[str, Any]) -> Detector | None:
        """A fresh detector for one response under ``params`` (validated), or None where no prefix can decide
        a violation of these params (an at-least limit, a keyword, a tone)."""
        self.validate(params)
        return self.detector(params)

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

    def check_many(self, responses: Sequence[str], params: Sequence[Mapping[str, Any]]) -> list[bool]:
        """`check` for each (response, params) pair, batched where the task has a `batch_checker`."""
        if len(responses) != len(params):
            raise ValueError(f"{self.id}: {len(responses)} responses but {len(params)} parameter sets")
        if self.batch_checker is not None and len(responses) > 1:
            return [bool(v) for v in self.batch_checker(responses, params)]
        return [bool(self.checker(r, p)) for r, p in zip(responses, params, strict=True)]

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
