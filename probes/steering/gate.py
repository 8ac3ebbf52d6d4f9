"""Step 4: the conditional gate's threshold per task, measured through the `Steerer` (the gate is the
monitor's) at the chosen alpha on the sweep's training-split prompts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from probes.heldout import held_out_prompts
from probes.steering.arms import distinct, repetition
from probes.steering.choice import choose_gate, with_gate_thresholds
from probes.steering.sweep import SweepConfig, budget_for
from steerer.bank import ProbeBank
from steerer.stats import paired_gain_ci
from steerer.stats import ratio_of_means_ci as ppl_ratio_ci


def calibrate_gates(lm, bank: ProbeBank, doc: dict, tasks: Sequence[str], thresholds: Sequence[float],
                    config: SweepConfig, log: Callable[[str], None] = print) -> dict:
    """Per task: conditional steering at its chosen alpha on the sweep's training-split prompts, at each gate
    threshold (all tasks in one Steerer per threshold), against the same prompts unsteered through the same
    Steerer; compliance, gain and perplexity ratio per threshold, and `choose_gate`'s pick."""
    from steerer.ab.fluency import response_nll, scored_tokens
    from steerer.constraints import Constraint
    from steerer.core import Request, Steerer
    from steerer.generation import SamplingParams
    from steerer.model import chat_prompt
    from steerer.policy import OFF, SteeringPolicy

    prompts = {t: held_out_prompts(t, config.n, config.seed, split="train") for t in tasks}
    alphas = {t: bank.extra["steering"][t]["alpha"] for t in tasks}

    def requests(policy_of) -> list:
        return [Request(p.messages, (Constraint(t, p.params),), policy_of(t),
                        sampling=SamplingParams(max_new_tokens=budget_for(t, config)), id=f"{p.id}")
                for t in tasks for p in prompts[t]]

    runs = {}
    for g in [None, *thresholds]:  # None: unsteered
        gbank = with_gate_thresholds(bank, {t: g for t in tasks}) if g is not None else bank
        with Steerer(lm, gbank, capacity=config.max_batch, use_unreliable_probes=True) as steerer:
            reqs = requests(lambda t, g=g: OFF if g is None else SteeringPolicy("conditional", alphas[t]))
            runs[g] = steerer.run(reqs, config.max_batch)
        log(f"gate {g}: {len(runs[g])} responses")
    flat = [(g, i) for g in runs for i in range(len(runs[g]))]
    ids = {t: [chat_prompt(lm.tokenizer, p.messages) for p in prompts[t]] for t in tasks}
    all_ids = [i for t in tasks for i in ids[t]]
    nll = response_nll(lm, [all_ids[i] for _, i in flat], [scored_tokens(lm, runs[g][i].tokens) for g, i in flat])
    nll_of = {(g, i): v for (g, i), v in zip(flat, nll, strict=True)}
    out, start = {}, 0
    for t in tasks:
        rows = range(start, start + len(prompts[t]))
        start += len(prompts[t])
        base_ok = [bool(runs[None][i].verdicts[0].satisfied) for i in rows]
        cells = []
        for g in thresholds:
            ok = [bool(runs[g][i].verdicts[0].satisfied) for i in rows]
            deltas = [nll_of[(g, i)] - nll_of[(None, i)] for i in rows
                      if nll_of[(g, i)] is not None and nll_of[(None, i)] is not None]
            steered = [sum(runs[g][i].steered_tokens.values()) / max(len(runs[g][i].tokens), 1) for i in rows]
            cells.append({"gate_threshold": g, "alpha": alphas[t], "n": len(ok), "compliance": float(np.mean(ok)),
                          "compliance_baseline": float(np.mean(base_ok)), "gain": float(np.mean(ok) - np.mean(base_ok)),
                          "gain_ci": paired_gain_ci(ok, base_ok),
                          "perplexity_ratio": round(math.exp(float(np.mean(deltas))), 4) if deltas else None,
                          "perplexity_ratio_ci": ppl_ratio_ci(deltas),
                          "steered_token_share": round(float(np.mean(steered)), 4),
                          "repetition": _mean([repetition(runs[g][i].tokens) for i in rows]),
                          "distinct_2": _mean([distinct(runs[g][i].tokens) for i in rows])})
        base_rep = _mean([repetition(runs[None][i].tokens) for i in rows])
        chosen = choose_gate(cells, base_repetition=base_rep)
        out[t] = {"cells": cells, "repetition_unsteered": base_rep, "chosen": None if chosen is None else chosen["gate_threshold"]}
        log(f"{t}: gate threshold {out[t]['chosen']}")
    return out


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None
