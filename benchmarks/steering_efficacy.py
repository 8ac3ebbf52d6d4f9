"""Does steering along the probe directions raise compliance, and what does it cost in fluency?

On held-out prompts of every task (test-split base requests, params over a spread of difficulty, no aid,
greedy decoding) each task's prompts run unsteered, then with policies `constant` and `conditional` at a
grid of strengths. Strength is given as a fraction of the probe layer's typical residual norm (alpha is
absolute, and SmolLM2-135M's norms grow from ~30 at layer 0 to ~650 at layer 28, so one absolute grid would
mean different things at different layers): alpha = fraction x mean L2 norm of the generated tokens'
residuals at that layer, measured by a tap during the unsteered runs. Both are recorded.

Per (task, policy, alpha) cell:
  compliance        share of responses the task's checker accepts
  perplexity_ratio  cost: exp(mean over prompts of NLL_steered - NLL_baseline), where NLL is the mean
                    negative log-likelihood per response token of the response under the *unsteered* model
                    (teacher-forced forward of chat prompt + response, no hooks; EOS not scored), and each
                    prompt's own unsteered response is the baseline. This is the geometric mean of the
                    per-prompt perplexity ratios (= ratio of exp(mean NLL) over the paired prompts).
                    Prompts where either response is empty are left out.
  repetition        mean over responses (with >= 3 tokens) of 1 - distinct/total token 3-grams (rep-3)
Every request of one task (all policies and strengths) runs in one shared batch through `Steerer.run`.

    .venv/bin/python benchmarks/steering_efficacy.py [--n-per-task 24] [--fractions 0.05,0.1,0.2,0.4]
        # writes benchmarks/results/steering_efficacy.json and .png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from heldout import HeldOutPrompt, held_out_prompts, load_bank  # benchmarks/heldout.py, beside this script
from tqdm import tqdm

from probes.tasks import TASKS
from steerer.ab.fluency import response_nll
from steerer.bank import ProbeBank
from steerer.constraints import Constraint
from steerer.core import Request, Result, Steerer
from steerer.generation import SamplingParams, StepView
from steerer.model import chat_prompt, load_model
from steerer.policy import OFF, SteeringPolicy

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("constant", "conditional")
PPL_LIMIT = 1.10  # a cell "costs little" at or under this perplexity ratio
GAIN = 0.15  # compliance gain (absolute) that counts as a real effect
MATCH_TOLERANCE = 0.05  # conditional "matches" constant's gain if within this many points of it


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
    policy: str  # off | constant | conditional
    fraction: float
    alpha: float


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
                   id=f"{prompt.id}|{arm.policy}|{arm.fraction}")


def repetition(tokens: Sequence[int], n: int = 3) -> float | None:
    """rep-n: 1 - distinct n-grams / n-grams of the response; None if it has fewer than n tokens."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else None


def mean_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def cell(arm: Arm, layer: int, results: list[Result], base: list[Result], nll: list[float | None],
         base_nll: list[float | None]) -> dict:
    pairs = [s - b for s, b in zip(nll, base_nll, strict=True) if s is not None and b is not None]
    steered = [sum(r.steered_tokens.values()) / max(len(r.tokens), 1) for r in results]
    return {
        "policy": arm.policy, "alpha": round(arm.alpha, 4), "fraction": arm.fraction, "layer": layer,
        "n": len(results),
        "compliance": statistics.fmean(bool(r.verdicts[0].satisfied) for r in results),
        "compliance_baseline": statistics.fmean(bool(r.verdicts[0].satisfied) for r in base),
        "perplexity_ratio": round(math.exp(statistics.fmean(pairs)), 4) if pairs else None,
        "perplexity_pairs": len(pairs),
        "repetition": mean_or_none([repetition(r.tokens) for r in results]),
        "steered_token_share": round(statistics.fmean(steered), 4),
        "mean_tokens": statistics.fmean(len(r.tokens) for r in results),
    }


def best_cell(cells: list[dict], policy: str, ppl_limit: float | None) -> dict | None:
    """The steered cell of `policy` with the largest compliance gain (ties: lower perplexity ratio)."""
    eligible = [c for c in cells if c["policy"] == policy and c["perplexity_ratio"] is not None
                and (ppl_limit is None or c["perplexity_ratio"] <= ppl_limit)]
    if not eligible:
        return None
    best = max(eligible, key=lambda c: (c["compliance"] - c["compliance_baseline"], -c["perplexity_ratio"]))
    return {"alpha": best["alpha"], "fraction": best["fraction"],
            "gain": round(best["compliance"] - best["compliance_baseline"], 4),
            "perplexity_ratio": best["perplexity_ratio"]}


