"""`steerer probes train`: committed corpus + cached features -> chosen probes, their measurements, the bank,
and the paper's report. Nothing here looks at a test split or IFEval before every choice is made."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from probes import evaluation, ifeval, summaries
from probes.dataset import TaskData
from probes.features import load_features
from probes.reliability import range_of
from steerer.reliability import in_range

GENERALISATION_SPLITS = ("test", "heldout_phrasing", "ifeval")


def load_ifeval(corpus: Path, features: Path) -> TaskData | None:
    """IFEval's responses with their features (split "ifeval"), or None when they were not generated."""
    if not (corpus / ifeval.FILE).exists():
        return None
    rows = [r | {"split": "ifeval", "family": "ifeval", "base_id": r["id"]} for r in ifeval.load(corpus)]
    return load_features(features, ifeval.TASK, rows)


def rows_of(data: TaskData, mask: np.ndarray) -> TaskData:
    """Some rows' data with their per-token readings (a design may read a summary of them): enough to measure a
    probe on them."""
    rows = [r for r, keep in zip(data.rows, mask, strict=True) if keep]
    spans = [data.tokens[int(data.offsets[i]):int(data.offsets[i + 1])] for i in np.flatnonzero(mask)]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(s) for s in spans], dtype=np.int64)]), dtype=torch.long)
    return TaskData(rows, data.positions[torch.from_numpy(np.asarray(mask))],
                    torch.cat(spans) if spans else data.tokens[:0], offsets)


def baseline_design(design: evaluation.Design) -> evaluation.Design | None:
    """The same parameter handling without the residual: how much the request alone predicts (None where the
    design reads no parameters, so the baseline is a constant)."""
    if design.variant_rule is None and not design.extras({}):
        return None
    plain = {k: v for k, v in design.conditioning.items() if k != "lens"}
    return dataclasses.replace(design, name=f"{design.name} (params only)", conditioning=plain, residual=False)


def measure_all(probe: evaluation.FittedProbe, data: TaskData, external: TaskData | None) -> dict:
    """Every column; IFEval also restricted to the corpus's numeric parameter range (scoped reliability)."""
    out = {split: evaluation.measure(probe, data, data.split == split) for split in GENERALISATION_SPLITS[:2]}
    out["ifeval"] = evaluation.measure(probe, external, np.ones(len(external.rows), dtype=bool)) \
        if external is not None and len(external.rows) else None
    limits = range_of([r["params"] for r in data.rows])
    if out["ifeval"] is not None and limits:
        inside = np.array([in_range(r["params"], limits)[0] for r in external.rows])
        out["ifeval_in_range"] = evaluation.measure(probe, external, inside)
    return out


def choose_and_measure(task: str, data: TaskData, external: TaskData | None, layers: list[int]) -> dict:
    """The chosen probe (design, layer, C by family-grouped CV on train), every candidate's CV score, its
    measurements on every split, the single-probe design's, and the params-only baseline's."""
    chosen, scores = evaluation.choose(data, layers, evaluation.designs_for(task))  # `available` ones only
    design_cv = {}  # why the design won: each design's best training CV AUROC (the card keeps them)
    for s in scores:
        design_cv[s["design"]] = max(design_cv.get(s["design"], -1.0), np.nan_to_num(s["cv_auroc"], nan=-1.0))
    single, _ = evaluation.choose(data, layers, (evaluation.BASE,))
    result = {"probe": chosen, "cv_scores": scores, "measured": measure_all(chosen, data, external) | {
                  "design_cv": {name: round(float(v), 4) for name, v in design_cv.items()}},
              "single": {"layer": single.layer, "cv_auroc": round(single.cv_auroc, 4),
                         "measured": measure_all(single, data, external)}}
    baseline = baseline_design(chosen.design)
    if baseline is not None:
        params_only, _ = evaluation.choose(data, [chosen.layer], (baseline,))
        result["params_only"] = {"cv_auroc": round(params_only.cv_auroc, 4),
                                 "measured": measure_all(params_only, data, external)}
    return result


def train_corpus(corpus: Path, features: Path, tasks: list[str], token_layers: list[int], lens_of=None,
                 progress: bool = True) -> tuple[dict[str, TaskData], dict[str, dict]]:
    """Every task's data and its `choose_and_measure` result (bank probes live at token layers, so their flag
    thresholds are calibrated on the per-token readings the monitor will see). `lens_of`: (LensWeights,
    tokenizer) of the model, for the tasks whose designs read the logit lens of the request's words."""
    external = load_ifeval(corpus, features)
    datas, results = {}, {}
    for task in tqdm(tasks, desc="probes", disable=not progress):
        datas[task] = evaluation.load_task(corpus, features, task)
        mine = rows_of(external, np.array([r["task"] == task for r in external.rows])) if external else None
        mine = mine if mine is not None and mine.rows else None  # IFEval has no prompts for some tasks
        param = evaluation.lens_param(task)
        if param and lens_of is not None:
            for data in (datas[task], mine):
                if data is not None:
                    evaluation.attach_lexical(data, *lens_of, param)
        declared = [d.conditioning for d in evaluation.designs_for(task)
                    if d.summarised and (not d.lexical or datas[task].lens is not None)]
        for data in (datas[task], mine):  # running means and maxima, as the monitor keeps them
            if data is not None and declared:
                summaries.attach(data, token_layers, declared)
        results[task] = choose_and_measure(task, datas[task], mine, token_layers)
    return datas, results


def generalisation_summary(results: dict[str, dict]) -> dict[str, dict]:
    """Per task, the report's generalisation columns (in distribution, held-out phrasing, IFEval) with n and
    intervals, for the chosen probe, the single-probe design and the params-only baseline."""
    def cols(measured: dict) -> dict:
        return {split: (measured[split] if measured.get(split) else None) for split in GENERALISATION_SPLITS}

    out = {}
    for task, r in results.items():
        probe = r["probe"]
        out[task] = {"design": probe.design.name, "layer": probe.layer, "C": probe.c,
                     "cv_auroc": round(probe.cv_auroc, 4), **cols(r["measured"]),
                     "single": {"layer": r["single"]["layer"], **cols(r["single"]["measured"])},
                     "params_only": cols(r["params_only"]["measured"]) if "params_only" in r else None}
    return out


def write_generalisation(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "generalisation.json").write_text(json.dumps(summary, indent=1))
