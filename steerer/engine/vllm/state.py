"""Worker-side state of the vLLM plugin: which row is which request, and what one forward pass saw.

Three writers, one reader, all in the worker process:
- `update_rows` (from the V1 logits processor, before each forward): rows added, removed and moved in
  vLLM's persistent batch, each added row with its steerer slot (from `SamplingParams.extra_args`) and
  prompt length. Rows of requests that steerer does not manage hold slot -1 and are never steered.
- `begin_pass` (from the model's Python `forward`, outside the compiled graph): token -> slot from the
  attention metadata's `query_start_loc`, row -> slot, which tokens are generated (position >= prompt
  length, so chunked prefill, prefix-cache hits and recompute after preemption all come out right), and
  each steered layer's slot -> delta table from the controller's coefficients.
- `layer` (the custom op's body, at every decoder layer, inside the compiled graph): add the token's slot
  row of the layer's delta table to the residual (the null row `capacity` is zeros: exact zeros for tokens
  and rows that do not steer), then write each row's last-token residual at tapped layers.

CUDA graphs replay kernels, not Python, so everything `layer` reads per pass lives in preallocated buffers
(`Buffers`) that `begin_pass` fills in place (`copy_`, never rebinding), and `layer` is index_select / add
on them with shapes taken from its inputs only. While a graph is being captured it always runs that whole
path; eager calls skip passes with nothing to do (`live`, `active`), which a replay cannot.

The driver reads `last_pass()` and `captured` (views on the static tap buffer) between steps. Pure torch:
no vLLM import, so it is testable without vLLM. Per-request differences live in tensor contents, never
in Python branches per row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from steerer.controller import SlotMap
from steerer.taps import LayerSteering, Where

UNMANAGED = -1  # slot of a row whose request steerer does not manage
COVER = {Where.BOTH: 0, Where.GENERATED: 1, Where.PROMPT: 2}  # row of `Buffers.token_slot` per `Where`
DEFAULT_MAX_TOKENS = 8192  # tokens per pass when the caller does not say (vLLM: `max_num_batched_tokens`)


def slot_masks(capacity: int, slots: Iterable[int], started: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[capacity] `live` (slots in flight) and `positions` (0 for slots that have sampled, else -1, so
    `where=generated` gives a row still in its prompt zeros): what `Controller.coefficients` takes per slot."""
    live = torch.zeros(capacity, dtype=torch.bool)
    positions = torch.full((capacity,), -1, dtype=torch.long)
    live[list(slots)] = True
    positions[list(started)] = 0
    return live, positions