def summarise(tasks: dict[str, list[dict]]) -> dict:
    per_task, gaining, matches = {}, {p: [] for p in POLICIES}, []
    for task, cells in tasks.items():
        entry: dict = {"compliance_baseline": cells[0]["compliance_baseline"]}
        for policy in POLICIES:
            entry[f"{policy}_best_within_ppl_limit"] = best_cell(cells, policy, PPL_LIMIT)
            entry[f"{policy}_best"] = best_cell(cells, policy, None)
            within = entry[f"{policy}_best_within_ppl_limit"]
            if within is not None and within["gain"] >= GAIN:
                gaining[policy].append(task)
        const = entry["constant_best"]
        match = None
        if const is not None and const["gain"] > 0:
            match = any(c["policy"] == "conditional" and c["perplexity_ratio"] is not None
                        and c["compliance"] - c["compliance_baseline"] >= const["gain"] - MATCH_TOLERANCE
                        and c["perplexity_ratio"] < const["perplexity_ratio"] for c in cells)
            if match:
                matches.append(task)
        entry["conditional_matches_constant_at_lower_ppl"] = match
        per_task[task] = entry
    return {
        "criteria": {"gain_at_least": GAIN, "perplexity_ratio_at_most": PPL_LIMIT,
                     "match_tolerance": MATCH_TOLERANCE,
                     "match_rule": "conditional matches constant if some conditional cell gains at least constant's "
                                   "best gain minus the tolerance at a lower perplexity ratio than that constant "
                                   "cell (None where constant gains nothing)"},
        "tasks_gaining_at_low_cost": {**gaining, "either": sorted(set(gaining["constant"]) | set(gaining["conditional"]))},
        "conditional_matches_constant_at_lower_ppl": matches,
        "per_task": per_task,
    }


