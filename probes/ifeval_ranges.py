"""IFEval's ranges without IFEval's prompts (#22 item 2): retrain word_count, term_exclusion and
keyword_inclusion on the shipped corpus's training split plus the IFEval-range corpus's training split, and
measure the shipped probe and the retrained one side by side.

The IFEval-range corpus (`steerer probes corpus --ranges ifeval`) has the shipped corpus's base-request split
and phrasing families, so its rows get the shipped treatment: `probes.evaluation.split_of` assigns train, test
(held-out requests) or heldout_phrasing (held-out wording); its non-training rows are renamed `range_test` and
`range_heldout_phrasing`, so they never enter training and the shipped columns (test, heldout_phrasing) keep
exactly the shipped rows. Design, layer and C are chosen by family-grouped CV on the merged training split
(`probes.evaluation.choose`, as `steerer probes train` does); IFEval is measured afterwards, never chosen on.

Both probes are read through the runtime's `Scorer` (bank weights, conditioning rows, lens inputs): on the
cached end residuals (`probes.features`) for the corpus columns, and teacher-forced by
`probes.reliability.ifeval_metrics` (the shipped reliability path) for IFEval. A paired bootstrap gives the
interval of the difference (new - old) on each column.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from probes import evaluation, ifeval, pipeline, reliability
from probes.corpus import load_corpus
from probes.dataset import POSITIONS, TaskData
from probes.features import load_features
from probes.train import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from steerer.bank import ProbeBank, content_version

TASKS = ("word_count", "term_exclusion", "keyword_inclusion")
RANGE_SPLITS = {"test": "range_test", "heldout_phrasing": "range_heldout_phrasing"}
CORPUS_COLUMNS = ("test", "heldout_phrasing", "range_heldout", "range_test", "range_heldout_phrasing")


def range_split(row: dict) -> str:
    """The shipped split rule, with the range corpus's held-out rows renamed (kept out of training and out of
    the shipped columns)."""
    split = evaluation.split_of(row)
    return RANGE_SPLITS.get(split, split)


def load_range_task(corpus: Path, features: Path, task: str) -> TaskData:
    rows = [r | {"split": range_split(r)} for r in load_corpus(corpus, task)]
    return load_features(features, task, rows)


def concat(a: TaskData, b: TaskData) -> TaskData:
    """Rows of `a` then `b` with their residuals (per-token offsets shifted); lens inputs are attached after."""
    return TaskData(a.rows + b.rows, torch.cat([a.positions, b.positions]), torch.cat([a.tokens, b.tokens]),
                    torch.cat([a.offsets, b.offsets[1:] + a.offsets[-1]]))


def column_masks(data: TaskData) -> dict[str, np.ndarray]:
    """Each corpus column's rows: the shipped held-out splits, and the range corpus's held-out rows (pooled and
    by kind)."""
    split = data.split
    masks = {"test": split == "test", "heldout_phrasing": split == "heldout_phrasing",
             "range_heldout": np.isin(split, list(RANGE_SPLITS.values()))}
    return masks | {name: split == name for name in RANGE_SPLITS.values()}


def paired_difference_ci(y: np.ndarray, old: np.ndarray, new: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                         level: float = 0.95, seed: int = BOOTSTRAP_SEED) -> list[float] | None:
    """95% percentile-bootstrap interval of AUROC(new) - AUROC(old) on the same rows (resampled together,
    stratified by class as `probes.train.auroc_ci`): whether a difference is more than resampling noise."""
    y = np.asarray(y)
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        return None
    rng = np.random.default_rng(seed)
    count_pos = rng.multinomial(pos.sum(), np.full(pos.sum(), 1 / pos.sum()), size=resamples)  # [R, P]
    count_neg = rng.multinomial(neg.sum(), np.full(neg.sum(), 1 / neg.sum()), size=resamples)  # [R, N]

    def aurocs(score: np.ndarray) -> np.ndarray:  # exact per resample (Mann-Whitney, ties half), as auroc_ci
        a, b = score[pos], score[neg]
        wins = (a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])
        return np.einsum("rp,pn,rn->r", count_pos, wins, count_neg) / (pos.sum() * neg.sum())

    diffs = aurocs(np.asarray(new, dtype=float)) - aurocs(np.asarray(old, dtype=float))
    tail = (1 - level) / 2 * 100
    return [round(float(v), 4) for v in np.percentile(diffs, [tail, 100 - tail])]


def side_by_side(name: str, y: np.ndarray, old: np.ndarray, new: np.ndarray) -> dict:
    """One column: both probes' AUROC with 95% intervals, n, and the paired difference's interval."""
    out = {"n": int(len(y)), "n_satisfied": int(y.sum())}
    for key, p in (("old", old), ("new", new)):
        m = reliability.column_metrics(name, y, p)
        out[key] = {"auroc": m[f"{name}_auroc"], "ci": m[f"{name}_auroc_ci"]}
    both = 0 < int(y.sum()) < len(y)
    out["difference_ci"] = paired_difference_ci(y, old, new) if both else None
    return out


@torch.inference_mode()
def cached_readings(bank: ProbeBank, task: str, data: TaskData, mask: np.ndarray, lens, tokenizer) -> np.ndarray:
    """P(satisfied) of `bank`'s probe for `task` at each masked row's cached end residual, through the runtime's
    `Scorer` with the row's params (one batched pass)."""
    from steerer.lens import token_ids, words_of
    from steerer.monitor import Scorer

    index = np.flatnonzero(mask)
    if not len(index):
        return np.zeros(0)
    k = bank.index(task)
    probe, param = bank.probes[k], bank.lens_params[k]
    scorer = Scorer(bank, len(index), lens, bank)
    for slot, i in enumerate(index):
        params = data.rows[i]["params"]
        scorer.register(slot, {task: params}, {task: token_ids(tokenizer, words_of(params, param))} if param else None)
    x = data.positions[torch.from_numpy(index), POSITIONS.index("eos"), probe.layer].float()
    every = {p.layer: x for p in bank.probes}  # only column k counts
    return scorer.score(torch.arange(len(index)), every)[:, k].double().numpy()


