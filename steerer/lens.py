"""The logit lens of a request's words: how close the model is to saying them, read off the residual stream.

A probe for "do not use the word X" cannot know X from the residual alone. The model's own weights can: the
residual through the final norm and the unembedding gives, at any layer, the logit the model would give X's
first token now. A probe that declares ``lens`` conditioning adds two inputs per token: the max and the
mean of that logit over the first tokens of every spelling of the request's words (as is, capitalised, with
and without a leading space). Everything comes from the residual and the weights, never the generated text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LENS_TOKENS = 64  # token ids per request and probe (terms are bounded by the request limits anyway)
FEATURES = 2  # max, mean


def words_of(params: dict, param: str) -> list[str]:
    """The words a lens reads from a request's params: a list of terms, or the words of a topic phrase."""
    value = params.get(param)
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    words = [w for w in str(value or "").replace("-", " ").split() if len(w) > 2]
    return words or [str(value or "")]


def token_ids(tokenizer, words: list[str], limit: int = MAX_LENS_TOKENS) -> list[int]:
    """First token of each spelling of each word (deduplicated, sorted, at most `limit`)."""
    ids: set[int] = set()
    for word in words:
        for spelling in (word, " " + word, word.capitalize(), " " + word.capitalize()):
            encoded = tokenizer.encode(spelling, add_special_tokens=False) if spelling.strip() else []
            if encoded:
                ids.add(int(encoded[0]))
    return sorted(ids)[:limit]


# model_type -> what a family's final RMSNorm adds to its weight: Gemma scales by (1 + w), the others by w
NORM_OFFSET = {"gemma": 1.0, "gemma2": 1.0, "gemma3": 1.0, "gemma3_text": 1.0}


def norm_offset(config) -> float:
    """The offset of the final norm's scale for a model config (`NORM_OFFSET`; 0 for most families)."""
    return NORM_OFFSET.get(getattr(config, "model_type", None), 0.0)


@dataclass
class LensWeights:
    """What the lens needs of a model: its final norm (RMSNorm scale and epsilon) and its unembedding.

    `norm_weight` is the effective scale, family quirks folded in (Gemma's stored w becomes 1 + w), so both
    backends compute the same lens from the same checkpoint. Gemma 2's final logit softcap is left out: it is
    monotone, and a lens reading is a feature, not a logit the model samples from."""

    norm_weight: torch.Tensor  # [d]
    eps: float
    unembedding: torch.Tensor  # [vocab, d]

    @classmethod
    def of(cls, model: torch.nn.Module) -> LensWeights:
        """From a transformers causal LM (the decoder's final `norm`, the output embeddings)."""
        norm = model.get_decoder().norm
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5)))
        weight = norm.weight.detach()
        offset = norm_offset(getattr(model, "config", None))
        return cls(weight + offset if offset else weight, eps, model.get_output_embeddings().weight.detach())

    def features(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] max and mean lens logit per row: x [B, d] residuals, ids/mask [B, M] each row's token ids."""
        return pool(self.logits(x, ids), mask)

    def logits(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, M] the lens logit of each of a row's token ids: x [B, d] residuals, ids [B, M]."""
        x = x.float()
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        return torch.einsum("bd,bmd->bm", h, self.unembedding[ids].float())


def pool(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 2] max and mean of [B, M] per-id lens logits over each row's ids (`mask`); zeros for a row without."""
    mask = mask.bool()
    count = mask.sum(-1).clamp(min=1)
    best = torch.where(mask, logits, torch.full_like(logits, -torch.inf)).max(-1).values
    best = torch.where(mask.any(-1), best, torch.zeros_like(best))
    mean = torch.where(mask, logits, torch.zeros_like(logits)).sum(-1) / count
    return torch.stack([best, mean], dim=-1)


def id_table(ids: list[int], width: int = MAX_LENS_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's ids padded to `width` ([width] long) and its mask ([width] bool)."""
    padded = torch.zeros(width, dtype=torch.long)
    mask = torch.zeros(width, dtype=torch.bool)
    padded[: len(ids)] = torch.tensor(ids[:width], dtype=torch.long)
    mask[: len(ids)] = True
    return padded, mask


def lens_for(bank, model: torch.nn.Module) -> LensWeights | None:
    """The model's lens weights when some probe of `bank` (or warning predictor) reads a lens, else None."""
    return LensWeights.of(model) if any(bank.lens_params) or any(bank.alerting.lens_params) else None
