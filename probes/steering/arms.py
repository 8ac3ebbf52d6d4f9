"""Generating and scoring steered arms: greedy generations of a task's prompts under every (direction, layer,
strength, where) arm in static batches, then per arm compliance, perplexity ratio and repetition with their
intervals (`steerer.stats`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from steerer.stats import paired_gain_ci, wilson
from steerer.stats import ratio_of_means_ci as ppl_ratio_ci


class LastPromptAndGenerated:
    """A `Where` for measurement: generated tokens and the prompt's last token (which chooses the first
    response token). The prompt pass's width comes from a pre-hook on the model (prompts are left-padded, so
    the last column is every row's last prompt token)."""

    def __init__(self, model: torch.nn.Module):
        self.width = 1
        self._handle = model.register_forward_pre_hook(self._see, with_kwargs=True)

    def _see(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.width = int(ids.shape[-1])

    def mask(self, generated):
        if generated is True or isinstance(generated, torch.Tensor):
            return generated
        cover = torch.zeros(1, self.width, dtype=torch.bool)
        cover[0, -1] = True
        return cover

    def remove(self) -> None:
        self._handle.remove()


@dataclass(frozen=True)
class Arm:
    """One steered configuration of a task's sweep (layer None = unsteered)."""

    layer: int | None
    fraction: float
    alpha: float
    direction: str = "paired"  # paired (this module's) | probe (the source bank's, at its steering layer)
    where: str = "generated"  # generated | both | last_prompt+generated

    @property
    def key(self) -> str:
        if self.layer is None:
            return "off"
        return f"{self.direction}@{self.layer}:{self.fraction:g}:{self.where}"


def generate_arms(lm, prompts, arms: Sequence[Arm], vectors: dict[tuple[str, int], np.ndarray],
                  signs: Sequence[int], max_new_tokens: int, max_batch: int = 256, progress=None) -> list[list]:
    """Greedy generations of every prompt under every arm (one static batch per `where`, split into
    `max_batch` chunks): per arm, a list of `Generation`s aligned with `prompts`. Row r of arm a gets
    alpha (x its prompt's variant sign, for this module's directions) along its arm's direction at its arm's
    layer, zero elsewhere."""
    from steerer.engine.hf import HFEngine
    from steerer.generation import SamplingParams, generate
    from steerer.model import chat_prompt
    from steerer.taps import FixedSteering, LayerHooks, LayerSteering, Where

    ids = [chat_prompt(lm.tokenizer, p.messages) for p in prompts]
    out: list[list] = [[None] * len(prompts) for _ in arms]
    for where in dict.fromkeys(a.where for a in arms):
        mine = [k for k, a in enumerate(arms) if a.where == where]
        keys = sorted({(arms[k].direction, arms[k].layer) for k in mine if arms[k].layer is not None})
        layers = sorted({layer for _, layer in keys})
        special = LastPromptAndGenerated(lm.model) if where == "last_prompt+generated" else None
        steering = {}
        for layer in layers:
            cols = [key for key in keys if key[1] == layer]
            steer = LayerSteering(torch.tensor(np.stack([vectors[c] for c in cols]), dtype=torch.float32),
                                  Where.GENERATED if where == "last_prompt+generated" else Where(where))
            if special is not None:
                steer.where = special
            steering[layer] = (steer, cols)
        jobs = [(k, i) for k in mine for i in range(len(prompts))]
        size = math.ceil(len(jobs) / math.ceil(len(jobs) / max_batch)) if jobs else 1  # balanced chunks
        try:
            for start in range(0, len(jobs), size):
                chunk = jobs[start:start + size]
                table = {}
                for layer, (_, cols) in steering.items():
                    t = torch.zeros(len(chunk), len(cols))
                    for row, (k, i) in enumerate(chunk):
                        a = arms[k]
                        if a.layer == layer:
                            sign = signs[i] if a.direction == "paired" else 1  # the probe's: as the bank has it
                            t[row, cols.index((a.direction, a.layer))] = a.alpha * sign
                    table[layer] = t
                hooks = LayerHooks(lm.model, steering={layer: s for layer, (s, _) in steering.items()})
                with hooks:
                    gens = generate(HFEngine(lm, hooks), [ids[i] for _, i in chunk],
                                    SamplingParams(max_new_tokens=max_new_tokens),
                                    FixedSteering({layer: s for layer, (s, _) in steering.items()}, table))
                for (k, i), g in zip(chunk, gens, strict=True):
                    out[k][i] = g
                if progress is not None:
                    progress(len(chunk))
        finally:
            if special is not None:
                special.remove()
    return out


def score_cells(lm, task: str, prompts, arms: Sequence[Arm], gens: list[list], base: int = 0) -> list[dict]:
    """Per arm: compliance (the task's checker on the decoded text), perplexity ratio against arm `base`
    (the unsteered one) as the benchmark measures it, with intervals; per-prompt outcomes kept."""
    from steerer.ab.fluency import response_nll, scored_tokens
    from steerer.constraints import Constraint, check_constraint
    from steerer.model import chat_prompt

    texts = [[lm.tokenizer.decode(g.tokens, skip_special_tokens=True) for g in row] for row in gens]
    ok = [[bool(check_constraint(Constraint(task, p.params), t)) for p, t in zip(prompts, row, strict=True)]
          for row in texts]
    ids = [chat_prompt(lm.tokenizer, p.messages) for p in prompts]
    flat = [(k, i) for k in range(len(arms)) for i in range(len(prompts))]
    nll_flat = response_nll(lm, [ids[i] for _, i in flat], [scored_tokens(lm, gens[k][i].tokens) for k, i in flat])
    nll = [[None] * len(prompts) for _ in arms]
    for (k, i), v in zip(flat, nll_flat, strict=True):
        nll[k][i] = v
    cells = []
    for k, arm in enumerate(arms):
        deltas = [s - b for s, b in zip(nll[k], nll[base], strict=True) if s is not None and b is not None]
        n = len(prompts)
        comp = sum(ok[k]) / n
        cells.append({
            "direction": arm.direction if arm.layer is not None else None, "layer": arm.layer,
            "fraction": arm.fraction, "alpha": round(arm.alpha, 4), "where": arm.where, "n": n,
            "compliance": comp, "compliance_ci": wilson(sum(ok[k]), n),
            "compliance_baseline": sum(ok[base]) / n, "gain": comp - sum(ok[base]) / n,
            "gain_ci": paired_gain_ci(ok[k], ok[base]),
            "perplexity_ratio": round(math.exp(float(np.mean(deltas))), 4) if deltas else None,
            "perplexity_ratio_ci": ppl_ratio_ci(deltas), "perplexity_pairs": len(deltas),
            "mean_tokens": float(np.mean([len(g.tokens) for g in gens[k]])),
            "repetition": _mean([repetition(g.tokens) for g in gens[k]]),
            "distinct_2": _mean([distinct(g.tokens) for g in gens[k]]),
            "satisfied": ok[k],
        })
    return cells


def repetition(tokens: Sequence[int], n: int = 3) -> float | None:
    """rep-n: 1 - distinct n-grams / n-grams of the response; None if it has fewer than n tokens. Degenerate,
    looping text is *more* predictable to the unsteered model, so the perplexity ratio alone does not see it."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else None


def distinct(tokens: Sequence[int], n: int = 2) -> float | None:
    """distinct-n: distinct n-grams / n-grams of the response (1: no n-gram repeats); None if it has fewer
    than n tokens. A second fluency measure beside perplexity, over shorter spans than rep-3."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None
