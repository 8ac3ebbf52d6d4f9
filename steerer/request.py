"""What every front hands a backend and gets back: requests, token events, verdicts, results.

A neutral, low module (it imports no backend, driver or controller), so the gRPC service, the CLI, the
library, the benchmarks and every backend (transformers, vLLM) share one set of types without importing
each other. The old import paths (`steerer.core`, `steerer.controller`, `steerer.generation`) re-export
these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from steerer.constraints import Constraint
from steerer.policy import OFF, SteeringPolicy

if TYPE_CHECKING:
    from steerer.monitor import FlagEvent

__all__ = ["Detection", "Request", "Result", "RowSpec", "SamplingParams", "Spec", "TokenEvent", "Verdict"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. A temperature in [0, `sampling.MIN_TEMPERATURE`) (1e-4) is greedy: smaller
    ones would overflow the scaled logits, and sampling at them is greedy in all but name anyway."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE) = greedy
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    def validate(self) -> SamplingParams:
        if not 1 <= self.max_new_tokens <= 8192:
            raise ValueError(f"max_new_tokens must be in 1..8192, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 10):
            raise ValueError(f"temperature must be in [0, 10], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


class Spec(Protocol):
    """What a row is monitored and steered for: a `Request`, or a `RowSpec` (no prompt, no sampling)."""

    constraints: tuple[Constraint, ...]
    policies: dict[str, SteeringPolicy]
    id: str | None

    def policy_for(self, task: str) -> SteeringPolicy: ...


@dataclass(frozen=True)
class Request:
    prompt: str | list[dict]  # a user message, or chat messages
    constraints: tuple[Constraint, ...] = ()
    policy: SteeringPolicy = OFF  # applies to every constraint without its own entry in `policies`
    policies: dict[str, SteeringPolicy] = field(default_factory=dict)
    sampling: SamplingParams = SamplingParams()
    id: str | None = None
    system: str | None = None

    def policy_for(self, task: str) -> SteeringPolicy:
        return self.policies.get(task, self.policy)


@dataclass(frozen=True)
class RowSpec:
    """What one batch row is monitored and steered for (a `Request` without prompt and sampling)."""

    constraints: tuple[Constraint, ...] = ()
    policy: SteeringPolicy = OFF  # for every constraint without its own entry in `policies`
    policies: dict[str, SteeringPolicy] = field(default_factory=dict)
    id: str | None = None

    def policy_for(self, task: str) -> SteeringPolicy:
        return self.policies.get(task, self.policy)


@dataclass(frozen=True)
class Detection:
    """A violation the text so far already decides (certain, unlike a probe's flag, which predicts).

    `token_index` is the token that broke the constraint (the offline onset rule's index: the token that
    wrote the deciding character). The event arrives with the token at which the violation became certain:
    the same token, except for term_exclusion, where a word is known to be whole only when the next
    character (or the end) arrives, usually one token later."""

    task: str
    token_index: int


@dataclass
class TokenEvent:
    request_id: str
    index: int  # position of this token in the response
    token_id: int
    text: str  # the text this token adds
    risks: dict[str, float]  # smoothed risk per constraint after reading the previous token
    steering: dict[str, float]  # alpha applied per constraint in the pass that chose this token
    flags: list[FlagEvent] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)  # violations this token made certain
    # Guarded tasks that vetoed candidates before this token was drawn (task -> candidates vetoed; `steerer.guard`):
    # empty when the first draw passed. A vetoed token never reaches an event.
    redrawn: dict[str, int] = field(default_factory=dict)


@dataclass
class Verdict:
    task: str
    params: dict
    predicted_violation: bool  # from the probe at the end of the response (EOS residual); False if muted
    p_satisfied_end: float | None  # the probe's reading there (None if it is not a finite number)
    flagged: bool  # a flag was raised at some point during generation (never for a muted probe)
    first_flag_token: int | None
    satisfied: bool | None  # the checker's verdict on the final text (None if not checkable)
    probe_reliable: bool = True  # the bank marks the probe reliable (its AUROC interval clears chance)
    probe_muted: bool = False  # unreliable and not overridden: no prediction, no flags, no steering
    detected_at: int | None = None  # token that broke the constraint, where a prefix decided it (`Detection`)
    # Why the probe is unreliable or muted here: the held-out column that failed, or the param outside the
    # range a scoped probe was measured reliable on (`ProbeBank.reliable_for`); "" for a reliable probe.
    probe_note: str = ""


@dataclass
class Result:
    request_id: str
    text: str
    tokens: list[int]
    finish_reason: str
    verdicts: list[Verdict]
    prompt_tokens: int
    steered_tokens: dict[str, int]
    bank_version: str
    traces: dict[str, list[float]] | None = None  # per-token P(satisfied) per task (record=True only)
