"""Step 2: each task's sweep on training-split prompts (`probes.heldout`, split="train"), resumable from the
report folder, and the chosen directions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from probes.heldout import held_out_prompts
from probes.steering.arms import Arm, generate_arms, score_cells
from probes.steering.choice import RULE, brief_cell, choose, gain_of, unsteered_repetition
from probes.steering.directions import (
    MAX_TOKENS,
    SIGNS,
    DirectionFit,
    fit_directions,
    generated_layer_norm,
    variant_rule,
)
from probes.steering.plot import save_doc
from steerer import conditioning
from steerer.bank import ProbeBank

DEFAULT_LAYERS = (6, 12, 18, 24)
DEFAULT_FRACTIONS = (0.08, 0.16, 0.32)


@dataclass
class SweepConfig:
    tasks: Sequence[str]
    layers: Sequence[int] = DEFAULT_LAYERS
    fractions: Sequence[float] = DEFAULT_FRACTIONS
    n: int = 20
    seed: int = 0
    max_new_tokens: int = 96
    length_max_new_tokens: int = 160  # tasks whose label needs the whole response (the count tasks)
    max_tokens: int = MAX_TOKENS
    compare_probe: bool = True  # also sweep the source bank's direction at its steering layer
    where_tasks: Sequence[str] = ("lowercase",)  # also measure steering the prompt at the chosen cell
    max_batch: int = 192
    extra: dict = field(default_factory=dict)


def budget_for(task: str, config: SweepConfig) -> int:
    from steerer.tasks import TOKEN_BUDGET, get_task

    return config.length_max_new_tokens if get_task(task).token_budget > TOKEN_BUDGET else config.max_new_tokens


def sweep_task(lm, bank: ProbeBank, data, token_layers: Sequence[int], task: str, config: SweepConfig,
               log: Callable[[str], None] = print) -> tuple[dict, dict[int, DirectionFit]]:
    """One task's directions, sweep cells and choice (plus the `where` check when asked)."""
    rule = variant_rule(bank, task)
    fits = fit_directions(data, task, token_layers, config.layers, rule, config.max_tokens)
    prompts = held_out_prompts(task, config.n, config.seed, split="train")
    signs = [SIGNS[rule].get(conditioning.VARIANTS[rule](p.params), 1) if rule else 1 for p in prompts]
    probe = bank.probes[bank.index(task)]
    vectors = {("paired", layer): fit.direction for layer, fit in fits.items()}
    arms = [Arm(None, 0.0, 0.0)]
    arms += [Arm(layer, f, f * fits[layer].norm) for layer in config.layers for f in config.fractions]
    probe_norm = None
    if config.compare_probe:
        layer = probe.steering_layer
        probe_norm = generated_layer_norm(data, token_layers, layer, config.max_tokens)
        if probe_norm is None:  # its strength scale is read at the token layers only
            log(f"{task}: the bank's steering layer {layer} is not a stored token layer; its direction is not swept")
        else:
            vectors[("probe", layer)] = bank.directions[bank.index(task)].numpy()
            # the probe's direction has no per-variant sign: `generate_arms` applies it as the bank does (+1)
            arms += [Arm(layer, f, f * probe_norm, "probe") for f in config.fractions]
    budget = budget_for(task, config)
    t0 = time.time()
    gens = generate_arms(lm, prompts, arms, vectors, signs, budget, config.max_batch)
    cells = score_cells(lm, task, prompts, arms, gens)
    paired = [c for c in cells if c["direction"] == "paired"]
    chosen = choose(cells)  # the source bank's direction (at its layer) is a candidate too
    record = {"task": task, "variant_rule": rule, "n": config.n, "max_new_tokens": budget,
              "probe_layer": probe.layer, "probe_steering_layer": probe.steering_layer,
              "probe_direction_norm_at_layer": probe_norm,
              "directions": {str(layer): fit.summary() | {
                  "cosine_with_probe_direction": _cos(fit.direction, bank.directions[bank.index(task)].numpy())
                  if layer == probe.steering_layer else None} for layer, fit in fits.items()},
              "prompts": [{"id": p.id, "params": p.params, "sign": s} for p, s in zip(prompts, signs, strict=True)],
              "cells": cells, "rule": RULE, "repetition_unsteered": unsteered_repetition(cells),
              "chosen": brief_cell(chosen), "best_paired_cell": brief_cell(choose([cells[0], *paired])),
              "best_probe_cell": brief_cell(choose([cells[0], *(c for c in cells if c["direction"] == "probe")])),
              "command": config.extra.get("command")}
    if task in config.where_tasks:
        # at the chosen layer, or (nothing chosen) the layer of the largest gain whatever its cost
        layer = (chosen or max(paired, key=lambda c: (gain_of(c), -c["perplexity_ratio"])))["layer"]
        w_arms = [Arm(None, 0.0, 0.0)] + [Arm(layer, f, f * fits[layer].norm, "paired", w)
                                          for w in ("both", "last_prompt+generated") for f in config.fractions]
        w_gens = generate_arms(lm, prompts, w_arms[1:], vectors, signs, budget, config.max_batch)
        w_cells = score_cells(lm, task, prompts, w_arms, [gens[0], *w_gens])
        record["where_check"] = w_cells[1:] + [c for c in paired if c["layer"] == layer]
    record["seconds"] = round(time.time() - t0, 1)
    log(f"{task}: chosen {brief_cell(chosen)} in {record['seconds']} s")
    return record, fits


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 4)