@dataclass
class Retrained:
    """One task's retrained probe, its candidate-bank entry and the data it was chosen and measured on."""

    task: str
    probe: evaluation.FittedProbe
    cv_scores: list[dict]
    measured: dict
    entry: evaluation.BankEntry
    data: TaskData


def retrain(task: str, data: TaskData, external: TaskData | None, token_layers: list[int], hidden_size: int,
            shipped: ProbeBank, lens_of) -> Retrained:
    """The shipped training recipe on the merged data: designs of the task, layer and C by family-grouped CV on
    the training split; the bank entry keeps the shipped probe's steering (direction, layer, gate)."""
    from steerer.monitor import MonitorConfig

    param = evaluation.lens_param(task)
    if param:
        for d in (data, external):
            if d is not None:
                evaluation.attach_lexical(d, *lens_of, param)
    designs = tuple(d for d in evaluation.designs_for(task) if not d.lexical or data.lexical is not None)
    probe, scores = evaluation.choose(data, token_layers, designs)
    measured = pipeline.measure_all(probe, data, external)
    entry = evaluation.bank_entry(task, probe, data, hidden_size, token_layers, measured, MonitorConfig())
    data.tokens, data.offsets = data.tokens[:0], torch.zeros_like(data.offsets)  # end residuals suffice from here
    old = shipped.probes[shipped.index(task)]
    entry.direction = shipped.directions[shipped.index(task)].double().numpy()
    entry.record["steer_layer"] = old.steering_layer
    entry.record["gate_threshold"] = old.gate_threshold
    return Retrained(task, probe, scores, measured, entry, data)


def candidate_bank(shipped: ProbeBank, retrained: dict[str, Retrained], note: dict) -> ProbeBank:
    """The shipped bank with the retrained tasks' probes swapped in (every other probe, the steering, the
    warning predictors and the extra records kept); reliability is recomputed by `with_ifeval`."""
    entries = [retrained[t].entry if t in retrained else evaluation.entry_from_bank(shipped, t) for t in shipped.tasks]
    extra = copy.deepcopy(shipped.extra) | {"ifeval_ranges": note}
    for task, r in retrained.items():  # the retrained probe's columns (IFEval is rewritten by with_reliability)
        extra.setdefault("generalisation", {})[task] = {
            split: (r.measured.get(split) or {}).get("auroc") for split in ("test", "heldout_phrasing", "ifeval")}
    bank = evaluation.assemble_bank(entries, shipped.model, shipped.fingerprint, shipped.hidden_size, "pending", extra)
    bank.warning = shipped.warning
    bank.version = content_version(bank)
    return bank


