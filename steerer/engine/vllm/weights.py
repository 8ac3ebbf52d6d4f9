"""What steerer reads of the weights vLLM loaded: the fingerprint a bank is checked against, and the lens weights.

Both take vLLM's model object (a `Steerer<Arch>`: `.config`, `.model.embed_tokens`, and the final norm and
unembedding where its family keeps them), so the offline driver (through `LLM.apply_model`) and the `vllm serve` plugin (in
the worker, from the model runner) read them the same way. Pure torch: no vLLM import.
"""

from __future__ import annotations

import torch

from steerer.engine.vllm import FAMILIES
from steerer.lens import LensWeights, norm_offset
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


def _find(model, path: str):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def lens_weights(model) -> LensWeights:
    """The final norm and the unembedding, copied in fp32 (what a probe reading the logit lens needs), where
    the model's family keeps them (`Family.norm`, `.unembedding`: Gemma 2 has no `lm_head`, it reads its tied
    embedding); the norm's family offset folded in as `LensWeights.of` does on transformers."""
    family = getattr(model, "steerer_family", None) or FAMILIES["LlamaForCausalLM"]
    norm = _find(model, family.norm)
    vocab = int(model.config.vocab_size)  # vLLM pads the vocabulary of its embeddings
    weight = norm.weight.detach().float().clone() + norm_offset(model.config)
    return LensWeights(weight, float(norm.variance_epsilon),
                       _find(model, family.unembedding).weight[:vocab].detach().float().clone())


EMBEDDING_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight")


def checkpoint_fingerprint(folder, config) -> str | None:
    """The fingerprint of a local safetensors checkpoint before anything loads it (its first embedding rows and
    `config`); None where it cannot be read here (not a local folder, another format): checked at load then."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(str(folder)).glob("*.safetensors")) if Path(str(folder)).is_dir() else []
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = set(handle.keys())
                key = next((k for k in EMBEDDING_KEYS if k in names), None)
                if key is not None:
                    return fingerprint_of(config, handle.get_slice(key)[:64])
        except Exception:  # an unreadable file: leave the check to the load
            return None
    return None


def fingerprint_of(config, embedding_rows: torch.Tensor) -> str:
    """`model_fingerprint` of a config and the embedding's first rows."""
    return model_fingerprint(_Embeddings(config, embedding_rows))
