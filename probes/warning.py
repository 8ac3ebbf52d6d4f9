"""Token-level warning predictors (#12): forecasts of a violation from the tokens before it, for the flags.

The bank's probes are trained on the end-of-response residual, where the signal peaks; read at every token
they flag late or cry wolf. A warning predictor is trained on the residuals of generated tokens *before* the
violation's onset (every token of a compliant response), labelled by the response's final outcome, and may
read what detection knows: the task's progress towards its limit (`steerer.tasks` `progress`: count so far /
limit) as per-token inputs (`steerer.conditioning.progress_features`). It keeps the probe's conditioning
(variant per bound or value, inputs from params, the logit lens of the request's words).

Choice per task, on the training split only: for each candidate layer, out-of-fold per-token readings
(folds grouped by base request) -> the flag threshold whose false flags on compliant responses stay within
the budget -> the share of violations flagged at least `EARLY` tokens before their reference (detection, or
the end where no prefix decides). The best layer competes with the bank's own probe read per token (its
flag threshold recalibrated the same way); the winner goes into the bank's `warning/` sub-bank, the other
tasks keep their probe there. Every reading here is computed by the runtime's own `Scorer` on the bank
being written, so what is measured is what the monitor will read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from probes.dataset import TaskData
from probes.evaluation import Design, FittedProbe, assemble_bank, entry_from_bank, fit_design, lexical_at
from steerer import conditioning
from steerer.bank import ProbeBank
from steerer.detokenize import IncrementalDetokenizer
from steerer.monitor import MonitorConfig, Scorer, first_flag
from steerer.stats import wilson
from steerer.tasks import get_task
from steerer.tasks.base import end_index

EARLY = 3  # tokens before the reference that count as early warning
BUDGET = 0.10  # false-flag share allowed on compliant training responses (out of fold), per task
TOKENS_PER_ROW = 12  # training tokens sampled per response (before its onset)
C = 0.01
FOLDS = 4
GRID = np.round(np.linspace(0.02, 0.98, 49), 4)


@dataclass
class Trace:
    """One response's per-token readings as the monitor takes them (index 0 .. last reading, cut before a
    detected violation, where detection settles the task and flags stop)."""

    p: list[float]
    index: list[int]
    satisfied: bool
    reference: int  # detection, else the end index (for violations)
    key: str = "all"  # the request's variant (bound, value) under the predictor's design


def progress_fractions(task: str, params: dict, token_ids: list[int], tokenizer) -> np.ndarray | None:
    """[n + 1] the task's progress after each generated token and at the EOS pass (None: no progress rule)."""
    make = get_task(task).progress
    if make is None:
        return None
    tracker, detok, out = make(params), IncrementalDetokenizer(tokenizer), []
    for token in token_ids:
        out.append(tracker.feed(detok.add(token)))
    out.append(tracker.feed(detok.flush()))
    return np.array(out, dtype=np.float32)


def row_inputs(data: TaskData, i: int, column: int, design: Design, tokenizer) -> np.ndarray:
    """[T, d (+ 2 lens) (+ 3 progress)] inputs of every reading of row i (passes 0 .. its last reading)."""
    row = data.rows[i]
    start, end = int(data.offsets[i]), int(data.offsets[i + 1])
    x = data.tokens[start:end, column].float().numpy()
    parts = [x]
    if design.lexical:
        parts.append(lexical_at(data, x, row["params"]))
    if conditioning.reads_progress(design.conditioning):
        ids = row["token_ids"] if isinstance(row["token_ids"], list) else json.loads(row["token_ids"])
        fractions = progress_fractions(row["task"], row["params"], ids, tokenizer)
        index = np.arange(len(x))
        parts.append(conditioning.progress_features(fractions[np.minimum(index, len(fractions) - 1)], index))
    return np.concatenate(parts, axis=1) if len(parts) > 1 else x


def reference(row: dict) -> int:
    """The token a violation is measured against: its detection (onset), else the end."""
    if row["onset"] is not None:
        return int(row["onset"])
    return end_index(int(row["n_tokens"]), row["finish_reason"] == "eos")


