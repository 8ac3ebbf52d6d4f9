"""What steerer reads of the weights vLLM loaded: the fingerprint a bank is checked against, and the lens weights.

Both take vLLM's model object (`SteererLlamaForCausalLM`, or any vLLM Llama: `.config`, `.model.embed_tokens`,
`.model.norm`, `.lm_head`), so the offline driver (through `LLM.apply_model`) and the `vllm serve` plugin (in
the worker, from the model runner) read them the same way. Pure torch: no vLLM import.
"""

from __future__ import annotations

import torch

from steerer.lens import LensWeights
from steerer.model import model_fingerprint


class _Embeddings:
    """Just enough of a transformers model for `model_fingerprint` (config + first embedding rows)."""

    def __init__(self, config, weight: torch.Tensor):
        self.config, self.weight = config, weight

    def get_input_embeddings(self):
        return self


def fingerprint(model) -> str:
    """The loaded weights' steerer fingerprint (dtype-independent, as `steerer.model.model_fingerprint`)."""
    return model_fingerprint(_Embeddings(model.config, model.model.embed_tokens.weight[:64].detach().clone()))


def lens_weights(model) -> LensWeights:
    """The final norm and the unembedding, copied in fp32 (what a probe reading the logit lens needs)."""
    norm = model.model.norm
    return LensWeights(norm.weight.detach().float().clone(), float(norm.variance_epsilon),
                       model.lm_head.weight.detach().float().clone())
