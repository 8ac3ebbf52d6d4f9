"""`SteererLlamaForCausalLM`: vLLM's Llama with one custom-op call after each decoder layer steerer uses.

Registered under its own architecture name (`steerer.engine.vllm.ARCHITECTURE`), so an engine opts in with
`hf_overrides={"architectures": ["SteererLlamaForCausalLM"]}` and every other engine in the process stays
plain vLLM. The weights, the compiled backbone (`LlamaModel` under `support_torch_compile`) and the
attention are vLLM's; the subclass only passes `layer_type` and adds the call.

Which layers call the op: `hf_config.steerer_layers` (`LAYERS_KEY`, set by the driver through `hf_overrides`
to the bank's probe layers, where it taps and steers); every layer when absent. Each call is an opaque
boundary in the compiled graph (Inductor cannot fuse the residual add across it and the Python body runs),
so layers the bank does not use get none.

It implements Llama checkpoints only (`startup.SUPPORTED`): any other architecture is refused by name, at start-up
and here, rather than run as Llama with its other weights (e.g. Qwen2's q/k/v biases) silently dropped. The list is part of the HF config, which vLLM hashes into its
compile-cache key, so a cached graph built for other layers is never reused.

A vLLM decoder layer returns `(hidden, residual)` with the MLP output not yet added: the residual stream
after layer L is their sum (transformers' `hidden_states[L + 1]`). Steering adds to `residual`; the next
layer's fused add + norm (or the final norm) sums them.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from steerer.engine.vllm import LAYERS_KEY
from steerer.engine.vllm.ops import register_ops
from steerer.engine.vllm.startup import architecture_problem
from steerer.engine.vllm.state import STATE

register_ops()


class SteererLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None, **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, **kwargs)
        self.steerer_layer = extract_layer_index(prefix)
        layers = op_layers(config or vllm_config.model_config.hf_config)
        self.steerer_op = layers is None or self.steerer_layer in layers

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = super().forward(positions, hidden_states, residual)
        if self.steerer_op:  # fixed per layer at construction: no branch in the traced graph
            torch.ops.steerer.layer(hidden_states, residual, self.steerer_layer)
        return hidden_states, residual


class SteererLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        problem = architecture_problem(vllm_config.model_config.hf_config)  # also refused at start-up (startup.py)
        if problem is not None:
            raise ValueError(problem)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SteererLlamaDecoderLayer)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        # Runs as Python at every step: only `self.model` (LlamaModel) is compiled.
        qsl, num_reqs = pass_layout()
        STATE.begin_pass(positions, qsl, num_reqs)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)


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
