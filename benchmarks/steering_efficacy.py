"""Does steering raise compliance, what does it cost in fluency, and does the end verdict survive it?

On held-out prompts of every task (test-split base requests, params over a spread of difficulty, no aid,
greedy decoding) each task's prompts run unsteered, then with policies `constant`, `conditional` and
`proportional`. Strength: where the bank records a steering sweep (`steerer probes steer`, on
training-split prompts: `extra["steering"][task]["alpha"]`), that alpha times each of `--alpha-scales`;
elsewhere a fraction of the steering layer's typical residual norm (alpha is absolute, and SmolLM2-135M's
norms grow from ~30 at layer 0 to ~650 at layer 28): alpha = fraction x mean L2 norm of the generated
tokens' residuals at that layer, measured by a tap during the unsteered runs. Both are recorded. A probe
whose conditioning declares `steer_signs` gets its alpha's sign from the request's variant (the runtime
does it: "at most" pushes towards shorter text, "at least" towards longer).

Per (task, policy, alpha) cell, with 95% intervals beside each figure:
  compliance        share of responses the task's checker accepts (Wilson interval)
  gain              compliance - compliance_baseline on the same prompts (paired bootstrap over prompts)
  perplexity_ratio  cost: exp(mean over prompts of NLL_steered - NLL_baseline), where NLL is the mean
                    negative log-likelihood per response token of the response under the *unsteered* model
                    (teacher-forced forward of chat prompt + response, no hooks; EOS not scored), and each
                    prompt's own unsteered response is the baseline: the geometric mean of the per-prompt
                    perplexity ratios (bootstrap over prompts). Prompts where either response is empty are
                    left out.
  repetition        mean over responses (with >= 3 tokens) of 1 - distinct/total token 3-grams (rep-3)
  distinct_2        mean over responses (with >= 2 tokens) of distinct/total token 2-grams: a second fluency
                    measure beside perplexity (looping text is likely text, so the ratio alone misses it)
  verdict           the probe's end verdict against the checker on these responses: accuracy of
                    `predicted_violation` (Wilson) and AUROC of `p_satisfied_end` (stratified bootstrap)
The summary's `verdict_calibration` pools them over tasks: unsteered vs each steering policy.
Every request of one task (all policies and strengths) runs in one shared batch through `Steerer`.
A cell counts as a gain at low cost only if its perplexity ratio is <= 1.10 *and* its repetition stays
within 0.05 of the unsteered run (`loop_free`; the summary's `*_loop_free` entries and the bar); the
ratio-only figures are kept beside them. `--recount` recomputes the summary of an existing JSON with these
rules without generating (distinct_2 is None in records written before it was measured). `--merge A.json,...`
adds the steered cells of other runs (e.g. more `--alpha-scales` for some `--tasks`) to `--output` and
recounts over all cells: each merged cell keeps its own run's unsteered rep-3 (`repetition_baseline`, which
its loop-free test reads) and gain (paired against its own run's unsteered responses); `--table` prints
every cell as a Markdown row with its intervals (the docs' steering table). `--mark-bank BANK` writes
`steerable: false` and the measured reason into BANK's `extra["steering"][task]` for every task of `--output`
whose gaining cells (perplexity ratio <= 1.10) all loop: the sweep's rule (`without_looping_steering`) on
the benchmark's cells.

    .venv/bin/python benchmarks/steering_efficacy.py --bank BANK [--n-per-task 60] [--alpha-scales 1]
        [--threads 1]     # writes benchmarks/results/steering_efficacy.json and .png
    .venv/bin/python benchmarks/steering_efficacy.py --recount [--output JSON]   # summary only, no model
    .venv/bin/python benchmarks/steering_efficacy.py --merge RUN.json[,...] [--output JSON] [--table]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from probes.heldout import HeldOutPrompt, held_out_prompts, load_bank
from probes.reliability import end_readings
from probes.steering import (
    REP_MARGIN,
    benchmark_doc,
    distinct,
    loop_free,
    repetition,
    without_looping_steering,
)
from probes.tasks import TASKS
from probes.train import auroc, auroc_ci
from steerer.ab.fluency import response_nll, scored_tokens
from steerer.bank import ProbeBank
from steerer.constraints import Constraint
from steerer.core import Request, Result, Steerer
from steerer.generation import SamplingParams, StepView
from steerer.lens import lens_for
from steerer.model import chat_prompt, load_model
from steerer.monitor import Monitor
from steerer.policy import OFF, SteeringPolicy
from steerer.stats import paired_gain_ci, wilson
from steerer.stats import ratio_of_means_ci as ppl_ratio_ci
from steerer.taps import Where
from steerer.tasks import TOKEN_BUDGET, get_task

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("constant", "conditional", "proportional")
PPL_LIMIT = 1.10  # a cell "costs little" at or under this perplexity ratio
GAIN = 0.15  # compliance gain (absolute) that counts as a real effect
MATCH_SHARE = 0.80  # conditional "matches" constant if it reaches this share of constant's best gain
TASKS_GAINING_BAR = 4
TASKS_MATCHING_BAR = 3


class NormTapSteerer(Steerer):
    """A Steerer that also sums the L2 norms of generated tokens' residuals at the bank's layers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_sum = {layer: 0.0 for layer in self.bank.layers}
        self.norm_count = 0

    def after_forward(self, view: StepView) -> None:
        super().after_forward(view)
        keep = (view.index >= 0) & ~view.closing
        if bool(keep.any()):
            for layer in self.bank.layers:
                self.norm_sum[layer] += float(view.residuals[layer][keep].float().norm(dim=-1).sum())
            self.norm_count += int(keep.sum())

    def mean_norms(self) -> dict[int, float]:
        return {layer: s / max(self.norm_count, 1) for layer, s in self.norm_sum.items()}


