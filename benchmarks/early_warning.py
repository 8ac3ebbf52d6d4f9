"""How early does the monitor flag a response that will violate its constraint, and how often does it cry wolf?

On held-out prompts of every task (test-split base requests, params over a spread of difficulty, no aid),
unsteered and greedy, each response is generated with its task's constraint (policy off) and compared with
the checker's final verdict:

* for a violating response, the reference is its *detection*: the token the monitor's live detector
  (`Verdict.detected_at`) says broke the constraint -- the token completing a forbidden word, the first token
  over an upper length bound, the first capital, the first token no JSON can follow. Where no prefix decides
  the violation (lower bounds, keywords, semantic tasks) it is the end: the EOS, or the last token if cut
  off. lead = reference token - first flag token (positive = flagged before the violation was certain).
  The offline onset rule (`probes.violations`) runs the same detector, so it must agree exactly; the
  JSON counts any disagreement (`detector_disagreements`, expected 0);
* for a compliant response, any flag at all is a false flag.

Flags come from the bank's token-level warning predictors where it has them (`ProbeBank.warning`, see
`probes.warning`; term_exclusion's is a forecast from the forbidden words' logit lens that may flag from the
prompt's last token, index -1, see `probes.forecast`), else from its probes; a task that detection settled
raises no flag after it, so a lead is always a forecast.

Writes benchmarks/results/early_warning.json and early_warning.png:
    {"tasks": {TASK: {"violations", "flagged_at_least_3_early", "flagged_at_least_3_early_ci", "lead_tokens",
                      "compliant", "false_flag_rate", "false_flag_rate_ci", "flagged", "median_lead", "detected",
                      "detector_disagreements", "flag_source"}}, ...}
where flagged_at_least_3_early is the share of *all* violations flagged >= 3 tokens before the violating
token (never-flagged violations count as not early), lead_tokens lists the leads of flagged ones, detected
counts the violations a prefix decided, and every share carries a 95% Wilson interval.

    .venv/bin/python benchmarks/early_warning.py [--n-per-task 64] [--max-new-tokens 120] [--tasks a,b --merge]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from probes.heldout import held_out_prompts, load_bank
from probes.tasks import TASKS
from probes.violations import token_prefixes, violating_token
from steerer.constraints import Constraint
from steerer.core import Request, Result, Steerer
from steerer.generation import SamplingParams
from steerer.model import load_model
from steerer.stats import wilson

RESULTS = Path(__file__).resolve().parent / "results"
EARLY = 3  # tokens of warning that count as "early"


def task_summary(records: list[dict]) -> dict:
    violations = [r for r in records if not r["satisfied"]]
    compliant = [r for r in records if r["satisfied"]]
    leads = [r["lead"] for r in violations if r["lead"] is not None]
    early = sum(lead >= EARLY for lead in leads)
    false = sum(r["flagged"] for r in compliant)
    return {
        "violations": len(violations),
        "flagged_at_least_3_early": round(early / len(violations), 4) if violations else None,
        "flagged_at_least_3_early_ci": list(wilson(early, len(violations))) if violations else None,
        "lead_tokens": leads,
        "compliant": len(compliant),
        "false_flag_rate": round(false / len(compliant), 4) if compliant else None,
        "false_flag_rate_ci": list(wilson(false, len(compliant))) if compliant else None,
        "flagged": len(leads),
        "median_lead": statistics.median(leads) if leads else None,
        "detected": sum(r["detected_at"] is not None for r in violations),
        "detector_disagreements": sum(r["detected_at"] is not None and r["detected_at"] != r["violating_token"]
                                      for r in violations),
    }


def record(result: Result, decode) -> dict:
    """One response: the verdict, and for a violation its reference token (the detection, else the end) and
    the lead; `violating_token` is the offline onset rule's answer, which the detection must equal."""
    verdict = result.verdicts[0]
    out = {"id": result.request_id, "task": verdict.task, "params": verdict.params, "satisfied": bool(verdict.satisfied),
           "flagged": verdict.flagged, "first_flag_token": verdict.first_flag_token, "tokens": len(result.tokens),
           "finish_reason": result.finish_reason, "detected_at": verdict.detected_at, "violating_token": None,
           "lead": None}
    if not verdict.satisfied:
        prefixes = token_prefixes(decode, result.tokens)
        v = violating_token(verdict.task, verdict.params, prefixes, result.finish_reason == "eos")
        out["violating_token"] = v
        reference = v if verdict.detected_at is None else verdict.detected_at
        if verdict.first_flag_token is not None:
            out["lead"] = reference - verdict.first_flag_token
    return out


