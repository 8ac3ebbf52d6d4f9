"""`steerer probes steer`: steering directions and layers chosen for steering, not reused from the probes.

A probe's weight separates compliant from violating readings; that need not be the push that makes the
model comply. Here each task gets a direction of its own, from the corpus and its cached features, and its
layer and strength are chosen by what steering does to generated text:

1. **Direction** (training split only): per corpus row, the mean residual of its generated tokens (the first
   `max_tokens` readings, at each candidate token layer); within each group of rows that answer the same
   base request (and, for tasks whose probe is conditioned on a variant, the same variant: the bound of a
   count limit, the target polarity or register), the compliant rows' mean minus the violating rows' mean;
   averaged over the groups that hold both classes. Variants that need opposite pushes (at most / at least)
   are combined into one direction with a sign per variant (`SIGNS`): direction = mean over variants of
   sign x difference, weighted by the variant's groups, and the runtime multiplies a request's alpha by its variant's sign
   (`conditioning["steer_signs"]`).
2. **Sweep** (training-split prompts: `benchmarks/heldout.py` with `split="train"`, never the test prompts
   the benchmark measures on): constant steering at every (candidate layer, fraction) with alpha = fraction
   x the layer's mean residual norm over generated tokens, greedy decoding, against the same prompts
   unsteered. Per cell: compliance by the task's checker, and the perplexity ratio as the benchmark
   measures it (the unsteered model's mean NLL per response token of the steered response vs the unsteered
   response, geometric mean over prompts).
3. **Choice** (`choose`): the cell with the largest compliance gain at perplexity ratio <= 1.10 (ties:
   lower ratio); a task where no cell gains keeps its source bank's steering, and says so.

4. **Gate** (`calibrate_gates`, where the runtime has `Probe.gate_threshold`): for tasks whose choice gained,
   conditional steering at the chosen alpha on the same prompts through the `Steerer` (the gate is the
   monitor's), at a few gate thresholds; the one gaining most at perplexity ratio <= 1.10 (`choose_gate`).

The bank written is the source bank with each chosen task's steering layer and direction replaced (and its
gate threshold), and `extra["steering"]` recording the choice per task (layer, alpha, fraction, gain,
perplexity ratio, n, signs, gate threshold). The sweep's table is `report/sweep.json` (+ `sweep.png`).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from steerer import conditioning
from steerer.bank import ProbeBank

REPO = Path(__file__).resolve().parents[1]
PPL_LIMIT = 1.10
DEFAULT_LAYERS = (6, 12, 18, 24)
DEFAULT_FRACTIONS = (0.08, 0.16, 0.32)
MAX_TOKENS = 64  # generated-token readings per row that enter its mean
# Per variant rule, the sign of each variant's push along the combined direction (+1: the direction is
# that variant's compliant-minus-violating difference; -1: its opposite). Keyed like conditioning["rows"].
SIGNS: dict[str, dict[str, int]] = {
    "bound": {"upper": 1, "lower": -1},  # +: toward shorter (at most), -: toward longer (at least)
    "polarity": {"positive": 1, "negative": -1},
    "register": {"formal": 1, "informal": -1},
}
SOURCE = "sweep on train split"


# -- directions (pure) -----------------------------------------------------------------------------------------
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


# -- choice and bank (pure) --------------------------------------------------------------------------------------
def gain_of(cell: dict) -> float:
    return cell["compliance"] - cell["compliance_baseline"]


def choose(cells: Sequence[dict], ppl_limit: float = PPL_LIMIT) -> dict | None:
    """The steered cell with the largest compliance gain at perplexity ratio <= `ppl_limit` (ties: the lower
    ratio, then the smaller fraction), or None when no such cell gains anything."""
    eligible = [c for c in cells if c.get("alpha") and c.get("perplexity_ratio") is not None
                and c["perplexity_ratio"] <= ppl_limit and gain_of(c) > 0]
    if not eligible:
        return None
    return max(eligible, key=lambda c: (round(gain_of(c), 9), -c["perplexity_ratio"], -c["fraction"]))


def steer_signs_supported() -> bool:
    """Does this runtime read `conditioning["steer_signs"]` (a bank carrying it would not load otherwise)?"""
    try:
        conditioning.check({"variant": "bound", "rows": {"lower": 0}, "steer_signs": {"lower": -1}}, 1)
    except conditioning.ConditioningError:
        return False
    return True


def steered_bank(bank: ProbeBank, choices: dict[str, dict], directions: dict[str, np.ndarray],
                 signs_in_conditioning: bool | None = None) -> ProbeBank:
    """`bank` with each chosen task's steering layer and direction replaced, and `extra["steering"]` set to
    `choices` (task -> the record of its choice: layer, alpha, fraction, gain, perplexity_ratio, n, source,
    and `steer_signs` for variant tasks). Tasks absent from `directions` keep their steering. Signs go into
    the probe's conditioning when the runtime reads them (`steer_signs_supported`, or as told)."""
    if signs_in_conditioning is None:
        signs_in_conditioning = steer_signs_supported()
    probes, dirs = list(bank.probes), bank.directions.clone()
    for task, direction in directions.items():
        i = bank.index(task)
        choice = choices[task]
        vec = torch.as_tensor(np.asarray(direction), dtype=torch.float32)
        dirs[i] = vec / vec.norm()
        probe = replace(probes[i], steer_layer=int(choice["layer"]))
        signs = choice.get("steer_signs")
        if signs and signs_in_conditioning and probe.conditioning is not None:
            probe = replace(probe, conditioning=probe.conditioning | {"steer_signs": dict(signs)})
        probes[i] = probe
    extra = bank.extra | {"steering": {**bank.extra.get("steering", {}), **choices}}
    return replace(bank, probes=probes, directions=dirs, extra=extra)