def training_tokens(data: TaskData, rows: np.ndarray, column: int, design: Design, tokenizer, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Up to TOKENS_PER_ROW readings per row, before its onset, labelled with the row's final outcome."""
    rng = np.random.default_rng(seed)
    xs, ys, params = [], [], []
    for i in rows:
        row = data.rows[i]
        x = row_inputs(data, i, column, design, tokenizer)
        stop = len(x) if row["onset"] is None else min(len(x), int(row["onset"]))
        if stop <= 0:
            continue
        pick = rng.choice(stop, size=min(stop, TOKENS_PER_ROW), replace=False)
        xs.append(x[pick])
        ys += [int(row["satisfied"])] * len(pick)
        params += [row["params"]] * len(pick)
    return np.concatenate(xs), np.array(ys), params


def traces(probe: FittedProbe, data: TaskData, rows: np.ndarray, column: int, tokenizer) -> list[Trace]:
    out = []
    for i in rows:
        row = data.rows[i]
        x = row_inputs(data, i, column, probe.design, tokenizer)
        stop = len(x) if row["satisfied"] or row["onset"] is None else min(len(x), int(row["onset"]))
        p = probe.proba(x[:stop], [row["params"]] * stop) if stop else np.zeros(0)
        out.append(Trace(p.tolist(), list(range(stop)), bool(row["satisfied"]), reference(row),
                         probe.design.variant(row["params"])))
    return out


def logit(p, eps: float = 1e-6):
    p = np.clip(p, eps, 1 - eps)
    return np.log(p / (1 - p))


def shifted(trace: Trace, shift: float) -> Trace:
    """The trace with `shift` added to every logit (a variant's bias moved)."""
    return replace(trace, p=(1.0 / (1.0 + np.exp(-(logit(np.asarray(trace.p), 1e-9) + shift)))).tolist())


def variant_shifts(traces_: list[Trace], config: MonitorConfig) -> dict[str, float]:
    """Per variant, the logit shift that moves its own budget threshold to 0.5: each variant then spends the
    false-flag budget on its own requests (a bound that flags early by nature does not use up the other's), and
    one threshold serves all, held in the variant's bias."""
    keys = sorted({t.key for t in traces_})
    if len(keys) < 2:
        return {}
    return {key: -float(logit(calibrate([t for t in traces_ if t.key == key and t.satisfied], config)))
            for key in keys}


def flagged_early(trace: Trace, threshold: float, config: MonitorConfig) -> bool:
    at = first_flag(trace.p, trace.index, threshold, config)
    return at is not None and trace.reference - at >= EARLY


def false_flagged(trace: Trace, threshold: float, config: MonitorConfig) -> bool:
    return first_flag(trace.p, trace.index, threshold, config) is not None


def calibrate(compliant: list[Trace], config: MonitorConfig, budget: float = BUDGET) -> float:
    """The highest P(satisfied) flag threshold whose false flags stay within the budget."""
    ok = [t for t in GRID if np.mean([false_flagged(tr, float(t), config) for tr in compliant] or [0]) <= budget]
    return float(max(ok)) if ok else float(GRID[0])


def warning_summary(traces_: list[Trace], threshold: float, config: MonitorConfig) -> dict:
    """Early-warning share of violations and false-flag share of compliant responses, with 95% intervals."""
    bad = [t for t in traces_ if not t.satisfied]
    ok = [t for t in traces_ if t.satisfied]
    early = sum(flagged_early(t, threshold, config) for t in bad)
    false = sum(false_flagged(t, threshold, config) for t in ok)
    return {"violations": len(bad), "flagged_at_least_3_early": round(early / len(bad), 4) if bad else None,
            "flagged_at_least_3_early_ci": list(wilson(early, len(bad))) if bad else None,
            "compliant": len(ok), "false_flag_rate": round(false / len(ok), 4) if ok else None,
            "false_flag_rate_ci": list(wilson(false, len(ok))) if ok else None}


def group_folds(rows: np.ndarray, data: TaskData, k: int = FOLDS) -> list[np.ndarray]:
    bases = sorted({data.rows[i]["base_id"] for i in rows})
    fold = {b: j % k for j, b in enumerate(bases)}
    return [np.array([i for i in rows if fold[data.rows[i]["base_id"]] == j]) for j in range(k)]


def out_of_fold(data: TaskData, rows: np.ndarray, column: int, layer: int, design: Design, tokenizer
                ) -> list[Trace]:
    out = []
    for held in group_folds(rows, data):
        fit_rows = np.setdiff1d(rows, held)
        x, y, params = training_tokens(data, fit_rows, column, design, tokenizer)
        probe = fit_design(x, y, params, design, C, layer)
        out += traces(probe, data, held, column, tokenizer)
    return out


def bank_traces(bank: ProbeBank, task: str, data: TaskData, rows: np.ndarray, token_layers: list[int], lens,
                tokenizer) -> list[Trace]:
    """Per-token readings of `task`'s probe in `bank` through the runtime's `Scorer` (one row at a time)."""
    from steerer.lens import token_ids, words_of

    k = bank.index(task)
    probe = bank.probes[k]
    scorer = Scorer(bank, 1, lens, bank)
    column = token_layers.index(probe.layer)
    out = []
    for i in rows:
        row = data.rows[i]
        words = {task: token_ids(tokenizer, words_of(row["params"], bank.lens_params[k]))} \
            if bank.lens_params[k] else None
        scorer.register(0, {task: row["params"]}, words)
        start, end = int(data.offsets[i]), int(data.offsets[i + 1])
        stop = end - start if row["satisfied"] or row["onset"] is None else min(end - start, int(row["onset"]))
        x = data.tokens[start:start + stop, column].float()
        index = torch.arange(stop)
        progress = torch.zeros(stop, len(bank.probes))
        if conditioning.reads_progress(probe.conditioning):
            ids = row["token_ids"] if isinstance(row["token_ids"], list) else json.loads(row["token_ids"])
            fractions = progress_fractions(task, row["params"], ids, tokenizer)
            progress[:, k] = torch.from_numpy(fractions[np.minimum(np.arange(stop), len(fractions) - 1)])
        residuals = {p.layer: x for p in bank.probes}  # only column k is read
        if conditioning.forecasts(probe.conditioning) or conditioning.lens_max(probe.conditioning) \
                or conditioning.pool(probe.conditioning):  # running: in order
            p = torch.cat([scorer.score(torch.zeros(1, dtype=torch.long), {layer: x[t:t + 1] for layer in residuals},
                                        None, progress[t:t + 1], index[t:t + 1])[:, k] for t in range(stop)]) \
                if stop else torch.zeros(0)
        else:
            p = scorer.score(torch.zeros(stop, dtype=torch.long), residuals, None, progress, index)[:, k] \
                if stop else torch.zeros(0)
        out.append(Trace(p.tolist(), list(range(stop)), bool(row["satisfied"]), reference(row)))
    return out


def split_rows(data: TaskData, split: str) -> np.ndarray:
    return np.flatnonzero(data.split == split)


def choose_warning(task: str, data: TaskData, bank: ProbeBank, token_layers: list[int], layers: list[int], lens,
                   tokenizer, config: MonitorConfig) -> dict:
    """Candidates scored on training out-of-fold readings; returns the choice and every candidate's score."""
    train = split_rows(data, "train")
    probe = bank.probes[bank.index(task)]
    base = {key: value for key, value in (probe.conditioning or {}).items() if key not in ("rows", "steer_signs", "pool")}
    if get_task(task).progress is not None:
        base["progress"] = True
    design = Design("warning", base)
    candidates = []
    eos = bank_traces(bank, task, data, train, token_layers, lens, tokenizer)
    threshold = calibrate([t for t in eos if t.satisfied], config)
    candidates.append({"kind": "end_probe", "layer": probe.layer, "threshold": threshold,
                       **warning_summary(eos, threshold, config)})
    with threadpool_limits(1):
        for layer in layers:
            column = token_layers.index(layer)
            oof = out_of_fold(data, train, column, layer, design, tokenizer)
            shifts = variant_shifts(oof, config)
            oof = [shifted(t, shifts.get(t.key, 0.0)) for t in oof]
            threshold = calibrate([t for t in oof if t.satisfied], config)
            candidates.append({"kind": "warning", "layer": layer, "threshold": threshold, "variant_shifts": shifts,
                               **warning_summary(oof, threshold, config)})
    best = max(candidates, key=lambda c: (c["flagged_at_least_3_early"] or 0, c["kind"] == "end_probe"))
    fitted = None
    if best["kind"] == "warning":
        column = token_layers.index(best["layer"])
        with threadpool_limits(1):
            x, y, params = training_tokens(data, train, column, design, tokenizer)
            fitted = fit_design(x, y, params, design, C, best["layer"])
            for key, shift in best["variant_shifts"].items():  # per-variant calibration, held in the bias
                if key in fitted.variants:
                    fitted.variants[key].bias += shift
    return {"task": task, "design": design, "chosen": best, "candidates": candidates, "fitted": fitted}


def warning_entry(choice: dict, bank: ProbeBank, hidden_size: int):
    """The warning sub-bank's entry for one task: the fitted predictor, or the bank's own probe again."""
    task, best = choice["task"], choice["chosen"]
    record = {"position": "tokens_before_onset", "method": "logreg", "flag_threshold": best["threshold"],
              "metrics": {k: v for k, v in best.items() if k not in ("threshold", "variant_shifts")}, "reliable": True,
              "reliability": None}  # the probe's record describes the probe's metrics, not these
    if choice["fitted"] is None:
        entry = entry_from_bank(bank, task)
        entry.record = {**entry.record, **record, "position": "eos"}
        return entry
    fitted, design = choice["fitted"], choice["design"]
    d = hidden_size
    n_lens = 2 if design.lexical else 0
    n_progress = len(conditioning.PROGRESS_FEATURES) if conditioning.reads_progress(design.conditioning) else 0

    def split(fit) -> tuple:
        w = fit.weight
        return (w[:d], fit.bias, w[d + n_lens + n_progress:], w[d:d + n_lens], w[d + n_lens:d + n_lens + n_progress])

    weight, bias, inputs, lens_w, progress_w = split(fitted.fallback)
    variants = [(key, *split(fit)) for key, fit in sorted(fitted.variants.items()) if design.variant_rule]
    entry = entry_from_bank(bank, task)  # direction and steering layer stay the bank's (unused by the monitor)
    declared = {"inputs": []} | design.conditioning
    record = {**entry.record, **record, "layer": fitted.layer, "threshold": 0.5, "conditioning": declared}
    return replace(entry, record=record, weight=weight, bias=bias, own_inputs=inputs, own_lens=lens_w,
                   own_progress=progress_w, variant_rows=variants)


def build_warning_bank(choices: list[dict], bank: ProbeBank) -> ProbeBank:
    """The warning sub-bank: the chosen predictors; other tasks keep what the bank's warning bank has, else
    their probe."""
    entries = {c["task"]: warning_entry(c, bank, bank.hidden_size) for c in choices}
    ordered = [entries[t] if t in entries else entry_from_bank(bank.alerting, t) for t in bank.tasks]
    return assemble_bank(ordered, bank.model, bank.fingerprint, bank.hidden_size, "warning", {})


def measure(task: str, data: TaskData, warning: ProbeBank, bank: ProbeBank, end_threshold: float,
            token_layers: list[int], lens, tokenizer, config: MonitorConfig, external: TaskData | None = None) -> dict:
    """Early warning on every held-out split, for the warning predictor and, beside it, the end probe (at the
    budget threshold `choose_warning` calibrated for it on the training split)."""
    out = {}
    for name, source in (("warning", warning), ("end_probe", bank)):
        threshold = float(source.probes[source.index(task)].flag_threshold) if name == "warning" else end_threshold
        out[name] = {"threshold": threshold}
        for split in ("test", "heldout_phrasing"):
            out[name][split] = warning_summary(
                bank_traces(source, task, data, split_rows(data, split), token_layers, lens, tokenizer), threshold,
                config)
        if external is not None and len(external.rows):
            out[name]["ifeval"] = warning_summary(bank_traces(source, task, external, np.arange(len(external.rows)),
                                                              token_layers, lens, tokenizer), threshold, config)
    return out


def train_warnings(corpus: Path, features: Path, bank: ProbeBank, tasks: list[str], token_layers: list[int],
                   layers: list[int], lens, tokenizer, config: MonitorConfig | None = None, progress: bool = True
                   ) -> tuple[ProbeBank, dict]:
    """Choose and fit every task's warning predictor; the bank with its `warning` sub-bank, and the report."""
    from probes import evaluation, pipeline

    config = config or MonitorConfig()
    external_all = pipeline.load_ifeval(corpus, features)
    choices, report = [], {}
    for task in tqdm(tasks, desc="warnings", disable=not progress):
        data = evaluation.load_task(corpus, features, task)
        param = evaluation.lens_param(task)
        external = None
        if external_all is not None:
            mask = np.array([r["task"] == task for r in external_all.rows])
            external = _rows_with_tokens(external_all, mask) if mask.any() else None
        if param:
            for part in (data, external):
                if part is not None:
                    evaluation.attach_lexical(part, lens, tokenizer, param)
        candidates = sorted(set(layers) | {bank.probes[bank.index(task)].layer} & set(token_layers))
        choice = choose_warning(task, data, bank, token_layers, candidates, lens, tokenizer, config)
        choices.append(choice)
        partial = replace(bank, warning=build_warning_bank(choices, bank))
        end_threshold = next(c["threshold"] for c in choice["candidates"] if c["kind"] == "end_probe")
        report[task] = {"chosen": choice["chosen"], "candidates": choice["candidates"],
                        "measured": measure(task, data, partial.warning, bank, end_threshold, token_layers, lens,
                                            tokenizer, config, external)}
        del data
    return replace(bank, warning=build_warning_bank(choices, bank)), report


def _rows_with_tokens(data: TaskData, mask: np.ndarray) -> TaskData:
    """Some rows of `data` with their per-token arrays (re-based offsets)."""
    keep = np.flatnonzero(mask)
    spans = [(int(data.offsets[i]), int(data.offsets[i + 1])) for i in keep]
    tokens = torch.cat([data.tokens[a:b] for a, b in spans]) if spans else data.tokens[:0]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([b - a for a, b in spans])]), dtype=torch.long)
    return TaskData([data.rows[i] for i in keep], data.positions[torch.from_numpy(keep)], tokens, offsets)



