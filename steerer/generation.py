"""The batched generation loop: a running batch that requests join and leave between steps.

Per step there is one forward pass for the rows already decoding (plus one prefill for rows joining),
then one vectorised token choice, and the `StepHooks` see the batch as tensors: the tokens just chosen
and the residuals tapped at the input position. Nothing on this path loops over rows in Python.

Every per-row tensor lives on the engine's device. What the host needs from a step (tokens, which rows
finished, plus whatever the hooks add, e.g. risks and flag changes) comes back in one transfer
(`StepView.fetch`), so a GPU step synchronises once.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from steerer.driver import to_host
from steerer.engine.base import BatchState, Engine
from steerer.request import SamplingParams  # noqa: F401 (re-exported: it lives with the request types)
from steerer.sampling import MIN_TEMPERATURE, select_tokens


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
    done: torch.Tensor | None = None  # [B] bool: the row leaves the batch after this pass
    _host: HostStep | None = field(default=None, repr=False)

    def fetch(self, *extra: torch.Tensor) -> tuple[HostStep, list[torch.Tensor]]:
        """The step's per-row data on the host, and `extra` tensors (a hook's own), in one transfer.

        The first call moves everything; later calls reuse the step's part and move only their extras."""
        if self._host is not None:
            return self._host, to_host(*extra) if extra else []
        done = self.done if self.done is not None else torch.zeros_like(self.closing)
        base = (self.tokens, self.index, self.closing, self.finished, self.recorded, done)
        host = to_host(*base, *extra)
        self._host = HostStep(*(t.tolist() for t in host[:len(base)]))
        return self._host, host[len(base):]


