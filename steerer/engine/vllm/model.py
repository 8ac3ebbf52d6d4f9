"""`Steerer<Arch>`: vLLM's own model class of a family, with one custom-op call after each decoder layer steerer uses.

One class per supported family (`steerer.engine.vllm.FAMILIES`: Llama, Mistral, Qwen2, Qwen3, Gemma 2 and 3,
Phi-3), made from data by `steerer_class`, never a re-implementation: it subclasses vLLM's class (weights, the
compiled backbone under `support_torch_compile`, attention, biases, norms, softcapping, tied embeddings all
stay vLLM's) and, after vLLM builds it, swaps the class of each chosen decoder layer for a generated subclass
whose `forward` calls vLLM's and then the op. Only `__class__` changes, so parameter names and weight loading
are untouched, and Dynamo traces the subclass's `forward` as it would vLLM's.

Each is registered under its own name (`plugin.py`), so an engine opts in with
`hf_overrides={"architectures": ["Steerer<Arch>"]}` (the driver picks it from the checkpoint's `architectures`)
and every other engine in the process stays plain vLLM. A checkpoint of another family is refused by name, at
start-up (`startup.py`) and here, rather than run with some of its weights silently dropped.

Which layers call the op: `hf_config.steerer_layers` (`LAYERS_KEY`, set by the driver through `hf_overrides`
to the bank's probe layers, where it taps and steers); every layer when absent. Each call is an opaque
boundary in the compiled graph (Inductor cannot fuse the residual add across it and the Python body runs),
so layers the bank does not use get none. The list is part of the HF config, which vLLM hashes into its
compile-cache key, so a cached graph built for other layers is never reused.

A vLLM decoder layer of these families returns `(hidden, residual)` with the last sublayer's output not yet
added: the residual stream after layer L is their sum (transformers' `hidden_states[L + 1]`). Steering adds
to `residual`; the next layer's fused add + norm (or the final norm) sums them.
"""

from __future__ import annotations

import functools
import importlib

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.utils import PPMissingLayer

from steerer.engine.vllm import LAYERS_KEY, STEERER_ARCHITECTURES, family_of
from steerer.engine.vllm.ops import register_ops
from steerer.engine.vllm.startup import architecture_problem
from steerer.engine.vllm.state import STATE

register_ops()


def _import(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def steered_layer_class(base: type) -> type:
    """`base` (a vLLM decoder layer class) whose forward calls the op on its `(hidden, residual)` output."""

    def forward(self, *args, **kwargs):
        out = base.forward(self, *args, **kwargs)
        if self.steerer_op:  # fixed per layer at construction: no branch in the traced graph
            torch.ops.steerer.layer(out[0], out[1], self.steerer_layer)
        return out

    return type(f"Steerer{base.__name__}", (base,), {"forward": forward, "__module__": base.__module__})


def insert_ops(model: torch.nn.Module, layers_path: str, config) -> None:
    """Swap each decoder layer under `layers_path` for its steered class, marking which ones call the op."""
    layers: object = model
    for part in layers_path.split("."):
        layers = getattr(layers, part)
    chosen = op_layers(config)
    for index, layer in enumerate(layers):  # the list spans every layer (other pipeline ranks: placeholders)
        if isinstance(layer, PPMissingLayer):
            continue
        layer.__class__ = steered_layer_class(type(layer))
        layer.steerer_layer = index
        layer.steerer_op = chosen is None or index in chosen


@functools.cache
def steerer_class(name: str) -> type:
    """The `Steerer<Arch>` class `name` (a key of `STEERER_ARCHITECTURES`), made from vLLM's class of its family."""
    family = family_of(name)
    base = _import(family.vllm_class)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        problem = architecture_problem(config, name)  # also refused at start-up (startup.py)
        if problem is not None:
            raise ValueError(problem)
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        insert_ops(self, family.layers, config)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        # Runs as Python at every step: only the backbone (`self.model`) is compiled.
        qsl, num_reqs = pass_layout()
        STATE.begin_pass(positions, qsl, num_reqs)
        return base.forward(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    return type(name, (base,), {"__init__": __init__, "forward": forward, "__module__": __name__,
                                "__qualname__": name, "steerer_family": family})


def __getattr__(name: str) -> type:
    """`Steerer<Arch>` classes are made on first use (vLLM's registry imports them lazily by name)."""
    if name in STEERER_ARCHITECTURES:
        return steerer_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SteererLlamaForCausalLM = steerer_class("SteererLlamaForCausalLM")


def op_layers(config) -> frozenset[int] | None:
    """The decoder layers that call the op (`config.steerer_layers`); None: all of them."""
    layers = getattr(config, LAYERS_KEY, None)
    return None if layers is None else frozenset(int(layer) for layer in layers)


def pass_layout() -> tuple[torch.Tensor | None, int | None]:
    """The pass's row start offsets (`query_start_loc`, [B+1]) and request count from the attention
    metadata in vLLM's forward context; (None, None) in profiling and warm-up runs that carry none."""
    if not is_forward_context_available():
        return None, None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # dual-batch overlap: micro-batches (not used on one CPU worker)
        raise RuntimeError("steerer: micro-batched forward passes (DBO) are not supported")
    if not metadata:
        return None, None
    first = next(iter(metadata.values()))
    qsl = getattr(first, "query_start_loc", None)
    seq_lens = getattr(first, "seq_lens", None)
    return qsl, (int(seq_lens.shape[0]) if seq_lens is not None else None)