def with_ifeval(lm, bank: ProbeBank, corpus: Path, ranges: dict[str, dict], command: str | None,
                tasks: tuple[str, ...]) -> tuple[ProbeBank, dict]:
    """The IFEval column of `tasks`, teacher-forced through the runtime (`steerer probes reliability`'s path),
    and the bank with its reliability records recomputed from it (other tasks keep their recorded column)."""
    rows = [r for r in ifeval.load(corpus) if r["task"] in tasks]
    measured = reliability.ifeval_metrics(lm, bank, rows, ranges)
    return reliability.with_reliability(bank, measured | kept_ifeval(bank, tasks), ranges, command), measured


def kept_ifeval(bank: ProbeBank, tasks: tuple[str, ...]) -> dict[str, dict]:
    """The recorded IFEval metrics of the probes not in `tasks`, in `ifeval_metrics`' shape (not remeasured)."""
    return {p.task: {"metrics": {k: v for k, v in p.metrics.items() if k.startswith(("ifeval_", "n_ifeval"))}}
            for p in bank.probes if p.task not in tasks and "ifeval_auroc" in p.metrics}


def ifeval_column(old: dict, new: dict, task: str) -> dict:
    """IFEval side by side from two `ifeval_metrics` results (readings in the same row order)."""
    y = np.array([r["satisfied"] for r in old[task]["readings"]], dtype=int)
    p_old = np.array([r["p_satisfied"] for r in old[task]["readings"]])
    p_new = np.array([r["p_satisfied"] for r in new[task]["readings"]])
    if [r["id"] for r in old[task]["readings"]] != [r["id"] for r in new[task]["readings"]]:
        raise ValueError("IFEval readings of the two banks are not in the same row order")
    return side_by_side("ifeval", y, p_old, p_new)


def model_decided(rows: list[dict]) -> np.ndarray:
    """Rows whose label the model decided, not the token budget: the corpus keeps no `censored` row (a word
    limit's verdict fixed by the cut, `probes.corpus.censored`), but IFEval's responses were generated with the
    task's budget (160 tokens for word_count), so most of its "at least 300 words" rows are such cuts."""
    from probes.corpus import censored

    return np.array([not censored(r["task"], r["params"], r["satisfied"], r["finish_reason"]) for r in rows])


def better(columns: dict) -> dict:
    """The brief's rule, per task: IFEval higher (point estimate) and no corpus column worse beyond its
    interval (the new AUROC at or above the old one's 95% low end)."""
    ifv = columns["ifeval"]
    gain = ifv["new"]["auroc"] is not None and ifv["old"]["auroc"] is not None and \
        ifv["new"]["auroc"] > ifv["old"]["auroc"]
    worse = [name for name in ("test", "heldout_phrasing", "range_heldout")
             if columns[name]["old"]["ci"] and columns[name]["new"]["auroc"] is not None
             and columns[name]["new"]["auroc"] < columns[name]["old"]["ci"][0]]
    return {"ifeval_higher": bool(gain), "worse_columns": worse, "adopt": bool(gain and not worse)}