@dataclass(frozen=True)
class Arm:
    policy: str  # off | constant | conditional | proportional
    fraction: float
    alpha: float
    scale: float | None = None  # x the sweep's chosen alpha (None: alpha from a fraction of the layer norm)


def run_requests(steerer: Steerer, requests: list[Request], bar: tqdm, max_batch: int) -> list[Result]:
    results = {}
    for item in steerer.generate(requests, max_batch):
        if isinstance(item, Result):
            results[item.request_id] = item
            bar.update(1)
    return [results[r.id] for r in requests]


def make_request(prompt: HeldOutPrompt, arm: Arm, max_new_tokens: int) -> Request:
    policy = OFF if arm.policy == "off" else SteeringPolicy(arm.policy, arm.alpha)
    return Request(prompt.messages, (Constraint(prompt.task, prompt.params),), policy,
                   sampling=SamplingParams(max_new_tokens=max_new_tokens),
                   id=f"{prompt.id}|{arm.policy}|{arm.fraction}|{arm.alpha:.4f}")


def mean_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _round(pair, places: int = 4):
    return None if pair is None else [round(float(x), places) for x in pair]


def verdict_calibration(results: Sequence[Result]) -> dict:
    """The probe's end verdict against the checker: accuracy of predicted_violation, AUROC of p_satisfied_end."""
    pairs = [(v.satisfied, v.predicted_violation, v.p_satisfied_end) for r in results for v in r.verdicts[:1]
             if v.satisfied is not None and not v.probe_muted]
    n = len(pairs)
    if n == 0:
        return {"n": 0}
    right = sum(bool(s) != bool(p) for s, p, _ in pairs)
    scored = [(s, p) for s, _, p in pairs if p is not None and math.isfinite(p)]
    y = np.array([int(s) for s, _ in scored])
    score = np.array([p for _, p in scored], dtype=float)
    both = len(set(y.tolist())) == 2
    return {"n": n, "n_satisfied": int(sum(bool(s) for s, _, _ in pairs)),
            "accuracy": round(right / n, 4), "accuracy_ci": _round(wilson(right, n)),
            "predicted_violation_rate": round(statistics.fmean(bool(p) for _, p, _ in pairs), 4),
            "auroc": round(auroc(y, score), 4) if both else None,
            "auroc_ci": _round(auroc_ci(y, score)) if both else None}


def cell(arm: Arm, layer: int, results: list[Result], base: list[Result], nll: list[float | None],
         base_nll: list[float | None]) -> dict:
    deltas = [s - b for s, b in zip(nll, base_nll, strict=True) if s is not None and b is not None]
    steered = [sum(r.steered_tokens.values()) / max(len(r.tokens), 1) for r in results]
    ok = [bool(r.verdicts[0].satisfied) for r in results]
    ok_base = [bool(r.verdicts[0].satisfied) for r in base]
    n = len(results)
    return {
        "policy": arm.policy, "alpha": round(arm.alpha, 4), "fraction": round(arm.fraction, 4), "scale": arm.scale,
        "layer": layer, "n": n,
        "compliance": statistics.fmean(ok), "compliance_ci": _round(wilson(sum(ok), n)),
        "compliance_baseline": statistics.fmean(ok_base), "compliance_baseline_ci": _round(wilson(sum(ok_base), n)),
        "gain": round(statistics.fmean(ok) - statistics.fmean(ok_base), 4),
        "gain_ci": _round(paired_gain_ci(ok, ok_base)),
        "perplexity_ratio": round(math.exp(statistics.fmean(deltas)), 4) if deltas else None,
        "perplexity_ratio_ci": _round(ppl_ratio_ci(deltas)),
        "perplexity_pairs": len(deltas),
        "repetition": mean_or_none([repetition(r.tokens) for r in results]),
        "repetition_baseline": mean_or_none([repetition(r.tokens) for r in base]),
        "distinct_2": mean_or_none([distinct(r.tokens) for r in results]),
        "steered_token_share": round(statistics.fmean(steered), 4),
        "mean_tokens": statistics.fmean(len(r.tokens) for r in results),
        "verdict": verdict_calibration(results),
    }


def _best(c: dict) -> dict:
    return {k: c.get(k) for k in ("alpha", "fraction", "scale", "gain", "gain_ci", "perplexity_ratio",
                                  "perplexity_ratio_ci", "compliance", "compliance_ci", "repetition", "distinct_2")}


def best_cell(cells: list[dict], policy: str, ppl_limit: float | None, loops: bool = True) -> dict | None:
    """The steered cell of `policy` with the largest compliance gain (ties: lower perplexity ratio); with
    `loops` False only cells whose rep-3 stays within `REP_MARGIN` of the unsteered cell (`cells[0]`)."""
    base_rep = cells[0].get("repetition")
    eligible = [c for c in cells if c["policy"] == policy and c["perplexity_ratio"] is not None
                and (ppl_limit is None or c["perplexity_ratio"] <= ppl_limit)
                and (loops or loop_free(c, base_rep, REP_MARGIN))]
    if not eligible:
        return None
    return _best(max(eligible, key=lambda c: (c["gain"], -c["perplexity_ratio"])))


def _matches(cells: list[dict], loops: bool) -> bool | None:
    """Some conditional cell gains >= MATCH_SHARE of constant's best gain (any perplexity) at a lower
    perplexity ratio than that constant cell; with `loops` False, among loop-free cells only. None where
    constant gains nothing."""
    base_rep = cells[0].get("repetition")
    const = best_cell(cells, "constant", None, loops)
    if const is None or const["gain"] <= 0:
        return None
    return any(c["policy"] == "conditional" and c["perplexity_ratio"] is not None
               and c["gain"] >= MATCH_SHARE * const["gain"] and c["perplexity_ratio"] < const["perplexity_ratio"]
               and (loops or loop_free(c, base_rep, REP_MARGIN)) for c in cells)