def is_capturing(tensor: torch.Tensor) -> bool:
    """A CUDA graph is being captured on the current stream: Python branches taken now are frozen."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


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
class Buffers:
    """What the op reads and writes per pass, allocated once (sizes: tokens per pass, rows per pass, slots)
    on the model's device; filled in place so a captured CUDA graph keeps reading the same memory.

    `token_slot[c, t]`: the slot whose delta token t gets under cover c (`COVER`), `capacity` (the null row)
    when the token is padding, unmanaged, or outside the cover. `last[r]`: row r's last token (0 past the
    pass's rows). `tables[L]`: [capacity + 1, d] delta per slot at steered layer L, row `capacity` zeros.
    `taps`: [tap layers, max_rows, d] each row's residual at its last token, allocated at the first op call
    (its dtype and width are the model's)."""

    max_tokens: int
    max_rows: int
    capacity: int
    device: torch.device
    token_slot: torch.Tensor
    last: torch.Tensor
    tables: dict[int, torch.Tensor]
    taps: torch.Tensor | None = None

    @classmethod
    def allocate(cls, max_tokens: int, max_rows: int, capacity: int, device: torch.device,
                 steering: dict[int, LayerSteering], dtype: torch.dtype | None) -> Buffers:
        tables = {layer: torch.zeros(capacity + 1, steer.directions.shape[1], device=device,
                                     dtype=dtype or steer.directions.dtype) for layer, steer in steering.items()}
        token_slot = torch.full((len(COVER), max_tokens), capacity, dtype=torch.long, device=device)
        # the tensors' own device: "cuda" allocates on "cuda:0", which compares unequal to "cuda"
        return cls(max_tokens, max_rows, capacity, token_slot.device, token_slot,
                   torch.zeros(max_rows, dtype=torch.long, device=device), tables)

    def fits(self, tokens: int, rows: int, device: torch.device) -> bool:
        return tokens <= self.max_tokens and rows <= self.max_rows and device == self.device


@dataclass
class WorkerState:
    """See the module docstring. One instance per worker process (`STATE`)."""

    capacity: int = 0
    tap_layers: frozenset[int] = frozenset()
    steering: dict[int, LayerSteering] = field(default_factory=dict)
    rows: SlotMap = field(default_factory=SlotMap)
    prompt_lengths: SlotMap = field(default_factory=SlotMap)
    passes: int = 0  # forward passes that carried managed rows
    op_calls: int = 0  # custom-op invocations that did work (tests check the op fires under compile)
    row_updates: int = 0  # BatchUpdates received (tests check the logits processor is wired)
    live: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_rows: int = 0
    dtype: torch.dtype | None = None  # the model's; None: the directions' (tables), the first op call's (taps)
    buffers: Buffers | None = None
    _tap_index: dict[int, int] = field(default_factory=dict)
    _rows_in_pass: int = 0
    _cleared: bool = False  # token_slot holds only the null row (set by `_clear`)
    _info: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def installed(self) -> bool:
        return self.capacity > 0

    @property
    def captured(self) -> dict[int, torch.Tensor]:
        """Tapped layer -> [rows of the latest live pass, d] views on the static tap buffer (index them to
        keep: the next pass overwrites them)."""
        b = self.buffers
        if not self.live or b is None or b.taps is None:
            return {}
        return {layer: b.taps[i, : self._rows_in_pass] for layer, i in self._tap_index.items()}

    def install(self, capacity: int, tap_layers: Iterable[int], steering: dict[int, LayerSteering], *,
                max_tokens: int | None = None, max_rows: int | None = None, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> None:
        """A driver takes the model: from now on its slots' rows are steered and tapped. `max_tokens` /
        `max_rows`: vLLM's `max_num_batched_tokens` / `max_num_seqs`, the buffers' sizes (a larger pass
        reallocates them, which only eager execution survives). `device`: where to allocate now; None
        allocates at the first live pass, on its device."""
        self.capacity = capacity
        self.tap_layers = frozenset(tap_layers)
        self.steering = steering
        self._tap_index = {layer: i for i, layer in enumerate(sorted(self.tap_layers))}
        self.max_tokens = max_tokens or DEFAULT_MAX_TOKENS
        self.max_rows = max_rows or capacity
        self.dtype = dtype
        self.buffers = None
        self.live = False
        if device is not None:
            self._reserve(self.max_tokens, self.max_rows, torch.device(device))

    def uninstall(self) -> None:
        self.capacity = 0
        self.tap_layers = frozenset()
        self.steering = {}
        self._tap_index = {}
        self.buffers = None
        self.live = False

    def _reserve(self, tokens: int, rows: int, device: torch.device) -> Buffers:
        """The buffers, allocated on first use or when a pass outgrows them (eager only: a captured graph
        would keep reading the old ones, so vLLM's sizes go to `install`)."""
        b = self.buffers
        if b is None or not b.fits(tokens, rows, device):
            self.max_tokens, self.max_rows = max(self.max_tokens, tokens), max(self.max_rows, rows)
            b = self.buffers = Buffers.allocate(self.max_tokens, self.max_rows, self.capacity, device,
                                                self.steering, self.dtype)
        return b

    # -- batch membership (logits processor) -------------------------------------------------------------
    def new_batch(self) -> None:
        """A logits processor was built for a new persistent batch (a new engine in this process): its rows
        start empty, whatever an engine shut down before it left in the maps."""
        self.rows = SlotMap()
        self.prompt_lengths = SlotMap()

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
        """Fill the pass's token maps and delta tables in place. Not live (the op does nothing) in profiling
        and warm-up runs, when no driver is installed, or when no managed row is in the batch."""
        self.live = False
        n_rows = len(self.rows.slots)
        if not self.installed or query_start_loc is None or n_rows == 0:
            self._clear()
            return
        if num_reqs is not None and num_reqs != n_rows:
            raise RuntimeError(f"steerer: the pass has {num_reqs} requests but the logits processor tracks "
                               f"{n_rows} rows; vLLM's batch layout is not what this plugin expects")
        device = positions.device
        slots = self.rows.rows().to(device)
        if not bool((slots != UNMANAGED).any()):
            self._clear()
            return
        n = positions.shape[0]
        b = self._reserve(n, n_rows, device)
        qsl = query_start_loc[: n_rows + 1].to(device=device, dtype=torch.long)
        actual = int(qsl[-1])
        rows = torch.repeat_interleave(torch.arange(n_rows, device=device), qsl[1:] - qsl[:-1], output_size=actual)
        if n > actual:  # padding tokens: the null row
            rows = torch.cat([rows, rows.new_full((n - actual,), n_rows)])
        null = self.capacity  # row `capacity` of every delta table is zeros
        slot_index = torch.cat([torch.where(slots >= 0, slots, null), slots.new_full((1,), null)])
        prompt = torch.cat([self.prompt_lengths.rows().to(device), qsl.new_full((1,), 2 ** 62)])
        token_slot = slot_index[rows]
        generated = positions.long() >= prompt[rows]
        b.token_slot[COVER[Where.BOTH], :n].copy_(token_slot)
        b.token_slot[COVER[Where.GENERATED], :n].copy_(torch.where(generated, token_slot, null))
        b.token_slot[COVER[Where.PROMPT], :n].copy_(torch.where(generated, null, token_slot))
        last = (qsl[1:] - 1).clamp(min=0)
        b.last[:n_rows].copy_(last)
        b.last[n_rows:].zero_()
        self._fill_tables(b)
        self._cleared = False
        self._rows_in_pass = n_rows
        self._info = (slots, positions[last].long(), prompt[:-1])
        self.passes += 1
        self.live = True

    def _clear(self) -> None:
        """A pass that is not live: every token to the null row, so a replayed graph adds exact zeros
        instead of the previous pass's steering."""
        if self.buffers is not None and not self._cleared:
            self.buffers.token_slot.fill_(self.capacity)
            self._cleared = True

    def _fill_tables(self, b: Buffers) -> None:
        """Each steered layer's slot -> delta rows from the controller's latest coefficients (zeros when the
        layer is inactive), written into the static table; the null row stays zero."""
        for layer, steer in self.steering.items():
            table = b.tables[layer]
            if steer.active and steer.coeffs is not None:
                table[: self.capacity].copy_(steer.delta(table.dtype)[:, 0])
            else:
                table.zero_()

    def layer(self, index: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """The custom op's body: steer `residual` in place, then tap `hidden + residual` at rows' last tokens.
        Branch-free tensor work on the static buffers; the Python checks are per layer (fixed at install) or
        eager-only shortcuts, never taken while a CUDA graph is captured."""
        capturing = is_capturing(residual)
        b = self.buffers
        if b is None or not (self.live or capturing):
            return
        self.op_calls += 1
        n = residual.shape[0]
        steer = self.steering.get(index)
        if steer is not None and (capturing or steer.active):
            table = b.tables[index]
            residual.add_(table.index_select(0, b.token_slot[COVER[steer.where], :n]).to(residual.dtype))
        i = self._tap_index.get(index)
        if i is not None:
            if b.taps is None or b.taps.dtype != hidden.dtype or b.taps.shape[-1] != hidden.shape[-1]:
                b.taps = hidden.new_zeros(len(self._tap_index), b.max_rows, hidden.shape[-1])  # first call only
            rows = b.max_rows if capturing else self._rows_in_pass  # eager: only the pass's rows
            last = b.last[:rows]
            torch.add(hidden.index_select(0, last), residual.index_select(0, last), out=b.taps[i, :rows])

    def last_pass(self) -> PassInfo | None:
        """The latest live pass on the host (None before the first)."""
        if self._info is None:
            return None
        slots, last, prompt = (t.tolist() for t in self._info)
        return PassInfo(self.passes, slots, last, prompt)


STATE = WorkerState()