# -- statistics (pure) -------------------------------------------------------------------------------------------
def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (None for n = 0)."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_gain_ci(steered: Sequence[bool], base: Sequence[bool], resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of mean(steered) - mean(base) over prompts resampled in pairs."""
    s, b = np.asarray(steered, float), np.asarray(base, float)
    if len(s) == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(s), size=(resamples, len(s)))
    diffs = s[idx].mean(1) - b[idx].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return float(low), float(high)


def ppl_ratio_ci(deltas: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95,
                 ) -> tuple[float, float] | None:
    """Percentile bootstrap interval of exp(mean NLL difference) over prompts (the perplexity ratio)."""
    d = np.asarray(deltas, float)
    if len(d) == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    ratios = np.exp(d[idx].mean(1))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def repetition(tokens: Sequence[int], n: int = 3) -> float | None:
    """rep-n: 1 - distinct n-grams / n-grams of the response; None if it has fewer than n tokens. Degenerate,
    looping text is *more* predictable to the unsteered model, so the perplexity ratio alone does not see it."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else None


# -- the sweep (runs the model) ----------------------------------------------------------------------------------
def heldout_module():
    """benchmarks/heldout.py, whose prompt builder the sweep shares with the benchmarks (split="train")."""
    path = str(REPO / "benchmarks")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("heldout")


class LastPromptAndGenerated:
    """A `Where` for measurement: generated tokens and the prompt's last token (which chooses the first
    response token). The prompt pass's width comes from a pre-hook on the model (prompts are left-padded, so
    the last column is every row's last prompt token)."""

    def __init__(self, model: torch.nn.Module):
        self.width = 1
        self._handle = model.register_forward_pre_hook(self._see, with_kwargs=True)

    def _see(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.width = int(ids.shape[-1])

    def mask(self, generated):
        if generated is True or isinstance(generated, torch.Tensor):
            return generated
        cover = torch.zeros(1, self.width, dtype=torch.bool)
        cover[0, -1] = True
        return cover

    def remove(self) -> None:
        self._handle.remove()


@dataclass(frozen=True)
class Arm:
    """One steered configuration of a task's sweep (layer None = unsteered)."""

    layer: int | None
    fraction: float
    alpha: float
    direction: str = "paired"  # paired (this module's) | probe (the source bank's, at its steering layer)
    where: str = "generated"  # generated | both | last_prompt+generated

    @property
    def key(self) -> str:
        if self.layer is None:
            return "off"
        return f"{self.direction}@{self.layer}:{self.fraction:g}:{self.where}"


def generate_arms(lm, prompts, arms: Sequence[Arm], vectors: dict[tuple[str, int], np.ndarray],
                  signs: Sequence[int], max_new_tokens: int, max_batch: int = 256, progress=None) -> list[list]:
    """Greedy generations of every prompt under every arm (one static batch per `where`, split into
    `max_batch` chunks): per arm, a list of `Generation`s aligned with `prompts`. Row r of arm a gets
    alpha (x its prompt's variant sign, for this module's directions) along its arm's direction at its arm's
    layer, zero elsewhere."""
    from steerer.engine.hf import HFEngine
    from steerer.generation import SamplingParams, generate
    from steerer.model import chat_prompt
    from steerer.taps import FixedSteering, LayerHooks, LayerSteering, Where

    ids = [chat_prompt(lm.tokenizer, p.messages) for p in prompts]
    out: list[list] = [[None] * len(prompts) for _ in arms]
    for where in dict.fromkeys(a.where for a in arms):
        mine = [k for k, a in enumerate(arms) if a.where == where]
        keys = sorted({(arms[k].direction, arms[k].layer) for k in mine if arms[k].layer is not None})
        layers = sorted({layer for _, layer in keys})
        special = LastPromptAndGenerated(lm.model) if where == "last_prompt+generated" else None
        steering = {}
        for layer in layers:
            cols = [key for key in keys if key[1] == layer]
            steer = LayerSteering(torch.tensor(np.stack([vectors[c] for c in cols]), dtype=torch.float32),
                                  Where.GENERATED if where == "last_prompt+generated" else Where(where))
            if special is not None:
                steer.where = special
            steering[layer] = (steer, cols)
        jobs = [(k, i) for k in mine for i in range(len(prompts))]
        size = math.ceil(len(jobs) / math.ceil(len(jobs) / max_batch)) if jobs else 1  # balanced chunks
        try:
            for start in range(0, len(jobs), size):
                chunk = jobs[start:start + size]
                table = {}
                for layer, (_, cols) in steering.items():
                    t = torch.zeros(len(chunk), len(cols))
                    for row, (k, i) in enumerate(chunk):
                        a = arms[k]
                        if a.layer == layer:
                            sign = signs[i] if a.direction == "paired" else 1  # the probe's: as the bank has it
                            t[row, cols.index((a.direction, a.layer))] = a.alpha * sign
                    table[layer] = t
                hooks = LayerHooks(lm.model, steering={layer: s for layer, (s, _) in steering.items()})
                with hooks:
                    gens = generate(HFEngine(lm, hooks), [ids[i] for _, i in chunk],
                                    SamplingParams(max_new_tokens=max_new_tokens),
                                    FixedSteering({layer: s for layer, (s, _) in steering.items()}, table))
                for (k, i), g in zip(chunk, gens, strict=True):
                    out[k][i] = g
                if progress is not None:
                    progress(len(chunk))
        finally:
            if special is not None:
                special.remove()
    return out


def score_cells(lm, task: str, prompts, arms: Sequence[Arm], gens: list[list], base: int = 0) -> list[dict]:
    """Per arm: compliance (the task's checker on the decoded text), perplexity ratio against arm `base`
    (the unsteered one) as the benchmark measures it, with intervals; per-prompt outcomes kept."""
    from steerer.ab.fluency import response_nll, scored_tokens
    from steerer.constraints import Constraint, check_constraint
    from steerer.model import chat_prompt

    texts = [[lm.tokenizer.decode(g.tokens, skip_special_tokens=True) for g in row] for row in gens]
    ok = [[bool(check_constraint(Constraint(task, p.params), t)) for p, t in zip(prompts, row, strict=True)]
          for row in texts]
    ids = [chat_prompt(lm.tokenizer, p.messages) for p in prompts]
    flat = [(k, i) for k in range(len(arms)) for i in range(len(prompts))]
    nll_flat = response_nll(lm, [ids[i] for _, i in flat], [scored_tokens(lm, gens[k][i].tokens) for k, i in flat])
    nll = [[None] * len(prompts) for _ in arms]
    for (k, i), v in zip(flat, nll_flat, strict=True):
        nll[k][i] = v
    cells = []
    for k, arm in enumerate(arms):
        deltas = [s - b for s, b in zip(nll[k], nll[base], strict=True) if s is not None and b is not None]
        n = len(prompts)
        comp = sum(ok[k]) / n
        cells.append({
            "direction": arm.direction if arm.layer is not None else None, "layer": arm.layer,
            "fraction": arm.fraction, "alpha": round(arm.alpha, 4), "where": arm.where, "n": n,
            "compliance": comp, "compliance_ci": wilson(sum(ok[k]), n),
            "compliance_baseline": sum(ok[base]) / n, "gain": comp - sum(ok[base]) / n,
            "gain_ci": paired_gain_ci(ok[k], ok[base]),
            "perplexity_ratio": round(math.exp(float(np.mean(deltas))), 4) if deltas else None,
            "perplexity_ratio_ci": ppl_ratio_ci(deltas), "perplexity_pairs": len(deltas),
            "mean_tokens": float(np.mean([len(g.tokens) for g in gens[k]])),
            "repetition": _mean([repetition(g.tokens) for g in gens[k]]),
            "satisfied": ok[k],
        })
    return cells


@dataclass
class SweepConfig:
    tasks: Sequence[str]
    layers: Sequence[int] = DEFAULT_LAYERS
    fractions: Sequence[float] = DEFAULT_FRACTIONS
    n: int = 20
    seed: int = 0
    max_new_tokens: int = 96
    length_max_new_tokens: int = 160  # tasks whose label needs the whole response (the count tasks)
    max_tokens: int = MAX_TOKENS
    compare_probe: bool = True  # also sweep the source bank's direction at its steering layer
    where_tasks: Sequence[str] = ("lowercase",)  # also measure steering the prompt at the chosen cell
    max_batch: int = 192
    extra: dict = field(default_factory=dict)


def budget_for(task: str, config: SweepConfig) -> int:
    from steerer.tasks import TOKEN_BUDGET, get_task

    return config.length_max_new_tokens if get_task(task).token_budget > TOKEN_BUDGET else config.max_new_tokens


def sweep_task(lm, bank: ProbeBank, data, token_layers: Sequence[int], task: str, config: SweepConfig,
               log: Callable[[str], None] = print) -> tuple[dict, dict[int, DirectionFit]]:
    """One task's directions, sweep cells and choice (plus the `where` check when asked)."""
    heldout = heldout_module()
    rule = variant_rule(bank, task)
    fits = fit_directions(data, task, token_layers, config.layers, rule, config.max_tokens)
    prompts = heldout.held_out_prompts(task, config.n, config.seed, split="train")
    signs = [SIGNS[rule].get(conditioning.VARIANTS[rule](p.params), 1) if rule else 1 for p in prompts]
    probe = bank.probes[bank.index(task)]
    vectors = {("paired", layer): fit.direction for layer, fit in fits.items()}
    arms = [Arm(None, 0.0, 0.0)]
    arms += [Arm(layer, f, f * fits[layer].norm) for layer in config.layers for f in config.fractions]
    probe_norm = None
    if config.compare_probe:
        layer = probe.steering_layer
        vectors[("probe", layer)] = bank.directions[bank.index(task)].numpy()
        probe_norm = _layer_norm(data, token_layers, layer, config.max_tokens)
        # the probe's direction has no per-variant sign: `generate_arms` applies it as the bank does (+1)
        arms += [Arm(layer, f, f * probe_norm, "probe") for f in config.fractions]
    budget = budget_for(task, config)
    t0 = time.time()
    gens = generate_arms(lm, prompts, arms, vectors, signs, budget, config.max_batch)
    cells = score_cells(lm, task, prompts, arms, gens)
    paired = [c for c in cells if c["direction"] == "paired"]
    chosen = choose(cells)  # the source bank's direction (at its layer) is a candidate too
    record = {"task": task, "variant_rule": rule, "n": config.n, "max_new_tokens": budget,
              "probe_layer": probe.layer, "probe_steering_layer": probe.steering_layer,
              "probe_direction_norm_at_layer": probe_norm,
              "directions": {str(layer): fit.summary() | {
                  "cosine_with_probe_direction": _cos(fit.direction, bank.directions[bank.index(task)].numpy())
                  if layer == probe.steering_layer else None} for layer, fit in fits.items()},
              "prompts": [{"id": p.id, "params": p.params, "sign": s} for p, s in zip(prompts, signs, strict=True)],
              "cells": cells, "chosen": _brief(chosen), "best_paired_cell": _brief(choose(paired)),
              "best_probe_cell": _brief(choose([c for c in cells if c["direction"] == "probe"])),
              "command": config.extra.get("command")}
    if task in config.where_tasks:
        # at the chosen layer, or (nothing chosen) the layer of the largest gain whatever its cost
        layer = (chosen or max(paired, key=lambda c: (gain_of(c), -c["perplexity_ratio"])))["layer"]
        w_arms = [Arm(None, 0.0, 0.0)] + [Arm(layer, f, f * fits[layer].norm, "paired", w)
                                          for w in ("both", "last_prompt+generated") for f in config.fractions]
        w_gens = generate_arms(lm, prompts, w_arms[1:], vectors, signs, budget, config.max_batch)
        w_cells = score_cells(lm, task, prompts, w_arms, [gens[0], *w_gens])
        record["where_check"] = w_cells[1:] + [c for c in paired if c["layer"] == layer]
    record["seconds"] = round(time.time() - t0, 1)
    log(f"{task}: chosen {_brief(chosen)} in {record['seconds']} s")
    return record, fits


def _layer_norm(data, token_layers, layer, max_tokens) -> float | None:
    if layer not in token_layers:
        return None
    col = list(token_layers).index(layer)
    train = np.flatnonzero(data.split == "train")
    offsets = data.offsets.tolist()
    lengths = [min(data.rows[i]["n_tokens"], offsets[i + 1] - offsets[i]) for i in train]
    pieces = [data.tokens[offsets[i]:offsets[i] + n, col] for i, n in zip(train, lengths, strict=True)]
    local = np.concatenate([[0], np.cumsum([p.shape[0] for p in pieces])]).tolist()
    return mean_norm(torch.cat(pieces), local, lengths, max_tokens)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 4)