def write_report(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def plot(doc: dict, path: Path) -> None:
    """One panel per task: each column's AUROC with its 95% interval, shipped beside retrained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("test", "heldout_phrasing", "range_heldout", "ifeval", "ifeval_model_decided")
    labels = ["test", "held-out\nphrasing", "range\nheld-out", "IFEval", "IFEval\nmodel-decided"]
    blank = {"old": {"auroc": None, "ci": None}, "new": {"auroc": None, "ci": None}}
    fig, axes = plt.subplots(1, len(doc["tasks"]), figsize=(4.8 * len(doc["tasks"]), 3.4), sharey=True)
    for ax, (task, t) in zip(np.atleast_1d(axes), doc["tasks"].items(), strict=True):
        for j, (key, colour) in enumerate((("old", "tab:grey"), ("new", "tab:blue"))):
            xs = np.arange(len(names)) + (j - 0.5) * 0.36
            vals = [t["columns"].get(n, blank)[key]["auroc"] or np.nan for n in names]
            cis = [t["columns"].get(n, blank)[key]["ci"] or [np.nan, np.nan] for n in names]
            err = np.array([[v - c[0] for v, c in zip(vals, cis, strict=True)],
                            [c[1] - v for v, c in zip(vals, cis, strict=True)]])
            ax.bar(xs, vals, 0.36, yerr=err, color=colour, capsize=2,
                   label={"old": "shipped", "new": "retrained"}[key])
        ax.axhline(0.5, color="k", lw=0.6, ls=":")
        ax.axhline(0.7, color="tab:red", lw=0.6, ls="--")
        ax.set_xticks(np.arange(len(names)), labels, fontsize=7)
        ax.set_title(task)
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("AUROC (95% bootstrap)")
    np.atleast_1d(axes)[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(corpus: Path, features: Path, range_corpus: Path, range_features: Path, shipped: ProbeBank, lm,
        tasks: tuple[str, ...] = TASKS, command: str | None = None) -> tuple[ProbeBank, dict]:
    """Retrain `tasks` on both corpora's training splits, measure shipped and retrained side by side, and
    assemble the candidate bank (retrained probes only for tasks that pass `better`)."""
    from steerer.lens import LensWeights, lens_for

    fmanifest = json.loads((features / "manifest.json").read_text())
    rmanifest = json.loads((range_features / "manifest.json").read_text())
    if {k: fmanifest[k] for k in ("fingerprint", "token_layers")} != \
            {k: rmanifest[k] for k in ("fingerprint", "token_layers")} or fmanifest["fingerprint"] != lm.fingerprint:
        raise ValueError("both feature caches must be of the bank's model with the same token layers")
    shipped.check_model(lm.fingerprint, lm.hidden_size)
    token_layers = fmanifest["token_layers"]
    lens_of = (LensWeights.of(lm.model), lm.tokenizer)
    # IFEval's cached residuals only feed the entry's provisional IFEval metrics (`with_ifeval` rewrites them)
    external = pipeline.load_ifeval(corpus, features) if (features / ifeval.TASK).exists() else None
    retrained: dict[str, Retrained] = {}
    for task in tasks:
        data = concat(evaluation.load_task(corpus, features, task), load_range_task(range_corpus, range_features, task))
        mine = pipeline.rows_of(external, np.array([r["task"] == task for r in external.rows])) if external else None
        retrained[task] = retrain(task, data, mine if mine is not None and mine.rows else None, token_layers,
                                  fmanifest["hidden_size"], shipped, lens_of)
    old_ranges = {p.task: p.metrics.get("measured_range") or {} for p in shipped.probes}  # as the bank recorded
    ranges = old_ranges | {t: reliability.range_of([row["params"] for row in r.data.rows]) for t, r in retrained.items()}
    note = {"command": command, "range_corpus": str(range_corpus), "tasks": list(tasks)}
    full = candidate_bank(shipped, retrained, note)
    full, new_ifeval = with_ifeval(lm, full, corpus, ranges, None, tasks)
    old_ifeval = reliability.ifeval_metrics(lm, shipped, [r for r in ifeval.load(corpus) if r["task"] in tasks],
                                            old_ranges)
    lens = lens_for(full, lm.model)
    by_id = {r["id"]: r for r in ifeval.load(corpus)}
    doc: dict = {"command": command, "shipped_bank": shipped.version, "tasks": {}}
    for task, r in retrained.items():
        masks = column_masks(r.data)
        y = r.data.labels
        columns = {}
        for name in CORPUS_COLUMNS:
            old = cached_readings(shipped, task, r.data, masks[name], lens, lm.tokenizer)
            new = cached_readings(full, task, r.data, masks[name], lens, lm.tokenizer)
            columns[name] = side_by_side(name, y[masks[name]], old, new)
        columns["ifeval"] = ifeval_column(old_ifeval, new_ifeval, task)
        decided = model_decided([by_id[r["id"]] for r in old_ifeval[task]["readings"]])
        if not decided.all():  # evaluation only, beside the full column: nothing is chosen on it
            columns["ifeval_model_decided"] = ifeval_column(_subset(old_ifeval, task, decided),
                                                            _subset(new_ifeval, task, decided), task)
        n_train = {"shipped": int(sum(s == "train" for s in r.data.split[:_n_shipped(r.data)])),
                   "range": int(sum(s == "train" for s in r.data.split[_n_shipped(r.data):]))}
        doc["tasks"][task] = {
            "old": {"design": shipped.probes[shipped.index(task)].metrics.get("design"),
                    "layer": shipped.probes[shipped.index(task)].layer,
                    "recorded": {k: shipped.probes[shipped.index(task)].metrics.get(f"{k}_auroc")
                                 for k in ("test", "heldout_phrasing", "ifeval")}},
            "new": {"design": r.probe.design.name, "layer": r.probe.layer, "C": r.probe.c,
                    "cv_auroc": round(float(r.probe.cv_auroc), 4), "n_train": n_train,
                    "measured_range": ranges[task],
                    "ifeval_in_range": new_ifeval[task]["metrics"].get("ifeval_in_range_auroc")},
            "columns": columns, "decision": better(columns)}
    adopted = {t: r for t, r in retrained.items() if doc["tasks"][t]["decision"]["adopt"]}
    note["adopted"] = sorted(adopted)
    ranges = {t: ranges[t] if t in adopted else old_ranges[t] for t in shipped.tasks}
    measured = {t: (new_ifeval if t in adopted else old_ifeval)[t] for t in old_ifeval} | kept_ifeval(shipped, tasks)
    bank = reliability.with_reliability(candidate_bank(shipped, adopted, note), measured, ranges, command)
    doc["candidate_bank"] = {"version": bank.version, "adopted": sorted(adopted)}
    return bank, doc


def _n_shipped(data: TaskData) -> int:
    """How many leading rows come from the shipped corpus (range rows carry the range tag)."""
    from probes.corpus import RANGE_TAG

    return sum(r.get("tag") != RANGE_TAG for r in data.rows)


def main(args) -> int:
    """`steerer probes ranges`: retrain, measure, write the candidate bank, the report and its plot."""
    import shlex
    import sys

    from steerer.model import load_model

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks or set(tasks) - set(TASKS):
        raise ValueError(f"--tasks must be among {', '.join(TASKS)} (the IFEval-range corpus's tasks)")
    for path in (args.features, args.range_features):
        if not (Path(path) / "manifest.json").exists():
            raise FileNotFoundError(f"no features at {path}: compute them with `steerer probes build`")
    shipped = ProbeBank.load(args.bank)
    if args.out and Path(args.out).resolve() == Path(shipped_path(args.bank)).resolve():
        raise ValueError("--out must not be the source bank: write the candidate to a folder of its own")
    lm = load_model(shipped.model, threads=args.threads)
    command = shlex.join(["steerer", *sys.argv[1:]])
    bank, doc = run(Path(args.corpus), Path(args.features), Path(args.range_corpus), Path(args.range_features),
                    shipped, lm, tasks, command)
    report = Path(args.report)
    if args.out and doc["candidate_bank"]["adopted"]:
        doc["candidate_bank"]["path"] = str(bank.save(args.out))
    write_report(report, doc)
    plot(doc, report.with_suffix(".png"))
    for task, t in doc["tasks"].items():
        print(f"{task:18s} " + "  ".join(
            f"{name} {c['old']['auroc']}->{c['new']['auroc']}" for name, c in t["columns"].items()
            if name in ("test", "heldout_phrasing", "range_heldout", "ifeval")) + f"  adopt={t['decision']['adopt']}")
    print(f"wrote {report}" + (f" and {doc['candidate_bank']['path']}" if "path" in doc["candidate_bank"] else
                               " (no task passed: no candidate bank)"))
    return 0


def shipped_path(bank: str | None) -> Path:
    from steerer.bank import DEFAULT_BANK

    return Path(bank) if bank else Path(DEFAULT_BANK)


def _subset(measured: dict, task: str, keep: np.ndarray) -> dict:
    return {task: {"readings": [r for r, k in zip(measured[task]["readings"], keep, strict=True) if k]}}
