"""Step 1 of the sweep (pure): per task and candidate layer, the steering direction from the corpus's cached
features, compliant minus violating within groups answering the same request (and variant), combined over
variants with a sign each (`SIGNS`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from steerer import conditioning
from steerer.bank import ProbeBank

MAX_TOKENS = 64  # generated-token readings per row that enter its mean
# Per variant rule, the sign of each variant's push along the combined direction (+1: the direction is
# that variant's compliant-minus-violating difference; -1: its opposite). Keyed like conditioning["rows"].
SIGNS: dict[str, dict[str, int]] = {
    "bound": {"upper": 1, "lower": -1},  # +: toward shorter (at most), -: toward longer (at least)
    "polarity": {"positive": 1, "negative": -1},
    "register": {"formal": 1, "informal": -1},
}


def row_means(tokens: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int], max_tokens: int = MAX_TOKENS,
              ) -> np.ndarray:
    """[N, d] per row: the mean of its first min(length, max_tokens) readings (`tokens` [sum T, d], rows at
    `offsets` [N+1]); a row with no reading gets NaN."""
    offsets = [int(o) for o in offsets]
    out = np.full((len(lengths), tokens.shape[-1]), np.nan, dtype=np.float64)
    for i, length in enumerate(lengths):
        start = offsets[i]
        stop = min(offsets[i + 1], start + min(int(length), max_tokens))
        if stop > start:
            out[i] = tokens[start:stop].double().mean(0).numpy()
    return out


def mean_norm(tokens: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int], max_tokens: int = MAX_TOKENS,
              ) -> float:
    """The mean L2 norm of the readings `row_means` averages (what a fraction of alpha is a fraction of)."""
    norms, offsets = [], [int(o) for o in offsets]
    for i, length in enumerate(lengths):
        stop = min(offsets[i + 1], offsets[i] + min(int(length), max_tokens))
        if stop > offsets[i]:
            norms.append(tokens[offsets[i]:stop].float().norm(dim=-1))
    return float(torch.cat(norms).mean()) if norms else float("nan")


def group_difference(means: np.ndarray, satisfied: Sequence[bool], groups: Sequence[str],
                     ) -> tuple[np.ndarray | None, int]:
    """Mean over groups holding both classes of (mean compliant row - mean violating row), and how many
    groups that was (None, 0 when none holds both). Rows with NaN means are left out."""
    satisfied = np.asarray(satisfied, dtype=bool)
    groups = np.asarray(groups)
    ok = ~np.isnan(means).any(axis=1)
    diffs = []
    for g in dict.fromkeys(groups.tolist()):
        mine = (groups == g) & ok
        pos, neg = mine & satisfied, mine & ~satisfied
        if pos.any() and neg.any():
            diffs.append(means[pos].mean(0) - means[neg].mean(0))
    if not diffs:
        return None, 0
    return np.mean(diffs, axis=0), len(diffs)


@dataclass
class DirectionFit:
    """One candidate: a unit direction at a layer, and what it was made from."""

    task: str
    layer: int
    direction: np.ndarray  # [d] unit
    norm: float  # mean residual norm of generated tokens at the layer (alpha = fraction x norm)
    groups: dict[str, int]  # per variant ("all" without one): groups holding both classes
    signs: dict[str, int] | None = None  # per variant key, the push's sign along `direction`
    agreement: float | None = None  # cosine between the signed variant differences (1 = one axis)

    def summary(self) -> dict:
        return {"layer": self.layer, "norm": round(self.norm, 3), "groups": self.groups, "signs": self.signs,
                "variant_agreement": None if self.agreement is None else round(self.agreement, 4)}


def steering_direction(means: np.ndarray, satisfied: Sequence[bool], groups: Sequence[str],
                       variants: Sequence[str] | None = None, signs: dict[str, int] | None = None,
                       ) -> tuple[np.ndarray, dict[str, int], float | None]:
    """(unit direction, groups used per variant, agreement). Without variants: `group_difference` of all rows.
    With variants and `signs`: each signed variant's difference (groups never span variants), averaged with
    weights = its groups; the agreement is the cosine between the two signed differences (None unless exactly two). ValueError when no
    group holds both classes."""
    groups = np.asarray(groups)
    if variants is None:
        diff, n = group_difference(means, satisfied, groups)
        if diff is None:
            raise ValueError("no group holds both compliant and violating rows")
        return _unit(diff), {"all": n}, None
    if not signs:
        raise ValueError("variants need signs")
    variants = np.asarray(variants)
    satisfied = np.asarray(satisfied, dtype=bool)
    signed, weights, used = [], [], {}
    for key, sign in signs.items():
        mine = variants == key
        diff, n = group_difference(means[mine], satisfied[mine], groups[mine])
        used[key] = n
        if diff is not None:
            signed.append(sign * diff)
            weights.append(n)
    if not signed:
        raise ValueError("no group of any variant holds both compliant and violating rows")
    agreement = None
    if len(signed) == 2:
        a, b = signed
        agreement = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    # every group counts once, whichever variant it belongs to (a variant with two groups is mostly noise)
    return _unit(np.average(signed, axis=0, weights=weights)), used, agreement


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if not math.isfinite(n) or n == 0:
        raise ValueError("direction has zero or non-finite norm")
    return v / n


def variant_rule(bank: ProbeBank, task: str) -> str | None:
    """The probe's variant rule when it is one `SIGNS` knows (the bound, polarity, register), else None."""
    rule = (bank.probes[bank.index(task)].conditioning or {}).get("variant")
    return rule if rule in SIGNS else None