@dataclass
class HostStep:
    """A step's per-row data as Python lists (from `StepView.fetch`)."""

    tokens: list[int]
    index: list[int]
    closing: list[bool]
    finished: list[bool]
    recorded: list[bool]
    done: list[bool]


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

    def __post_init__(self) -> None:
        self.device = torch.device(getattr(self.engine, "device", "cpu"))
        zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=self.device)  # noqa: E731
        self._tokens = zeros(0)
        self._buffer = zeros(0, 0)
        self._count = zeros(0)
        self._closing = zeros(0, dtype=torch.bool)
        self._eos_hit = zeros(0, dtype=torch.bool)
        self._params: dict[str, torch.Tensor] = {}
        self._sampling: list[SamplingParams] = []  # host copy per row: which rows sample, which use top-p
        self._kinds = _kinds(self._sampling)
        self._eos = torch.tensor(self.engine.eos_token_ids, dtype=torch.long, device=self.device)

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
        index = torch.full((len(rows),), -1, dtype=torch.long, device=self.device)
        if self.hooks is not None:
            self.hooks.before_forward(rows, index)
        logits, state = self.engine.prefill(list(prompts))
        p = _stack_params(params, self.device)
        tokens = select_tokens(logits, p["temperature"], p["top_p"], p["seed"], torch.zeros_like(index), **_kinds(params))
        tokens = self._guard(rows, logits, tokens, p, torch.zeros_like(index), _kinds(params))
        width = max(max(x.max_new_tokens for x in params), self._buffer.shape[1])
        self.state = state if self.state is None else self.engine.merge(self.state, state)
        self.rows += rows
        self._sampling += params
        self._kinds = _kinds(self._sampling)
        n = len(rows)
        self._buffer = torch.cat([_widen(self._buffer, width), torch.zeros(n, width, dtype=torch.long, device=self.device)])
        self._count = torch.cat([self._count, torch.zeros_like(index)])
        self._closing = torch.cat([self._closing, torch.zeros(n, dtype=torch.bool, device=self.device)])
        self._eos_hit = torch.cat([self._eos_hit, torch.zeros(n, dtype=torch.bool, device=self.device)])
        self._params = {k: torch.cat([self._params[k], v]) if self._params else v for k, v in p.items()}
        start = len(self.rows) - n
        self._tokens = torch.cat([self._tokens, tokens])
        new = torch.arange(start, len(self.rows), device=self.device)
        return self._accept(rows, new, tokens, index, torch.zeros(n, dtype=torch.bool, device=self.device))

    def step(self) -> list[Generation]:
        """One decode pass for every running row. Returns the rows that finished in it."""
        if not self.rows:
            return []
        index = self._count - 1 + self._closing.long()  # a closing row is fed its EOS token
        if self.hooks is not None:
            self.hooks.before_forward(self.rows, index)
        logits = self.engine.decode(self.state, self._tokens)
        p = self._params
        tokens = select_tokens(logits, p["temperature"], p["top_p"], p["seed"], self._count, **self._kinds)
        tokens = self._guard(self.rows, logits, tokens, p, self._count, self._kinds)
        closing = self._closing.clone()
        self._tokens = tokens
        return self._accept(self.rows, None, tokens, index, closing)

    def _guard(self, rows: list[Hashable], logits: torch.Tensor, tokens: torch.Tensor, p: dict[str, torch.Tensor],
               steps: torch.Tensor, kinds: dict[str, bool]) -> torch.Tensor:
        """The hooks' `guard` (if any) vets the drawn tokens before they are used (`steerer.guard`), redrawing
        with this step's sampler; only when some row is guarded (`guarding`), so others pay nothing."""
        guard = getattr(self.hooks, "guard", None)
        if guard is None or not self.hooks.guarding(rows):
            return tokens
        return guard(rows, logits, tokens, lambda masked: select_tokens(masked, p["temperature"], p["top_p"],
                                                                        p["seed"], steps, **kinds))

    def _accept(self, rows: list[Hashable], at: torch.Tensor | None, tokens: torch.Tensor, index: torch.Tensor,
                closing: torch.Tensor) -> list[Generation]:
        """Record the chosen tokens of rows `at` (None: every row), tell the hooks, and retire finished rows."""
        sel = slice(None) if at is None else at
        live = ~closing
        is_eos = torch.isin(tokens, self._eos) & ~self._params["ignore_eos"][sel]
        count = self._count[sel]
        recorded = live & ~is_eos
        column = count.clamp(max=self._buffer.shape[1] - 1)
        where = torch.arange(len(count), device=self.device) if at is None else at
        self._buffer[where, column] = torch.where(recorded, tokens, self._buffer[where, column])
        new_count = count + recorded.long()
        finished = live & (is_eos | (new_count >= self._params["max_new_tokens"][sel]))
        self._count[sel] = new_count
        self._eos_hit[sel] = self._eos_hit[sel] | (live & is_eos)
        # A row that chose EOS stays one more pass when tap_eos, so the EOS token's residual is read.
        to_close = finished & self._eos_hit[sel] if self.tap_eos else torch.zeros_like(finished)
        self._closing[sel] = self._closing[sel] | to_close
        done = closing | (finished & ~to_close)
        view = StepView(rows, index, tokens, self.engine.residuals() if self.hooks is not None else {},
                        closing, finished, recorded, done)
        if self.hooks is not None:
            self.hooks.after_forward(view)
        host, _ = view.fetch()  # the step's one transfer (already made if a hook fetched its own data)
        if not any(host.done):
            return []
        start = 0 if at is None else len(self.rows) - len(rows)
        return self._retire([start + i for i, d in enumerate(host.done) if d])

    def remove(self, rows: Sequence[Hashable]) -> None:
        """Drop rows without a result (cancelled requests)."""
        gone = [i for i, row in enumerate(self.rows) if row in set(rows)]
        if gone:
            self._retire(gone, results=False)

    def _retire(self, gone: list[int], results: bool = True) -> list[Generation]:
        out = []
        if results:
            picked = torch.tensor(gone, dtype=torch.long, device=self.device)
            data = torch.cat([self._count[picked, None], self._eos_hit[picked, None].long(),
                              self.state.prompt_lengths[picked, None].to(self.device), self._buffer[picked]], dim=1)
            for i, (n, eos, prompt, *tokens) in zip(gone, to_host(data)[0].tolist(), strict=True):
                out.append(Generation(self.rows[i], tokens[:n], "eos" if eos else "length", prompt))
        dropped = set(gone)
        keep_list = [i for i in range(len(self.rows)) if i not in dropped]
        keep = torch.tensor(keep_list, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in keep_list]
        self._sampling = [self._sampling[i] for i in keep_list]
        self._kinds = _kinds(self._sampling)
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


def _stack_params(params: Sequence[SamplingParams], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "max_new_tokens": torch.tensor([p.max_new_tokens for p in params], dtype=torch.long, device=device),
        "temperature": torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        "top_p": torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
        "seed": torch.tensor([p.seed for p in params], dtype=torch.long, device=device),
        "ignore_eos": torch.tensor([p.ignore_eos for p in params], dtype=torch.bool, device=device),
    }


def _kinds(params: Sequence[SamplingParams]) -> dict[str, bool]:
    """What `select_tokens` would otherwise read off the device: does any row sample, any use top-p."""
    sampled = [p for p in params if p.temperature >= MIN_TEMPERATURE]
    return {"sampled": bool(sampled), "nucleus": any(p.top_p < 1 for p in sampled)}


def _widen(buffer: torch.Tensor, width: int) -> torch.Tensor:
    if buffer.shape[1] >= width:
        return buffer
    pad = torch.zeros(buffer.shape[0], width - buffer.shape[1], dtype=buffer.dtype, device=buffer.device)
    return torch.cat([buffer, pad], dim=1)
