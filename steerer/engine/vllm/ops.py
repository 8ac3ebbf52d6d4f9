"""The one custom op the decoder layers call: `torch.ops.steerer.layer(hidden, residual, layer)`.

Why an op and not a forward hook: vLLM compiles the model (Dynamo + Inductor), and compiled graphs skip
Python forward hooks silently. An opaque custom op stays in the graph as a call, so its Python body
(`WorkerState.layer`) runs at every forward pass, compiled or eager. It mutates `residual` in place
(declared, so functionalisation keeps it ordered) and returns nothing; its fake implementation does
nothing, which is all tracing needs.
"""

from __future__ import annotations

import torch
from torch.library import Library

from steerer.engine.vllm.state import STATE

_LIB = Library("steerer", "FRAGMENT")  # kept alive for the process: the op lives as long as the library
_registered = False


def _layer(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    STATE.layer(layer, hidden, residual)


def _layer_fake(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


def register_ops() -> None:
    """Define `steerer::layer` once per process (vLLM's own helper, on the platform's dispatch key)."""
    global _registered
    if _registered or hasattr(torch.ops.steerer, "layer"):
        _registered = True
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("layer", _layer, mutates_args=["residual"], fake_impl=_layer_fake, target_lib=_LIB)
    _registered = True
