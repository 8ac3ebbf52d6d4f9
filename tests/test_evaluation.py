"""Choosing and banking probes on synthetic data (no model): splits keep held-out wording and requests out of
training, parameter conditioning is chosen when the data need it, and a banked probe scores through the
runtime exactly as it was measured."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from probes import evaluation
from probes.dataset import POSITIONS, TaskData
from steerer.bank import ProbeBank
from steerer.monitor import Monitor, MonitorConfig

D, LAYERS = 8, 2


def synthetic(n: int = 240, seed: int = 0) -> TaskData:
    """A count task: coordinate 0 of the end residual is log(length); 'at least L' is met when length >= L,
    'at most L' when length <= L. A single probe cannot read this; one per bound with log(limit) can."""
    rng = np.random.default_rng(seed)
    rows, x = [], np.zeros((n, len(POSITIONS), LAYERS, D), dtype=np.float32)
    for i in range(n):
        relation = "at least" if i % 2 else "at most"
        limit = int(rng.integers(10, 200))
        length = float(np.exp(rng.uniform(np.log(5), np.log(400))))
        ok = length >= limit if relation == "at least" else length <= limit
        family = f"f{(i // 2) % 6}"  # both relations in every family
        rows.append({"id": f"r{i}", "params": {"relation": relation, "limit": limit}, "satisfied": bool(ok),
                     "family": family, "base_id": f"b{i % 20}", "family_split": "heldout" if family == "f5" else "train",
                     "base_split": "test" if i % 20 >= 15 else "train"})
        x[i, :, :, 0] = np.log(length)
        x[i, :, :, 1:] = rng.normal(size=(len(POSITIONS), LAYERS, D - 1))
    rows = [r | {"split": evaluation.split_of(r)} for r in rows]
    tokens = torch.from_numpy(x[:, -1, :, :]).half()  # one pass per row: its end reading, at both layers
    return TaskData(rows, torch.from_numpy(x), tokens, torch.arange(n + 1))


def test_splits_keep_heldout_wording_and_requests_out_of_training():
    data = synthetic()
    for row in data.rows:
        if row["family_split"] == "heldout":
            assert row["split"] == "heldout_phrasing"
        elif row["base_split"] == "test":
            assert row["split"] == "test"
        else:
            assert row["split"] == "train"


def test_conditioning_is_chosen_where_the_parameter_decides():
    data = synthetic()
    probe, scores = evaluation.choose(data, [0, 1], evaluation.designs_for("word_count"))
    by_design = {s["design"]: s["cv_auroc"] for s in scores}
    assert probe.design.name == "per_bound+log_limit" and probe.cv_auroc > 0.95
    assert by_design["single"] < 0.75
    for split in ("test", "heldout_phrasing"):
        m = evaluation.measure(probe, data, data.split == split)
        assert m["auroc"] > 0.9 and m["auroc_ci"][0] <= m["auroc"] <= m["auroc_ci"][1]
    assert evaluation.measure(probe, data, np.zeros(len(data.rows), dtype=bool))["auroc"] is None


def test_a_banked_conditioned_probe_scores_as_measured(tmp_path):
    data = synthetic()
    probe, _ = evaluation.choose(data, [0, 1], evaluation.designs_for("word_count"))
    measured = {s: evaluation.measure(probe, data, data.split == s) for s in ("test", "heldout_phrasing")}
    entry = evaluation.bank_entry("word_count", probe, data, D, [0, 1], measured, MonitorConfig())
    bank = ProbeBank.load(evaluation.assemble_bank([entry], "synthetic", "f" * 16, D, "v", {}).save(tmp_path / "b"))
    assert bank.probes[0].conditioning["variant"] == "bound" and bank.probes[0].reliable
    monitor = Monitor(bank, capacity=len(data.rows))
    for i, row in enumerate(data.rows):
        monitor.register(i, ["word_count"], {"word_count": row["params"]})
    x = data.positions[:, POSITIONS.index("eos"), probe.layer]
    got = monitor.score(torch.arange(len(data.rows)), {probe.layer: x})[:, 0].numpy()
    want = probe.proba(x.numpy(), [r["params"] for r in data.rows])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_params_only_baseline_reads_no_residual():
    data = synthetic()
    baseline = dataclasses.replace(evaluation.DESIGNS["word_count"][2], name="params", residual=False)
    probe, _ = evaluation.choose(data, [0], (baseline,))
    assert probe.variants["upper"].weight.shape == (1,)  # log(limit) only
    assert np.isfinite(probe.cv_auroc)
    assert probe.cv_auroc < 0.9