def summarise(tasks: dict[str, list[dict]]) -> dict:
    """Per task and policy the best cells, and which tasks gain >= GAIN at low cost: by perplexity alone
    (`*_within_ppl_limit`, the old rule, kept beside) and loop-free (`*_loop_free`: the bar's rule)."""
    per_task: dict[str, dict] = {}
    gaining, sure, free, free_sure = ({p: [] for p in POLICIES} for _ in range(4))
    matches, free_matches = [], []
    for task, cells in tasks.items():
        entry: dict = {"compliance_baseline": cells[0]["compliance_baseline"],
                       "compliance_baseline_ci": cells[0]["compliance_baseline_ci"],
                       "repetition_unsteered": cells[0].get("repetition"),
                       "distinct_2_unsteered": cells[0].get("distinct_2")}
        for policy in POLICIES:
            entry[f"{policy}_best_within_ppl_limit"] = best_cell(cells, policy, PPL_LIMIT)
            entry[f"{policy}_best_loop_free"] = best_cell(cells, policy, PPL_LIMIT, loops=False)
            entry[f"{policy}_best"] = best_cell(cells, policy, None)
            for key, lists in (("within_ppl_limit", (gaining, sure)), ("loop_free", (free, free_sure))):
                best = entry[f"{policy}_best_{key}"]
                if best is not None and best["gain"] >= GAIN:
                    lists[0][policy].append(task)
                    if best["gain_ci"] is not None and best["gain_ci"][0] > 0:
                        lists[1][policy].append(task)
        entry["conditional_matches_constant_at_lower_ppl"] = match = _matches(cells, loops=True)
        entry["conditional_matches_constant_loop_free"] = free_match = _matches(cells, loops=False)
        matches += [task] if match else []
        free_matches += [task] if free_match else []
        steered = [c for c in cells[1:] if c.get("alpha")]
        entry["steerable_without_loops"] = any(loop_free(c, cells[0].get("repetition"), REP_MARGIN) and c["gain"] > 0
                                               and c["perplexity_ratio"] is not None
                                               and c["perplexity_ratio"] <= PPL_LIMIT for c in steered)
        per_task[task] = entry
    either = sorted(set().union(*gaining.values()))
    either_free = sorted(set().union(*free.values()))
    return {
        "criteria": {"gain_at_least": GAIN, "perplexity_ratio_at_most": PPL_LIMIT, "match_share": MATCH_SHARE,
                     "repetition_within": REP_MARGIN,
                     "loop_free_rule": f"rep-3 <= the unsteered run's + {REP_MARGIN} (and perplexity ratio <= "
                                       f"{PPL_LIMIT}): looping text is likely text, so the ratio alone misses it",
                     "match_rule": "conditional matches constant if some conditional cell gains at least "
                                   f"{MATCH_SHARE:.0%} of constant's best gain (any perplexity) at a lower perplexity "
                                   "ratio than that constant cell (None where constant gains nothing); the loop-free "
                                   "variant considers loop-free cells only"},
        "tasks_gaining_at_low_cost": {**gaining, "either": either},
        "tasks_gaining_at_low_cost_interval_above_zero": sure,
        "tasks_gaining_loop_free": {**free, "either": either_free},
        "tasks_gaining_loop_free_interval_above_zero": free_sure,
        "conditional_matches_constant_at_lower_ppl": matches,
        "conditional_matches_constant_loop_free": free_matches,
        "not_steerable_without_loops": [t for t, e in per_task.items() if not e["steerable_without_loops"]
                                        and any(c.get("alpha") and c["gain"] > 0 for c in tasks[t][1:])],
        "bar": {"steering_gain": {"rule": f"gain >= {GAIN} at perplexity ratio <= {PPL_LIMIT} with rep-3 within "
                                          f"{REP_MARGIN} of unsteered on >= {TASKS_GAINING_BAR} tasks (any policy)",
                                  "tasks": either_free, "met": len(either_free) >= TASKS_GAINING_BAR},
                "conditional_matches": {"rule": f"conditional reaches >= {MATCH_SHARE:.0%} of constant's best gain at "
                                                f"a lower perplexity ratio on >= {TASKS_MATCHING_BAR} tasks, loop-free "
                                                "cells only",
                                        "tasks": free_matches, "met": len(free_matches) >= TASKS_MATCHING_BAR},
                "ppl_only_rule_for_comparison": {"steering_gain": either, "conditional_matches": matches}},
        "per_task": per_task,
    }


def recount(path: Path) -> dict:
    """Recompute the summary of a written result with today's rules (no generation): the cells hold the
    measures. The verdict calibration and the config are kept; the rule is recorded."""
    doc = json.loads(path.read_text())
    calibration = doc["summary"].get("verdict_calibration")
    doc["summary"] = summarise(doc["tasks"]) | ({"verdict_calibration": calibration} if calibration else {})
    doc["config"]["recounted"] = ("summary recomputed from these cells by `benchmarks/steering_efficacy.py "
                                  "--recount` (loop-free rule); distinct_2 is None where the cells predate it")
    doc["config"].setdefault("distinct_2", "mean over responses of distinct/total token 2-grams")
    path.write_text(json.dumps(doc, indent=1))
    return doc


def _cell_key(c: dict) -> tuple:
    return c["policy"], round(float(c["alpha"]), 3)


def _same_unsteered(a: dict, b: dict) -> bool:
    """Two runs' unsteered cells of one task agree (same compliance and rep-3: greedy, same prompts)."""
    return (a["n"] == b["n"] and abs(a["compliance"] - b["compliance"]) < 1e-9
            and a.get("repetition") is not None and b.get("repetition") is not None
            and abs(a["repetition"] - b["repetition"]) < 1e-6)


