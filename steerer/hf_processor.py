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
the prefill), updates the monitor, and sets the steering coefficients of pass t+1 from the flags and
risks after pass t. Both this processor and `Steerer` drive the same `Driver` and `Controller` (slots, monitor,
policies, token events, results); only the order in which they learn a pass's token differs. A forward pre-hook on the model recognises a
prefill (empty cache), puts the hooks in the prompt phase (so `Where.GENERATED` steering leaves the prompt
alone) and starts fresh per-row state, so one attached processor serves several `generate()` calls. The
scores are returned unchanged, except for rows with a guarded constraint (`steerer.guard`): the candidates the
guard vetoes, in score order down to the first allowed one, are set to -inf (`Driver.guard_scores`), so greedy
decoding takes exactly the token `Steerer` would; a sampled row may still draw a lower-ranked vetoed token
(the drop-in cannot redraw), so guard sampled rows with `Steerer`.

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
from steerer.driver import Driver, Options, to_host
from steerer.engine.hf import eos_token_ids
from steerer.lens import lens_for
from steerer.model import model_fingerprint
from steerer.monitor import Monitor, MonitorConfig
from steerer.policy import OFF, SteeringPolicy
from steerer.request import Result, RowSpec, TokenEvent
from steerer.taps import LayerHooks, Where

__all__ = ["RowSpec", "SteererLogitsProcessor", "attach_steerer"]


@dataclass
class _Generation:
    """Per-`generate()` state: the rows' slots and where the sequence stands (host-side, per row)."""

    slots: list[int]
    slot_tensor: torch.Tensor  # [B] on the model's device
    prompt_len: int
    prompt_mask: torch.Tensor  # [B, T0] (CPU)
    counts: list[int]  # tokens recorded per row
    done: list[bool]  # no more passes are read for this row
    calls: int = 0
    events: list[TokenEvent] = field(default_factory=list)


