"""Probe training: per task and layer a linear probe for "the constraint is / will be satisfied".

Methods are pure functions over (X, y): standardised logistic regression with regularisation chosen by
grouped cross-validation (groups = base requests, so no prompt text is shared between folds), and a
difference-of-means direction as the second method. The best layer per task is picked on the
cross-validated AUROC of the training split; thresholds are calibrated on out-of-fold predictions; the
test split (held-out base requests) is only used for the reported figures. These per-layer probes feed the
paper's experiments (`probes.report`); the bank's probes, with parameter conditioning and generalisation
measured on held-out phrasing and IFEval, are chosen in `probes.evaluation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import GroupKFold
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from probes.dataset import POSITIONS, TaskData
from steerer.bank import fold_scaler

CS = (0.0001, 0.001, 0.01, 0.1)
FOLDS = 3


@dataclass
class LinearProbe:
    """A probe on raw residuals: P(satisfied) = sigmoid(x @ weight + bias)."""

    weight: np.ndarray
    bias: float
    threshold: float  # on P(satisfied)
    direction: np.ndarray  # unit, raw space, toward satisfaction (difference of class means)
    c: float | None = None
    cv_auroc: float = float("nan")
    method: str = "logreg"

    def proba(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(x @ self.weight + self.bias)))


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if len(set(y.tolist())) == 2 else float("nan")


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def auroc_ci(y: np.ndarray, score: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
             seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the AUROC: [low, high], rounded to 4 places (NaN without both labels).

    Test rows are resampled with replacement within each class (stratified: every resample has both
    labels, so every resample has an AUROC), with a fixed seed so a bank's figures are reproducible. Each
    resample's AUROC is exact (the Mann-Whitney form, ties count half), from one matrix of pairwise
    comparisons and per-row draw counts, so 2000 resamples cost milliseconds.
    """
    y, score = np.asarray(y), np.asarray(score, dtype=float)
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # [P, N]
    rng = np.random.default_rng(seed)
    count_pos = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=resamples)  # [R, P]
    count_neg = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=resamples)  # [R, N]
    aurocs = np.einsum("rp,pn,rn->r", count_pos, wins, count_neg) / (len(pos) * len(neg))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(aurocs, [tail, 100 - tail])
    return round(float(low), 4), round(float(high), 4)


def is_reliable(ci: tuple[float, float]) -> bool:
    """A probe is reliable when its AUROC interval lies wholly above chance (0.5); NaN is not reliable."""
    return bool(ci[0] > 0.5)


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold on P(satisfied) that maximises balanced accuracy (ties: closest to 0.5)."""
    if len(set(y.tolist())) < 2:
        return 0.5
    candidates = np.unique(np.concatenate([p, [0.5]]))
    scores = [(balanced_accuracy_score(y, p >= t), -abs(t - 0.5), t) for t in candidates]
    return float(max(scores)[2])


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    scale = x.std(0) + 1e-6
    return mean, scale


def _fit_logreg(z: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=300, tol=1e-3, class_weight="balanced").fit(z, y)


def _folds(y: np.ndarray, groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    n_groups = len(set(groups.tolist()))
    k = min(FOLDS, n_groups)
    if k < 2:
        return []
    return [(a, b) for a, b in GroupKFold(n_splits=k).split(y, y, groups) if len(set(y[a].tolist())) == 2]


def cross_validate(fit, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean per-fold AUROC, out-of-fold P(satisfied)) of `fit(x, y) -> LinearProbe` over grouped folds."""
    oof = np.full(len(y), np.nan)
    scores = []
    for tr, va in _folds(y, groups):
        probe = fit(x[tr], y[tr])
        oof[va] = probe.proba(x[va])
        score = auroc(y[va], oof[va])
        if not np.isnan(score):
            scores.append(score)
    return (float(np.mean(scores)) if scores else float("nan")), oof


def _threshold_from(y: np.ndarray, oof: np.ndarray) -> float:
    seen = ~np.isnan(oof)
    return best_threshold(y[seen], oof[seen]) if seen.any() else 0.5