def write_report(folder: Path, report: dict, bank_version: str, command: str) -> None:
    """warning.json (everything measured) and README.md (the table people read)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "warning.json").write_text(json.dumps({"bank_version": bank_version, "command": command,
                                                     "budget": BUDGET, "early": EARLY, "tasks": report},
                                                    indent=1, default=str))

    def cell(m: dict | None) -> str:
        if not m or not m.get("violations"):
            return "-"
        early, ci = m["flagged_at_least_3_early"], m["flagged_at_least_3_early_ci"]
        text = f"{early:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] n={m['violations']}"
        if m.get("compliant"):
            ffr, fci = m["false_flag_rate"], m["false_flag_rate_ci"]
            text += f"; false {ffr:.2f} [{fci[0]:.2f}, {fci[1]:.2f}] n={m['compliant']}"
        return text

    lines = [f"# Early warning from token-level predictors (bank {bank_version})", "",
             f"`{command}`. Per task: the flagging reader chosen on the training split out of fold (a warning "
             f"predictor at a layer, or the bank's end probe), its flag threshold set for <= {BUDGET:.0%} false "
             "flags on compliant training responses (out of fold). Measured on teacher-forced per-token readings "
             "through the runtime's `Scorer` (what the live monitor reads), cut where detection settles the task. "
             f"Cells: share of violations flagged >= {EARLY} tokens before their reference (detection, else the "
             "end) [95% Wilson] n; false flags on compliant responses [95% Wilson] n.", "",
             "| task | chosen | layer | in distribution | held-out phrasing | IFEval | end probe, in distribution |",
             "|---|---|---|---|---|---|---|"]
    for task, r in report.items():
        w, e = r["measured"]["warning"], r["measured"]["end_probe"]
        lines.append(f"| {task} | {r['chosen']['kind']} | {r['chosen']['layer']} | {cell(w.get('test'))} | "
                     f"{cell(w.get('heldout_phrasing'))} | {cell(w.get('ifeval'))} | {cell(e.get('test'))} |")
    (folder / "README.md").write_text("\n".join(lines) + "\n")
