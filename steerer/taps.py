"""Residual-stream taps and steering hooks on decoder layers: the one place that knows layer layouts.

Where a family keeps its decoder layers, and how a layer's output carries the residual stream, are data
(`LayerLayout`, one entry per architecture in `LAYOUTS`): transformers' layers return the residual itself
(or a tuple whose element 0 is), vLLM's return `(hidden, residual)` whose sum is the residual stream.

`LayerHooks` puts one forward hook on each decoder layer it needs. At a layer the hook first adds the
steering vector (per batch row: `coeffs[B, K] @ directions[K, d]`), then records each row's last token's
residual for the caller. Recording keeps a view, never a copy, so monitoring costs one slice per layer.
A pass is either a `[B, T, d]` batch (transformers) or flattened tokens `[N, d]` with row start offsets
(`starts`, [B+1], as vLLM lays out a mixed prefill/decode pass). Which tokens are prompt and which are
generated is a per-token mask (`generated`: a bool for a uniform pass, or a [B, T] / [N] tensor), so one
pass may mix rows in their prefill with rows decoding.

Alpha is absolute: directions are unit vectors in the residual space of their layer, so `alpha` is the
L2 norm of the vector added to each token's residual. (SmolLM2-135M's residual norms grow from about 30 at
layer 0 to about 130 at layer 10 and 650 at layer 28; `steerer generate --json` prints them.) A row whose coefficients are
all zero gets an exact zero added (masked, not multiplied, so not even a NaN direction reaches it), so its
output is bit-identical to an unsteered run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import nn


class Where(StrEnum):
    """Which tokens a steering vector applies to."""

    PROMPT = "prompt"
    GENERATED = "generated"
    BOTH = "both"

    def mask(self, generated: bool | torch.Tensor) -> bool | torch.Tensor:
        """Which tokens of a pass this covers, from its prompt/generated mask (a bool: every token alike)."""
        if self is Where.BOTH:
            return True
        return generated if self is Where.GENERATED else (not generated if isinstance(generated, bool) else ~generated)


@dataclass(frozen=True)
class LayerLayout:
    """Where an architecture keeps its decoder layers and how a layer's output carries the residual.

    `layers`: attribute path of the `ModuleList` of decoder blocks. `output`: "first" = the output is the
    residual stream, or a tuple whose element 0 is (transformers); "hidden_residual" = a `(hidden, residual)`
    pair whose sum is the residual stream (vLLM's fused add + norm: the next layer adds them).
    """

    layers: str
    output: str = "first"

    def __post_init__(self) -> None:
        if self.output not in ("first", "hidden_residual"):
            raise ValueError(f"unknown layer output layout {self.output!r}")

    def find_layers(self, model: nn.Module) -> nn.ModuleList | None:
        obj: object = model
        for part in self.layers.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj if isinstance(obj, nn.ModuleList) else None

    def read(self, output, pick) -> torch.Tensor:
        """The residual stream at the tokens `pick` selects (a function of a [..., d] tensor)."""
        if self.output == "hidden_residual":
            return pick(output[0]) + pick(output[1])
        return pick(output[0] if isinstance(output, tuple) else output)

    def add(self, output, delta: torch.Tensor):
        """The layer's output with `delta` added to the residual stream (same structure as `output`)."""
        if self.output == "hidden_residual":
            hidden, residual, *rest = output
            return (hidden, residual + delta.to(residual.dtype), *rest)
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype), *output[1:])
        return output + delta.to(output.dtype)

    def dtype(self, output) -> torch.dtype:
        return (output[0] if isinstance(output, tuple) else output).dtype


# model_type -> layout; families not listed are found by trying the known layer paths with "first".
LAYOUTS: dict[str, LayerLayout] = {
    **{name: LayerLayout("model.layers") for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                                      "gemma3_text", "phi3", "olmo2", "granite")},
    "gpt2": LayerLayout("transformer.h"),
    "gpt_neox": LayerLayout("gpt_neox.layers"),
    "opt": LayerLayout("model.decoder.layers"),
    "mpt": LayerLayout("transformer.blocks"),
}
_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks")


def layout_for(model: nn.Module) -> LayerLayout:
    """The layout of a model: its `model_type`'s entry in `LAYOUTS`, else the first known path that exists."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = LAYOUTS.get(model_type)
    if known is not None and known.find_layers(model) is not None:
        return known
    for path in _PATHS:
        if LayerLayout(path).find_layers(model) is not None:
            return LayerLayout(path)
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}")


def decoder_layers(model: nn.Module, layout: LayerLayout | None = None) -> nn.ModuleList:
    """The decoder blocks of a causal LM, whatever the family calls them."""
    layers = (layout or layout_for(model)).find_layers(model)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__}")
    return layers


@dataclass
class LayerSteering:
    """Steering at one layer: K unit directions and, per batch row, K coefficients (alphas)."""

    directions: torch.Tensor  # [K, d], unit norm
    where: Where = Where.GENERATED
    coeffs: torch.Tensor | None = None  # [B, K]; None or all-zero means nothing is added
    active: bool = False  # False skips the add entirely (cheaper than adding zeros)
    steered: torch.Tensor | None = None  # [B] bool: rows with a non-zero coefficient

    def set_coeffs(self, coeffs: torch.Tensor, active: bool | None = None) -> None:
        """Coefficients for the next pass. `active` says whether any row may be steered; None reads it off
        the coefficients (a device sync; the controller knows it on the host and passes it)."""
        self.coeffs = coeffs
        self.steered = (coeffs != 0).any(dim=1)
        self.active = bool(self.steered.any()) if active is None else active

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, d] vectors to add. Rows with all-zero coefficients get an exact zero whatever the
        directions hold: with a NaN in a direction, 0 * NaN would otherwise be NaN in every row."""
        delta = self.coeffs.to(dtype) @ self.directions.to(dtype)
        return torch.where(self.steered[:, None], delta, 0.0)[:, None, :]


