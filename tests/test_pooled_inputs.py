"""Probe inputs that summarise the readings (#22): the mean residual over the generated tokens (`pool: mean`) is served
by the monitor exactly as `probes.summaries` computes it offline, and `probes train`'s choice offers it (and the
running maximum of the lens) beside the end-reading designs, by the same training-split CV."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from probes import evaluation, summaries
from probes.dataset import POSITIONS, TaskData
from steerer.constraints import Constraint
from steerer.core import Request, Steerer
from steerer.generation import SamplingParams
from steerer.monitor import MonitorConfig
from steerer.service.testing import placeholder_bank

PROMPT = "Write two cheerful sentences about a sunny morning."
LAYER = 21
CONFIG = MonitorConfig(smoothing=0.0, warmup_tokens=0)


def mean_probe_bank(bank, task: str, layer: int, weight: np.ndarray, bias: float):
    """`bank` with `task`'s end probe reading the running mean of its residual at `layer` (``pool: mean``)."""
    entry = evaluation.entry_from_bank(bank, task)
    new = replace(entry, record={**entry.record, "layer": layer, "conditioning": {"inputs": [], "pool": "mean"}},
                  weight=weight, bias=bias, variant_rows=[])
    entries = [new if t == task else evaluation.entry_from_bank(bank, t) for t in bank.tasks]
    return evaluation.assemble_bank(entries, bank.model, bank.fingerprint, bank.hidden_size, bank.version, bank.extra)


def test_the_served_running_mean_is_the_offline_one(lm):
    """Live risks (smoothing off) equal the offline running mean of teacher-forced residuals at every reading
    (the prompt's last token as is, then the mean over the generated ones), and the end verdict reads the mean
    over the whole response."""
    from probes.designs import last_reading
    from probes.features import residual_passes, sequence_for

    rng = np.random.default_rng(0)
    weight = rng.normal(size=lm.hidden_size) / np.sqrt(lm.hidden_size) * 0.5
    bank = mean_probe_bank(placeholder_bank(lm.fingerprint, lm.hidden_size, "mean"), "sentiment", LAYER, weight, 0.3)
    assert bank.probes[bank.index("sentiment")].conditioning["pool"] == "mean"
    request = Request(PROMPT, (Constraint("sentiment", {"polarity": "positive"}),),
                      sampling=SamplingParams(max_new_tokens=16), id="m")
    with Steerer(lm, bank, monitor_config=CONFIG) as steerer:
        out = list(steerer.generate([request]))
    events = [e for e in out if not hasattr(e, "verdicts")]
    result = next(e for e in out if hasattr(e, "verdicts"))
    verdict, tokens = result.verdicts[0], [e.token_id for e in events]
    row = {"messages": [{"role": "user", "content": PROMPT}], "token_ids": tokens,
           "finish_reason": "eos" if result.finish_reason == "eos" else "length", "n_tokens": len(tokens)}
    seq = sequence_for(lm, row)
    x = residual_passes(lm, [seq], [LAYER])[0][:, 0].numpy()
    readings = x[seq.prompt_len - 1: seq.prompt_len + last_reading(row) + 1]  # -1 .. the last one taken
    offline = 1 / (1 + np.exp(-(summaries.running_mean(readings) @ weight + 0.3)))
    risks = [e.risks["sentiment"] for e in events]
    assert risks[: len(offline)] == pytest.approx((1 - offline).tolist(), abs=2e-4)
    plain = 1 / (1 + np.exp(-(readings @ weight + 0.3)))  # the reading of each pass: what the mean replaces
    assert np.abs(plain[2:] - offline[2:]).max() > 0.01
    end = 1 / (1 + np.exp(-(readings[1:].mean(0) @ weight + 0.3)))
    assert verdict.p_satisfied_end == pytest.approx(float(end), abs=2e-4)


def test_a_running_mean_reads_the_prompt_then_the_generated_tokens():
    x = np.array([[9.0], [1.0], [3.0], [5.0]])
    assert summaries.running_mean(x)[:, 0].tolist() == [9.0, 1.0, 2.0, 3.0]
    assert summaries.running_mean(x[:1])[:, 0].tolist() == [9.0]