def fit_directions(data, task: str, token_layers: Sequence[int], layers: Sequence[int], rule: str | None,
                   max_tokens: int = MAX_TOKENS) -> dict[int, DirectionFit]:
    """Per candidate layer, the direction from a task's `TaskData` (training split only)."""
    train = np.flatnonzero(data.split == "train")
    rows = [data.rows[i] for i in train]
    offsets = data.offsets.tolist()
    lengths = [min(r["n_tokens"], offsets[i + 1] - offsets[i]) for r, i in zip(rows, train, strict=True)]
    satisfied = [bool(r["satisfied"]) for r in rows]
    variants = [conditioning.VARIANTS[rule](r["params"]) for r in rows] if rule else None
    groups = [f"{r['base_id']}|{v}" for r, v in zip(rows, variants or [""] * len(rows), strict=True)]
    fits = {}
    for layer in layers:
        col = list(token_layers).index(layer)
        # gather this layer's readings of the training rows into one contiguous block
        pieces = [data.tokens[offsets[i]:offsets[i] + lengths[k], col] for k, i in enumerate(train)]
        block = torch.cat(pieces) if pieces else data.tokens[:0, col]
        local = np.concatenate([[0], np.cumsum([p.shape[0] for p in pieces])]).tolist()
        means = row_means(block, local, lengths, max_tokens)
        direction, used, agreement = steering_direction(means, satisfied, groups, variants,
                                                        SIGNS[rule] if rule else None)
        fits[layer] = DirectionFit(task, layer, direction, mean_norm(block, local, lengths, max_tokens), used,
                                   dict(SIGNS[rule]) if rule else None, agreement)
    return fits


def generated_layer_norm(data, token_layers, layer, max_tokens) -> float | None:
    """Mean residual norm over the training split's generated tokens at `layer` (None: not a token layer):
    what a swept fraction of strength is a fraction of."""
    if layer not in token_layers:
        return None
    col = list(token_layers).index(layer)
    train = np.flatnonzero(data.split == "train")
    offsets = data.offsets.tolist()
    lengths = [min(data.rows[i]["n_tokens"], offsets[i + 1] - offsets[i]) for i in train]
    pieces = [data.tokens[offsets[i]:offsets[i] + n, col] for i, n in zip(train, lengths, strict=True)]
    local = np.concatenate([[0], np.cumsum([p.shape[0] for p in pieces])]).tolist()
    return mean_norm(torch.cat(pieces), local, lengths, max_tokens)
