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
    ids = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    x = _splitmix64(base[:, None] + ids[None, :] * _GOLDEN)
    return (((x >> 40) & ((1 << 24) - 1)).to(torch.float32) + 0.5) / float(1 << 24)


def select_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, steps: torch.Tensor, sampled: bool | None = None,
                  nucleus: bool | None = None) -> torch.Tensor:
    """Greedy where temperature < MIN_TEMPERATURE (0 included), else top-p Gumbel-max sampling at that
    temperature. [B] ids. `sampled` (any row samples) and `nucleus` (any sampled row has top_p < 1) are
    read off the tensors when not given; a caller that knows them on the host spares those device reads.

    Every row's choice depends only on its own logits, temperature, top-p, seed and step, so a row draws
    the same token in any batch."""
    greedy = logits.argmax(dim=-1)
    sampled_rows = temperature >= MIN_TEMPERATURE
    if sampled is None:
        sampled = bool(sampled_rows.any())
    if not sampled:
        return greedy
    if logits.device.type == "cpu":  # only the sampled rows (picking them costs no synchronisation here)
        idx = sampled_rows.nonzero().squeeze(1)
        return greedy.index_put((idx,), _sample(logits[idx], temperature[idx], top_p[idx], seeds[idx], steps[idx],
                                                nucleus))
    # elsewhere every row is computed and the greedy ones keep their argmax: no data-dependent shapes
    safe = torch.where(sampled_rows, temperature, 1.0)
    return torch.where(sampled_rows, _sample(logits, safe, top_p, seeds, steps, nucleus), greedy)


def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
            steps: torch.Tensor, nucleus: bool | None) -> torch.Tensor:
    scaled = logits / temperature[:, None]
    if nucleus is None:
        nucleus = bool((top_p < 1).any())
    if nucleus:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, logits.shape[-1])))
    return (scaled + gumbel).argmax(dim=-1)