def synthetic(n: int = 160, d: int = 8, seed: int = 0, lens=None) -> TaskData:
    """Rows whose label shows in the mean of their generated readings only (each reading noisy, the end one pure
    noise), and, with `lens`, in how close some reading came to the request's word."""
    rng = np.random.default_rng(seed)
    layers = 2
    labels = rng.integers(0, 2, n)
    rows, tokens, offsets, positions = [], [], [0], torch.zeros(n, len(POSITIONS), layers, d)
    for i in range(n):
        length = int(rng.integers(6, 12))
        t = rng.normal(size=(length, layers, d)).astype(np.float32)
        t[:, :, 0] += (2 * labels[i] - 1) * 0.8
        t[-1] = rng.normal(size=(layers, d))  # the end reading carries nothing
        tokens.append(torch.from_numpy(t).half())
        offsets.append(offsets[-1] + length)
        positions[i, POSITIONS.index("eos")] = torch.from_numpy(t[-1])
        positions[i, POSITIONS.index("last_prompt")] = torch.from_numpy(rng.normal(size=(layers, d)).astype(np.float32))
        split = "train" if i < n * 3 // 4 else "test"
        rows.append({"params": {"polarity": "positive" if i % 2 else "negative", "terms": ["river"]},
                     "satisfied": int(labels[i]), "split": split, "family": f"f{i % 5}", "base_id": f"b{i}"})
    return TaskData(rows, positions, torch.cat(tokens), torch.tensor(offsets))


def test_probes_train_offers_the_running_mean_and_chooses_it_where_the_signal_is():
    data = synthetic()
    designs = evaluation.designs_for("sentiment")
    declared = [d.conditioning for d in designs if d.summarised]
    summaries.attach(data, [0, 1], declared)
    probe, scores = evaluation.choose(data, [0, 1], designs)
    assert {"mean", "per_polarity+mean", "single"} <= {s["design"] for s in scores}
    assert evaluation.conditioning.pool(probe.design.conditioning) == "mean"
    assert evaluation.measure(probe, data, data.split == "test")["auroc"] > 0.75
    # the per-token readings the flag threshold is calibrated on end at the end input the probe was chosen on
    train = data.split == "train"
    traces = evaluation.token_readings(probe, data, train, [0, 1])
    end = probe.proba(evaluation.eos_matrix(data, probe.layer, train, probe.design),
                      [r["params"] for r, m in zip(data.rows, train, strict=True) if m])
    assert [t[0][-1] for t in traces] == pytest.approx(end.tolist(), abs=1e-5)


def test_without_summaries_the_summarised_designs_are_not_candidates():
    data = synthetic(n=60)
    _, scores = evaluation.choose(data, [0, 1], evaluation.designs_for("sentiment"))
    assert {s["design"] for s in scores} == {"single", "per_polarity"}


def test_the_lens_running_maximum_offline_ends_where_its_readings_do(lm):
    """`probes train`'s lens_max inputs (`summaries.attach`) are the last of the per-reading ones the flags are
    calibrated on, for both ways of keeping the maximum."""
    from steerer.lens import LensWeights

    d = 8
    g = torch.Generator().manual_seed(0)
    weights = LensWeights(torch.ones(d), 1e-5, torch.randn(len(lm.tokenizer), d, generator=g))
    data = synthetic(n=12, d=d)
    data.lens = (weights, lm.tokenizer, "terms")
    declared = [d.conditioning for d in evaluation.designs_for("keyword_inclusion") if d.summarised]
    summaries.attach(data, [0, 1], declared)
    for c in declared:
        how = c["lens_max"]
        for i in range(len(data.rows)):
            _, lex = summaries.running_inputs(data, i, 1, c)
            assert lex[-1] == pytest.approx(data.summaries[(f"lens_max:{how}", 1)][i].tolist(), abs=1e-5)
            assert (np.diff(lex[:, 0]) >= 0).all()  # a running maximum never falls


@pytest.mark.parametrize("declared, message", [({"pool": "max"}, "pool must be one of mean"),
                                               ({"pool": ["mean"]}, "pool must be one of mean")])
def test_a_malformed_pool_is_refused(declared, message):
    from steerer.conditioning import ConditioningError, check

    with pytest.raises(ConditioningError, match=message):
        check(declared, 0)