def run(lm, bank: ProbeBank, corpus: Path, features: Path, config: SweepConfig, report: Path,
        log: Callable[[str], None] = print, fresh: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Sweep every task (resumable: tasks finished earlier, with the settings their records carry, are read
    back from `report/sweep.json` and their directions from `report/directions.npz`, unless `fresh`); returns
    (the sweep document, chosen directions by task)."""
    from probes.evaluation import load_task

    fmanifest = json.loads((features / "manifest.json").read_text())
    token_layers = fmanifest["token_layers"]
    bad = [layer for layer in config.layers if layer not in token_layers]
    if bad:
        raise ValueError(f"candidate layers {bad} are not token layers of the features ({token_layers})")
    report.mkdir(parents=True, exist_ok=True)
    path, npz = report / "sweep.json", report / "directions.npz"
    settings = {k: v for k, v in asdict(config).items() if k not in ("tasks", "extra")}
    doc = json.loads(path.read_text()) if path.exists() and not fresh else {}
    if doc.get("source_bank") != bank.version or doc.get("model") != lm.name:
        doc = {}
    doc = {"model": lm.name, "source_bank": bank.version, "settings": settings, "tasks": doc.get("tasks", {}),
           **config.extra}
    vectors = dict(np.load(npz)) if npz.exists() and doc["tasks"] else {}
    for task in config.tasks:
        record = doc["tasks"].get(task)
        if record and all(f"{task}@{layer}" in vectors for layer in record["settings"]["layers"]):
            log(f"{task}: done earlier ({record['settings']})")
            continue
        data = load_task(corpus, features, task)
        record, fits = sweep_task(lm, bank, data, token_layers, task, config, log)
        record["settings"] = json.loads(json.dumps(settings))
        del data
        for layer, fit in fits.items():
            vectors[f"{task}@{layer}"] = fit.direction.astype(np.float32)
        np.savez(npz, **vectors)
        doc["tasks"][task] = record
        save_doc(doc, report)
    chosen = {}
    for t, r in doc["tasks"].items():
        c = r.get("chosen")
        if t in config.tasks and c:
            chosen[t] = vectors[f"{t}@{c['layer']}"] if c["direction"] == "paired" else \
                bank.directions[bank.index(t)].numpy()
    return doc, chosen