def _brief(cell: dict | None) -> dict | None:
    if cell is None:
        return None
    return {k: cell[k] for k in ("direction", "layer", "fraction", "alpha", "where", "n", "compliance",
                                 "compliance_baseline", "gain", "gain_ci", "perplexity_ratio", "perplexity_ratio_ci")}


def choice_record(record: dict, fits: dict[int, DirectionFit] | None = None) -> dict | None:
    """The bank's `extra["steering"][task]` entry for a task's sweep record (None: no cell gained)."""
    chosen = record.get("chosen")
    if chosen is None:
        return None
    paired = chosen["direction"] == "paired"
    out = {"layer": chosen["layer"], "alpha": chosen["alpha"], "fraction": chosen["fraction"],
           "gain": round(chosen["gain"], 4), "perplexity_ratio": chosen["perplexity_ratio"], "n": chosen["n"],
           "compliance_baseline": chosen["compliance_baseline"], "source": SOURCE,
           "direction": "paired mean difference (compliant - violating, same base request), training split"
           if paired else "the source bank's direction, at its steering layer"}
    signs = record["directions"][str(chosen["layer"])].get("signs") if paired else None
    if signs:
        out["steer_signs"] = signs
    return out


def run(lm, bank: ProbeBank, corpus: Path, features: Path, config: SweepConfig, report: Path,
        log: Callable[[str], None] = print, fresh: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Sweep every task (resumable: tasks finished earlier, with the settings their records carry, are read
    back from `report/sweep.json` and their directions from `report/directions.npz`, unless `fresh`); returns
    (the sweep document, chosen directions by task)."""
    from probes.evaluation import load_task

    fmanifest = json.loads((features / "manifest.json").read_text())
    token_layers = fmanifest["token_layers"]
    bad = [layer for layer in config.layers if layer not in token_layers]
    if bad:
        raise ValueError(f"candidate layers {bad} are not token layers of the features ({token_layers})")
    report.mkdir(parents=True, exist_ok=True)
    path, npz = report / "sweep.json", report / "directions.npz"
    settings = {k: v for k, v in asdict(config).items() if k not in ("tasks", "extra")}
    doc = json.loads(path.read_text()) if path.exists() and not fresh else {}
    if doc.get("source_bank") != bank.version or doc.get("model") != lm.name:
        doc = {}
    doc = {"model": lm.name, "source_bank": bank.version, "settings": settings, "tasks": doc.get("tasks", {}),
           **config.extra}
    vectors = dict(np.load(npz)) if npz.exists() and doc["tasks"] else {}
    for task in config.tasks:
        record = doc["tasks"].get(task)
        if record and all(f"{task}@{layer}" in vectors for layer in record["settings"]["layers"]):
            log(f"{task}: done earlier ({record['settings']})")
            continue
        data = load_task(corpus, features, task)
        record, fits = sweep_task(lm, bank, data, token_layers, task, config, log)
        record["settings"] = json.loads(json.dumps(settings))
        del data
        for layer, fit in fits.items():
            vectors[f"{task}@{layer}"] = fit.direction.astype(np.float32)
        np.savez(npz, **vectors)
        doc["tasks"][task] = record
        save_doc(doc, report)
    chosen = {}
    for t, r in doc["tasks"].items():
        c = r.get("chosen")
        if t in config.tasks and c:
            chosen[t] = vectors[f"{t}@{c['layer']}"] if c["direction"] == "paired" else \
                bank.directions[bank.index(t)].numpy()
    return doc, chosen


# -- the conditional gate (runs the model through the Steerer: the gate is the monitor's) ----------------------
def with_gate_thresholds(bank: ProbeBank, thresholds: dict[str, float | None]) -> ProbeBank:
    """`bank` with these tasks' gate thresholds set on the probes that gate conditional steering (the warning
    predictors where the bank has them, else its probes)."""
    def set_on(target: ProbeBank) -> ProbeBank:
        probes = [replace(p, gate_threshold=thresholds[p.task]) if p.task in thresholds else p
                  for p in target.probes]
        return replace(target, probes=probes)

    if bank.warning is not None:
        return replace(bank, warning=set_on(bank.warning))
    return set_on(bank)


def choose_gate(cells: Sequence[dict], ppl_limit: float = PPL_LIMIT) -> dict | None:
    """The gate threshold whose conditional steering gains most at perplexity ratio <= `ppl_limit` (ties: the
    lower ratio, then the lower threshold: less steering); None when none gains."""
    eligible = [c for c in cells if c.get("perplexity_ratio") is not None and c["perplexity_ratio"] <= ppl_limit
                and gain_of(c) > 0]
    if not eligible:
        return None
    return max(eligible, key=lambda c: (round(gain_of(c), 9), -c["perplexity_ratio"], -c["gate_threshold"]))


def calibrate_gates(lm, bank: ProbeBank, doc: dict, tasks: Sequence[str], thresholds: Sequence[float],
                    config: SweepConfig, log: Callable[[str], None] = print) -> dict:
    """Per task: conditional steering at its chosen alpha on the sweep's training-split prompts, at each gate
    threshold (all tasks in one Steerer per threshold), against the same prompts unsteered through the same
    Steerer; compliance, gain and perplexity ratio per threshold, and `choose_gate`'s pick."""
    from steerer.ab.fluency import response_nll, scored_tokens
    from steerer.constraints import Constraint
    from steerer.core import Request, Steerer
    from steerer.generation import SamplingParams
    from steerer.model import chat_prompt
    from steerer.policy import OFF, SteeringPolicy

    heldout = heldout_module()
    prompts = {t: heldout.held_out_prompts(t, config.n, config.seed, split="train") for t in tasks}
    alphas = {t: bank.extra["steering"][t]["alpha"] for t in tasks}

    def requests(policy_of) -> list:
        return [Request(p.messages, (Constraint(t, p.params),), policy_of(t),
                        sampling=SamplingParams(max_new_tokens=budget_for(t, config)), id=f"{p.id}")
                for t in tasks for p in prompts[t]]

    runs = {}
    for g in [None, *thresholds]:  # None: unsteered
        gbank = with_gate_thresholds(bank, {t: g for t in tasks}) if g is not None else bank
        with Steerer(lm, gbank, capacity=config.max_batch, use_unreliable_probes=True) as steerer:
            reqs = requests(lambda t, g=g: OFF if g is None else SteeringPolicy("conditional", alphas[t]))
            runs[g] = steerer.run(reqs, config.max_batch)
        log(f"gate {g}: {len(runs[g])} responses")
    flat = [(g, i) for g in runs for i in range(len(runs[g]))]
    ids = {t: [chat_prompt(lm.tokenizer, p.messages) for p in prompts[t]] for t in tasks}
    all_ids = [i for t in tasks for i in ids[t]]
    nll = response_nll(lm, [all_ids[i] for _, i in flat], [scored_tokens(lm, runs[g][i].tokens) for g, i in flat])
    nll_of = {(g, i): v for (g, i), v in zip(flat, nll, strict=True)}
    out, start = {}, 0
    for t in tasks:
        rows = range(start, start + len(prompts[t]))
        start += len(prompts[t])
        base_ok = [bool(runs[None][i].verdicts[0].satisfied) for i in rows]
        cells = []
        for g in thresholds:
            ok = [bool(runs[g][i].verdicts[0].satisfied) for i in rows]
            deltas = [nll_of[(g, i)] - nll_of[(None, i)] for i in rows
                      if nll_of[(g, i)] is not None and nll_of[(None, i)] is not None]
            steered = [sum(runs[g][i].steered_tokens.values()) / max(len(runs[g][i].tokens), 1) for i in rows]
            cells.append({"gate_threshold": g, "alpha": alphas[t], "n": len(ok), "compliance": float(np.mean(ok)),
                          "compliance_baseline": float(np.mean(base_ok)), "gain": float(np.mean(ok) - np.mean(base_ok)),
                          "gain_ci": paired_gain_ci(ok, base_ok),
                          "perplexity_ratio": round(math.exp(float(np.mean(deltas))), 4) if deltas else None,
                          "perplexity_ratio_ci": ppl_ratio_ci(deltas),
                          "steered_token_share": round(float(np.mean(steered)), 4)})
        chosen = choose_gate(cells)
        out[t] = {"cells": cells, "chosen": None if chosen is None else chosen["gate_threshold"]}
        log(f"{t}: gate threshold {out[t]['chosen']}")
    return out


