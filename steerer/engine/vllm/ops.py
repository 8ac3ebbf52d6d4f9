"""The one custom op the decoder layers call: `torch.ops.steerer.layer(hidden, residual, layer)`.

Why an op and not a forward hook: vLLM compiles the model (Dynamo + Inductor), and compiled graphs skip
Python forward hooks silently. An opaque custom op stays in the graph as a call, so its Python body
(`WorkerState.layer`) runs at every forward pass, compiled or eager. It mutates `residual` in place
(declared, so functionalisation keeps it ordered) and returns nothing; its fake implementation does
nothing, which is all tracing needs.

Registered through vLLM's helper (on the platform's dispatch key) when vLLM is importable, else straight
through `torch.library` on the CPU and CUDA keys: the CUDA-graph test (`tests/test_cuda_graph.py`) and
`scripts/gpu-check` run the op on machines without vLLM.
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
    """Define `steerer::layer` once per process."""
    global _registered
    if _registered or hasattr(torch.ops.steerer, "layer"):
        _registered = True
        return
    try:
        from vllm.utils.torch_utils import direct_register_custom_op
    except ImportError:  # no vLLM: the op alone, as the CUDA-graph check uses it
        _LIB.define("layer(Tensor hidden, Tensor(a!) residual, int layer) -> ()")
        for key in ("CPU", "CUDA"):
            _LIB.impl("layer", _layer, key)
        _LIB._register_fake("layer", _layer_fake)
    else:
        direct_register_custom_op("layer", _layer, mutates_args=["residual"], fake_impl=_layer_fake,
                                  target_lib=_LIB)
    _registered = True
