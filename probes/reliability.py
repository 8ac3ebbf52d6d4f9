"""`steerer probes reliability`: measure a bank's probes on IFEval and rewrite each probe's reliability.

Training (`probes.evaluation.bank_entry`) measures the in-distribution and held-out phrasing columns; the
IFEval column needs the model. Here each IFEval response mapped onto a bank task is teacher-forced (its
prompt and the tokens the model sampled, `probes.features`), and the bank's own probe reads it at its layer
and position (the end reading, as training measured) through the runtime's `Scorer`: the same weights,
conditioning rows and lens inputs that serve requests. Tasks where both classes occur get an AUROC with the
training code's 95% bootstrap interval, over all rows and over the rows inside the probe's measured
parameter range (the corpus's); `steerer.reliability.assess` then decides every probe from its stored
metrics. Only the manifest changes: probe weights are untouched.

IFEval rows are few (about 150 with both classes), so this runs on CPU in a minute or two.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from probes.corpus import load_corpus
from probes.features import residual_passes, sequence_for
from probes.train import auroc, auroc_ci
from steerer import reliability
from steerer.bank import ProbeBank, content_version

BATCH = 8


def range_of(params: list[dict]) -> dict[str, list[float]]:
    """param -> [min, max] of every numeric parameter over some rows' params (empty: none numeric)."""
    values: dict[str, list[float]] = {}
    for row in params:
        for name, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                values.setdefault(name, []).append(value)
    return {name: [min(v), max(v)] for name, v in sorted(values.items())}


def measured_range(corpus: Path, task: str) -> dict[str, list[float]]:
    """The numeric parameter range of the task's corpus rows (all splits): what its probe was trained and
    measured on. Empty for tasks without numeric parameters."""
    return range_of([row["params"] for row in load_corpus(corpus, task)])


def column_metrics(name: str, y: np.ndarray, p: np.ndarray) -> dict:
    """`{name}_auroc`, `{name}_auroc_ci` (None unless both classes occur) and `n_{name}`, as training stores
    its columns."""
    both = 0 < int(y.sum()) < len(y)
    return {f"{name}_auroc": round(auroc(y, p), 4) if both else None,
            f"{name}_auroc_ci": list(auroc_ci(y, p)) if both else None, f"n_{name}": int(len(y))}


@torch.inference_mode()
def end_readings(lm, bank: ProbeBank, task: str, rows: list[dict], lens=None) -> np.ndarray:
    """P(satisfied) of `task`'s probe at each row's end reading (the EOS pass, else the last pass live
    generation ran), teacher-forced, through the runtime's `Scorer` with the row's params."""
    from steerer.lens import token_ids, words_of
    from steerer.monitor import Scorer

    k = bank.index(task)
    probe, param = bank.probes[k], bank.lens_params[k]
    scorer = Scorer(bank, 1, lens, bank)
    seqs = [sequence_for(lm, r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(seqs[i].ids))
    out = np.zeros(len(rows))
    for start in range(0, len(order), BATCH):
        batch = order[start:start + BATCH]
        residuals = residual_passes(lm, [seqs[i] for i in batch], [probe.layer])
        for i, res in zip(batch, residuals, strict=True):
            s = seqs[i]
            x = res[s.position(s.last_index), 0][None]  # [1, d]
            words = {task: token_ids(lm.tokenizer, words_of(rows[i]["params"], param))} if param else None
            scorer.register(0, {task: rows[i]["params"]}, words)
            every = {p.layer: x for p in bank.probes}  # the scorer reads every probe's layer; only column k counts
            out[i] = float(scorer.score(torch.zeros(1, dtype=torch.long), every)[0, k])
    return out


def ifeval_metrics(lm, bank: ProbeBank, rows: list[dict], ranges: dict[str, dict]) -> dict[str, dict]:
    """task -> the IFEval column (all rows, and the rows inside the task's measured range) for every bank task
    with IFEval rows, plus the readings themselves for the report."""
    from steerer.lens import lens_for

    lens = lens_for(bank, lm.model)
    out = {}
    for task in bank.tasks:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        p = end_readings(lm, bank, task, mine, lens)
        y = np.array([bool(r["satisfied"]) for r in mine], dtype=int)
        metrics = column_metrics("ifeval", y, p)
        if ranges.get(task):
            inside = np.array([reliability.in_range(r["params"], ranges[task])[0] for r in mine])
            metrics |= column_metrics(f"ifeval_{reliability.IN_RANGE}", y[inside], p[inside])
        out[task] = {"metrics": metrics, "n_satisfied": int(y.sum()),
                     "readings": [{"id": r["id"], "params": r["params"], "satisfied": bool(r["satisfied"]),
                                   "p_satisfied": round(float(q), 6)} for r, q in zip(mine, p, strict=True)]}
    return out


def with_reliability(bank: ProbeBank, measured: dict[str, dict], ranges: dict[str, dict], command: str | None = None
                     ) -> ProbeBank:
    """The bank with each probe's IFEval metrics, measured range and reliability record (re)computed by
    `steerer.reliability.assess` from its stored metrics; `reliable` follows the record."""
    probes = []
    for probe in bank.probes:
        metrics = {k: v for k, v in probe.metrics.items() if not k.startswith(("ifeval_", "n_ifeval"))}
        metrics |= (measured.get(probe.task) or {}).get("metrics", {})
        if ranges.get(probe.task):
            metrics["measured_range"] = ranges[probe.task]
        record = reliability.assess(metrics, ranges.get(probe.task))
        probes.append(replace(probe, metrics=metrics, reliable=record["reliable"], reliability=record))
    extra = copy.deepcopy(bank.extra)
    if command:
        extra["reliability"] = {"command": command, "rule": reliability.RULE,
                                "ifeval": "the IFEval responses of the bank's corpus (eval/ifeval.jsonl.gz), teacher-forced, read by "
                                          "the bank's probe at its layer and end position"}
    for task, g in (extra.get("generalisation") or {}).items():
        if task in measured:
            g["ifeval"] = measured[task]["metrics"]["ifeval_auroc"]
    out = replace(bank, probes=probes, extra=extra)
    out.version = content_version(out)
    return out


def summary_table(bank: ProbeBank) -> list[dict]:
    """One row per probe: each column's AUROC and interval, the verdict and why (for reports and the README)."""
    rows = []
    for probe in bank.probes:
        record = probe.reliability or reliability.assess(probe.metrics)
        cols = {name: {"auroc": c["auroc"], "ci": c["ci"], "n": c["n"], "status": c["status"]}
                for name, c in record["columns"].items()}
        limits = probe.reliable_range
        within = ", ".join(f"{k} {lo:g}-{hi:g}" for k, (lo, hi) in (limits or {}).items())
        served = "served" if probe.reliable else f"served within {within}, muted outside" if limits else "muted"
        rows.append({"task": probe.task, "columns": cols, "reliable": bool(probe.reliable),
                     "failed": record["failed"], "scope": record.get("scope"), "served": served})
    return rows


def write_report(folder: Path, bank: ProbeBank, measured: dict[str, dict], command: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"command": command, "bank_version": bank.version, "rule": reliability.RULE,
           "probes": summary_table(bank), "ifeval_readings": {t: m["readings"] for t, m in measured.items()}}
    path = folder / "reliability.json"
    path.write_text(json.dumps(doc, indent=1))
    return path
