"""Per-row summaries of a response's readings, the inputs of bank probes that read more than the end reading.

The monitor serves two such inputs (`steerer.conditioning`): ``lens_max`` (the running maximum over the readings
of the logit lens of the request's words: how close the model came to saying a required word) and ``pool: mean``
(the running mean of the residual over the generated tokens: the text's gist, not its last token). Here the same
arithmetic runs offline on the cached per-token residuals (`probes.features`: the last prompt token, then every
pass to the end reading, at the token layers), so `probes train` chooses them by the grouped CV it uses for every
design, `bank_entry` calibrates their flags on the readings the monitor will see, and `probes.designs` reuses them.
"""

from __future__ import annotations

import numpy as np
import torch

from probes.dataset import POSITIONS, TaskData
from steerer import conditioning, lens

KINDS = {"pooled": "runmax", "ids": "idmax"}  # conditioning lens_max -> `lens_summary` kind


def pooled(logits: np.ndarray) -> np.ndarray:
    """[..., 2] max and mean over the ids (last axis) of per-id lens logits (`steerer.lens.pool`)."""
    if logits.shape[-1] == 0:
        return np.zeros((*logits.shape[:-1], 2), dtype=np.float32)
    return np.stack([logits.max(-1), logits.mean(-1)], axis=-1)


def lens_summary(logits: np.ndarray, words: list[list[int]], kind: str) -> np.ndarray:
    """[2] one row's lens input of `kind` from its per-id logits [R, M] over readings -1 .. last."""
    if kind == "runmax":  # pool each reading, keep the maximum: what a monitor keeps with two numbers per row
        return pooled(logits).max(0)
    if kind == "idmax":  # each id's maximum over the readings, pooled at the end
        return pooled(logits.max(0))
    if kind == "runmean":
        return pooled(logits).mean(0)
    if kind == "eos_lens":  # the shipped lens probe's input: the last reading
        return pooled(logits[-1])
    if kind == "wordmin":  # every word is required: the closest id of the least-approached word
        best = logits.max(0)
        per_word = [best[w].max() for w in words if w] or [0.0]
        return np.array([best.max() if best.size else 0.0, min(per_word)], dtype=np.float32)
    raise ValueError(f"unknown lens summary {kind!r}")


def running_summaries(logits: np.ndarray, kind: str) -> np.ndarray:
    """[R, 2] the lens input of `kind` ("runmax" or "idmax") after each reading: the monitor's per-token view of
    `lens_summary`, a running maximum (of the pooled pair, or of each id before pooling)."""
    if kind == "runmax":
        return np.maximum.accumulate(pooled(logits), axis=0)
    if kind == "idmax":
        return pooled(np.maximum.accumulate(logits, axis=0))
    raise ValueError(f"no running form of lens summary {kind!r}")


def running_mean(x: np.ndarray) -> np.ndarray:
    """[R, d] the pooled residual after each reading of x [R, d] (readings -1 .. last): the first (the prompt's last
    token) as is, then the mean of the generated readings so far (the monitor's `pool: mean`)."""
    out = x.astype(np.float64, copy=True)
    if len(x) > 1:
        out[1:] = np.cumsum(x[1:], axis=0, dtype=np.float64) / np.arange(1, len(x))[:, None]
    return out.astype(np.float32)


def readings(data: TaskData, i: int, column: int) -> np.ndarray:
    """[R, d] row i's residuals at token layer column `column`: the last prompt token, then every pass to the end."""
    start, end = int(data.offsets[i]), int(data.offsets[i + 1])
    last_prompt = data.positions[i, POSITIONS.index("last_prompt")]
    return np.concatenate([last_prompt[_layer_of(data, column)].numpy()[None],
                           data.tokens[start:end, column].float().numpy()])


def _layer_of(data: TaskData, column: int) -> int:
    return data.summaries["token_layers"][column]


def lens_logits(data: TaskData, x: np.ndarray, params: dict) -> np.ndarray:
    """[R, M] per-id lens logits of residuals x [R, d] for one request's words (`data.lens`, the runtime's ids)."""
    weights, tokenizer, param = data.lens
    ids = lens.token_ids(tokenizer, lens.words_of(params, param))
    if not ids:
        return np.zeros((len(x), 0), dtype=np.float32)
    table = torch.tensor(ids, dtype=torch.long).expand(len(x), -1)
    return weights.logits(torch.from_numpy(np.ascontiguousarray(x)).float(), table).numpy()


def running_inputs(data: TaskData, i: int, column: int, declared: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Row i's per-reading inputs at a token layer as the monitor computes them under `declared` conditioning:
    ([R, d] residual term, running mean with ``pool``; [R, 2] lens inputs, running maximum with ``lens_max``, or
    None without lens)."""
    x = readings(data, i, column)
    residual = running_mean(x) if conditioning.pool(declared) == "mean" else x
    if conditioning.lens_param(declared) is None:
        return residual, None
    logits = lens_logits(data, x, data.rows[i]["params"])
    how = conditioning.lens_max(declared)
    return residual, running_summaries(logits, KINDS[how]) if how else pooled(logits)


def attach(data: TaskData, token_layers: list[int], declared: list[dict]) -> TaskData:
    """`data.summaries`: every row's end value of each summary that some of the `declared` conditionings read, at
    every token layer: ("mean", layer) -> [N, d]; ("lens_max:<how>", layer) -> [N, 2]. Lens summaries need
    `data.lens` (`probes.evaluation.attach_lexical`)."""
    data.summaries = {"token_layers": list(token_layers)}
    means = any(conditioning.pool(c) == "mean" for c in declared)
    hows = sorted({h for c in declared if (h := conditioning.lens_max(c))})
    if not (means or hows):
        return data
    out: dict[tuple[str, int], list] = {}
    for i, row in enumerate(data.rows):
        for column, layer in enumerate(token_layers):
            x = readings(data, i, column)
            if means:
                out.setdefault(("mean", layer), []).append(running_mean(x)[-1])
            if hows:
                logits = lens_logits(data, x, row["params"])
                for how in hows:
                    out.setdefault((f"lens_max:{how}", layer), []).append(lens_summary(logits, [], KINDS[how]))
    d = data.positions.shape[-1]
    for key, values in out.items():
        data.summaries[key] = np.stack(values).astype(np.float32)
    if not data.rows:
        for layer in token_layers:
            if means:
                data.summaries[("mean", layer)] = np.zeros((0, d), dtype=np.float32)
            for how in hows:
                data.summaries[(f"lens_max:{how}", layer)] = np.zeros((0, lens.FEATURES), dtype=np.float32)
    return data


def end_inputs(data: TaskData, layer: int, mask: np.ndarray, declared: dict | None) -> tuple[np.ndarray | None,
                                                                                            np.ndarray | None]:
    """(residual [n, d] or None: the end reading; lens [n, 2] or None: the end reading's) summaries of the masked
    rows that `declared` asks for in place of the end reading."""
    residual = data.summaries[("mean", layer)][mask] if conditioning.pool(declared) == "mean" else None
    how = conditioning.lens_max(declared)
    return residual, data.summaries[(f"lens_max:{how}", layer)][mask] if how else None
