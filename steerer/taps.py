"""Residual-stream taps and steering hooks on decoder layers: the one place that knows layer layouts.

`LayerHooks` puts one forward hook on each decoder layer it needs. At a layer the hook first adds the
steering vector (per batch row: `coeffs[B, K] @ directions[K, d]`), then records the last position's
residual for the caller. Recording keeps a view, never a copy, so monitoring costs one slice per layer.

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


class Phase(StrEnum):
    PROMPT = "prompt"
    GENERATED = "generated"


class Where(StrEnum):
    """Which tokens a steering vector applies to."""

    PROMPT = "prompt"
    GENERATED = "generated"
    BOTH = "both"

    def covers(self, phase: Phase) -> bool:
        return self is Where.BOTH or self.value == phase.value


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, whatever the family calls them."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}")


@dataclass
class LayerSteering:
    """Steering at one layer: K unit directions and, per batch row, K coefficients (alphas)."""

    directions: torch.Tensor  # [K, d], unit norm
    where: Where = Where.GENERATED
    coeffs: torch.Tensor | None = None  # [B, K]; None or all-zero means nothing is added
    active: bool = False  # False skips the add entirely (cheaper than adding zeros)
    steered: torch.Tensor | None = None  # [B] bool: rows with a non-zero coefficient

    def set_coeffs(self, coeffs: torch.Tensor) -> None:
        self.coeffs = coeffs
        self.steered = (coeffs != 0).any(dim=1)
        self.active = bool(self.steered.any())

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
    decoder layer L at the last position of the latest forward pass, shape [B, d] (steering included).
    """

    model: nn.Module
    tap_layers: tuple[int, ...] = ()
    steering: dict[int, LayerSteering] = field(default_factory=dict)
    phase: Phase = Phase.PROMPT
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    capture_all_positions: bool = False
    _handles: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        n = len(decoder_layers(self.model))
        self.tap_layers = tuple(sorted(set(self.tap_layers)))
        for layer in (*self.tap_layers, *self.steering):
            if not 0 <= layer < n:
                raise ValueError(f"layer {layer} out of range: the model has {n} decoder layers (0..{n - 1})")

    def attach(self) -> LayerHooks:
        if self._handles:
            return self
        layers = decoder_layers(self.model)
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

    def _make_hook(self, index: int):
        steer = self.steering.get(index)
        tap = index in self.tap_layers

        def hook(module: nn.Module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            changed = False
            if steer is not None and steer.active and steer.where.covers(self.phase):
                hidden = hidden + steer.delta(hidden.dtype)
                changed = True
            if tap:
                self.captured[index] = hidden if self.capture_all_positions else hidden[:, -1]
            if not changed:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

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
            steer.set_coeffs(self.table[layer][picked])

    def after_forward(self, view) -> None:
        pass
