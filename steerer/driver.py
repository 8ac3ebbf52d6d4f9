"""The driver: ONE loop that turns an engine's passes into `Controller` calls, for every engine.

Four engines drive a controller: the transformers loop (`Steerer`), the `generate()` drop-in
(`SteererLogitsProcessor`), vLLM's offline engine (`VLLMSteerer`) and plain `vllm serve` (`SteererServe`).
What they share lives here, once; each keeps only how it learns rows, positions and tokens:

    build        Driver(bank, tokenizer, eos, options, device, lens)   one `Options` for every engine
    membership   validate(spec)                 once per path (remembered per request; `steerer.backend`)
                 join(spec, id, stop) -> slot   a row joins (stop rule: EOS ids, token budget)
                 leave(slot)                    a row leaves without a result (cancelled)
                 finish(slot, reason, ...)      a row ended: its `Result`
    per pass     before(rows, positions, live)  coefficients for the pass about to run
                 before_slots()                 the same for every slot (an engine whose op indexes by slot)
                 read(...)                      after it: observe -> one host transfer -> settle
                 observe(...) / settle(...)     the same in two halves, for an engine that folds the
                                                readings into its own transfer (`StepView.fetch`)
                 guard(slots, logits, tokens, redraw) -> tokens   before a token is used: veto the ones a
                                                guarded constraint forbids and draw again (`steerer.guard`)
                 token(slot, token) -> event    a chosen token: EOS / length decided here, unless the engine
                                                decided it on its device (`recorded=`, `final=`)
                 ending(slot)                   "eos" / "length" once a token ended the row, else None

Nothing here imports an engine: engines import the driver (layering: backends -> driver -> controller).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from steerer import guard as guards
from steerer.bank import ProbeBank
from steerer.controller import Controller, Observation
from steerer.lens import LensWeights
from steerer.monitor import MonitorConfig
from steerer.request import Result, Spec, TokenEvent
from steerer.taps import Where

__all__ = ["Driver", "Options", "Stop", "eos_token_ids", "to_host"]


@dataclass(frozen=True)
class Options:
    """What every engine's controller is built with (one set, so engines cannot drift apart).

    `check=False` leaves `Verdict.satisfied` None for the caller (a server checks off the model's thread);
    `stop_steering_on_detection`: a task's conditional steering ends once its violation is detected."""

    capacity: int = 128
    monitor_config: MonitorConfig | None = None
    where: Where = Where.GENERATED
    record: bool = False
    check: bool = True
    use_unreliable_probes: bool = False
    stop_steering_on_detection: bool = False


@dataclass(frozen=True)
class Stop:
    """When a row's token ends it: one of `eos` (unless `ignore_eos`), or `max_new_tokens` recorded tokens."""

    eos: frozenset[int] = frozenset()
    max_new_tokens: int | None = None
    ignore_eos: bool = False


@dataclass
class _Row:
    stop: Stop
    recorded: int = 0  # tokens appended to the response
    tokens: int = 0  # token events (EOS included)
    ending: str | None = None
    guarded: tuple[str, ...] = ()  # tasks whose policy guards them (`steerer.guard`)
    vetoes: Counter[str] = field(default_factory=Counter)  # task -> candidates vetoed for the next token
    end_vetoed_at: int | None = None  # `recorded` when the guard first vetoed EOS (`guard.END_EXTRA` counts from it)
    loops: guards.LoopCache = field(default_factory=dict)  # the loop veto's scans (`guard.loop_vetoes`)


def eos_token_ids(*sources: Any) -> tuple[int, ...]:
    """The tokens that end a row, from every source given (a generation config's `eos_token_id`, which may be
    a list, and the tokenizer's): sorted, unique, None dropped. One rule for every engine."""
    out: set[int] = set()
    for source in sources:
        for value in source if isinstance(source, list | tuple | set | frozenset) else [source]:
            if value is not None:
                out.add(int(value))
    return tuple(sorted(out))


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU copies of `tensors` in one device-to-host transfer (one synchronisation); CPU tensors as they are.

    Packed as float64, which holds every token id, count, bool and float32 exactly."""
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors)
    wide = torch.float32 if tensors[0].device.type == "mps" else torch.float64  # mps has no float64
    flat = torch.cat([t.reshape(-1).to(wide) for t in tensors]).cpu()
    out, at = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[at:at + n].view(t.shape).to(t.dtype))
        at += n
    return out


@dataclass
class Driver:
    """See the module docstring. `controller` is public: tests and callers read its monitor and policies."""

    controller: Controller
    eos: frozenset[int] = frozenset()
    _rows: dict[int, _Row] = field(default_factory=dict)
    # Requests this driver validated (by identity; the bank never changes under a driver): admitting one of
    # them again costs nothing, so a request is validated once however many layers ask.
    _valid: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)
    # The engine calls `guard` on its draws (transformers loop, drop-in); others refuse guarded policies.
    can_guard: bool = False

    @classmethod
    def build(cls, bank: ProbeBank, tokenizer: Any, eos: Iterable[int], options: Options = Options(), *,
              device: str | torch.device = "cpu", lens: LensWeights | None = None) -> Driver:
        o = options
        controller = Controller(bank, tokenizer, capacity=o.capacity, device=device, monitor_config=o.monitor_config,
                                where=o.where, record=o.record, check=o.check,
                                use_unreliable_probes=o.use_unreliable_probes, lens=lens,
                                stop_steering_on_detection=o.stop_steering_on_detection)
        return cls(controller, frozenset(eos))

    @property
    def device(self) -> torch.device:
        return self.controller.device

    @property
    def capacity(self) -> int:
        return self.controller.capacity

    @property
    def in_flight(self) -> int:
        return self.controller.in_flight

    @property
    def free_slots(self) -> int:
        return self.controller.free_slots

    def slot_of(self, request_id: str) -> int | None:
        return self.controller.slot_of(request_id)

    # -- membership ----------------------------------------------------------------------------------------
    def validate(self, spec: Spec) -> None:
        """ValueError (a message for the user) unless `spec` runs on this bank; a spec already validated by
        this driver is not checked again (idempotent and cheap, so every layer may call it)."""
        if self._valid.get(id(spec)) is spec:
            return
        self.controller.validate(spec)
        if not self.can_guard and (guarded := guards.guarded_tasks(spec)):
            raise ValueError(f"this engine cannot guard ({', '.join(guarded)}): the guard vets tokens in the "
                             "process that samples them (not vLLM's tensor-parallel workers; docs/GUARD.md)")
        with contextlib.suppress(TypeError):  # not weak-referenceable: validated, just not remembered
            self._valid[id(spec)] = spec

    def join(self, spec: Spec, request_id: str | None = None, stop: Stop | None = None,
             validated: bool = False) -> int:
        """A row joins (validated unless this driver already did, or the engine says it did: `validated`); its
        slot. `stop`: default the engine's EOS ids and no token budget (an engine that ends rows itself)."""
        if not validated:
            self.validate(spec)
        slot = self.controller.add(spec, request_id, validated=True)
        self._rows[slot] = _Row(stop if stop is not None else Stop(self.eos), guarded=guards.guarded_tasks(spec))
        return slot

    def join_all(self, specs: Iterable[Spec], stops: Iterable[Stop | None] | None = None) -> list[int]:
        """Several rows join, all or none: every spec is validated (and capacity checked) before any joins."""
        specs = list(specs)
        if len(specs) > self.free_slots:
            raise RuntimeError(f"only {self.free_slots} free slots for {len(specs)} requests")
        for spec in specs:
            self.validate(spec)
        stops = list(stops) if stops is not None else [None] * len(specs)
        return [self.join(spec, None, stop) for spec, stop in zip(specs, stops, strict=True)]

    def leave(self, slot: int) -> None:
        """A row leaves without a result (cancelled); its slot is free before the next pass."""
        self._rows.pop(slot, None)
        self.controller.remove(slot)

    def finish(self, slot: int, reason: str | None = None, prompt_tokens: int = 0,
               tokens: list[int] | None = None) -> Result:
        """A row ended: its `Result` (reason default: how its last token ended it, else the controller's)."""
        row = self._rows.pop(slot, None)
        if reason is None and row is not None:
            reason = row.ending
        return self.controller.finish(slot, reason, prompt_tokens, tokens)

    def finish_all(self, ended: list[tuple[int, str | None, int, list[int] | None]]) -> list[Result]:
        """Rows that ended in one pass, as `finish`'s arguments: their `Result`s, the checkers run once for all
        (`Controller.finish_all`)."""
        items = []
        for slot, reason, prompt_tokens, tokens in ended:
            row = self._rows.pop(slot, None)
            items.append((slot, row.ending if reason is None and row is not None else reason, prompt_tokens, tokens))
        return self.controller.finish_all(items)

    def ending(self, slot: int) -> str | None:
        """"eos" or "length" once a token ended the row (`token`), else None."""
        return self._rows[slot].ending

    def started(self, slot: int) -> bool:
        """The row has had a token event (it is past its prompt)."""
        return self._rows[slot].tokens > 0

    # -- per pass ------------------------------------------------------------------------------------------
    def before(self, rows: torch.Tensor, positions: torch.Tensor, live: torch.Tensor | None = None) -> None:
        """Before a pass: the coefficients of `rows` (slots [B]) at `positions` [B] (-1: in the prompt)."""
        self.controller.coefficients(rows, positions, live)

    def before_slots(self) -> None:
        """Before a pass, for an engine whose steering op gathers rows by slot (vLLM): every slot's alphas; a
        slot not in flight gets zeros, one that has not sampled yet is at position -1 (its prompt)."""
        if not self._rows:
            return
        capacity = self.capacity
        live = torch.zeros(capacity, dtype=torch.bool)
        positions = torch.full((capacity,), -1, dtype=torch.long)
        live[list(self._rows)] = True
        positions[[s for s, row in self._rows.items() if row.tokens]] = 0
        device = self.device
        self.controller.coefficients(torch.arange(capacity, device=device), positions.to(device), live.to(device))

    def observe(self, rows: torch.Tensor, positions: torch.Tensor, residuals: dict[int, torch.Tensor],
                closing: torch.Tensor) -> Observation:
        """After a pass, on the device: score the residuals; bring `Observation.tensors()` to the host with
        the engine's own data, then `settle`."""
        return self.controller.observe(rows, positions, residuals, closing)

    def settle(self, slots: list[int], positions: list[int], closing: list[bool], host: list[torch.Tensor]) -> None:
        self.controller.settle(slots, positions, closing, host)

    def read(self, slots: list[int], positions: list[int], residuals: dict[int, torch.Tensor],
             closing: list[bool] | None = None) -> None:
        """After a pass: observe -> one host transfer -> settle, for rows `slots` at `positions` (their input
        token's place in the response, -1 for the prompt's end); `residuals` aligned with `slots`.
        `closing`: rows that fed their EOS token (the pass reads the EOS residual; no token follows)."""
        device = self.device
        closing = closing if closing is not None else [False] * len(slots)
        observation = self.observe(torch.tensor(slots, dtype=torch.long, device=device),
                                   torch.tensor(positions, dtype=torch.long, device=device), residuals,
                                   torch.tensor(closing, dtype=torch.bool, device=device))
        self.settle(slots, positions, closing, to_host(*observation.tensors()))

    def guarding(self, slots: Iterable[int]) -> bool:
        """Some of these rows have a guarded constraint still undecided (their tokens need `guard`)."""
        return any(self._live_guards(slot) for slot in slots)

    def _live_guards(self, slot: int) -> dict[str, Any]:
        row = self._rows.get(slot)
        if row is None or not row.guarded:
            return {}
        detectors = self.controller.row_detectors(slot)
        return {task: detectors[task] for task in row.guarded if task in detectors}

    def veto(self, slot: int, token: int) -> list[str]:
        """The guarded tasks that forbid `token` as the row's next token (none: it may be used)."""
        live = self._live_guards(slot)
        if not live:
            return []
        row = self._rows[slot]
        end = token in row.stop.eos and not row.stop.ignore_eos
        detok, length = self.controller.row_text(slot)
        if vetoed := guards.vetoes(live, guards.peek(detok, None if end else token), length, end):
            return vetoed
        if end:  # the end veto (`end_ok`), for at most `guard.END_EXTRA` tokens past the first
            if not (tasks := guards.end_vetoes(live, detok.text())):
                return []
            row.end_vetoed_at = row.recorded if row.end_vetoed_at is None else row.end_vetoed_at
            return tasks if row.recorded - row.end_vetoed_at < guards.END_EXTRA else []
        return guards.loop_vetoes(live, detok.tokens, token, row.loops)  # the loop veto (`loop_ngram`)

    def repair(self, slot: int, token: int, vetoed: list[str]) -> int | None:
        """The token a vetoing detector proposes instead of `token` (`guard.repair_tokens`: " The" -> " the"
        under lowercase) if it passes every guarded detector, else None (draw again)."""
        live = self._live_guards(slot)
        if token in self._rows[slot].stop.eos or not live:
            return None
        detok, _ = self.controller.row_text(slot)
        for fixed in guards.repair_tokens(live, vetoed, guards.peek(detok, token), detok.tokenizer):
            if fixed != token and not self.veto(slot, fixed):
                return fixed
        return None

    def guard(self, slots: list[int], logits: torch.Tensor, tokens: torch.Tensor,
              redraw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The tokens [B] the sampler drew for `slots` with every vetoed one replaced (`steerer.guard`): an
        at-most limit's veto ends the row (EOS); else a vetoing detector's repair that passes every guarded
        detector is taken (`repair`); else the vetoed token's logit is set to -inf and `redraw` (the engine's
        sampler over [B, V] logits, row by row the same draw) picks again, up to `guard.MAX_VETOES` times,
        past which the row ends (EOS). The vetoes go on the row's next token event (`TokenEvent.redrawn`)."""
        rows = [(i, slot) for i, slot in enumerate(slots) if self._live_guards(slot)]
        if not rows:
            return tokens
        chosen = tokens.tolist()
        masked: torch.Tensor | None = None
        for attempt in range(guards.MAX_VETOES + 1):
            again = []
            for i, slot in rows:
                vetoed = self.veto(slot, chosen[i])
                if not vetoed:
                    continue
                row = self._rows[slot]
                row.vetoes.update(vetoed)
                eos = min(row.stop.eos, default=None)
                if eos is not None and (attempt == guards.MAX_VETOES
                                        or guards.ends_at_limit(self._live_guards(slot), vetoed)):
                    chosen[i] = eos
                    continue
                if (fixed := self.repair(slot, chosen[i], vetoed)) is not None:
                    chosen[i] = fixed
                    continue
                if masked is None:
                    masked = logits.clone()
                masked[i, chosen[i]] = float("-inf")
                again.append((i, slot))
            if not again or masked is None:
                break
            drawn = redraw(masked).tolist()
            for i, _ in again:
                chosen[i] = drawn[i]
            rows = again
        return torch.tensor(chosen, dtype=tokens.dtype, device=tokens.device)

    def guard_scores(self, slot: int, scores: torch.Tensor) -> torch.Tensor:
        """One row's next-token scores [V] (an engine that cannot redraw: the drop-in) with the candidates the
        guard vetoes, in score order down to the first allowed one, set to -inf: greedy decoding then takes
        exactly the token `guard` would. An at-most limit's veto, or one past the bound, leaves only EOS."""
        row = self._rows[slot]
        out = scores.clone()
        for attempt in range(guards.MAX_VETOES + 1):
            best = int(out.argmax())
            vetoed = self.veto(slot, best)
            if not vetoed:
                break
            row.vetoes.update(vetoed)
            eos = sorted(row.stop.eos)
            if eos and (attempt == guards.MAX_VETOES or guards.ends_at_limit(self._live_guards(slot), vetoed)):
                keep = out[eos].clone()
                out.fill_(float("-inf"))
                out[eos] = keep
                break
            if (fixed := self.repair(slot, best, vetoed)) is not None:  # as `guard`: the repair, not the next best
                keep = out[fixed].clone()
                out.fill_(float("-inf"))
                out[fixed] = keep
                break
            out[best] = float("-inf")
        return out

    def allowed(self, slot: int, candidates: list[int], probs: list[float] | None = None,
                mass: float = 1.0) -> list[int]:
        """The tokens a row may draw next, for an engine that masks before its sampler draws (vLLM:
        `steerer.engine.vllm.guard`). `candidates` best first are checked until the passing ones hold `mass` of
        what the vetoes leave of `probs` (None: greedy, the first passing one), or past `guard.MAX_VETOES`
        vetoes. As `guard`: vetoes ranked above the first passing candidate go on the next token event
        (`TokenEvent.redrawn`); such a veto's passing repair is the one token allowed; an at-most limit's veto
        there, or vetoes past the bound with none passing, leave only EOS."""
        row = self._rows[slot]
        eos = sorted(row.stop.eos)
        keep: list[int] = []
        vetoes, passed, gone = 0, 0.0, 0.0
        for rank, token in enumerate(candidates):
            tasks = self.veto(slot, token)
            p = probs[rank] if probs is not None else 0.0
            if not tasks:
                keep.append(token)
                passed += p
                if probs is None or passed >= mass * (1.0 - gone):
                    break
                continue
            vetoes += 1
            gone += p
            if not keep:
                row.vetoes.update(tasks)
                if eos and (vetoes > guards.MAX_VETOES or guards.ends_at_limit(self._live_guards(slot), tasks)):
                    return eos
                if (fixed := self.repair(slot, token, tasks)) is not None:
                    return [fixed]
            elif vetoes > guards.MAX_VETOES:
                break
        return keep or eos

    def token(self, slot: int, token: int, *, recorded: bool | None = None, final: bool = False) -> TokenEvent:
        """The token a row chose in the pass last read: its event. The row's stop rule decides whether it is
        EOS (not recorded) and whether it ends the row, unless the engine already decided (`recorded` given:
        then `final` is the engine's too). `final=True` also ends the row (the engine stopped it)."""
        row = self._rows[slot]
        if recorded is None:
            stop = row.stop
            eos = token in stop.eos and not stop.ignore_eos
            recorded = not eos
            length = stop.max_new_tokens is not None and row.recorded + recorded >= stop.max_new_tokens
            row.ending = "eos" if eos else "length" if length else None
            final = final or row.ending is not None
        elif final:
            row.ending = "length" if recorded else "eos"
        row.recorded += recorded
        row.tokens += 1
        event = self.controller.token(slot, token, recorded, final)
        if row.vetoes:
            event.redrawn, row.vetoes = dict(row.vetoes), Counter()
        return event