def fit_logreg(x: np.ndarray, y: np.ndarray, c: float) -> LinearProbe:
    """Standardised logistic regression, folded back to raw residual space."""
    mean, scale = _standardise(x)
    model = _fit_logreg((x - mean) / scale, y, c)
    weight, bias = fold_scaler(torch.from_numpy(model.coef_[0]).double(), float(model.intercept_[0]),
                               torch.from_numpy(mean).double(), torch.from_numpy(scale).double())
    return LinearProbe(weight.numpy(), bias, 0.5, mean_difference(x, y), c)


def train_logreg(x: np.ndarray, y: np.ndarray, groups: np.ndarray, cs: tuple[float, ...] = CS) -> LinearProbe:
    """Standardised logistic regression; C by grouped CV AUROC; threshold from out-of-fold predictions."""
    if len(set(y.tolist())) < 2:
        raise ValueError("a probe needs both labels in its training data")
    with threadpool_limits(1):
        best = None
        for c in cs:
            score, oof = cross_validate(lambda a, b, c=c: fit_logreg(a, b, c), x, y, groups)
            if best is None or (not np.isnan(score) and (np.isnan(best[0]) or score > best[0])):
                best = (score, c, oof)
        score, c, oof = best
        probe = fit_logreg(x, y, c)
    probe.threshold, probe.cv_auroc = _threshold_from(y, oof), score
    return probe


