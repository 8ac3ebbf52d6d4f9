"""Monitoring and steering inside transformers' own `model.generate()`, as a `LogitsProcessor`.

For callers who already use `generate()`: the same probes, risks, flags, verdicts and steering policies as
`Steerer`, per batch row, without switching to steerer's generation loop.

    with attach_steerer(model, tokenizer, bank, constraints=[Constraint("lowercase")],
                        policy=SteeringPolicy("conditional", 20.0)) as proc:
        out = model.generate(**enc, logits_processor=LogitsProcessorList([proc]), return_dict_in_generate=True)
        results = proc.finish(out)                  # list[Result], one per batch row

How it lines up with `Steerer`: `generate()` runs the prefill, then calls the processor once after every
forward pass, before the next token is chosen. Forward hooks (`LayerHooks`) tap the bank's layers in that
pass; the processor scores them (pass t read the token chosen in pass t-1, or the last prompt token for
the prefill), updates the `Monitor`, and sets the steering coefficients of pass t+1 from the flags and
risks after pass t, as `Steerer.before_forward` does. A forward pre-hook on the model recognises a
prefill (empty cache), puts the hooks in the prompt phase (so `Where.GENERATED` steering leaves the prompt
alone) and starts fresh per-row state, so one attached processor serves several `generate()` calls. The
scores are returned unchanged.

A token's id is only visible to the processor one call later (it is chosen after the call), so its
`TokenEvent` is emitted then, and the last token's in `finish()`. A row that chose EOS while others were
still running is fed its EOS in the next pass, which is exactly `Steerer`'s closing pass (the EOS residual
gives the end verdict). For rows that chose EOS in the very last step, `finish()` runs that one pass
itself when it gets the cache (`return_dict_in_generate=True`); given only the sequences, their end
verdict falls back to the last token's reading, as `Steerer` does for rows cut off by length.

Supported: greedy and sampled decoding with the KV cache (the default). Not supported: beam search,
assisted decoding, `use_cache=False`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor

from steerer.bank import ProbeBank
from steerer.constraints import Constraint
from steerer.core import Result, TokenEvent, build_verdicts
from steerer.generation import StepView
from steerer.model import model_fingerprint
from steerer.monitor import FlagEvent, Monitor, MonitorConfig
from steerer.policy import OFF, PolicyTable, SteeringPolicy
from steerer.taps import LayerHooks, Phase, Where


@dataclass(frozen=True)
class RowSpec:
    """What one batch row is monitored and steered for (a `Request` without prompt and sampling)."""

    constraints: tuple[Constraint, ...] = ()
    policy: SteeringPolicy = OFF  # for every constraint without its own entry in `policies`
    policies: dict[str, SteeringPolicy] = field(default_factory=dict)
    id: str | None = None

    def policy_for(self, task: str) -> SteeringPolicy:
        return self.policies.get(task, self.policy)


@dataclass
class _Row:
    spec: RowSpec
    request_id: str
    tasks: list[str]
    columns: torch.Tensor
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    steered: dict[str, int] = field(default_factory=dict)
    done: bool = False  # no more passes are read for this row
    eos: bool = False  # the row chose EOS
    pending: tuple[dict[str, float], dict[str, float], list[FlagEvent]] | None = None  # the chosen token's event


@dataclass
class _Generation:
    """Per-`generate()` state: one monitor, the rows, and where the sequence stands."""

    monitor: Monitor
    rows: list[_Row]
    prompt_len: int
    prompt_mask: torch.Tensor  # [B, T0]
    calls: int = 0
    events: list[TokenEvent] = field(default_factory=list)


class SteererLogitsProcessor(LogitsProcessor):
    """Probe monitoring and steering for `model.generate()`; see the module docstring.

    Build it with `attach_steerer` (or call `attach()` / `remove()`), pass it in `logits_processor`, and
    call `finish(output)` after `generate()` for the per-row `Result`s. `events()` drains the token events.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, bank: ProbeBank, rows: RowSpec | Sequence[RowSpec],
                 monitor_config: MonitorConfig | None = None, where: Where = Where.GENERATED,
                 capacity: int = 256, record: bool = False, check_bank: bool = True,
                 use_unreliable_probes: bool = False):
        if check_bank:
            bank.check_model(model_fingerprint(model), int(model.config.hidden_size))
        self.model = model
        self.tokenizer = tokenizer
        self.bank = bank
        self.rows = rows
        for spec in [rows] if isinstance(rows, RowSpec) else rows:
            _validate(spec, bank)
        self.monitor_config = monitor_config or MonitorConfig()
        self.record = record
        self.muted = bank.muted(use_unreliable_probes)  # as in Steerer: unreliable probes neither flag nor steer
        self.policies = PolicyTable(bank, capacity, where, muted=self.muted)
        self.hooks = LayerHooks(model, tap_layers=bank.layers, steering=self.policies.steering)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._applied = torch.zeros(capacity, len(bank.probes))  # coefficients of the pass about to run
        self._pre_hook = None
        self._gen: _Generation | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def attach(self) -> SteererLogitsProcessor:
        if self._pre_hook is None:
            self.hooks.attach()
            self._pre_hook = self.model.register_forward_pre_hook(self._before_model, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        self.hooks.remove()

    def __enter__(self) -> SteererLogitsProcessor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def monitor(self) -> Monitor:
        if self._gen is None:
            raise RuntimeError("no generation has started yet")
        return self._gen.monitor

    # -- the forward pre-hook: a prefill starts a generation -------------------------------------------
    def _before_model(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("SteererLogitsProcessor needs input_ids (inputs_embeds are not supported)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        if past > 0:
            return
        gen = self._gen
        if gen is not None and kwargs.get("use_cache") is False and ids.shape[1] == gen.prompt_len + gen.calls:
            raise RuntimeError("SteererLogitsProcessor needs generate(..., use_cache=True)")
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None or mask.ndim != 2 else mask
        self._begin(ids.shape[0], ids.shape[1], mask.detach().to("cpu", torch.long))

    def _begin(self, batch: int, prompt_len: int, prompt_mask: torch.Tensor) -> None:
        specs = [self.rows] * batch if isinstance(self.rows, RowSpec) else list(self.rows)
        if len(specs) != batch:
            raise ValueError(f"the processor was given {len(specs)} row specs for a batch of {batch} rows")
        if batch > self.policies.capacity:
            raise ValueError(f"batch of {batch} rows exceeds the processor's capacity {self.policies.capacity}")
        monitor = Monitor(self.bank, self.monitor_config, batch, record=self.record, muted=self.muted)
        rows = []
        for b, spec in enumerate(specs):
            tasks = [c.task for c in spec.constraints]
            monitor.register(b, tasks)
            self.policies.set(b, {t: spec.policy_for(t) for t in tasks})
            columns = torch.tensor([self.bank.index(t) for t in tasks], dtype=torch.long)
            rows.append(_Row(spec, spec.id or f"row-{b}", tasks, columns, steered=dict.fromkeys(tasks, 0)))
        self._gen = _Generation(monitor, rows, prompt_len, prompt_mask)
        # The prefill's coefficients, as Steerer.before_forward computes them for index -1.
        coeffs = self.policies.coefficients(torch.arange(batch), monitor.flags, monitor.smoothed)
        if self.policies.where is Where.GENERATED:
            coeffs = torch.zeros_like(coeffs)
        self._set_coefficients(coeffs)
        self.hooks.phase = Phase.PROMPT

    # -- the processor ----------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        gen = self._gen
        if gen is None:
            raise RuntimeError("SteererLogitsProcessor is not attached (use attach_steerer or .attach())")
        if input_ids.shape[0] != len(gen.rows) or input_ids.shape[1] != gen.prompt_len + gen.calls:
            raise RuntimeError("SteererLogitsProcessor saw an unexpected sequence shape; it supports greedy and "
                               "sampled generate() with the KV cache (no beam search or assisted decoding)")
        last = input_ids[:, -1].tolist() if gen.calls else None
        self._read_pass(gen, [b for b, row in enumerate(gen.rows) if not row.done], last)
        gen.calls += 1
        self._steer_next(gen)
        self.hooks.phase = Phase.GENERATED
        return scores

    def _set_coefficients(self, coeffs: torch.Tensor) -> None:
        self.policies.apply(coeffs)
        self._applied = coeffs

    def _steer_next(self, gen: _Generation) -> None:
        """Coefficients for the next pass from the monitor's state now (Steerer.before_forward)."""
        monitor = gen.monitor
        rows = torch.arange(len(gen.rows))
        coeffs = self.policies.coefficients(rows, monitor.flags[rows], monitor.smoothed[rows])
        done = torch.tensor([row.done for row in gen.rows])
        self._set_coefficients(torch.where(done[:, None], torch.zeros_like(coeffs), coeffs))

    def _read_pass(self, gen: _Generation, live: list[int], last: list[int] | None) -> None:
        """Score the pass just run for rows `live`; `last` = each row's input token (None for the prefill)."""
        if not live:
            return
        index, closing = [], []
        for b in live:
            row = gen.rows[b]
            if last is None:
                index.append(-1)
                closing.append(False)
                continue
            token = int(last[b])
            is_eos = token in self.eos_token_ids
            self._emit(gen, row, token, is_eos)
            index.append(len(row.tokens) if is_eos else len(row.tokens) - 1)
            closing.append(is_eos)
        picked = torch.tensor(live, dtype=torch.long)
        closing_t = torch.tensor(closing, dtype=torch.bool)
        captured = {layer: self.hooks.captured[layer][picked].detach().float().cpu() for layer in self.bank.layers}
        view = StepView(live, torch.tensor(index, dtype=torch.long), torch.zeros(len(live), dtype=torch.long),
                        captured, closing_t, closing_t.clone(), ~closing_t)
        monitor = gen.monitor
        monitor.after_forward(view)
        flag_events: dict[int, list[FlagEvent]] = {}
        for event in monitor.drain_events():
            flag_events.setdefault(event.row, []).append(event)
        risks = monitor.smoothed
        for b, is_closing in zip(live, closing, strict=True):
            row = gen.rows[b]
            if is_closing:
                row.done = True
                continue
            applied = self._applied[b, row.columns].tolist()
            for task, alpha in zip(row.tasks, applied, strict=True):
                row.steered[task] += alpha != 0
            row.pending = (dict(zip(row.tasks, risks[b, row.columns].tolist(), strict=True)),
                           dict(zip(row.tasks, applied, strict=True)), flag_events.get(b, []))

    def _emit(self, gen: _Generation, row: _Row, token: int, is_eos: bool) -> None:
        """The token chosen in the previous pass is now known: record it and emit its event."""
        text = ""
        if is_eos:
            row.eos = True
            index = len(row.tokens)
        else:
            row.tokens.append(token)
            full = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            text, row.text = full[len(row.text):], full
            index = len(row.tokens) - 1
        if row.pending is None:
            raise RuntimeError("internal error: a token arrived without the pass that chose it")
        risks, steering, flags = row.pending
        row.pending = None
        gen.events.append(TokenEvent(row.request_id, index, token, text, risks, steering, flags))

    # -- after generate() ---------------------------------------------------------------------------------
    def events(self) -> list[TokenEvent]:
        """Token events so far (drained). After `finish()` they include every row's last token."""
        if self._gen is None:
            return []
        events, self._gen.events = self._gen.events, []
        return events

    @torch.inference_mode()
    def finish(self, output: Any) -> list[Result]:
        """Per-row results of the generation that just ran. `output` is what generate() returned: the
        sequences tensor, or a GenerateOutput (with `return_dict_in_generate=True` its cache lets the rows
        that chose EOS in the last step get their EOS pass, as in `Steerer`)."""
        gen = self._gen
        if gen is None:
            raise RuntimeError("no generation to finish")
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        cache = None if isinstance(output, torch.Tensor) else getattr(output, "cache", None)
        if sequences.shape[1] != gen.prompt_len + gen.calls:
            raise RuntimeError(f"sequences have {sequences.shape[1]} columns; this generation has "
                               f"{gen.prompt_len + gen.calls} (prompt {gen.prompt_len} + {gen.calls} steps)")
        last = sequences[:, -1].tolist()
        closing = []
        for b, row in enumerate(gen.rows):
            if row.done:
                continue
            token = int(last[b])
            is_eos = token in self.eos_token_ids
            if is_eos and cache is not None:
                closing.append(b)
                continue
            self._emit(gen, row, token, is_eos)
            row.done = True
        if closing:
            self._eos_pass(gen, sequences, cache, closing, last)
        return [self._result(gen, b) for b in range(len(gen.rows))]

    def _eos_pass(self, gen: _Generation, sequences: torch.Tensor, cache: Any, rows: list[int],
                  last: list[int]) -> None:
        """Feed the EOS of rows that chose it in the last step (Steerer's closing pass) and read it."""
        device = sequences.device
        mask = torch.cat([gen.prompt_mask, torch.ones(len(gen.rows), gen.calls, dtype=torch.long)], dim=1)
        positions = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        self.model(input_ids=sequences[:, -1:], attention_mask=mask.to(device), position_ids=positions.to(device),
                   cache=cache, use_cache=True)
        self._read_pass(gen, rows, last)
        self._set_coefficients(torch.zeros_like(self._applied))

    def _result(self, gen: _Generation, b: int) -> Result:
        row = gen.rows[b]
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        monitor = gen.monitor
        verdicts = build_verdicts(monitor, b, tuple(row.spec.constraints), row.columns, text)
        traces = monitor.traces_for(b, row.tasks)
        return Result(row.request_id, text, list(row.tokens), "eos" if row.eos else "length", verdicts,
                      int(gen.prompt_mask[b].sum()), dict(row.steered), self.bank.version, traces)


@contextmanager
def attach_steerer(model: torch.nn.Module, tokenizer: Any, bank: ProbeBank,
                   constraints: Sequence[Constraint] = (), policy: SteeringPolicy = OFF,
                   policies: dict[str, SteeringPolicy] | None = None, rows: Sequence[RowSpec] | None = None,
                   monitor_config: MonitorConfig | None = None, where: Where = Where.GENERATED,
                   record: bool = False, check_bank: bool = True,
                   use_unreliable_probes: bool = False) -> Iterator[SteererLogitsProcessor]:
    """Hooks attached for the `with` block; the processor goes in `generate(logits_processor=...)`.

    `constraints`/`policy`/`policies` apply to every batch row; pass `rows` (one `RowSpec` per row) instead
    to give rows their own constraints and policies.
    """
    spec: RowSpec | list[RowSpec] = list(rows) if rows is not None else \
        RowSpec(tuple(constraints), policy, dict(policies or {}))
    processor = SteererLogitsProcessor(model, tokenizer, bank, spec, monitor_config, where, record=record,
                                       check_bank=check_bank, use_unreliable_probes=use_unreliable_probes)
    with processor:
        yield processor


def _validate(spec: RowSpec, bank: ProbeBank) -> None:
    """The checks `Steerer.validate` makes on a request's constraints and policies."""
    for constraint in spec.constraints:
        constraint.validate()
        if constraint.task not in bank.tasks:
            raise ValueError(f"the probe bank has no probe for task {constraint.task!r}")
    tasks = [c.task for c in spec.constraints]
    if len(set(tasks)) != len(tasks):
        raise ValueError("each task may appear once per row")
    unknown = set(spec.policies) - set(tasks)
    if unknown:
        raise ValueError(f"steering policies name tasks without a constraint: {', '.join(sorted(unknown))}")


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a row: the generation config's EOS ids and the tokenizer's (as HFEngine)."""
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, list | tuple) else [eos]
    eos.append(tokenizer.eos_token_id)
    return frozenset(int(e) for e in eos if e is not None)
