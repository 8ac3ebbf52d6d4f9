"""Probes that are meant to generalise, chosen on training data only and measured where users are.

Splits of the corpus (``probes.corpus``):
- ``train``: training base requests in training phrasing families;
- ``test`` (in distribution): held-out base requests, training phrasing families;
- ``heldout_phrasing``: the two held-out phrasing families of each task (never seen in training, any request);
- ``ifeval``: IFEval's own prompts mapped onto the tasks (``probes.ifeval``), evaluation only.

Probe *designs* differ in how a request's parameters enter (none; one probe per parameter value, e.g. per
relation of a count limit or per target sentiment; the parameter as an input, e.g. log of the limit). Every
design, layer and regularisation is scored by cross-validation on the training split grouped by phrasing
family (a fold's validation wording is never in its training folds), pooled over the task's requests, and
the best is refitted on all training rows. Every reported AUROC carries a 95% stratified bootstrap interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from threadpoolctl import threadpool_limits

from probes.corpus import load_corpus
from probes.dataset import POSITIONS, TaskData
from probes.features import load_features
from probes.reliability import range_of
from probes.summaries import end_inputs, running_inputs
from probes.train import auroc, auroc_ci, best_threshold
from steerer import conditioning, lens, reliability
from steerer.lens import LensWeights

CS = (0.001, 0.01, 0.1)
FOLDS = 4
SPLITS = ("train", "test", "heldout_phrasing")


def split_of(row: dict) -> str:
    """Held-out wording first (its rows test phrasing whatever their request), then request split."""
    if row.get("family_split") == "heldout":
        return "heldout_phrasing"
    return "train" if row["base_split"] == "train" else "test"


def load_task(corpus: Path, features: Path, task: str, partial: bool = False) -> TaskData:
    rows = [r | {"split": split_of(r)} for r in load_corpus(corpus, task)]
    return load_features(features, task, rows, partial)


# -- designs -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Design:
    """How a request's parameters enter a probe, as the bank declares it (`steerer.conditioning`): the same
    rules pick the variant and compute the inputs here and in the runtime, so they cannot disagree."""

    name: str
    conditioning: dict = field(default_factory=dict)  # the bank manifest's `conditioning` ({} = none)
    residual: bool = True  # False: a baseline reading params (or the lens) only, not the residual

    def variant(self, params: dict) -> str:
        return "all" if self.variant_rule is None else conditioning.VARIANTS[self.variant_rule](params)

    def extras(self, params: dict) -> list[float]:
        return conditioning.input_values(self.conditioning, params)

    @property
    def variant_rule(self) -> str | None:
        return self.conditioning.get("variant")

    @property
    def lens_param(self) -> str | None:
        return conditioning.lens_param(self.conditioning)

    @property
    def summarised(self) -> bool:
        """Reads a summary of the response's readings (`probes.summaries`: a running mean or maximum), not only
        its end reading."""
        return conditioning.pool(self.conditioning) is not None or conditioning.lens_max(self.conditioning) is not None

    @property
    def lexical(self) -> bool:
        """Reads the logit lens of the request's words (`steerer.lens`)."""
        return self.lens_param is not None


BASE = Design("single")
_BOUND = {"variant": "bound"}
_LOG_LIMIT = {"variant": "bound", "inputs": [{"param": "limit", "transform": "log"}]}
DESIGNS: dict[str, tuple[Design, ...]] = {
    "char_count": (BASE, Design("per_bound", _BOUND), Design("per_bound+log_limit", _LOG_LIMIT)),
    "word_count": (BASE, Design("per_bound", _BOUND), Design("per_bound+log_limit", _LOG_LIMIT)),
    "sentiment": (BASE, Design("per_polarity", {"variant": "polarity"})),
    "register": (BASE, Design("per_register", {"variant": "register"})),
}
for _task, _param in (("term_exclusion", "terms"), ("keyword_inclusion", "terms"), ("topic", "topic")):
    # the lens alone is two inputs (a 576-d residual overfits a few hundred rows); both are candidates
    DESIGNS[_task] = (BASE, Design("single+lens", {"lens": _param}), Design("lens", {"lens": _param}, residual=False))
