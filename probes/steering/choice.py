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
REP_MARGIN = 0.05  # a steered cell counts only if its rep-3 is at most the unsteered run's + this
SOURCE = "sweep on train split"
RULE = (f"perplexity ratio <= {PPL_LIMIT} and repetition (rep-3) within {REP_MARGIN} of the unsteered run: "
        "looping text is likely text, so the perplexity ratio alone lets loops through")


def gain_of(cell: dict) -> float:
    return cell["compliance"] - cell["compliance_baseline"]


def unsteered_repetition(cells: Sequence[dict]) -> float | None:
    """rep-3 of the unsteered cell among `cells` (alpha 0), None when absent or not measured."""
    return next((c.get("repetition") for c in cells if not c.get("alpha")), None)


def loop_free(cell: dict, base_repetition: float | None, rep_margin: float = REP_MARGIN) -> bool:
    """Does steering keep the response's repetition within `rep_margin` of the unsteered run? False where
    either was not measured (a record without repetition cannot show its gain is not a loop). A cell that
    carries its own run's unsteered rep-3 (`repetition_baseline`: cells merged from another run) is judged
    against that one."""
    rep = cell.get("repetition")
    base = cell.get("repetition_baseline", base_repetition)
    return rep is not None and base is not None and rep <= base + rep_margin + 1e-9


def choose(cells: Sequence[dict], ppl_limit: float = PPL_LIMIT, rep_margin: float | None = REP_MARGIN) -> dict | None:
    """The steered cell with the largest compliance gain at perplexity ratio <= `ppl_limit` and (unless
    `rep_margin` is None) rep-3 within `rep_margin` of the unsteered cell in `cells` (ties: the lower ratio,
    then the smaller fraction), or None when no such cell gains anything."""
    base = unsteered_repetition(cells)
    eligible = [c for c in cells if c.get("alpha") and c.get("perplexity_ratio") is not None
                and c["perplexity_ratio"] <= ppl_limit and gain_of(c) > 0
                and (rep_margin is None or loop_free(c, base, rep_margin))]
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


def loop_only(cells: Sequence[dict], source: str = "the sweep") -> str | None:
    """Why a task's steering should stay off: some cell gains at perplexity ratio <= PPL_LIMIT, but every such
    cell loops (rep-3 above the unsteered run's + REP_MARGIN). None otherwise (or where repetition was not
    measured). `source` names the cells' origin in the reason."""
    base = unsteered_repetition(cells)
    gaining = [c for c in cells if c.get("alpha") and c.get("perplexity_ratio") is not None
               and c["perplexity_ratio"] <= PPL_LIMIT and gain_of(c) > 0]
    if base is None or not gaining or choose(cells) is not None:
        return None
    reps = [c["repetition"] for c in gaining if c.get("repetition") is not None]
    return (f"off: every gaining cell of {source} loops (rep-3 {min(reps):.2f}-{max(reps):.2f} vs {base:.2f} "
            f"unsteered; rule: {RULE})")


def without_looping_steering(bank: ProbeBank, doc: dict, source: str = "the sweep") -> ProbeBank:
    """`bank` with `extra["steering"][task]` marked `steerable: false` (and why) for every task of the sweep
    document `doc` whose only gains are loops (`loop_only`); the manifest stays loadable. `benchmark_doc`
    shapes a `steering_efficacy.json` result as such a document."""
    steering = dict(bank.extra.get("steering") or {})
    for task, record in doc.get("tasks", {}).items():
        reason = loop_only(record.get("cells", []), source)
        if reason is not None:
            steering[task] = {**(steering.get(task) or {}), "steerable": False, "steerable_reason": reason}
    return replace(bank, extra=bank.extra | {"steering": steering})


def benchmark_doc(result: dict) -> dict:
    """A `benchmarks/steering_efficacy.py` result (task -> cells, the unsteered cell first, alpha 0) in the
    sweep document's shape (task -> {"cells": ...}), for `without_looping_steering`."""
    return {"tasks": {task: {"cells": cells} for task, cells in result.get("tasks", {}).items()}}


def brief_cell(cell: dict | None) -> dict | None:
    """A swept cell's figures without its per-prompt outcomes (the sweep record's `chosen` and best cells)."""
    if cell is None:
        return None
    return {k: cell.get(k) for k in ("direction", "layer", "fraction", "alpha", "where", "n", "compliance",
                                     "compliance_baseline", "gain", "gain_ci", "perplexity_ratio",
                                     "perplexity_ratio_ci", "repetition", "distinct_2")}


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


def choose_gate(cells: Sequence[dict], ppl_limit: float = PPL_LIMIT, base_repetition: float | None = None,
                rep_margin: float = REP_MARGIN) -> dict | None:
    """The gate threshold whose conditional steering gains most at perplexity ratio <= `ppl_limit` and, where
    `base_repetition` (the unsteered rep-3) is given, rep-3 within `rep_margin` of it (ties: the lower ratio,
    then the lower threshold: less steering); None when none gains."""
    eligible = [c for c in cells if c.get("perplexity_ratio") is not None and c["perplexity_ratio"] <= ppl_limit
                and gain_of(c) > 0 and (base_repetition is None or loop_free(c, base_repetition, rep_margin))]
    if not eligible:
        return None
    return max(eligible, key=lambda c: (round(gain_of(c), 9), -c["perplexity_ratio"], -c["gate_threshold"]))


def gate_supported() -> bool:
    """Does this runtime's Probe carry a gate threshold for conditional steering?"""
    from steerer.bank import Probe

    return "gate_threshold" in Probe.__dataclass_fields__