def merge_cells(into: dict[str, list[dict]], other: dict[str, list[dict]], run: int) -> dict[str, bool]:
    """Add `other`'s steered cells to `into` in place (a cell of the same policy and alpha is replaced), each
    tagged with `run` and its own run's unsteered rep-3; a task new to `into` comes whole. Where both runs'
    unsteered cells agree, an unmeasured distinct-2 of `into`'s is filled from `other`'s. Returns per task
    whether the unsteered cells agree."""
    agree = {}
    for task, cells in other.items():
        base = cells[0]
        steered = [c | {"run": run, "repetition_baseline": c.get("repetition_baseline", base.get("repetition"))}
                   for c in cells[1:]]
        if task not in into:
            into[task] = [base | {"run": run}, *steered]
            agree[task] = True
            continue
        mine = into[task]
        agree[task] = _same_unsteered(mine[0], base)
        if agree[task] and mine[0].get("distinct_2") is None:
            mine[0] = mine[0] | {"distinct_2": base.get("distinct_2"), "distinct_2_from_run": run}
        keys = {_cell_key(c) for c in steered}
        kept = [c for c in mine[1:] if _cell_key(c) not in keys]
        order = {p: i for i, p in enumerate(POLICIES)}
        into[task] = [mine[0], *sorted(kept + steered, key=lambda c: (order.get(c["policy"], 9), c["alpha"]))]
    return agree


def merge(path: Path, sources: Sequence[Path]) -> dict:
    """`path`'s result with the cells of `sources` merged in (`merge_cells`) and the summary recounted over
    all cells; each source's command, bank and agreement of unsteered cells is recorded in config['merged']."""
    doc = json.loads(path.read_text())
    merged = doc["config"].setdefault("merged", [])
    for source in sources:
        other = json.loads(source.read_text())
        run = len(merged) + 1
        agree = merge_cells(doc["tasks"], other["tasks"], run)
        merged.append({"run": run, "from": str(source), "command": other["config"].get("command"),
                       "bank_version": other.get("bank_version"), "n_per_task": other.get("n_per_task"),
                       "alpha_scales": other["config"].get("alpha_scales"), "tasks": sorted(other["tasks"]),
                       "unsteered_cells_agree": agree})
    doc["config"]["merge_rule"] = ("cells of `run` N come from config['merged'][N-1]; their gain is paired "
                                   "against that run's own unsteered responses and their loop-free test reads its "
                                   "unsteered rep-3 (`repetition_baseline`); cells without `run` are this file's")
    path.write_text(json.dumps(doc, indent=1))
    return recount(path)


def mark_bank(folder: Path, doc: dict, source: str) -> list[str]:
    """Mark steering off (`without_looping_steering`) in the bank at `folder` for the tasks of the result `doc`
    whose gains all loop; the bank is rewritten only if a record changed. Returns the tasks changed."""
    bank = ProbeBank.load(folder)
    if doc.get("model") not in (None, bank.model):
        raise ValueError(f"--mark-bank: the result is of model {doc['model']!r}, the bank of {bank.model!r}")
    where = f"{source} (test-split prompts, n={doc.get('n_per_task')} per task)"
    marked = without_looping_steering(bank, benchmark_doc(doc), source=where)
    before, after = bank.extra.get("steering") or {}, marked.extra.get("steering") or {}
    changed = sorted(t for t in after if after[t] != before.get(t))
    if changed:
        marked.save(folder)
    return changed


def calibration_summary(results_by_policy: dict[str, list[Result]]) -> dict:
    """Pooled over tasks: the end verdict against the checker, unsteered vs under each policy."""
    return {policy: verdict_calibration(results) for policy, results in results_by_policy.items()}


