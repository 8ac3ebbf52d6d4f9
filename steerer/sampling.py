"""Next-token selection over a batch: greedy rows and sampled rows side by side, no loop over rows.

Sampling uses the Gumbel-max trick with counter-based noise hashed from (row seed, step, token id),
so a seeded request draws the same tokens whichever batch it shares and at whatever row it sits.
"""

from __future__ import annotations

import torch

_MASK64 = 0xFFFFFFFFFFFFFFFF
# Temperatures below this are greedy. Far below it logits / temperature overflow float32 (at 1e-40 every
# sampled row chose token 0), and already at it the Gumbel noise decides only between near-exact ties.
MIN_TEMPERATURE = 1e-4


def _to_signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


_GOLDEN = _to_signed(0x9E3779B97F4A7C15)
_MIX1 = _to_signed(0xBF58476D1CE4E5B9)
_MIX2 = _to_signed(0x94D049BB133111EB)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping multiply; logical shifts via masks)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) noise [B, V], a pure function of (seed, step, token id)."""
    base = _splitmix64(seeds.to(torch.int64) * _GOLDEN + steps.to(torch.int64))
    x = _splitmix64(base[:, None] + torch.arange(vocab, dtype=torch.int64)[None, :] * _GOLDEN)
    return (((x >> 40) & ((1 << 24) - 1)).to(torch.float32) + 0.5) / float(1 << 24)


def select_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Greedy where temperature < MIN_TEMPERATURE (0 included), else top-p Gumbel-max sampling at that
    temperature. [B] ids."""
    greedy = logits.argmax(dim=-1)
    sampled_rows = temperature >= MIN_TEMPERATURE
    if not bool(sampled_rows.any()):
        return greedy
    idx = sampled_rows.nonzero().squeeze(1)
    scaled = logits[idx] / temperature[idx, None]
    p = top_p[idx]
    if bool((p < 1).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seeds[idx], steps[idx], logits.shape[-1])))
    tokens = greedy.clone()
    tokens[idx] = (scaled + gumbel).argmax(dim=-1)
    return tokens