# Summaries of the readings the monitor keeps per row (#22): how close the model came to saying a required word (the
# running maximum of its lens), and the mean residual over the generated tokens (the text's gist) for semantic tasks.
_MAX, _MAX_IDS = {"lens": "terms", "lens_max": "pooled"}, {"lens": "terms", "lens_max": "ids"}
DESIGNS["keyword_inclusion"] += (Design("lens_max", _MAX, residual=False), Design("single+lens_max", _MAX),
                                 Design("lens_max_ids", _MAX_IDS, residual=False), Design("single+lens_max_ids", _MAX_IDS))
DESIGNS["topic"] += (Design("mean", {"pool": "mean"}), Design("lens_max", {"lens": "topic", "lens_max": "pooled"},
                                                               residual=False))
DESIGNS["sentiment"] += (Design("mean", {"pool": "mean"}), Design("per_polarity+mean", {"variant": "polarity",
                                                                                        "pool": "mean"}))


def lens_param(task: str) -> str | None:
    """The param whose words some design of `task` reads through the lens (None: no lens design)."""
    return next((d.lens_param for d in designs_for(task) if d.lens_param), None)


def designs_for(task: str) -> tuple[Design, ...]:
    return DESIGNS.get(task, (BASE,))


# -- fitting ---------------------------------------------------------------------------------------------------
@dataclass
class VariantFit:
    weight: np.ndarray  # raw space over [residual, extras]
    bias: float

    def logit(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias


@dataclass
class FittedProbe:
    design: Design
    layer: int
    c: float
    variants: dict[str, VariantFit]
    fallback: VariantFit  # for a variant value never seen in training
    cv_auroc: float = float("nan")
    threshold: float = 0.5

    def proba(self, x: np.ndarray, params: list[dict]) -> np.ndarray:
        inputs = _inputs(x, params, self.design)
        z = np.array([self.variants.get(self.design.variant(p), self.fallback).logit(inputs[i])
                      for i, p in enumerate(params)])
        return 1.0 / (1.0 + np.exp(-z))


def _inputs(x: np.ndarray, params: list[dict], design: Design) -> np.ndarray:
    extra = np.array([design.extras(p) for p in params], dtype=float).reshape(len(params), -1)
    keep = x if design.residual else x[:, x.shape[1] - lens.FEATURES:] if design.lexical else x[:, :0]
    return np.concatenate([keep, extra], axis=1)


def _fit(z: np.ndarray, y: np.ndarray, c: float) -> VariantFit:
    """Standardised, class-balanced logistic regression folded back to raw inputs; one class or no inputs (a
    params-only baseline whose params only pick the variant) -> the row's log-odds prior, a constant."""
    if len(set(y.tolist())) < 2 or z.shape[1] == 0:
        p = min(max(float(y.mean()), 0.02), 0.98)
        return VariantFit(np.zeros(z.shape[1]), math.log(p / (1 - p)))
    mean, scale = z.mean(0), z.std(0) + 1e-6
    model = LogisticRegression(C=c, max_iter=300, tol=1e-3, class_weight="balanced").fit((z - mean) / scale, y)
    w = model.coef_[0] / scale
    return VariantFit(w, float(model.intercept_[0] - (w * mean).sum()))


def fit_design(x: np.ndarray, y: np.ndarray, params: list[dict], design: Design, c: float, layer: int
               ) -> FittedProbe:
    z = _inputs(x, params, design)
    keys = np.array([design.variant(p) for p in params])
    variants = {k: _fit(z[keys == k], y[keys == k], c) for k in sorted(set(keys.tolist()))}
    return FittedProbe(design, layer, c, variants, _fit(z, y, c))


def family_folds(y: np.ndarray, groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    k = min(FOLDS, len(set(groups.tolist())))
    return [(a, b) for a, b in GroupKFold(n_splits=k).split(y, y, groups)] if k >= 2 else []


def cross_validated(x, y, params, groups, design: Design, c: float, layer: int) -> tuple[float, np.ndarray]:
    """Pooled out-of-fold AUROC (all folds' predictions together: the monitor scores every request on one
    scale) and the out-of-fold P(satisfied)."""
    oof = np.full(len(y), np.nan)
    for tr, va in family_folds(y, groups):
        probe = fit_design(x[tr], y[tr], [params[i] for i in tr], design, c, layer)
        oof[va] = probe.proba(x[va], [params[i] for i in va])
    seen = ~np.isnan(oof)
    return auroc(y[seen], oof[seen]), oof


def eos_matrix(data: TaskData, layer: int, mask: np.ndarray, design: Design = BASE) -> np.ndarray:
    """The design's inputs at the end of each masked row: the end reading, or the summaries it declares."""
    residual, lens_max = end_inputs(data, layer, mask, design.conditioning) if design.summarised else (None, None)
    x = data.positions[mask, POSITIONS.index("eos"), layer].numpy() if residual is None else residual
    if design.lexical:
        x = np.concatenate([x, data.lexical[mask, layer] if lens_max is None else lens_max], axis=1)
    return x


def available(data: TaskData, design: Design, layer: int) -> bool:
    """Whether `data` carries the design's inputs at `layer` (lens inputs, summaries at token layers)."""
    if design.lexical and data.lexical is None:
        return False
    return not design.summarised or (data.summaries is not None and layer in data.summaries["token_layers"])


def attach_lexical(data: TaskData, weights: LensWeights, tokenizer, param: str) -> TaskData:
    """`data.lexical` [N, L, 2]: the lens features (`steerer.lens`) at EOS at every layer, as the runtime
    computes them."""
    eos = data.positions[:, POSITIONS.index("eos")]  # [N, L, d]
    out = []
    for i, row in enumerate(data.rows):
        ids, mask = lens.id_table(lens.token_ids(tokenizer, lens.words_of(row["params"], param)))
        n_layers = eos.shape[1]
        out.append(weights.features(eos[i], ids.expand(n_layers, -1), mask.expand(n_layers, -1)))
    data.lexical = torch.stack(out).numpy()
    data.lens = (weights, tokenizer, param)  # for per-token readings (`token_readings`)
    return data


def lexical_at(data: TaskData, x: np.ndarray, params: dict) -> np.ndarray:
    """Lens features [T, 2] of residuals x [T, d] for one request's words (the runtime's computation)."""
    weights, tokenizer, param = data.lens
    ids, mask = lens.id_table(lens.token_ids(tokenizer, lens.words_of(params, param)))
    return weights.features(torch.from_numpy(x), ids.expand(len(x), -1), mask.expand(len(x), -1)).numpy()


def choose(data: TaskData, layers: list[int], designs: tuple[Design, ...] = (BASE,), cs: tuple[float, ...] = CS,
           ) -> tuple[FittedProbe, list[dict]]:
    """The (design, layer, C) with the best pooled family-grouped CV AUROC on the training split, refitted on
    all of it (threshold: best balanced accuracy out of fold). Also returns every candidate's CV score."""
    train = data.split == "train"
    y = data.labels[train]
    params = [r["params"] for r, keep in zip(data.rows, train, strict=True) if keep]
    groups = np.array([r["family"] for r, keep in zip(data.rows, train, strict=True) if keep])
    scores, best = [], None
    with threadpool_limits(1):
        for layer in layers:
            for design in (d for d in designs if available(data, d, layer)):
                x = eos_matrix(data, layer, train, design)
                for c in cs:
                    score, oof = cross_validated(x, y, params, groups, design, c, layer)
                    scores.append({"design": design.name, "layer": layer, "C": c, "cv_auroc": round(score, 4)})
                    if best is None or np.nan_to_num(score, nan=-1) > np.nan_to_num(best[0], nan=-1):
                        best = (score, design, c, layer, oof)
        score, design, c, layer, oof = best
        probe = fit_design(eos_matrix(data, layer, train, design), y, params, design, c, layer)
    seen = ~np.isnan(oof)
    probe.cv_auroc, probe.threshold = score, best_threshold(y[seen], oof[seen]) if seen.any() else 0.5
    return probe, scores


def measure(probe: FittedProbe, data: TaskData, mask: np.ndarray) -> dict:
    """AUROC with its 95% interval (null where a class is empty), counts, accuracy at the probe's threshold."""
    y = data.labels[mask]
    n_pos, n = int(y.sum()), int(len(y))
    if n == 0:
        return {"auroc": None, "auroc_ci": None, "n": 0, "n_satisfied": 0, "accuracy": None}
    p = probe.proba(eos_matrix(data, probe.layer, mask, probe.design), [r["params"] for r, m in zip(data.rows, mask, strict=True)
                                                            if m])
    both = 0 < n_pos < n
    ci = auroc_ci(y, p) if both else (float("nan"), float("nan"))
    return {"auroc": round(auroc(y, p), 4) if both else None, "auroc_ci": list(ci) if both else None, "n": n,
            "n_satisfied": n_pos, "accuracy": round(float(np.mean((p >= probe.threshold) == y)), 4),
            "auroc_within_variant": within_variant_auroc(probe, y, p, [r["params"] for r, m in
                                                                      zip(data.rows, mask, strict=True) if m])}


def within_variant_auroc(probe: FittedProbe, y: np.ndarray, p: np.ndarray, params: list[dict]) -> float | None:
    """Mean AUROC within each parameter value (weighted by rows; values with both classes only): what the
    residual adds beyond the prior a parameter value carries (e.g. 'negative' is rarely met). None when the
    probe has no variants or no value has both classes."""
    if probe.design.variant_rule is None:
        return None
    keys = np.array([probe.design.variant(q) for q in params])
    parts = [(int((keys == k).sum()), auroc(y[keys == k], p[keys == k])) for k in sorted(set(keys.tolist()))
             if 0 < y[keys == k].sum() < (keys == k).sum()]
    if not parts:
        return None
    return round(float(sum(n * a for n, a in parts) / sum(n for n, _ in parts)), 4)


# -- the bank probe ----------------------------------------------------------------------------------------------
def token_readings(probe: FittedProbe, data: TaskData, mask: np.ndarray, token_layers: list[int]
                   ) -> list[tuple[list[float], list[int]]]:
    """Per row of `mask`: the probe's P(satisfied) at the last prompt token and at every pass after it (what the
    live monitor reads), from the cached every-token residuals at the probe's layer (a token layer)."""
    t = token_layers.index(probe.layer)
    out = []
    for i in np.flatnonzero(mask):
        start, end = int(data.offsets[i]), int(data.offsets[i + 1])
        x = np.concatenate([data.positions[i, POSITIONS.index("last_prompt"), probe.layer].numpy()[None],
                            data.tokens[start:end, t].float().numpy()])
        if probe.design.summarised:  # the running mean or maximum the monitor keeps
            residual, lex = running_inputs(data, i, t, probe.design.conditioning)
            x = residual if lex is None else np.concatenate([residual, lex], axis=1)
        elif probe.design.lexical:
            x = np.concatenate([x, lexical_at(data, x, data.rows[i]["params"])], axis=1)
        out.append((probe.proba(x, [data.rows[i]["params"]] * len(x)).tolist(), list(range(-1, end - start))))
    return out


def class_direction(data: TaskData, layer: int) -> np.ndarray:
    """Unit vector from the mean violating to the mean satisfying EOS residual (training split): the steering
    direction the bank carries beside the probe."""
    train = data.split == "train"
    x, y = eos_matrix(data, layer, train), data.labels[train]
    d = x[y == 1].mean(0) - x[y == 0].mean(0)
    return d / (np.linalg.norm(d) + 1e-12)


STEER_BAND = (1 / 3, 2 / 3)  # steering works best in the middle of the network (ActAdd, CAA); not at the ends


def steering_layer(data: TaskData) -> int:
    """Where the bank steers for this task: the layer of the middle band whose class mean difference best
    separates the training split's end readings (projection AUROC). A probe may read best at the first or
    last layer, where a steering vector does little (SmolLM2's last layer: lowercase unchanged at alpha 600);
    an efficacy sweep (#12) should replace this prior."""
    n_layers = data.positions.shape[2]
    band = range(math.ceil(STEER_BAND[0] * (n_layers - 1)), math.floor(STEER_BAND[1] * (n_layers - 1)) + 1)
    band = band or range(n_layers)  # a model (or test data) too shallow for a band
    train = data.split == "train"
    y = data.labels[train]

    def separation(layer: int) -> float:
        return auroc(y, eos_matrix(data, layer, train) @ class_direction(data, layer))

    return max(band, key=lambda layer: (np.nan_to_num(separation(layer), nan=-1), -layer))


@dataclass
class BankEntry:
    """One task's bank probe: the manifest record and its tensors (own row, variant rows, input coefficients)."""

    record: dict
    weight: np.ndarray  # [d]
    bias: float
    direction: np.ndarray  # [d]
    own_inputs: np.ndarray  # [F]
    own_lens: np.ndarray  # [2] or [0]
    # (key, weight, bias, inputs, lens[, progress])
    variant_rows: list[tuple[str, np.ndarray, float, np.ndarray, np.ndarray] | tuple]
    own_progress: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [3] or [0]: progress coefficients


def bank_entry(task: str, probe: FittedProbe, data: TaskData, hidden_size: int, token_layers: list[int],
               measured: dict, config) -> BankEntry:
    """The bank's record for a chosen probe: weights split into the residual part and the declared inputs,
    an EOS threshold (balanced accuracy out of fold), a flag threshold that keeps false flags on compliant
    training responses under the budget (per-token readings), and reliability (`steerer.reliability.assess`):
    the 95% AUROC interval clears chance on every held-out column with both classes (held-out requests,
    held-out phrasing, IFEval), or the probe holds within the corpus's parameter range."""
    from probes.train import TARGET_FALSE_FLAG_RATE, calibrate_flag_threshold, flag_rate

    d, design = hidden_size, probe.design
    n_lens = lens.FEATURES if design.lexical else 0

    def split_weight(fit: VariantFit) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
        """(residual weight [d], bias, param-input coefficients, lens coefficients) of one fitted row, laid
        out as `_inputs` built it: [residual if any, lens if any, param inputs]."""
        w = fit.weight
        residual, rest = (w[:d], w[d:]) if design.residual else (np.zeros(d), w)
        return residual, fit.bias, rest[n_lens:], rest[:n_lens]

    weight, bias, own_inputs, own_lens = split_weight(probe.fallback)
    variant_rows = [(key, *split_weight(fit)) for key, fit in sorted(probe.variants.items())
                    if design.variant_rule]
    declared = {"inputs": []} | design.conditioning if design.conditioning else None
    train = data.split == "train"
    ok = token_readings(probe, data, train & (data.labels == 1), token_layers)
    bad = token_readings(probe, data, train & (data.labels == 0), token_layers)
    flag_threshold = calibrate_flag_threshold(ok, TARGET_FALSE_FLAG_RATE, config)
    test_ok = token_readings(probe, data, (data.split == "test") & (data.labels == 1), token_layers)
    test_bad = token_readings(probe, data, (data.split == "test") & (data.labels == 0), token_layers)
    test = measured["test"]
    metrics = {"test_auroc": test["auroc"], "test_auroc_ci": test["auroc_ci"], "test_accuracy": test["accuracy"],
               "n_test": test["n"], "cv_auroc": round(float(probe.cv_auroc), 4), "C": probe.c,
               "design": probe.design.name, "heldout_phrasing_auroc": measured["heldout_phrasing"]["auroc"],
               "heldout_phrasing_auroc_ci": measured["heldout_phrasing"]["auroc_ci"],
               "n_heldout_phrasing": measured["heldout_phrasing"]["n"],
               **({"design_cv": measured["design_cv"]} if measured.get("design_cv") else {}),
               "train_violations_flagged": round(flag_rate(bad, flag_threshold, config), 4),
               "test_false_flag_rate": round(flag_rate(test_ok, flag_threshold, config), 4),
               "test_violations_flagged": round(flag_rate(test_bad, flag_threshold, config), 4)}
    for column in ("ifeval", f"ifeval_{reliability.IN_RANGE}"):
        if measured.get(column):
            metrics |= {f"{column}_auroc": measured[column]["auroc"], f"{column}_auroc_ci": measured[column]["auroc_ci"],
                        f"n_{column}": measured[column]["n"]}
    limits = range_of([r["params"] for r in data.rows])
    if limits:
        metrics["measured_range"] = limits
    record = reliability.assess(metrics, limits)
    reliable = record["reliable"]
    steer_at = steering_layer(data)
    record = {"task": task, "layer": probe.layer, "position": "eos", "polarity": "satisfied",
              "threshold": round(probe.threshold, 6), "method": "logreg", "flag_threshold": round(flag_threshold, 6),
              "metrics": metrics, "reliable": reliable, "conditioning": declared, "steer_layer": steer_at,
              "reliability": record}
    return BankEntry(record, weight, bias, class_direction(data, steer_at), own_inputs, own_lens, variant_rows)


def entry_from_bank(bank, task: str) -> BankEntry:
    """A bank's probe for `task` as an entry again (its rows, variant rows and coefficients), to assemble
    into another bank unchanged."""
    k = bank.index(task)
    probe, n = bank.probes[k], len(bank.probes)
    rows = (probe.conditioning or {}).get("rows", {})
    tensor = lambda t, i: t[i].numpy().astype(np.float64)  # noqa: E731
    variants = [(key, tensor(bank.variant_weights, r), float(bank.variant_biases[r]), tensor(bank.input_weights, n + r),
                 tensor(bank.lens_weights, n + r), tensor(bank.progress_weights, n + r)) for key, r in rows.items()]
    record = {f: getattr(probe, f) for f in probe.__dataclass_fields__}
    record["conditioning"] = {key: v for key, v in probe.conditioning.items() if key != "rows"} \
        if probe.conditioning else None
    return BankEntry(record, tensor(bank.weights, k), float(bank.biases[k]), tensor(bank.directions, k),
                     tensor(bank.input_weights, k), tensor(bank.lens_weights, k), variants,
                     tensor(bank.progress_weights, k))


def assemble_bank(entries: list[BankEntry], model: str, fingerprint: str, hidden_size: int, version: str,
                  extra: dict):
    """A ProbeBank from entries: own rows first, then every variant row, input coefficients zero-padded."""
    from steerer.bank import Probe, ProbeBank
    from steerer.conditioning import PROGRESS_FEATURES, reads_progress

    width = max([len(e.own_inputs) for e in entries] + [len(v[3]) for e in entries for v in e.variant_rows] + [0])
    pad = lambda a, n=width: np.concatenate([a, np.zeros(n - len(a))])  # noqa: E731
    any_lens = any(len(e.own_lens) for e in entries)
    lens_pad = lambda a: pad(a, lens.FEATURES if any_lens else 0)  # noqa: E731
    any_progress = any(reads_progress(e.record.get("conditioning")) for e in entries)
    progress_pad = lambda a: pad(a, len(PROGRESS_FEATURES) if any_progress else 0)  # noqa: E731
    probes, variant_weights, variant_biases, variant_inputs, variant_lens, variant_progress = [], [], [], [], [], []
    for e in entries:
        record = dict(e.record)
        if e.variant_rows:
            record["conditioning"] = record["conditioning"] | {
                "rows": {key: len(variant_weights) + j for j, (key, *_rest) in enumerate(e.variant_rows)}}
            for _key, w, b, inputs, lens_coefs, *progress in e.variant_rows:
                variant_weights.append(w)
                variant_biases.append(b)
                variant_inputs.append(pad(inputs))
                variant_lens.append(lens_pad(lens_coefs))
                variant_progress.append(progress_pad(progress[0] if progress else np.zeros(0)))
        probes.append(Probe(**record))
    tensor = lambda rows, shape: torch.tensor(np.array(rows), dtype=torch.float32).reshape(shape)  # noqa: E731
    k, v = len(entries), len(variant_weights)
    return ProbeBank(model, fingerprint, hidden_size, probes, tensor([e.weight for e in entries], (k, hidden_size)),
                     tensor([e.bias for e in entries], (k,)),
                     torch.nn.functional.normalize(tensor([e.direction for e in entries], (k, hidden_size)), dim=1),
                     version, extra, tensor(variant_weights, (v, hidden_size)), tensor(variant_biases, (v,)),
                     tensor([pad(e.own_inputs) for e in entries] + variant_inputs, (k + v, width)),
                     tensor([lens_pad(e.own_lens) for e in entries] + variant_lens,
                            (k + v, lens.FEATURES if any_lens else 0)),
                     tensor([progress_pad(e.own_progress) for e in entries] + variant_progress,
                            (k + v, len(PROGRESS_FEATURES) if any_progress else 0)))
