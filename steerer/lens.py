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


@dataclass
class LensWeights:
    """What the lens needs of a model: its final norm (RMSNorm weight and epsilon) and its unembedding."""

    norm_weight: torch.Tensor  # [d]
    eps: float
    unembedding: torch.Tensor  # [vocab, d]

    @classmethod
    def of(cls, model: torch.nn.Module) -> LensWeights:
        """From a transformers causal LM (the decoder's final `norm`, the output embeddings)."""
        norm = model.get_decoder().norm
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5)))
        return cls(norm.weight.detach(), eps, model.get_output_embeddings().weight.detach())

    def features(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] max and mean lens logit per row: x [B, d] residuals, ids/mask [B, M] each row's token ids."""
        x = x.float()
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        rows = self.unembedding[ids].float()  # [B, M, d]
        logits = torch.einsum("bd,bmd->bm", h, rows)
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
    """The model's lens weights when some probe of `bank` reads a lens, else None (nothing to hold)."""
    return LensWeights.of(model) if any(bank.lens_params) else None
