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
rules without generating (distinct_2 is None in records written before it was measured).

    .venv/bin/python benchmarks/steering_efficacy.py --bank BANK [--n-per-task 60] [--alpha-scales 1]
        [--threads 1]     # writes benchmarks/results/steering_efficacy.json and .png
    .venv/bin/python benchmarks/steering_efficacy.py --recount [--output JSON]   # summary only, no model
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from probes.heldout import HeldOutPrompt, held_out_prompts, load_bank
from probes.steering import REP_MARGIN, distinct, loop_free, repetition
from probes.tasks import TASKS
from probes.train import auroc, auroc_ci
from steerer.ab.fluency import response_nll, scored_tokens
from steerer.bank import ProbeBank
from steerer.constraints import Constraint
from steerer.core import Request, Result, Steerer
from steerer.generation import SamplingParams, StepView
from steerer.model import chat_prompt, load_model
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
    parser.add_argument("--recount", action="store_true",
                        help="recompute the summary of --output with today's rules, without generating")
    args = parser.parse_args(argv)
    if args.recount:
        if not Path(args.output).exists():
            parser.error(f"--recount: no result at {args.output}")
        summary = recount(Path(args.output))["summary"]
        print(json.dumps(summary["bar"], indent=1))
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


def print_table(tasks: dict[str, list[dict]]) -> None:
    print(f"{'task':18s} {'policy':12s} {'alpha':>8s} {'comply [95%]':>18s} {'base':>5s} {'gain [95%]':>20s} "
          f"{'ppl x [95%]':>20s} {'acc':>5s} {'auroc':>5s}")
    for task, cells in tasks.items():
        for c in cells:
            ci = c["compliance_ci"]
            g = c["gain_ci"]
            p = c["perplexity_ratio_ci"]
            ppl = "-" if c["perplexity_ratio"] is None else f"{c['perplexity_ratio']:.3f} [{p[0]:.2f},{p[1]:.2f}]"
            v = c["verdict"]
            au = "-" if v.get("auroc") is None else f"{v['auroc']:.2f}"
            acc = "-" if v.get("accuracy") is None else f"{v['accuracy']:.2f}"
            print(f"{task:18s} {c['policy']:12s} {c['alpha']:8.2f} {c['compliance']:5.2f} [{ci[0]:.2f},{ci[1]:.2f}] "
                  f"{c['compliance_baseline']:5.2f} {c['gain']:+5.2f} [{g[0]:+.2f},{g[1]:+.2f}] {ppl:>20s} "
                  f"{acc:>5s} {au:>5s}")


if __name__ == "__main__":
    main()