def plot(tasks: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tasks)
    cols = 3
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False, sharey=True)
    colors = {"off": "grey", "constant": "tab:blue", "conditional": "tab:orange", "proportional": "tab:green"}
    for ax, task in zip(axes.flat, names, strict=False):
        cells = tasks[task]
        for x, c in enumerate(cells):
            low, high = c["compliance_ci"]
            ax.bar(x, c["compliance"], color=colors[c["policy"]], alpha=0.85)
            ax.errorbar(x, c["compliance"], yerr=[[c["compliance"] - low], [high - c["compliance"]]], color="black",
                        capsize=3, linewidth=1)
            ppl = c["perplexity_ratio"]
            rep = c.get("repetition")
            label = ("" if c["policy"] == "off" or ppl is None else f"{ppl:.2f}\n") + \
                ("" if rep is None else f"r{rep:.2f}")
            ax.text(x, min(high + 0.03, 0.9), label, ha="center", fontsize=7,
                    color="red" if ppl is not None and ppl > PPL_LIMIT else "black")
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels([c["policy"][:5] + ("" if c["scale"] in (None, 1, 1.0) or c["policy"] == "off"
                                               else f"x{c['scale']:g}") for c in cells], fontsize=7, rotation=30)
        steered = [c for c in cells if c["policy"] != "off"]
        alpha = f", alpha {steered[0]['alpha']:.3g}" if steered else ""
        ax.set_title(f"{task} (layer {cells[0]['layer']}{alpha})", fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("compliance (95% Wilson)")
    fig.suptitle(title + f"\nnumbers: perplexity ratio (red > {PPL_LIMIT}) and rep-3 (r: share of repeated token "
                         "3-grams; looping text is cheap to the perplexity ratio)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arms_for(task: str, bank: ProbeBank, norms: dict[int, float], scales: Sequence[float],
             fractions: Sequence[float], policies: Sequence[str] = POLICIES) -> list[Arm]:
    """Every policy at the sweep's chosen alpha x each scale, or (no sweep record) at each fraction of the norm."""
    chosen = bank.extra.get("steering", {}).get(task)
    norm = norms[bank.probes[bank.index(task)].steering_layer]
    if chosen:
        return [Arm(p, chosen["alpha"] * s / norm, chosen["alpha"] * s, s) for p in policies for s in scales]
    return [Arm(p, f, f * norm) for p in policies for f in fractions]



# -- the monitor under steering (`--monitor-deduction`) -------------------------------------------------------
class DualReadingSteerer(Steerer):
    """A Steerer whose end verdicts read with the monitor's steering deduction (the runtime default) and that
    also keeps, per request, the end reading of a second monitor on the same residuals with the deduction off.
    Under a constant policy the monitor does not change the text, so both readings are of the same response."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        monitor = self.monitor
        self.raw = Monitor(monitor.bank, replace(monitor.config, deduct_steering=False), monitor.capacity,
                           muted=monitor.muted, lens=monitor.lens)
        register = monitor.register

        def both(*a, **k) -> None:  # every row the controller registers, the raw monitor registers alike
            register(*a, **k)
            self.raw.register(*a, **k)

        monitor.register = both
        self.raw_end: dict[str, torch.Tensor] = {}  # request id -> the raw monitor's end readings [K]

    def after_forward(self, view: StepView) -> None:
        self.raw.observe(self._slots(view.rows), view.index, view.residuals, view.closing)
        super().after_forward(view)

    def _finish_all(self, generations):
        for g in generations:  # the end reading as `build_verdicts` takes it: the EOS pass, else the last
            end = torch.where(torch.isnan(self.raw.eos_p[g.row]), self.raw.last_p[g.row], self.raw.eos_p[g.row])
            self.raw_end[self.driver.controller.request_id(g.row)] = end.cpu()
        return super()._finish_all(generations)


def auroc_diff_ci(y_a: np.ndarray, s_a: np.ndarray, y_b: np.ndarray, s_b: np.ndarray, resamples: int = 2000,
                  seed: int = 0) -> list[float] | None:
    """95% interval of AUROC(a) - AUROC(b) over the same prompts (paired bootstrap over prompt indices;
    resamples where either arm lacks a label are skipped)."""
    rng = np.random.default_rng(seed)
    n, diffs = len(y_a), []
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        if len(set(y_a[i].tolist())) == 2 and len(set(y_b[i].tolist())) == 2:
            diffs.append(auroc(y_a[i], s_a[i]) - auroc(y_b[i], s_b[i]))
    return _round(np.percentile(diffs, [2.5, 97.5])) if len(diffs) >= resamples // 2 else None


def _reading_metrics(y: np.ndarray, score: np.ndarray) -> dict:
    both = len(set(y.tolist())) == 2
    return {"auroc": round(auroc(y, score), 4) if both else None, "auroc_ci": _round(auroc_ci(y, score)) if both else None}


def deduction_cell(task: str, bank: ProbeBank, arm: Arm, prompts: list[HeldOutPrompt], base: list[Result],
                   steered: list[Result], raw: dict[str, torch.Tensor], clean_base: np.ndarray, clean: np.ndarray) -> dict:
    """One task: the end verdict's AUROC unsteered and under constant steering, read with the deduction,
    without it, and clean (the unsteered model teacher-forced on the steered text: what no correction can beat)."""
    probe = bank.probes[bank.index(task)]
    y0 = np.array([int(bool(r.verdicts[0].satisfied)) for r in base])
    y1 = np.array([int(bool(r.verdicts[0].satisfied)) for r in steered])
    off = np.array([r.verdicts[0].p_satisfied_end for r in base], dtype=float)
    deducted = np.array([r.verdicts[0].p_satisfied_end for r in steered], dtype=float)
    undeducted = np.array([float(raw[r.request_id][bank.index(task)]) for r in steered], dtype=float)
    readings = {"off": (y0, off), "off_clean": (y0, clean_base), "constant_deducted": (y1, deducted),
                "constant_raw": (y1, undeducted), "constant_clean": (y1, clean)}
    both = len(set(y0.tolist())) == 2 and len(set(y1.tolist())) == 2
    diff = {f"{a}_minus_{b}": auroc_diff_ci(*readings[a], *readings[b]) if both or b != "off" else None
            for a, b in (("constant_deducted", "off"), ("constant_raw", "off"), ("constant_clean", "off"),
                         ("constant_deducted", "constant_clean"), ("constant_raw", "constant_clean"))}
    return {"task": task, "read_layer": probe.layer, "steering_layer": probe.steering_layer,
            "deduction_reaches_probe": probe.steering_layer <= probe.layer, "alpha": round(arm.alpha, 4),
            "scale": arm.scale, "fraction": round(arm.fraction, 4), "n": len(prompts),
            "n_satisfied_off": int(y0.sum()), "n_satisfied_constant": int(y1.sum()),
            **{name: _reading_metrics(y, s) for name, (y, s) in readings.items()},
            "mean_abs_gap_deducted_vs_clean": round(float(np.mean(np.abs(deducted - clean))), 4),
            "mean_abs_gap_raw_vs_clean": round(float(np.mean(np.abs(undeducted - clean))), 4),
            "mean_abs_gap_off_live_vs_clean": round(float(np.mean(np.abs(off - clean_base))), 4),
            "auroc_differences_ci": diff}


def clean_readings(lm, bank: ProbeBank, task: str, prompts: list[HeldOutPrompt], results: list[Result], lens) -> np.ndarray:
    """P(satisfied) at each response's end reading with no steering: the unsteered model teacher-forced on the
    response's own tokens (`probes.reliability.end_readings`, the runtime's Scorer)."""
    rows = [{"messages": p.messages, "token_ids": r.tokens, "finish_reason": r.finish_reason, "params": p.params}
            for p, r in zip(prompts, results, strict=True)]
    return end_readings(lm, bank, task, rows, lens)


def monitor_under_steering(args, lm, bank: ProbeBank, tasks: list[str], prompts: dict[str, list[HeldOutPrompt]],
                           budget: dict[str, int], scales: list[float], fractions: list[float], argv) -> None:
    """`--monitor-deduction`: per task, unsteered and constant (the sweep's alpha, else the largest fraction)
    runs; the JSON is rewritten after every task, so a long run leaves what it measured."""
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    lens = lens_for(bank, lm.model)
    base_arm = Arm("off", 0.0, 0.0)
    doc: dict = {"model": lm.name, "bank_version": bank.version, "bank": str(args.bank) if args.bank else "default",
                 "n_per_task": args.n_per_task, "tasks": {},
                 "config": {"max_new_tokens": budget, "decoding": "greedy", "where": args.where, "seed": args.seed,
                            "policy": "constant at the bank's swept alpha (scale 1), else the largest --fractions x "
                                      "the steering layer's mean residual norm (from this run's unsteered responses)",
                            "readings": {
                                "off": "unsteered run's end verdict (live)",
                                "off_clean": "unsteered responses teacher-forced (checks that the offline reading "
                                             "reproduces the live one)",
                                "constant_deducted": "constant run's end verdict, the monitor taking this pass's "
                                                     "alpha x direction out of residuals at or above the steering "
                                                     "layer (MonitorConfig.deduct_steering=True, the default)",
                                "constant_raw": "the same responses read by a second monitor on the same residuals "
                                                "with deduct_steering=False",
                                "constant_clean": "the same responses teacher-forced through the unsteered model: "
                                                  "the reading no correction of the residual can beat (a probe "
                                                  "that reads below its steering layer reads the unsteered model's "
                                                  "residual live, so its live readings are taken, not recomputed)"},
                            "intervals": "95%: stratified bootstrap for each AUROC; differences: paired bootstrap over "
                                         "prompts",
                            "command": shlex.join([Path(sys.argv[0]).as_posix(),
                                                   *(argv if argv is not None else sys.argv[1:])])}}
    for task in tasks:
        bar = tqdm(total=2 * len(prompts[task]), desc=task, unit="resp")
        with NormTapSteerer(lm, bank, capacity=args.max_batch, use_unreliable_probes=True) as steerer:
            base = run_requests(steerer, [make_request(p, base_arm, budget[task]) for p in prompts[task]], bar,
                                args.max_batch)
            norms = steerer.mean_norms()
        arm = arms_for(task, bank, norms, scales[:1], [max(fractions)], ["constant"])[0]
        with DualReadingSteerer(lm, bank, capacity=args.max_batch, use_unreliable_probes=True,
                                where=Where(args.where)) as steerer:
            steered = run_requests(steerer, [make_request(p, arm, budget[task]) for p in prompts[task]], bar,
                                   args.max_batch)
            raw = steerer.raw_end
        bar.close()
        probe = bank.probes[bank.index(task)]
        if probe.steering_layer > probe.layer:  # the probe reads below the steering: its residual is the unsteered
            clean_base = np.array([r.verdicts[0].p_satisfied_end for r in base], dtype=float)  # model's on the
            clean = np.array([r.verdicts[0].p_satisfied_end for r in steered], dtype=float)  # same tokens already
        else:
            clean_base = clean_readings(lm, bank, task, prompts[task], base, lens)
            clean = clean_readings(lm, bank, task, prompts[task], steered, lens)
        doc["tasks"][task] = deduction_cell(task, bank, arm, prompts[task], base, steered, raw, clean_base, clean)
        output.write_text(json.dumps(doc, indent=1))
        print_deduction_table(doc["tasks"])
    print(f"wrote {output}")


def print_deduction_table(cells: dict[str, dict]) -> None:
    def fmt(reading: dict) -> str:
        ci = reading["auroc_ci"]
        return "-" if reading["auroc"] is None else f"{reading['auroc']:.2f} [{ci[0]:.2f},{ci[1]:.2f}]"

    names = ("off", "constant_deducted", "constant_raw", "constant_clean")
    print(f"{'task':18s} {'L read/steer':>12s} {'n':>4s} " + " ".join(f"{n:>18s}" for n in names)
          + f" {'deducted-clean':>16s}")
    for task, c in cells.items():
        d = c["auroc_differences_ci"]["constant_deducted_minus_constant_clean"]
        gap = "-" if d is None else f"[{d[0]:+.2f},{d[1]:+.2f}]"
        print(f"{task:18s} {c['read_layer']:>5d}/{c['steering_layer']:<6d} {c['n']:4d} "
              + " ".join(f"{fmt(c[n]):>18s}" for n in names) + f" {gap:>16s}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", default=None, help="probe bank folder (default: the trained bank)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-per-task", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--length-max-new-tokens", type=int, default=160,
                        help="token budget of the tasks whose label needs the whole response (the count tasks)")
    parser.add_argument("--alpha-scales", default="1", help="multiples of the sweep's chosen alpha (banks that "
                                                            "record one: extra['steering'])")
    parser.add_argument("--fractions", default="0.1,0.25", help="alpha as fractions of the layer's norm, for tasks "
                                                                "without a recorded sweep")
    parser.add_argument("--tasks", default=None, help="comma-separated task ids (default: every task in the bank)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="steering policies to run")
    parser.add_argument("--where", default="generated", choices=[w.value for w in Where],
                        help="which tokens steering is added to (the runtime's default: generated)")
    parser.add_argument("--output", default=str(RESULTS / "steering_efficacy.json"), help="JSON; the PNG goes beside it")
    parser.add_argument("--max-batch", type=int, default=192)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--monitor-deduction", action="store_true",
                        help="measure the end verdict under constant steering: unsteered, read with the monitor's "
                             "steering deduction, without it, and clean (teacher-forced unsteered); writes "
                             "benchmarks/results/monitor_under_steering.json unless --output says otherwise")
    parser.add_argument("--recount", action="store_true",
                        help="recompute the summary of --output with today's rules, without generating")
    parser.add_argument("--merge", default=None, help="comma-separated results of other runs whose cells join "
                                                      "--output's; the summary is recounted over all (no model)")
    parser.add_argument("--table", action="store_true", help="print every cell of --output as Markdown rows")
    parser.add_argument("--mark-bank", default=None, help="bank folder whose steering records get `steerable: "
                                                          "false` for --output's tasks whose gains all loop")
    args = parser.parse_args(argv)
    if args.recount or args.merge or args.table or args.mark_bank:
        sources = [Path(p) for p in (args.merge or "").split(",") if p.strip()]
        for path in [Path(args.output), *sources]:
            if not path.exists():
                parser.error(f"no result at {path}")
        if args.merge:
            doc = merge(Path(args.output), sources)
            output = Path(args.output)
            plot(doc["tasks"], output.with_suffix(".png"), f"steering efficacy: {doc.get('model')}, "
                 f"n={doc.get('n_per_task')}/task (test split), greedy; merged runs")
        doc = recount(Path(args.output)) if args.recount or args.merge else json.loads(Path(args.output).read_text())
        if args.table:
            print(markdown_table(doc["tasks"]))
        elif args.recount or args.merge:
            print(json.dumps(doc["summary"]["bar"], indent=1))
        if args.mark_bank:
            try:
                changed = mark_bank(Path(args.mark_bank), doc, Path(args.output).name)
            except ValueError as exc:  # a BankError too
                parser.error(str(exc))
            print(f"{args.mark_bank}: steering marked off for {', '.join(changed) or 'no task (nothing changed)'}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    scales = [float(f) for f in args.alpha_scales.split(",") if f.strip()]
    if not fractions or any(not 0 < f <= 2 for f in fractions) or not scales or any(s <= 0 for s in scales):
        parser.error("--fractions must be numbers in (0, 2] and --alpha-scales positive numbers")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or any(p not in POLICIES for p in policies):
        parser.error(f"--policies takes some of {', '.join(POLICIES)}")
    lm = load_model(args.model, device=args.device)
    bank = load_bank(args.bank)
    tasks = [t for t in TASKS if t in bank.tasks] if args.tasks is None else args.tasks.split(",")
    for task in tasks:
        if task not in bank.tasks:
            parser.error(f"the bank has no probe for task {task!r}")
    prompts = {t: held_out_prompts(t, args.n_per_task, args.seed) for t in tasks}
    budget = {t: args.length_max_new_tokens if get_task(t).token_budget > TOKEN_BUDGET else args.max_new_tokens
              for t in tasks}
    if args.monitor_deduction:
        if args.output == parser.get_default("output"):
            args.output = str(RESULTS / "monitor_under_steering.json")
        monitor_under_steering(args, lm, bank, tasks, prompts, budget, scales, fractions, argv)
        return
    n_rows = sum(len(p) for p in prompts.values())
    n_arms = len(policies) * max(len(scales), len(fractions))

    bar = tqdm(total=n_rows * (1 + n_arms), desc="generate", unit="resp")
    base_arm = Arm("off", 0.0, 0.0)
    # Every probe is measured, reliable or not: muting would hide what the benchmark is about.
    with NormTapSteerer(lm, bank, capacity=args.max_batch, use_unreliable_probes=True) as steerer:
        flat = [make_request(p, base_arm, budget[t]) for t in tasks for p in prompts[t]]
        base_flat = run_requests(steerer, flat, bar, args.max_batch)
        norms = steerer.mean_norms()
    base = {t: base_flat[i * args.n_per_task:(i + 1) * args.n_per_task] for i, t in enumerate(tasks)}
    arms: dict[str, list[Arm]] = {}
    steered: dict[str, list[list[Result]]] = {}
    for task in tasks:
        arms[task] = arms_for(task, bank, norms, scales, fractions, policies)
        requests = [make_request(p, arm, budget[task]) for arm in arms[task] for p in prompts[task]]
        with Steerer(lm, bank, capacity=args.max_batch, use_unreliable_probes=True,  # a fresh one per task:
                     where=Where(args.where)) as steerer:  # state is per request
            flat = run_requests(steerer, requests, bar, args.max_batch)
        n = len(prompts[task])
        steered[task] = [flat[k * n:(k + 1) * n] for k in range(len(arms[task]))]
    bar.close()

    # Perplexity under the unsteered model: every Steerer is closed, so no hooks are attached now.
    everything = [(p, r) for t in tasks for p, r in zip(prompts[t], base[t], strict=True)]
    everything += [(p, r) for t in tasks for group in steered[t] for p, r in zip(prompts[t], group, strict=True)]
    prompt_ids = [chat_prompt(lm.tokenizer, p.messages) for p, _ in everything]
    with tqdm(total=len(everything), desc="perplexity", unit="resp") as pbar:
        nll_flat = response_nll(lm, prompt_ids, [scored_tokens(lm, r.tokens) for _, r in everything],
                                on_batch=pbar.update)
    nll_of = {r.request_id: v for (_, r), v in zip(everything, nll_flat, strict=True)}

    table: dict[str, list[dict]] = {}
    by_policy: dict[str, list[Result]] = {"off": [r for t in tasks for r in base[t]]}
    for task in tasks:
        layer = bank.probes[bank.index(task)].steering_layer
        base_nll = [nll_of[r.request_id] for r in base[task]]
        cells = [cell(base_arm, layer, base[task], base[task], base_nll, base_nll)]
        for arm, group in zip(arms[task], steered[task], strict=True):
            cells.append(cell(arm, layer, group, base[task], [nll_of[r.request_id] for r in group], base_nll))
            if arm.scale in (None, 1.0) and (arm.scale is not None or arm.fraction == max(fractions)):
                by_policy.setdefault(arm.policy, []).extend(group)
        table[task] = cells
    summary = summarise(table)
    summary["verdict_calibration"] = {
        "rule": "the probe's end verdict (predicted_violation, p_satisfied_end) against the checker, pooled over "
                "tasks; steered policies at the sweep's alpha (scale 1; the largest fraction without a sweep)",
        **calibration_summary(by_policy)}
    out = {
        "model": lm.name, "bank_version": bank.version, "bank": str(args.bank) if args.bank else "default",
        "n_per_task": args.n_per_task, "tasks": table, "summary": summary,
        "config": {"max_new_tokens": budget, "alpha_scales": scales, "fractions": fractions, "decoding": "greedy",
                   "policies": policies, "where": args.where,
                   "prompts": "test split of split_base_requests(13), params over difficulty, aid=None",
                   "alphas": "extra['steering'][task]['alpha'] x scale where the bank records a sweep (on "
                             "training-split prompts), else fraction x mean residual norm at the steering layer",
                   "steering_from_bank": {t: bank.extra.get("steering", {}).get(t) for t in tasks},
                   "gate_thresholds": {t: bank.alerting.probes[bank.index(t)].gate_threshold for t in tasks},
                   "flag_thresholds": {t: float(bank.alerting.flag_thresholds[bank.index(t)]) for t in tasks},
                   "seed": args.seed, "mean_residual_norm_by_layer": {str(k): round(v, 3) for k, v in norms.items()},
                   "perplexity_ratio": "exp(mean over prompts of NLL_steered - NLL_own_unsteered_response), NLL = "
                                       "mean per response token under the unsteered model (EOS not scored); 95% "
                                       "percentile bootstrap over prompts",
                   "intervals": "95%: Wilson for compliance and accuracy, paired bootstrap over prompts for gains, "
                                "stratified bootstrap for AUROC",
                   "repetition": "mean over responses of 1 - distinct/total token 3-grams",
                   "distinct_2": "mean over responses of distinct/total token 2-grams",
                   "command": shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(out, indent=1))
    plot(table, output.with_suffix(".png"), f"steering efficacy: {lm.name}, bank {bank.version}, "
                                            f"n={args.n_per_task}/task (test split), greedy")
    print_table(table)
    print(f"wrote {output} and {output.with_suffix('.png')}")


def _pair(c: dict, key: str, fmt: str) -> str:
    value, ci = c.get(key), c.get(f"{key}_ci")
    if value is None:
        return "-"
    return format(value, fmt) + ("" if ci is None else f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]")


def markdown_table(tasks: dict[str, list[dict]]) -> str:
    """Every cell as a Markdown row, every measure side by side with its 95% interval; `loop-free` marks the
    cells the bar counts (perplexity ratio <= PPL_LIMIT, rep-3 within REP_MARGIN of the unsteered run)."""
    head = ("| task | policy | x alpha | alpha | compliance | gain | perplexity ratio | rep-3 (unsteered) | "
            "distinct-2 | verdict AUROC | loop-free |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for task, cells in tasks.items():
        base_rep = cells[0].get("repetition")
        for c in cells:
            off = c["policy"] == "off"
            free = (not off and c["perplexity_ratio"] is not None and c["perplexity_ratio"] <= PPL_LIMIT
                    and loop_free(c, base_rep, REP_MARGIN))
            own = c.get("repetition_baseline", base_rep)
            rep3 = "-" if c.get("repetition") is None else f"{c['repetition']:.2f}" + (
                "" if off or own is None else f" ({own:.2f})")
            d2 = "-" if c.get("distinct_2") is None else f"{c['distinct_2']:.2f}"
            v = c.get("verdict") or {}
            au = "-" if v.get("auroc") is None else f"{v['auroc']:.2f}" + (
                "" if v.get("auroc_ci") is None else f" [{v['auroc_ci'][0]:.2f}, {v['auroc_ci'][1]:.2f}]")
            scale = "-" if off or c.get("scale") is None else f"{c['scale']:g}"
            rows.append(f"| {task} | {c['policy']} | {scale} | {c['alpha']:.1f} | {_pair(c, 'compliance', '.2f')} | "
                        f"{'-' if off else _pair(c, 'gain', '+.2f')} | "
                        f"{'-' if off else _pair(c, 'perplexity_ratio', '.2f')} | {rep3} | {d2} | {au} | "
                        f"{'' if off else ('yes' if free else 'no')} |")
    return "\n".join(rows)


def print_table(tasks: dict[str, list[dict]]) -> None:
    print(f"{'task':18s} {'policy':12s} {'alpha':>8s} {'comply [95%]':>18s} {'base':>5s} {'gain [95%]':>20s} "
          f"{'ppl x [95%]':>20s} {'rep3':>5s} {'dist2':>5s} {'acc':>5s} {'auroc':>5s}")
    for task, cells in tasks.items():
        for c in cells:
            ci = c["compliance_ci"]
            g = c["gain_ci"]
            p = c["perplexity_ratio_ci"]
            ppl = "-" if c["perplexity_ratio"] is None else f"{c['perplexity_ratio']:.3f} [{p[0]:.2f},{p[1]:.2f}]"
            v = c["verdict"]
            au = "-" if v.get("auroc") is None else f"{v['auroc']:.2f}"
            acc = "-" if v.get("accuracy") is None else f"{v['accuracy']:.2f}"
            rep3, d2 = (("-" if c.get(k) is None else f"{c[k]:.2f}") for k in ("repetition", "distinct_2"))
            print(f"{task:18s} {c['policy']:12s} {c['alpha']:8.2f} {c['compliance']:5.2f} [{ci[0]:.2f},{ci[1]:.2f}] "
                  f"{c['compliance_baseline']:5.2f} {c['gain']:+5.2f} [{g[0]:+.2f},{g[1]:+.2f}] {ppl:>20s} "
                  f"{rep3:>5s} {d2:>5s} {acc:>5s} {au:>5s}")


if __name__ == "__main__":
    main()