class SteererLogitsProcessor(LogitsProcessor):
    """Probe monitoring and steering for `model.generate()`; see the module docstring.

    Build it with `attach_steerer` (or call `attach()` / `remove()`), pass it in `logits_processor`, and
    call `finish(output)` after `generate()` for the per-row `Result`s. `events()` drains the token events.
    Options as `Steerer`'s (`steerer.driver.Options`), `stop_steering_on_detection` included.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, bank: ProbeBank, rows: RowSpec | Sequence[RowSpec],
                 monitor_config: MonitorConfig | None = None, where: Where = Where.GENERATED,
                 capacity: int = 256, record: bool = False, check_bank: bool = True,
                 use_unreliable_probes: bool = False, stop_steering_on_detection: bool = False):
        if check_bank:
            bank.check_model(model_fingerprint(model), int(model.config.hidden_size))
        self.model = model
        self.tokenizer = tokenizer
        self.bank = bank
        self.rows = rows
        self.device = next(model.parameters()).device
        self.options = Options(capacity, monitor_config, Where(where), record, True, use_unreliable_probes,
                               stop_steering_on_detection)
        # The row's stop rule is the model's EOS ids and no token budget: generate() decides the length.
        self.driver = Driver.build(bank, tokenizer, eos_token_ids(model, tokenizer), self.options,
                                   device=self.device, lens=lens_for(bank, model))
        self.driver.can_guard = True  # greedy rows are guarded exactly (`Driver.guard_scores`; docs/GUARD.md)
        self.controller = self.driver.controller
        for spec in [rows] if isinstance(rows, RowSpec) else rows:
            self.driver.validate(spec)  # once: each generate()'s rows join without another check
        self.muted = self.controller.muted  # as in Steerer: unreliable probes neither flag nor steer
        self.hooks = LayerHooks(model, tap_layers=bank.layers, steering=self.controller.steering)
        self.eos_token_ids = self.driver.eos
        self._eos = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long, device=self.device)
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
        """The controller's monitor; batch row b of the current generation is slot `slots[b]`."""
        if self._gen is None:
            raise RuntimeError("no generation has started yet")
        return self.controller.monitor

    @property
    def slots(self) -> list[int]:
        return [] if self._gen is None else list(self._gen.slots)

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
        if batch > self.controller.capacity:
            raise ValueError(f"batch of {batch} rows exceeds the processor's capacity {self.controller.capacity}")
        if self._gen is not None:  # a new generate(): the previous one's rows leave
            for slot in self._gen.slots:
                self.driver.leave(slot)
        slots = [self.driver.join(spec, spec.id or f"row-{b}") for b, spec in enumerate(specs)]
        slot_tensor = torch.tensor(slots, dtype=torch.long, device=self.device)
        self._gen = _Generation(slots, slot_tensor, prompt_len, prompt_mask, [0] * batch, [False] * batch)
        # The prefill's coefficients, as for any row's first pass (zeros under Where.GENERATED).
        self.driver.before(slot_tensor, torch.full((batch,), -1, dtype=torch.long, device=self.device))
        self.hooks.set_pass(generated=False)

    # -- the processor ----------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        gen = self._gen
        if gen is None:
            raise RuntimeError("SteererLogitsProcessor is not attached (use attach_steerer or .attach())")
        if input_ids.shape[0] != len(gen.slots) or input_ids.shape[1] != gen.prompt_len + gen.calls:
            raise RuntimeError("SteererLogitsProcessor saw an unexpected sequence shape; it supports greedy and "
                               "sampled generate() with the KV cache (no beam search or assisted decoding)")
        self._read_pass(gen, [b for b, done in enumerate(gen.done) if not done],
                        input_ids[:, -1] if gen.calls else None)
        gen.calls += 1
        self._steer_next(gen)
        self.hooks.set_pass(generated=True)
        return self._guard(gen, scores)

    def _guard(self, gen: _Generation, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Rows with a guarded constraint: the candidates it vetoes are masked before generate() picks."""
        rows = [b for b, done in enumerate(gen.done) if not done and self.driver.guarding([gen.slots[b]])]
        if not rows:
            return scores
        scores = scores.clone()
        for b in rows:
            scores[b] = self.driver.guard_scores(gen.slots[b], scores[b])
        return scores

    def _steer_next(self, gen: _Generation) -> None:
        """Coefficients for the next pass from the monitor's state now; rows already done get none."""
        live = torch.tensor([not d for d in gen.done], dtype=torch.bool).to(self.device)
        positions = torch.tensor(gen.counts, dtype=torch.long).to(self.device)
        self.driver.before(gen.slot_tensor, positions, live)

    def _read_pass(self, gen: _Generation, live: list[int], last: torch.Tensor | None) -> None:
        """Score the pass just run for rows `live`: first the events of the tokens they fed in (`last`, the
        tokens chosen in the previous pass; None for the prefill), then this pass's readings."""
        if not live:
            return
        picked = torch.tensor(live, dtype=torch.long).to(self.device)
        slots = [gen.slots[b] for b in live]
        positions = [gen.counts[b] if last is not None else -1 for b in live]
        if last is None:
            tokens = closing = torch.zeros(len(live), dtype=torch.bool, device=self.device)
        else:
            tokens = last[picked]
            closing = torch.isin(tokens, self._eos)
        residuals = {layer: self.hooks.captured[layer][picked] for layer in self.bank.layers}
        # The fed tokens' events first: their text (detection, progress towards a limit) is part of what this
        # pass's readings see, as in the Steerer's loop. Two host transfers per call (tokens, then readings).
        token_list, closing_list = (t.tolist() for t in to_host(tokens, closing))
        if last is not None:
            for b, token, is_eos in zip(live, token_list, closing_list, strict=True):
                self._emit(gen, b, int(token), is_eos)
        observation = self.driver.observe(gen.slot_tensor[picked], torch.tensor(positions).to(self.device),
                                          residuals, closing)
        self.driver.settle(slots, positions, closing_list, to_host(*observation.tensors()))
        for b, is_closing in zip(live, closing_list, strict=True):
            gen.done[b] = gen.done[b] or is_closing

    def _emit(self, gen: _Generation, b: int, token: int, is_eos: bool, final: bool = False) -> None:
        """The token chosen in the previous pass is now known: record it and emit its event."""
        gen.events.append(self.driver.token(gen.slots[b], token, final=final))  # the stop rule decides EOS
        gen.counts[b] += not is_eos

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
        for b, done in enumerate(gen.done):
            if done:
                continue
            token = int(last[b])
            is_eos = token in self.eos_token_ids
            if is_eos and cache is not None:
                closing.append(b)
                continue
            self._emit(gen, b, token, is_eos, final=True)
            gen.done[b] = True
        if closing:
            self._eos_pass(gen, sequences, cache, closing)
        results = [self.driver.finish(slot, None, int(gen.prompt_mask[b].sum())) for b, slot in enumerate(gen.slots)]
        self._gen = _Generation([], gen.slot_tensor[:0], 0, gen.prompt_mask[:0], [], [], events=gen.events)
        return results

    def _eos_pass(self, gen: _Generation, sequences: torch.Tensor, cache: Any, rows: list[int]) -> None:
        """Feed the EOS of rows that chose it in the last step (Steerer's closing pass) and read it."""
        device = sequences.device
        mask = torch.cat([gen.prompt_mask, torch.ones(len(gen.slots), gen.calls, dtype=torch.long)], dim=1)
        positions = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        self.model(input_ids=sequences[:, -1:], attention_mask=mask.to(device), position_ids=positions.to(device),
                   cache=cache, use_cache=True)
        self._read_pass(gen, rows, sequences[:, -1])
        for steer in self.controller.steering.values():  # nothing more to steer until the next generate()
            steer.active = False


@contextmanager
def attach_steerer(model: torch.nn.Module, tokenizer: Any, bank: ProbeBank,
                   constraints: Sequence[Constraint] = (), policy: SteeringPolicy = OFF,
                   policies: dict[str, SteeringPolicy] | None = None, rows: Sequence[RowSpec] | None = None,
                   monitor_config: MonitorConfig | None = None, where: Where = Where.GENERATED,
                   record: bool = False, check_bank: bool = True, use_unreliable_probes: bool = False,
                   stop_steering_on_detection: bool = False) -> Iterator[SteererLogitsProcessor]:
    """Hooks attached for the `with` block; the processor goes in `generate(logits_processor=...)`.

    `constraints`/`policy`/`policies` apply to every batch row; pass `rows` (one `RowSpec` per row) instead
    to give rows their own constraints and policies.
    """
    spec: RowSpec | list[RowSpec] = list(rows) if rows is not None else \
        RowSpec(tuple(constraints), policy, dict(policies or {}))
    processor = SteererLogitsProcessor(model, tokenizer, bank, spec, monitor_config, where, record=record,
                                       check_bank=check_bank, use_unreliable_probes=use_unreliable_probes,
                                       stop_steering_on_detection=stop_steering_on_detection)
    with processor:
        yield processor
