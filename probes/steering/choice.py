"""Step 3 (pure): which swept cell (and which gate threshold) a task keeps, and the bank written with it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from probes.steering.directions import DirectionFit
from steerer import conditioning
from steerer.bank import ProbeBank

PPL_LIMIT = 1.10
SOURCE = "sweep on train split"


def gain_of(cell: dict) -> float:
    return cell["compliance"] - cell["compliance_baseline"]


def choose(cells: Sequence[dict], ppl_limit: float = PPL_LIMIT) -> dict | None:
    """The steered cell with the largest compliance gain at perplexity ratio <= `ppl_limit` (ties: the lower
    ratio, then the smaller fraction), or None when no such cell gains anything."""
    eligible = [c for c in cells if c.get("alpha") and c.get("perplexity_ratio") is not None
                and c["perplexity_ratio"] <= ppl_limit and gain_of(c) > 0]
    if not eligible:
        return None
    return max(eligible, key=lambda c: (round(gain_of(c), 9), -c["perplexity_ratio"], -c["fraction"]))


def steer_signs_supported() -> bool:
    """Does this runtime read `conditioning["steer_signs"]` (a bank carrying it would not load otherwise)?"""
    try:
        conditioning.check({"variant": "bound", "rows": {"lower": 0}, "steer_signs": {"lower": -1}}, 1)
    except conditioning.ConditioningError:
        return False
    return True


def steered_bank(bank: ProbeBank, choices: dict[str, dict], directions: dict[str, np.ndarray],
                 signs_in_conditioning: bool | None = None) -> ProbeBank:
    """`bank` with each chosen task's steering layer and direction replaced, and `extra["steering"]` set to
    `choices` (task -> the record of its choice: layer, alpha, fraction, gain, perplexity_ratio, n, source,
    and `steer_signs` for variant tasks). Tasks absent from `directions` keep their steering. Signs go into
    the probe's conditioning when the runtime reads them (`steer_signs_supported`, or as told)."""
    if signs_in_conditioning is None:
        signs_in_conditioning = steer_signs_supported()
    probes, dirs = list(bank.probes), bank.directions.clone()
    for task, direction in directions.items():
        i = bank.index(task)
        choice = choices[task]
        vec = torch.as_tensor(np.asarray(direction), dtype=torch.float32)
        dirs[i] = vec / vec.norm()
        probe = replace(probes[i], steer_layer=int(choice["layer"]))
        signs = choice.get("steer_signs")
        if signs and signs_in_conditioning and probe.conditioning is not None:
            probe = replace(probe, conditioning=probe.conditioning | {"steer_signs": dict(signs)})
        probes[i] = probe
    extra = bank.extra | {"steering": {**bank.extra.get("steering", {}), **choices}}
    return replace(bank, probes=probes, directions=dirs, extra=extra)


def brief_cell(cell: dict | None) -> dict | None:
    """A swept cell's figures without its per-prompt outcomes (the sweep record's `chosen` and best cells)."""
    if cell is None:
        return None
    return {k: cell[k] for k in ("direction", "layer", "fraction", "alpha", "where", "n", "compliance",
                                 "compliance_baseline", "gain", "gain_ci", "perplexity_ratio", "perplexity_ratio_ci")}


def choice_record(record: dict, fits: dict[int, DirectionFit] | None = None) -> dict | None:
    """The bank's `extra["steering"][task]` entry for a task's sweep record (None: no cell gained)."""
    chosen = record.get("chosen")
    if chosen is None:
        return None
    paired = chosen["direction"] == "paired"
    out = {"layer": chosen["layer"], "alpha": chosen["alpha"], "fraction": chosen["fraction"],
           "gain": round(chosen["gain"], 4), "perplexity_ratio": chosen["perplexity_ratio"], "n": chosen["n"],
           "compliance_baseline": chosen["compliance_baseline"], "source": SOURCE,
           "direction": "paired mean difference (compliant - violating, same base request), training split"
           if paired else "the source bank's direction, at its steering layer"}
    signs = record["directions"][str(chosen["layer"])].get("signs") if paired else None
    if signs:
        out["steer_signs"] = signs
    return out


def with_gate_thresholds(bank: ProbeBank, thresholds: dict[str, float | None]) -> ProbeBank:
    """`bank` with these tasks' gate thresholds set on the probes that gate conditional steering (the warning
    predictors where the bank has them, else its probes)."""
    def set_on(target: ProbeBank) -> ProbeBank:
        probes = [replace(p, gate_threshold=thresholds[p.task]) if p.task in thresholds else p
                  for p in target.probes]
        return replace(target, probes=probes)

    if bank.warning is not None:
        return replace(bank, warning=set_on(bank.warning))
    return set_on(bank)


def choose_gate(cells: Sequence[dict], ppl_limit: float = PPL_LIMIT) -> dict | None:
    """The gate threshold whose conditional steering gains most at perplexity ratio <= `ppl_limit` (ties: the
    lower ratio, then the lower threshold: less steering); None when none gains."""
    eligible = [c for c in cells if c.get("perplexity_ratio") is not None and c["perplexity_ratio"] <= ppl_limit
                and gain_of(c) > 0]
    if not eligible:
        return None
    return max(eligible, key=lambda c: (round(gain_of(c), 9), -c["perplexity_ratio"], -c["gate_threshold"]))


def gate_supported() -> bool:
    """Does this runtime's Probe carry a gate threshold for conditional steering?"""
    from steerer.bank import Probe

    return "gate_threshold" in Probe.__dataclass_fields__
