"""The batched generation loop: a running batch that requests join and leave between steps.

Per step there is one forward pass for the rows already decoding (plus one prefill for rows joining),
then one vectorised token choice, and the `StepHooks` see the batch as tensors: the tokens just chosen
and the residuals tapped at the input position. Nothing on this path loops over rows in Python.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from steerer.engine.base import BatchState, Engine
from steerer.sampling import select_tokens


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


@dataclass
class StepView:
    """One forward pass as the hooks see it; every tensor is aligned with `rows`.

    `residuals[L]` is the residual after layer L at the input position of this pass: the last prompt
    token for rows in their prefill, else the token generated in the previous step. `closing` rows fed
    their EOS token in this pass (tap_eos): their residual is the EOS residual and `tokens` is unused.
    """

    rows: list[Hashable]
    index: torch.Tensor  # [B] position of the input token in the response: -1 = last prompt token
    tokens: torch.Tensor  # [B] tokens chosen in this pass
    residuals: dict[int, torch.Tensor]
    closing: torch.Tensor  # [B] bool
    finished: torch.Tensor  # [B] bool: the chosen token ends the row (EOS or length)
    recorded: torch.Tensor  # [B] bool: the chosen token was appended to the response (not EOS, not closing)


class StepHooks(Protocol):
    def before_forward(self, rows: list[Hashable], index: torch.Tensor) -> None:
        """Set per-row steering for the pass about to run."""

    def after_forward(self, view: StepView) -> None:
        """Read the pass: score residuals, update monitors, stream tokens."""


@dataclass
class Generation:
    row: Hashable
    tokens: list[int]
    finish_reason: str  # "eos" | "length"
    prompt_tokens: int


@dataclass
class RunningBatch:
    """The stateful core of generation; see the module docstring."""

    engine: Engine
    hooks: StepHooks | None = None
    tap_eos: bool = False
    rows: list[Hashable] = field(default_factory=list)
    state: BatchState | None = None
    _tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    _buffer: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    _count: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    _closing: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    _eos_hit: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    _params: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._eos = torch.tensor(self.engine.eos_token_ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: Sequence[Hashable], prompts: Sequence[list[int]],
            params: Sequence[SamplingParams]) -> list[Generation]:
        """Prefill new rows and merge them into the running batch. Returns rows already finished."""
        if not rows:
            return []
        if len(set(rows) | set(self.rows)) != len(rows) + len(self.rows):
            raise ValueError("row ids must be unique within a running batch")
        params = [p.validate() for p in params]
        rows = list(rows)
        index = torch.full((len(rows),), -1, dtype=torch.long)
        if self.hooks is not None:
            self.hooks.before_forward(rows, index)
        logits, state = self.engine.prefill(list(prompts))
        p = _stack_params(params)
        tokens = select_tokens(logits, p["temperature"], p["top_p"], p["seed"], torch.zeros(len(rows), dtype=torch.long))
        width = max(int(p["max_new_tokens"].max()), self._buffer.shape[1])
        self.state = state if self.state is None else self.engine.merge(self.state, state)
        self.rows += rows
        self._buffer = torch.cat([_widen(self._buffer, width), torch.zeros(len(rows), width, dtype=torch.long)])
        self._count = torch.cat([self._count, torch.zeros(len(rows), dtype=torch.long)])
        self._closing = torch.cat([self._closing, torch.zeros(len(rows), dtype=torch.bool)])
        self._eos_hit = torch.cat([self._eos_hit, torch.zeros(len(rows), dtype=torch.bool)])
        self._params = {k: torch.cat([self._params[k], v]) if self._params else v for k, v in p.items()}
        start = len(self.rows) - len(rows)
        self._tokens = torch.cat([self._tokens, tokens])
        new = torch.arange(start, len(self.rows))
        return self._accept(new, tokens, index, torch.zeros(len(rows), dtype=torch.bool))

    def step(self) -> list[Generation]:
        """One decode pass for every running row. Returns the rows that finished in it."""
        if not self.rows:
            return []
        index = self._count - 1 + self._closing.long()  # a closing row is fed its EOS token
        if self.hooks is not None:
            self.hooks.before_forward(self.rows, index)
        logits = self.engine.decode(self.state, self._tokens)
        p = self._params
        tokens = select_tokens(logits, p["temperature"], p["top_p"], p["seed"], self._count)
        closing = self._closing.clone()
        self._tokens = tokens
        return self._accept(torch.arange(len(self.rows)), tokens, index, closing)

    def _accept(self, at: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor,
                closing: torch.Tensor) -> list[Generation]:
        """Record the chosen tokens of rows `at`, tell the hooks, and retire finished rows."""
        live = ~closing
        is_eos = torch.isin(tokens, self._eos) & ~self._params["ignore_eos"][at]
        count = self._count[at]
        recorded = live & ~is_eos
        self._buffer[at[recorded], count[recorded]] = tokens[recorded]
        new_count = count + recorded.long()
        finished = live & (is_eos | (new_count >= self._params["max_new_tokens"][at]))
        self._count[at] = new_count
        self._eos_hit[at] |= live & is_eos
        if self.hooks is not None:
            view = StepView([self.rows[i] for i in at.tolist()], index, tokens, dict(self.engine.hooks.captured),
                            closing, finished, recorded)
            self.hooks.after_forward(view)
        # A row that chose EOS stays one more pass when tap_eos, so the EOS token's residual is read.
        to_close = finished & self._eos_hit[at] if self.tap_eos else torch.zeros_like(finished)
        self._closing[at[to_close]] = True
        done = closing | (finished & ~to_close)
        if not bool(done.any()):
            return []
        return self._retire(at[done])

    def remove(self, rows: Sequence[Hashable]) -> None:
        """Drop rows without a result (cancelled requests)."""
        gone = [i for i, row in enumerate(self.rows) if row in set(rows)]
        if gone:
            self._retire(torch.tensor(gone, dtype=torch.long))

    def _retire(self, gone: torch.Tensor) -> list[Generation]:
        out = []
        for i in gone.tolist():
            n = int(self._count[i])
            reason = "eos" if bool(self._eos_hit[i]) else "length"
            out.append(Generation(self.rows[i], self._buffer[i, :n].tolist(), reason,
                                  int(self.state.prompt_lengths[i])))
        keep_mask = torch.ones(len(self.rows), dtype=torch.bool)
        keep_mask[gone] = False
        keep = keep_mask.nonzero().squeeze(1)
        self.rows = [self.rows[i] for i in keep.tolist()]
        for name in ("_tokens", "_buffer", "_count", "_closing", "_eos_hit"):
            setattr(self, name, getattr(self, name)[keep])
        self._params = {k: v[keep] for k, v in self._params.items()}
        self.state = self.engine.select(self.state, keep) if self.rows else None
        return out


def generate(engine: Engine, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams],
             hooks: StepHooks | None = None, tap_eos: bool = False) -> list[Generation]:
    """Generate for a static batch of token-id prompts; results in prompt order."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    batch = RunningBatch(engine, hooks, tap_eos)
    done = batch.add(list(range(len(prompts))), prompts, params)
    while len(batch):
        done += batch.step()
    return sorted(done, key=lambda g: g.row)