def save_doc(doc: dict, report: Path) -> Path:
    """Write the sweep document atomically to `report/sweep.json`."""
    path = report / "sweep.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.rename(path)
    return path


def gate_supported() -> bool:
    """Does this runtime's Probe carry a gate threshold for conditional steering?"""
    from steerer.bank import Probe

    return "gate_threshold" in Probe.__dataclass_fields__


def plot(doc: dict, path: Path) -> None:
    """Per task: gain vs perplexity ratio of every swept cell, the chosen one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(doc["tasks"])
    cols = 3
    rows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    markers = {f: m for f, m in zip(doc["settings"]["fractions"], "os^Dv", strict=False)}
    for ax, task in zip(axes.flat, tasks, strict=False):
        record = doc["tasks"][task]
        cells = [c for c in record["cells"] if c["layer"] is not None]
        keys = sorted({(c["direction"], c["layer"]) for c in cells}, key=lambda k: (k[0] != "paired", k[1]))
        cmap = plt.get_cmap("viridis", max(len(keys), 2))
        for j, key in enumerate(keys):
            mine = sorted((c for c in cells if (c["direction"], c["layer"]) == key), key=lambda c: c["fraction"])
            color = "tab:red" if key[0] == "probe" else cmap(j)
            ax.plot([c["perplexity_ratio"] for c in mine], [c["gain"] for c in mine], color=color, linewidth=1,
                    label=f"{key[0]} L{key[1]}")
            for c in mine:
                ax.scatter(c["perplexity_ratio"], c["gain"], color=color, marker=markers.get(c["fraction"], "o"), s=22)
        for where, color in (("both", "black"), ("last_prompt+generated", "tab:gray")):
            mine = sorted((c for c in record.get("where_check", []) if c["where"] == where), key=lambda c: c["fraction"])
            if mine:
                ax.plot([c["perplexity_ratio"] for c in mine], [c["gain"] for c in mine], color=color, linewidth=1,
                        linestyle="--", label=f"paired L{mine[0]['layer']}, {where}")
                for c in mine:
                    ax.scatter(c["perplexity_ratio"], c["gain"], color=color, marker=markers.get(c["fraction"], "o"),
                               s=22)
        chosen = record.get("chosen")
        if chosen:
            ax.scatter(chosen["perplexity_ratio"], chosen["gain"], s=160, facecolors="none", edgecolors="black")
        ax.axvline(PPL_LIMIT, color="grey", linestyle="--", linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.axhline(0.15, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"{task} (base {cells[0]['compliance_baseline']:.2f}, n={record['n']})", fontsize=10)
        ax.set_xlabel("perplexity ratio")
        ax.set_ylabel("compliance gain")
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle(f"steering sweep on training-split prompts ({doc['model']}); markers: fractions "
                 f"{', '.join(f'{f:g}' for f in markers)} of the layer norm; ring = chosen", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