def unit_directions(directions: torch.Tensor) -> torch.Tensor:
    directions = torch.as_tensor(directions, dtype=torch.float32)
    if directions.ndim == 1:
        directions = directions[None]
    norms = directions.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()) or not bool(torch.isfinite(directions).all()):
        raise ValueError("steering directions must be finite and non-zero")
    return directions / norms


@dataclass
class LayerHooks:
    """Removable forward hooks that tap (and optionally steer) the residual stream.

    Use as a context manager, or call `attach()` / `remove()`. `captured[L]` is the residual after
    decoder layer L at each row's last token of the latest forward pass, shape [B, d] (steering included).
    Before a pass the engine calls `set_pass(generated, starts)`: the per-token prompt/generated mask and,
    for flattened tokens, the rows' start offsets.
    """

    model: nn.Module
    tap_layers: tuple[int, ...] = ()
    steering: dict[int, LayerSteering] = field(default_factory=dict)
    generated: bool | torch.Tensor = False  # per token: True = a generated token (a bool: the whole pass)
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    capture_all_positions: bool = False
    layout: LayerLayout | None = None  # None: `layout_for(model)`
    starts: torch.Tensor | None = None  # [B+1] row start offsets when a pass is flattened tokens [N, d]
    _handles: list = field(default_factory=list, repr=False)
    _token_rows: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.layout = self.layout or layout_for(self.model)
        n = len(decoder_layers(self.model, self.layout))
        self.tap_layers = tuple(sorted(set(self.tap_layers)))
        for layer in (*self.tap_layers, *self.steering):
            if not 0 <= layer < n:
                raise ValueError(f"layer {layer} out of range: the model has {n} decoder layers (0..{n - 1})")

    def set_pass(self, generated: bool | torch.Tensor, starts: torch.Tensor | None = None) -> None:
        """Describe the next pass: which tokens are generated, and (flattened passes) where rows start."""
        self.generated = generated
        self.starts = starts
        self._token_rows = None

    def attach(self) -> LayerHooks:
        if self._handles:
            return self
        layers = decoder_layers(self.model, self.layout)
        for index in sorted(set(self.tap_layers) | set(self.steering)):
            self._handles.append(layers[index].register_forward_hook(self._make_hook(index)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.captured.clear()

    def __enter__(self) -> LayerHooks:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _pick_last(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # [B, T, d]
            return x if self.capture_all_positions else x[:, -1]
        return x if self.capture_all_positions else x[self.starts[1:] - 1]  # flattened [N, d]

    def _delta(self, steer: LayerSteering, dtype: torch.dtype, flat: torch.Tensor | None) -> torch.Tensor | None:
        """The per-token vectors to add at this layer, or None when nothing is added this pass."""
        cover = steer.where.mask(self.generated)
        if cover is False:
            return None
        delta = steer.delta(dtype)  # [B, 1, d]
        if flat is not None:  # flattened tokens: each token takes its row's vector
            if self._token_rows is None:
                counts = self.starts[1:] - self.starts[:-1]
                self._token_rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts,
                                                           output_size=flat.shape[0])
            delta = delta[:, 0][self._token_rows]  # [N, d]
        if isinstance(cover, torch.Tensor):
            delta = torch.where(cover[..., None], delta, torch.zeros((), dtype=dtype, device=delta.device))
        return delta

    def _make_hook(self, index: int):
        steer = self.steering.get(index)
        tap = index in self.tap_layers
        layout = self.layout

        def hook(module: nn.Module, args, output):
            changed = False
            if steer is not None and steer.active:
                first = output[0] if isinstance(output, tuple) else output
                delta = self._delta(steer, layout.dtype(output), first if first.ndim == 2 else None)
                if delta is not None:
                    output = layout.add(output, delta)
                    changed = True
            if tap:
                self.captured[index] = layout.read(output, self._pick_last)
            return output if changed else None

        return hook


def stack_captured(captured: dict[int, torch.Tensor], layers: Iterable[int]) -> torch.Tensor:
    """[len(layers), B, d] view of the captured residuals, for one batched matmul per step."""
    return torch.stack([captured[layer] for layer in layers])


@dataclass
class FixedSteering:
    """Step hooks that give each request fixed coefficients: row r reads `table[layer][r]` ([N, K]).

    A table lookup per pass, so rows that join or leave the batch keep their own strengths (row ids are
    the integer indices `generate` assigns). Row tables of zeros mean no steering for that request.
    """

    steering: dict[int, LayerSteering]
    table: dict[int, torch.Tensor]

    def before_forward(self, rows, index) -> None:
        picked = torch.as_tensor(rows, dtype=torch.long)
        for layer, steer in self.steering.items():
            steer.set_coeffs(self.table[layer][picked].to(steer.directions.device))

    def after_forward(self, view) -> None:
        pass
