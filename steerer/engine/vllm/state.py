"""Worker-side state of the vLLM plugin: which row is which request, and what one forward pass saw.

Three writers, one reader, all in the worker process:
- `update_rows` (from the V1 logits processor, before each forward): rows added, removed and moved in
  vLLM's persistent batch, each added row with its steerer slot (from `SamplingParams.extra_args`) and
  prompt length. Rows of requests that steerer does not manage hold slot -1 and are never steered.
- `begin_pass` (from the model's Python `forward`, outside the compiled graph): token -> row from the
  attention metadata's `query_start_loc`, row -> slot, and which tokens are generated (position >= prompt
  length, so chunked prefill, prefix-cache hits and recompute after preemption all come out right).
- `layer` (the custom op's body, at every decoder layer, inside the compiled graph): add
  `coeffs[slot_of_token] @ directions` to the residual (exact zeros for rows that do not steer), then keep
  each row's last-token residual at tapped layers.

The driver reads `last_pass()` and `captured` between steps. Pure torch: no vLLM import, so it is testable
without vLLM. Per-request differences live in tensor contents, never in Python branches per row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from steerer.controller import SlotMap
from steerer.taps import LayerSteering

UNMANAGED = -1  # slot of a row whose request steerer does not manage


def slot_masks(capacity: int, slots: Iterable[int], started: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[capacity] `live` (slots in flight) and `positions` (0 for slots that have sampled, else -1, so
    `where=generated` gives a row still in its prompt zeros): what `Controller.coefficients` takes per slot."""
    live = torch.zeros(capacity, dtype=torch.bool)
    positions = torch.full((capacity,), -1, dtype=torch.long)
    live[list(slots)] = True
    positions[list(started)] = 0
    return live, positions


@dataclass
class PassInfo:
    """One forward pass as the driver needs it, on the host; lists are aligned with vLLM's rows."""

    number: int
    slots: list[int]  # steerer slot per row (UNMANAGED for others)
    last_positions: list[int]  # position of each row's last token in this pass
    prompt_lengths: list[int]

    def complete(self, row: int, outputs: int = 0) -> bool:
        """vLLM samples a token from the row's pass: it reaches the row's last known token, `outputs` being the
        tokens vLLM has already generated for the request (a recompute after preemption replays them, and a
        chunk of that replay which stops among them samples nothing)."""
        return self.last_positions[row] >= self.prompt_lengths[row] + outputs - 1


@dataclass
class WorkerState:
    """See the module docstring. One instance per worker process (`STATE`)."""

    capacity: int = 0
    tap_layers: frozenset[int] = frozenset()
    steering: dict[int, LayerSteering] = field(default_factory=dict)
    rows: SlotMap = field(default_factory=SlotMap)
    prompt_lengths: SlotMap = field(default_factory=SlotMap)
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    passes: int = 0  # forward passes that carried managed rows
    op_calls: int = 0  # custom-op invocations that did work (tests check the op fires under compile)
    row_updates: int = 0  # BatchUpdates received (tests check the logits processor is wired)
    live: bool = False
    _token_slot: torch.Tensor | None = None
    _generated: torch.Tensor | None = None
    _last: torch.Tensor | None = None
    _info: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def installed(self) -> bool:
        return self.capacity > 0

    def install(self, capacity: int, tap_layers: Iterable[int], steering: dict[int, LayerSteering]) -> None:
        """A driver takes the model: from now on its slots' rows are steered and tapped."""
        self.capacity = capacity
        self.tap_layers = frozenset(tap_layers)
        self.steering = steering
        self.captured = {}

    def uninstall(self) -> None:
        self.capacity = 0
        self.tap_layers = frozenset()
        self.steering = {}
        self.captured = {}
        self.live = False

    # -- batch membership (logits processor) -------------------------------------------------------------
    def update_rows(self, batch_size: int, removed: Iterable[int], added: Iterable[tuple[int, int, int]],
                    moved: Iterable[tuple[int, int, bool]]) -> None:
        """vLLM's BatchUpdate: `added` (row, slot, prompt length); applied in vLLM's order (removed, added,
        moved) to the row -> slot and row -> prompt length maps."""
        added = list(added)
        removed, moved = list(removed), list(moved)
        self.rows.apply([(row, slot) for row, slot, _ in added], removed, moved)
        self.prompt_lengths.apply([(row, length) for row, _, length in added], removed, moved)
        if len(self.rows.slots) != batch_size:
            raise RuntimeError(f"steerer: the persistent batch has {batch_size} rows but its updates leave "
                               f"{len(self.rows.slots)}; vLLM's BatchUpdate is not what this plugin expects")
        self.row_updates += 1

    # -- one forward pass (model forward, eager Python) ----------------------------------------------------
    def begin_pass(self, positions: torch.Tensor, query_start_loc: torch.Tensor | None,
                   num_reqs: int | None = None) -> None:
        """Build the pass's token maps. Not live (the op does nothing) in profiling and warm-up runs, when
        no driver is installed, or when no managed row is in the batch."""
        self.live = False
        self.captured = {}
        n_rows = len(self.rows.slots)
        if not self.installed or query_start_loc is None or n_rows == 0:
            return
        if num_reqs is not None and num_reqs != n_rows:
            raise RuntimeError(f"steerer: the pass has {num_reqs} requests but the logits processor tracks "
                               f"{n_rows} rows; vLLM's batch layout is not what this plugin expects")
        slots = self.rows.rows().to(positions.device)
        if not bool((slots != UNMANAGED).any()):
            return
        qsl = query_start_loc[: n_rows + 1].to(device=positions.device, dtype=torch.long)
        counts = qsl[1:] - qsl[:-1]
        n = positions.shape[0]
        actual = int(qsl[-1])
        rows = torch.repeat_interleave(torch.arange(n_rows, device=positions.device), counts, output_size=actual)
        if n > actual:  # padding tokens: the null row
            rows = torch.cat([rows, rows.new_full((n - actual,), n_rows)])
        null = self.capacity  # row `capacity` of every coefficient table is zeros
        slot_index = torch.cat([torch.where(slots >= 0, slots, null), slots.new_full((1,), null)])
        prompt = torch.cat([self.prompt_lengths.rows().to(positions.device), qsl.new_full((1,), 2 ** 62)])
        self._token_slot = slot_index[rows]
        self._generated = positions.long() >= prompt[rows]
        self._last = (qsl[1:] - 1).clamp(min=0)
        self._info = (slots, positions[self._last].long(), prompt[:-1])
        self.passes += 1
        self.live = True

    def layer(self, index: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """The custom op's body: steer `residual` in place, then tap `hidden + residual` at rows' last tokens."""
        if not self.live:
            return
        self.op_calls += 1
        steer = self.steering.get(index)
        if steer is not None and steer.active and steer.coeffs is not None:
            cover = steer.where.mask(self._generated)
            if cover is not False:
                delta = steer.delta(residual.dtype)[:, 0]  # [capacity, d], exact zeros for rows not steered
                table = torch.cat([delta, delta.new_zeros(1, delta.shape[1])])
                add = table[self._token_slot]
                if isinstance(cover, torch.Tensor):
                    add = torch.where(cover[:, None], add, torch.zeros((), dtype=add.dtype, device=add.device))
                residual.add_(add)
        if index in self.tap_layers:
            last = self._last
            self.captured[index] = hidden[last] + residual[last]

    def last_pass(self) -> PassInfo | None:
        """The latest live pass on the host (None before the first)."""
        if self._info is None:
            return None
        slots, last, prompt = (t.tolist() for t in self._info)
        return PassInfo(self.passes, slots, last, prompt)


STATE = WorkerState()