@dataclass
class ChainedHooks:
    """Several step hooks run in order (e.g. steering first, then a recorder)."""

    parts: Sequence[StepHooks | None]

    def before_forward(self, rows: list[Hashable], index: torch.Tensor) -> None:
        for part in self.parts:
            if part is not None:
                part.before_forward(rows, index)

    def after_forward(self, view: StepView) -> None:
        for part in self.parts:
            if part is not None:
                part.after_forward(view)


def _stack_params(params: Sequence[SamplingParams]) -> dict[str, torch.Tensor]:
    return {
        "max_new_tokens": torch.tensor([p.max_new_tokens for p in params], dtype=torch.long),
        "temperature": torch.tensor([p.temperature for p in params], dtype=torch.float32),
        "top_p": torch.tensor([p.top_p for p in params], dtype=torch.float32),
        "seed": torch.tensor([p.seed for p in params], dtype=torch.long),
        "ignore_eos": torch.tensor([p.ignore_eos for p in params], dtype=torch.bool),
    }


def _widen(buffer: torch.Tensor, width: int) -> torch.Tensor:
    if buffer.shape[1] >= width:
        return buffer
    return torch.cat([buffer, torch.zeros(buffer.shape[0], width - buffer.shape[1], dtype=buffer.dtype)], dim=1)
