"""The forecast warning for forbidden words (#22 item 4): how readily the model reaches for one.

term_exclusion is decided by a word the model has not written yet, often in its first few tokens (detection at
token 2 leaves one reading, the prompt's last, to warn from). The residual probe read per token flags late. The
model's own weights know better: at every reading, the logit lens (`steerer.lens`: final norm + unembedding) of
the first tokens of every spelling of the forbidden words says how close the model is to writing one; a common
word ("the", "and") reads high from the prompt on, a rare one ("glacier") low. The forecast reads the *running
mean* of those two lens inputs (max and mean over the spellings) at one layer, from the prompt's last token on,
in a logistic regression of the row's final outcome, and may flag from that first reading (no warm-up,
`steerer.conditioning.forecasts`). At serving time it is a gather of a few unembedding rows per token.

Measured on the training split (out of fold, 10% false-flag budget, layers 9-29): the running mean beat the
instantaneous reading and the running maximum at every layer tried (layer 9: violations flagged >= 3 tokens
early 0.44 / 0.40 / 0.30), and the lens beat the model's own log-probability of the words (0.29 at best): a
maximum keeps rising with length on compliant rows too, while the mean settles to how common the word is.

Chosen on the corpus's training split only: per candidate layer, out-of-fold readings (folds grouped by base
request) -> the flag threshold whose false flags on compliant responses stay within the budget -> the share of
violations flagged at least `EARLY` tokens before detection; the best layer goes into the bank's `warning/`
sub-bank as the task's predictor (conditioning ``{"lens": "terms", "forecast": true}``, residual weight zero).
Readings are computed by teacher forcing the corpus's own responses (`probes.features`), so no feature cache is
needed: `steerer probes forecast`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from probes.evaluation import BankEntry, assemble_bank, entry_from_bank, split_of
from probes.warning import BUDGET, EARLY, Trace, calibrate, reference, warning_summary
from steerer import lens as lenses
from steerer.bank import ProbeBank
from steerer.monitor import MonitorConfig

TASK = "term_exclusion"
PARAM = "terms"
C = 1.0  # two inputs, hundreds of rows: barely any regularisation needed
FOLDS = 4


def forecast_config(config: MonitorConfig | None = None) -> MonitorConfig:
    """The monitor's rule as it applies to a forecast: no warm-up (flags from the prompt's last token, -1)."""
    return replace(config or MonitorConfig(), warmup_tokens=-1)


@torch.inference_mode()
def lens_readings(lm, rows: list[dict], layers: list[int], batch: int = 8, progress: bool = True
                  ) -> list[np.ndarray]:
    """Per row, [T, len(layers), 2] lens inputs (max, mean over the forbidden words' spellings) at readings
    -1 (the prompt's last token) .. the row's last token, by teacher forcing its response."""
    from probes.features import residual_passes, sequence_for

    weights = lenses.LensWeights.of(lm.model)
    out = []
    for start in tqdm(range(0, len(rows), batch), desc="lens readings", disable=not progress):
        chunk = rows[start:start + batch]
        seqs = [sequence_for(lm, _with_ids(r)) for r in chunk]
        for row, seq, x in zip(chunk, seqs, residual_passes(lm, seqs, layers), strict=True):
            x = x[seq.prompt_len - 1:]  # readings -1 .. end
            ids, mask = lenses.id_table(lenses.token_ids(lm.tokenizer, lenses.words_of(row["params"], PARAM)))
            t = len(x)
            out.append(torch.stack([weights.features(x[:, j], ids.expand(t, -1), mask.expand(t, -1))
                                    for j in range(len(layers))], dim=1).numpy())
    return out


def cached_readings(lm, rows: list[dict], layers: list[int], cache: Path | None, progress: bool = True
                    ) -> list[np.ndarray]:
    """`lens_readings`, kept in `cache` (an .npz by row id, for these layers): a rerun teacher-forces only the
    rows it has not seen (the readings are a function of the row, the model and the layers alone)."""
    if cache is None:
        return lens_readings(lm, rows, layers, progress=progress)
    stored = dict(np.load(cache)) if cache.is_file() else {}
    if stored and list(stored.pop("__layers__", [])) != list(layers):
        stored = {}  # other layers: start again
    stored.pop("__layers__", None)
    missing = [r for r in rows if r["id"] not in stored]
    if missing:
        stored |= dict(zip([r["id"] for r in missing], lens_readings(lm, missing, layers, progress=progress),
                           strict=True))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, __layers__=np.array(layers), **stored)
    return [stored[r["id"]] for r in rows]


def _with_ids(row: dict) -> dict:
    ids = row["token_ids"]
    return row if isinstance(ids, list) else {**row, "token_ids": json.loads(ids)}


def running_mean(x: np.ndarray) -> np.ndarray:
    """The running mean over readings (axis 0): what the monitor's `Scorer` keeps per row for a forecast."""
    return np.cumsum(x, axis=0) / np.arange(1, len(x) + 1).reshape(-1, *([1] * (x.ndim - 1)))


def readable(row: dict, n: int) -> int:
    """Readings the monitor takes before detection settles the task: -1 .. onset (an onset-th reading is the
    pass that chose the completing token's successor, after detection), all of a compliant row's."""
    if row["satisfied"] or row["onset"] is None:
        return n
    return min(n, int(row["onset"]) + 1)


def fit(rows: list[dict], readings: list[np.ndarray], j: int, c: float = C) -> tuple[np.ndarray, float]:
    """(lens coefficients [2], bias) of P(satisfied) from the running-mean lens inputs at layer column j, every
    reading before the onset labelled with the row's final outcome."""
    x = np.concatenate([running_mean(r[:, j])[:readable(row, len(r))] for row, r in zip(rows, readings, strict=True)])
    y = np.concatenate([[int(row["satisfied"])] * readable(row, len(r)) for row, r in zip(rows, readings,
                                                                                             strict=True)])
    model = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


def trace(row: dict, reading: np.ndarray, j: int, weight: np.ndarray, bias: float) -> Trace:
    """One row's forecast readings (P(satisfied), index -1 ..) as the monitor takes them."""
    n = readable(row, len(reading))
    z = running_mean(reading[:, j])[:n] @ weight + bias
    return Trace((1.0 / (1.0 + np.exp(-z))).tolist(), list(range(-1, n - 1)), bool(row["satisfied"]),
                 reference(row))


def out_of_fold(rows: list[dict], readings: list[np.ndarray], j: int) -> list[Trace]:
    """Every row's readings by a fit on the folds without its base request."""
    bases = sorted({r["base_id"] for r in rows})
    fold = {b: i % FOLDS for i, b in enumerate(bases)}
    out: list[Trace] = []
    for f in range(FOLDS):
        held = [i for i, r in enumerate(rows) if fold[r["base_id"]] == f]
        kept = [i for i, r in enumerate(rows) if fold[r["base_id"]] != f]
        weight, bias = fit([rows[i] for i in kept], [readings[i] for i in kept], j)
        out += [trace(rows[i], readings[i], j, weight, bias) for i in held]
    return out


def choose(rows: list[dict], readings: list[np.ndarray], layers: list[int], config: MonitorConfig | None = None
           ) -> dict:
    """The layer whose out-of-fold forecast flags most training violations early within the false-flag budget,
    refitted on all training rows; every candidate's score."""
    config = forecast_config(config)
    candidates = []
    for j, layer in enumerate(layers):
        oof = out_of_fold(rows, readings, j)
        threshold = calibrate([t for t in oof if t.satisfied], config)
        candidates.append({"kind": "forecast", "layer": layer, "threshold": threshold,
                           **warning_summary(oof, threshold, config)})
    best = max(candidates, key=lambda c: (c["flagged_at_least_3_early"] or 0, -(c["false_flag_rate"] or 0)))
    j = layers.index(best["layer"])
    weight, bias = fit(rows, readings, j)
    return {"chosen": best, "candidates": candidates, "weight": weight, "bias": bias}


def measure(rows: list[dict], readings: list[np.ndarray], layers: list[int], choice: dict,
            config: MonitorConfig | None = None) -> dict:
    """The chosen forecast's early-warning figures on `rows` (a held-out split), at its flag threshold."""
    config = forecast_config(config)
    j = layers.index(choice["chosen"]["layer"])
    return warning_summary([trace(r, x, j, choice["weight"], choice["bias"]) for r, x in zip(rows, readings,
                                                                                              strict=True)],
                           choice["chosen"]["threshold"], config)


def forecast_entry(bank: ProbeBank, choice: dict) -> BankEntry:
    """The warning sub-bank's entry: residual weight zero, the lens coefficients, the forecast conditioning."""
    best = choice["chosen"]
    entry = entry_from_bank(bank, TASK)  # direction and steering layer stay the bank's (unused by the monitor)
    record = {**entry.record, "layer": best["layer"], "position": "tokens_before_onset", "method": "logreg",
              "threshold": 0.5, "flag_threshold": best["threshold"], "reliable": True, "reliability": None,
              "conditioning": {"inputs": [], "lens": PARAM, "forecast": True},
              "metrics": {k: v for k, v in best.items() if k != "threshold"}}
    return replace(entry, record=record, weight=np.zeros(bank.hidden_size), bias=choice["bias"],
                   own_inputs=np.zeros(0), own_lens=np.asarray(choice["weight"], dtype=np.float64),
                   own_progress=np.zeros(0), variant_rows=[])


def with_forecast(bank: ProbeBank, choice: dict) -> ProbeBank:
    """`bank` with its warning sub-bank's term_exclusion predictor replaced by the forecast; the other tasks keep
    what the warning bank has (else their probe)."""
    entries = [forecast_entry(bank, choice) if t == TASK else entry_from_bank(bank.alerting, t) for t in bank.tasks]
    warning = assemble_bank(entries, bank.model, bank.fingerprint, bank.hidden_size, "warning", {})
    chosen = dict((bank.extra.get("warning") or {}).get("chosen", {})) | {TASK: "forecast"}
    extra = bank.extra | {"warning": (bank.extra.get("warning") or {}) | {"chosen": chosen}}
    return replace(bank, warning=warning, extra=extra)


def train_forecast(lm, corpus: Path, bank: ProbeBank, layers: list[int], config: MonitorConfig | None = None,
                   progress: bool = True, cache: Path | None = None, splits: tuple[str, ...] = ("test",
                                                                                              "heldout_phrasing")
                   ) -> tuple[ProbeBank, dict]:
    """Choose and fit the forecast on the training split; the bank with it, and the report (each of `splits`:
    test, heldout_phrasing, ifeval; teacher-forced on the stored responses)."""
    from probes.corpus import load_corpus

    rows = [r | {"split": split_of(r)} for r in load_corpus(corpus, TASK)]
    train = [r for r in rows if r["split"] == "train"]
    choice = choose(train, cached_readings(lm, train, layers, cache, progress), layers, config)
    report = {"chosen": choice["chosen"], "candidates": choice["candidates"],
              "coefficients": {"lens_max": float(choice["weight"][0]), "lens_mean": float(choice["weight"][1]),
                               "bias": choice["bias"]},
              "layers": layers, "budget": BUDGET, "early": EARLY, "measured": {}}
    for split in splits:
        held = [r for r in rows if r["split"] == split] if split != "ifeval" else _ifeval_rows(corpus)
        if held:
            report["measured"][split] = measure(held, cached_readings(lm, held, layers, cache, progress), layers,
                                                choice, config)
    return with_forecast(bank, choice), report


def _ifeval_rows(corpus: Path) -> list[dict]:
    """IFEval's forbidden_words responses stored beside the corpus (`steerer probes ifeval`; evaluation only)."""
    from probes import ifeval

    return [r for r in ifeval.load(corpus) if r["task"] == TASK]