def print_table(summary: dict[str, dict]) -> None:
    print(f"{'task':18s} {'viol':>5s} {'flagged':>7s} {'>=3 early':>9s} {'med lead':>8s} {'compl':>5s} {'false flag':>10s}")

    def fmt(x, spec: str) -> str:
        width = int(spec.split(".")[0])
        return "-".rjust(width) if x is None else format(x, spec)

    for task, s in summary.items():
        print(f"{task:18s} {s['violations']:5d} {s['flagged']:7d} {fmt(s['flagged_at_least_3_early'], '9.2f')} "
              f"{fmt(s['median_lead'], '8.1f')} {s['compliant']:5d} {fmt(s['false_flag_rate'], '10.2f')}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", default=None, help="probe bank folder (default: the trained bank)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-per-task", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=120)
    parser.add_argument("--tasks", default=None, help="comma-separated task ids (default: every task in the bank)")
    parser.add_argument("--output", default=str(RESULTS / "early_warning.json"))
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true",
                        help="replace only the --tasks entries (summary and responses) of an existing --output; the "
                             "other tasks keep their run (each task's bank version and command are kept in `runs`)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device)
    bank = load_bank(args.bank)
    tasks = [t for t in TASKS if t in bank.tasks] if args.tasks is None else args.tasks.split(",")
    for task in tasks:
        if task not in bank.tasks:
            parser.error(f"the bank has no probe for task {task!r}")
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    requests = [Request(p.messages, (Constraint(p.task, p.params),), sampling=sampling, id=p.id)
                for t in tasks for p in held_out_prompts(t, args.n_per_task, args.seed)]
    results: dict[str, Result] = {}
    with Steerer(lm, bank, capacity=args.max_batch, use_unreliable_probes=True) as steerer, \
            tqdm(total=len(requests), desc="generate", unit="resp") as bar:
        for item in steerer.generate(requests, args.max_batch):
            if isinstance(item, Result):
                results[item.request_id] = item
                bar.update(1)

    def decode(ids: list[int]) -> str:
        return lm.tokenizer.decode(ids, skip_special_tokens=True)

    records = [record(results[r.id], decode) for r in requests]
    summary = {t: task_summary([r for r in records if r["task"] == t]) for t in tasks}
    sources = (bank.extra.get("warning") or {}).get("chosen", {})
    names = {"warning": "warning predictor", "forecast": "forecast (running mean of the words' lens, no warm-up)"}
    for task in tasks:
        summary[task]["flag_source"] = names.get(sources.get(task), "end probe")
    out = {"model": lm.name, "bank_version": bank.version, "n_per_task": args.n_per_task, "tasks": summary,
           "config": {"max_new_tokens": args.max_new_tokens, "decoding": "greedy", "policy": "off",
                      "early_means_lead_at_least": EARLY, "seed": args.seed,
                      "lead_reference": "detection (Verdict.detected_at); the end where no prefix decides",
                      "prompts": "test split of split_base_requests(13), params over difficulty, aid=None",
                      "thresholds": {p.task: p.threshold for p in bank.probes},
                      "flag_thresholds": {p.task: p.flag_threshold for p in bank.alerting.probes},
                      "monitor": "MonitorConfig() defaults", "intervals": "95% Wilson"},
           "responses": records}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/early_warning.py", *(sys.argv[1:] if argv is None else argv)])
    runs = {task: {"bank_version": bank.version, "command": command} for task in tasks}
    if args.merge and output.is_file():
        out = merged(json.loads(output.read_text()), out, tasks)
        runs = out["runs"] | runs
    out["runs"] = runs
    output.write_text(json.dumps(out, indent=1))
    versions = sorted({r["bank_version"] for r in runs.values()})
    plot(out["tasks"], output.with_suffix(".png"),
         f"{lm.name}, bank {', '.join(versions)}, n={args.n_per_task} per task")
    print_table(summary)
    print(f"wrote {output} and {output.with_suffix('.png')}")


def merged(old: dict, new: dict, tasks: list[str]) -> dict:
    """`old` with `tasks`' summaries, responses and thresholds from `new` (same settings required); tasks of
    `old` not rerun keep their figures, their bank version recorded in `runs` (the file's own, if none)."""
    if old.get("n_per_task") != new["n_per_task"] or old.get("model") != new["model"]:
        raise SystemExit("--merge: the existing output was made with another model or --n-per-task")
    runs = old.get("runs") or {t: {"bank_version": old.get("bank_version"), "command": None} for t in old["tasks"]}
    summaries = old["tasks"] | {t: new["tasks"][t] for t in tasks}
    responses = [r for r in old["responses"] if r["task"] not in tasks] + new["responses"]
    config = old["config"]
    for key in ("thresholds", "flag_thresholds"):
        config[key] = config.get(key, {}) | {t: new["config"][key][t] for t in tasks}
    return old | {"bank_version": new["bank_version"], "tasks": summaries, "responses": responses,
                  "config": config, "runs": runs}


def plot(summary: dict[str, dict], path: Path, subtitle: str) -> None:
    """Per task: violations flagged >= 3 tokens before detection, and false flags on compliant responses,
    with 95% intervals; the bar's lines (50% early, 20% false flags)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for offset, key, color, label in ((-0.2, "flagged_at_least_3_early", "tab:green", "violations flagged >= 3 early"),
                                      (0.2, "false_flag_rate", "tab:red", "false flags on compliant")):
        values = [summary[t][key] or 0.0 for t in tasks]
        cis = [summary[t][f"{key}_ci"] or [v, v] for t, v in zip(tasks, values, strict=True)]
        err = np.array([[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
                        [hi - v for v, (_, hi) in zip(values, cis, strict=True)]])
        ax.bar(np.arange(len(tasks)) + offset, values, 0.4, yerr=err, color=color, alpha=0.8, capsize=3, label=label)
    ax.axhline(0.5, color="tab:green", ls="--", lw=0.8)
    ax.axhline(0.2, color="tab:red", ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share (95% Wilson interval)")
    ax.set_title(f"Early warning against detection\n{subtitle}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