def plot(tasks: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tasks)
    cols = 3
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, names, strict=False):
        cells = tasks[task]
        base = cells[0]["compliance_baseline"]
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="unsteered")
        for policy, color, marker, style in (("constant", "tab:blue", "o", "-"), ("conditional", "tab:orange", "s", ":")):
            mine = sorted((c for c in cells if c["policy"] == policy), key=lambda c: c["fraction"])
            xs = [0.0] + [c["fraction"] for c in mine]
            ys = [base] + [c["compliance"] for c in mine]
            ax.plot(xs, ys, color=color, marker=marker, linestyle=style, label=policy, markersize=5)
            costly = [c for c in mine if c["perplexity_ratio"] is not None and c["perplexity_ratio"] > PPL_LIMIT]
            ax.scatter([c["fraction"] for c in costly], [c["compliance"] for c in costly], s=90,
                       facecolors="none", edgecolors="red", linewidths=1.2, zorder=3)
        ax.set_title(f"{task} (layer {cells[0]['layer']})", fontsize=10)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("alpha / mean residual norm")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("compliance")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor="red", linestyle=""))
    labels.append(f"perplexity ratio > {PPL_LIMIT}")
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", default=None, help="probe bank folder (default: the trained bank)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-per-task", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--fractions", default="0.05,0.1,0.2,0.4", help="alpha as fractions of the layer's norm")
    parser.add_argument("--tasks", default=None, help="comma-separated task ids (default: every task in the bank)")
    parser.add_argument("--output", default=str(RESULTS / "steering_efficacy.json"), help="JSON; the PNG goes beside it")
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    if not fractions or any(not 0 < f <= 2 for f in fractions):
        parser.error("--fractions must be numbers in (0, 2]")
    lm = load_model(args.model, device=args.device)
    bank = load_bank(args.bank)
    tasks = [t for t in TASKS if t in bank.tasks] if args.tasks is None else args.tasks.split(",")
    for task in tasks:
        if task not in bank.tasks:
            parser.error(f"the bank has no probe for task {task!r}")
    prompts = {t: held_out_prompts(t, args.n_per_task, args.seed) for t in tasks}
    n_rows = sum(len(p) for p in prompts.values())

    bar = tqdm(total=n_rows * (1 + len(POLICIES) * len(fractions)), desc="generate", unit="resp")
    base_arm = Arm("off", 0.0, 0.0)
    # Every probe is measured, reliable or not: muting would hide what the benchmark is about.
    with NormTapSteerer(lm, bank, capacity=args.max_batch, use_unreliable_probes=True) as steerer:
        flat = [make_request(p, base_arm, args.max_new_tokens) for t in tasks for p in prompts[t]]
        base_flat = run_requests(steerer, flat, bar, args.max_batch)
        norms = steerer.mean_norms()
    base = {t: base_flat[i * args.n_per_task:(i + 1) * args.n_per_task] for i, t in enumerate(tasks)}
    arms: dict[str, list[Arm]] = {}
    steered: dict[str, list[list[Result]]] = {}
    for task in tasks:
        layer = bank.probes[bank.index(task)].layer
        arms[task] = [Arm(p, f, f * norms[layer]) for p in POLICIES for f in fractions]
        requests = [make_request(p, arm, args.max_new_tokens) for arm in arms[task] for p in prompts[task]]
        with Steerer(lm, bank, capacity=args.max_batch, use_unreliable_probes=True) as steerer:  # a fresh one per task: state is per request
            flat = run_requests(steerer, requests, bar, args.max_batch)
        n = len(prompts[task])
        steered[task] = [flat[k * n:(k + 1) * n] for k in range(len(arms[task]))]
    bar.close()

    # Perplexity under the unsteered model: every Steerer is closed, so no hooks are attached now.
    everything = [(p, r) for t in tasks for p, r in zip(prompts[t], base[t], strict=True)]
    everything += [(p, r) for t in tasks for group in steered[t] for p, r in zip(prompts[t], group, strict=True)]
    prompt_ids = [chat_prompt(lm.tokenizer, p.messages) for p, _ in everything]
    with tqdm(total=len(everything), desc="perplexity", unit="resp") as pbar:
        nll_flat = response_nll(lm, prompt_ids, [r.tokens for _, r in everything], on_batch=pbar.update)
    nll_of = {r.request_id: v for (_, r), v in zip(everything, nll_flat, strict=True)}

    table: dict[str, list[dict]] = {}
    for task in tasks:
        layer = bank.probes[bank.index(task)].layer
        base_nll = [nll_of[r.request_id] for r in base[task]]
        cells = [cell(base_arm, layer, base[task], base[task], base_nll, base_nll)]
        for arm, group in zip(arms[task], steered[task], strict=True):
            cells.append(cell(arm, layer, group, base[task], [nll_of[r.request_id] for r in group], base_nll))
        table[task] = cells
    out = {
        "model": lm.name, "bank_version": bank.version, "n_per_task": args.n_per_task, "tasks": table,
        "summary": summarise(table),
        "config": {"max_new_tokens": args.max_new_tokens, "fractions": fractions, "decoding": "greedy",
                   "prompts": "test split of split_base_requests(13), params over difficulty, aid=None",
                   "seed": args.seed, "mean_residual_norm_by_layer": {str(k): round(v, 3) for k, v in norms.items()},
                   "perplexity_ratio": "exp(mean over prompts of NLL_steered - NLL_own_unsteered_response), NLL = "
                                       "mean per response token under the unsteered model (EOS not scored)",
                   "repetition": "mean over responses of 1 - distinct/total token 3-grams"},
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(out, indent=1))
    plot(table, output.with_suffix(".png"), f"steering efficacy: {lm.name}, bank {bank.version}, "
                                            f"n={args.n_per_task}/task, greedy, {args.max_new_tokens} tokens")
    print_table(table, bank)
    print(f"wrote {output} and {output.with_suffix('.png')}")


def print_table(tasks: dict[str, list[dict]], bank: ProbeBank) -> None:
    print(f"{'task':18s} {'policy':12s} {'frac':>5s} {'alpha':>8s} {'comply':>7s} {'base':>6s} {'ppl x':>7s} {'rep3':>6s}")
    for task, cells in tasks.items():
        for c in cells:
            ppl = "-" if c["perplexity_ratio"] is None else f"{c['perplexity_ratio']:.3f}"
            rep = "-" if c["repetition"] is None else f"{c['repetition']:.3f}"
            print(f"{task:18s} {c['policy']:12s} {c['fraction']:5.2f} {c['alpha']:8.2f} {c['compliance']:7.2f} "
                  f"{c['compliance_baseline']:6.2f} {ppl:>7s} {rep:>6s}")


if __name__ == "__main__":
    main()