def mean_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unit vector from the mean of violating to the mean of satisfying residuals."""
    d = x[y == 1].mean(0) - x[y == 0].mean(0)
    return d / (np.linalg.norm(d) + 1e-12)


def fit_diffmean(x: np.ndarray, y: np.ndarray) -> LinearProbe:
    """Project on the difference of class means, then a 1-d logistic calibration of the projection."""
    direction = mean_difference(x, y)
    proj = x @ direction
    mu, sd = proj.mean(), proj.std() + 1e-6
    model = _fit_logreg(((proj - mu) / sd)[:, None], y, 1.0)
    a, b = float(model.coef_[0, 0]) / sd, float(model.intercept_[0]) - float(model.coef_[0, 0]) * mu / sd
    return LinearProbe(direction * a, b, 0.5, direction, None, float("nan"), "diffmean")


def train_diffmean(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> LinearProbe:
    with threadpool_limits(1):
        score, oof = cross_validate(fit_diffmean, x, y, groups)
        probe = fit_diffmean(x, y)
    probe.threshold, probe.cv_auroc = _threshold_from(y, oof), score
    return probe


def evaluate(probe: LinearProbe, x: np.ndarray, y: np.ndarray) -> dict:
    p = probe.proba(x)
    pred = p >= probe.threshold
    return {"auroc": round(auroc(y, p), 4), "accuracy": round(float(accuracy_score(y, pred)), 4),
            "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4) if len(set(y.tolist())) == 2 else None,
            "n": int(len(y)), "positive_rate": round(float(y.mean()), 4)}


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    g_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def split_at(data: TaskData, position: str | list[str], layer_index: int) -> Split:
    """Train/test arrays at one stored layer; several positions are pooled as extra rows."""
    names = [position] if isinstance(position, str) else position
    cols = [POSITIONS.index(n) for n in names]
    x = data.positions[:, cols, layer_index].numpy()  # [N, len(cols), d]
    y, split, groups = data.labels, data.split, data.groups
    train, test = split == "train", split == "test"
    flat = lambda a, m: a[m].reshape(-1, a.shape[-1])  # noqa: E731
    rep = len(cols)
    return Split(flat(x, train), np.repeat(y[train], rep), np.repeat(groups[train], rep), flat(x, test),
                 np.repeat(y[test], rep))


def fit_like(probe: LinearProbe, x: np.ndarray, y: np.ndarray) -> LinearProbe:
    """Refit a probe of the same method (and C) on other data: for the temporal and ablation studies."""
    with threadpool_limits(1):
        return fit_diffmean(x, y) if probe.method == "diffmean" else fit_logreg(x, y, probe.c or 0.01)


def _pick(logreg: LinearProbe, diffmean: LinearProbe) -> LinearProbe:
    """The method with the higher cross-validated AUROC (logistic on ties): chosen on training data only."""
    score = lambda p: -1.0 if np.isnan(p.cv_auroc) else p.cv_auroc  # noqa: E731
    return diffmean if score(diffmean) > score(logreg) else logreg


def train_task(data: TaskData, layers: list[int], position: str | list[str] = "eos",
               progress: bool = False) -> dict:
    """Per layer a logistic and a difference-of-means probe; per layer the better by CV is `probe`, and
    the best layer is the one whose chosen probe has the highest CV AUROC."""
    by_layer = {}
    for li, layer in enumerate(tqdm(layers, desc="layers", leave=False, disable=not progress)):
        s = split_at(data, position, li)
        logreg = train_logreg(s.x_train, s.y_train, s.g_train)
        diff = train_diffmean(s.x_train, s.y_train, s.g_train)
        chosen = _pick(logreg, diff)
        by_layer[layer] = {"probe": chosen, "test": evaluate(chosen, s.x_test, s.y_test), "cv_auroc": chosen.cv_auroc,
                           "method": chosen.method, "test_logreg": evaluate(logreg, s.x_test, s.y_test),
                           "test_diffmean": evaluate(diff, s.x_test, s.y_test),
                           "cv_logreg": logreg.cv_auroc, "cv_diffmean": diff.cv_auroc}
    return {"by_layer": by_layer, "best_layer": _best_layer(by_layer)}


def _best_layer(by_layer: dict) -> int:
    return max(by_layer, key=lambda layer: (np.nan_to_num(by_layer[layer]["cv_auroc"], nan=-1), -layer))


def train_general(datas: dict[str, TaskData], layers: list[int], position: str = "eos") -> dict:
    """One probe on all tasks pooled, per layer (method by CV as for specialists); best layer by CV."""
    by_layer = {}
    for li, layer in enumerate(tqdm(layers, desc="general probe", leave=False)):
        splits = {t: split_at(d, position, li) for t, d in datas.items()}
        x = np.concatenate([s.x_train for s in splits.values()])
        y = np.concatenate([s.y_train for s in splits.values()])
        g = np.concatenate([np.char.add(f"{t}:", s.g_train.astype(str)) for t, s in splits.items()])
        chosen = _pick(train_logreg(x, y, g), train_diffmean(x, y, g))
        by_layer[layer] = {"probe": chosen, "cv_auroc": chosen.cv_auroc, "method": chosen.method,
                           "test": {t: evaluate(chosen, s.x_test, s.y_test) for t, s in splits.items()}}
    return {"by_layer": by_layer, "best_layer": _best_layer(by_layer)}


TARGET_FALSE_FLAG_RATE = 0.15


def train_all_layers(datas: dict[str, TaskData], layers: list[int], progress: bool = True) -> tuple[dict, dict]:
    """Per task a probe at every layer (the paper's layer curves, temporal profile, transfer and INLP) and
    the general probe pooled over tasks; grouped by base request on the training split."""
    trained = {task: train_task(data, layers, "eos")
               for task, data in tqdm(datas.items(), desc="probes per layer", disable=not progress)}
    return trained, train_general(datas, layers, "eos")


# -- probes for live monitoring ----------------------------------------------------------------------
def flag_rate(readings: list[tuple[list[float], list[int]]], threshold: float, config) -> float:
    from steerer.monitor import first_flag

    if not readings:
        return float("nan")
    return float(np.mean([first_flag(p, idx, threshold, config) is not None for p, idx in readings]))


def calibrate_flag_threshold(compliant: list[tuple[list[float], list[int]]], target_false_flag_rate: float,
                             config) -> float:
    """The highest P(satisfied) threshold whose flags fire on at most the target share of compliant rows:
    flags during generation are tuned for a false-flag budget, not for EOS accuracy."""
    grid = np.round(np.linspace(0.02, 0.98, 49), 4)
    ok = [t for t in grid if flag_rate(compliant, float(t), config) <= target_false_flag_rate]
    return float(max(ok)) if ok else 0.02
