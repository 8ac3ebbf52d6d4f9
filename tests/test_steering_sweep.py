"""`probes.steering`: directions from features, the choice rule, the bank it writes, its intervals; and the
split parameter of the benchmarks' prompt builder (`probes.heldout`). Pure functions on synthetic data: no model is run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from probes import steering
from probes.dataset import TaskData
from steerer.bank import Probe, ProbeBank

D = 8
REPO = Path(__file__).resolve().parents[1]


def rows_and_tokens(rng, specs, lengths=None):
    """Rows {base_id, params, satisfied, n_tokens, split} and per-token readings [sum T, 2 layers, D]: a row's
    readings are noise + its `shift` (a [D] vector) at layer column 1 (column 0 is pure noise)."""
    rows, pieces = [], []
    for k, (base, params, ok, shift) in enumerate(specs):
        n = 5 if lengths is None else lengths[k]
        rows.append({"base_id": base, "params": params, "satisfied": ok, "n_tokens": n, "split": "train"})
        x = torch.from_numpy(rng.normal(0, 0.01, (n, 2, D))).float()
        x[:, 1] += torch.as_tensor(shift, dtype=torch.float32)
        pieces.append(x)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([p.shape[0] for p in pieces])]))
    return rows, torch.cat(pieces).half(), offsets


def test_row_means_take_the_first_readings_up_to_max_tokens():
    tokens = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 3)
    means = steering.row_means(tokens, [0, 4, 4, 10], [4, 0, 6], max_tokens=3)
    assert means[0].tolist() == [1.0] * 3  # rows 0..2 of the first row
    assert np.isnan(means[1]).all()  # no reading
    assert means[2].tolist() == [5.0] * 3  # readings 4, 5, 6 of the third row
    assert steering.mean_norm(torch.ones(4, 4), [0, 4], [4]) == pytest.approx(2.0)


def test_group_difference_pairs_within_requests_and_skips_one_class_groups():
    means = np.array([[1.0, 0], [0, 0], [3, 1], [2, 1], [9, 9]])
    diff, n = steering.group_difference(means, [True, False, True, False, True], ["a", "a", "b", "b", "c"])
    assert n == 2 and diff.tolist() == [1.0, 0.0]  # group c (compliant only) is left out
    assert steering.group_difference(means[:1], [True], ["a"]) == (None, 0)


def test_direction_cancels_a_request_confound():
    """Requests differ by a large offset that is not compliance; the paired difference ignores it."""
    rng = np.random.default_rng(0)
    push = np.eye(D)[0]
    specs = []
    for g in range(6):
        offset = rng.normal(0, 5, D)
        n_ok = 1 + g % 3  # unbalanced groups: a pooled class mean would carry the offsets
        specs += [(f"r{g}", {}, True, offset + push)] * n_ok + [(f"r{g}", {}, False, offset)]
    rows, tokens, offsets = rows_and_tokens(rng, specs)
    data = TaskData(rows, torch.zeros(len(rows), 1), tokens, offsets)
    fit = steering.fit_directions(data, "lowercase", [0, 3], [3], None)[3]
    assert fit.groups == {"all": 6}
    assert fit.direction @ push > 0.99
    assert np.linalg.norm(fit.direction) == pytest.approx(1.0)


def test_variant_directions_are_signed_and_weighted_by_groups():
    """At most: compliant = shorter (+v); at least: compliant = longer (-v). Signs make both one axis, v."""
    rng = np.random.default_rng(1)
    v = np.eye(D)[2]
    specs = []
    for g in range(4):
        specs += [(f"u{g}", {"relation": "at most", "limit": 20}, True, v),
                  (f"u{g}", {"relation": "at most", "limit": 20}, False, np.zeros(D)),
                  (f"l{g}", {"relation": "at least", "limit": 20}, True, -v),
                  (f"l{g}", {"relation": "at least", "limit": 20}, False, np.zeros(D))]
    rows, tokens, offsets = rows_and_tokens(rng, specs)
    data = TaskData(rows, torch.zeros(len(rows), 1), tokens, offsets)
    fit = steering.fit_directions(data, "word_count", [0, 3], [3], "bound")[3]
    assert fit.signs == {"upper": 1, "lower": -1}
    assert fit.groups == {"upper": 4, "lower": 4}
    assert fit.agreement > 0.99 and fit.direction @ v > 0.99
    # one variant with one group and a conflicting difference barely moves a direction with many groups
    means = np.array([v, 0 * v] * 4 + [np.eye(D)[5], 0 * v])
    variants = ["upper"] * 8 + ["lower"] * 2
    groups = [f"g{i // 2}" for i in range(10)]
    direction, used, _ = steering.steering_direction(means, [True, False] * 5, groups, variants,
                                                     steering.SIGNS["bound"])
    assert used == {"upper": 4, "lower": 1} and direction @ v > 0.95
    with pytest.raises(ValueError):
        steering.steering_direction(means[:1], [True], ["g"], None)


def cell(gain, ppl, fraction=0.1, base=0.2, alpha=10.0, layer=6, rep=0.2):
    return {"compliance": base + gain, "compliance_baseline": base, "perplexity_ratio": ppl, "fraction": fraction,
            "alpha": alpha, "layer": layer, "repetition": rep}


def test_choice_is_the_largest_gain_within_the_perplexity_limit():
    cells = [cell(0, 1.0, 0, alpha=0.0), cell(0.5, 1.3), cell(0.3, 1.08, 0.2), cell(0.3, 1.02, 0.4), cell(0.1, 1.0)]
    best = steering.choose(cells)
    assert best["perplexity_ratio"] == 1.02  # 0.5 costs too much; of the two 0.3s the cheaper
    assert steering.choose(cells, ppl_limit=2.0)["perplexity_ratio"] == 1.3
    assert steering.choose([cell(0, 1.0), cell(-0.1, 1.0), cell(0.4, None)]) is None  # nothing gains


def small_bank() -> ProbeBank:
    cond = {"variant": "bound", "rows": {"lower": 0, "upper": 1}, "inputs": []}
    probes = [Probe("word_count", 1, reliable=True, conditioning=cond), Probe("lowercase", 2, reliable=True,
                                                                             steer_layer=2)]
    return ProbeBank("synthetic", "f" * 16, D, probes, torch.zeros(2, D), torch.zeros(2), torch.eye(D)[:2],
                     version="s", variant_weights=torch.zeros(2, D), variant_biases=torch.zeros(2))


def test_steered_bank_round_trips_with_its_choices(tmp_path):
    bank = small_bank()
    direction = np.arange(D, dtype=float) + 1
    choice = {"layer": 6, "alpha": 12.5, "fraction": 0.16, "gain": 0.3, "perplexity_ratio": 1.04, "n": 20,
              "source": steering.SOURCE, "steer_signs": {"upper": 1, "lower": -1}}
    steered = steering.steered_bank(bank, {"word_count": choice}, {"word_count": direction},
                                    signs_in_conditioning=False)
    loaded = ProbeBank.load(steered.save(tmp_path / "bank"))
    probe = loaded.probes[loaded.index("word_count")]
    assert probe.steer_layer == 6 and probe.layer == 1  # reads where it did, steers where the sweep chose
    assert torch.allclose(loaded.directions[0], torch.as_tensor(direction / np.linalg.norm(direction)).float())
    assert loaded.extra["steering"]["word_count"] == choice
    assert loaded.probes[1].steer_layer == 2 and torch.equal(loaded.directions[1], bank.directions[1])  # kept
    assert "steer_signs" not in probe.conditioning
    if steering.steer_signs_supported():  # the runtime reads per-variant signs: they go into the conditioning
        signed = steering.steered_bank(bank, {"word_count": choice}, {"word_count": direction})
        again = ProbeBank.load(signed.save(tmp_path / "signed"))
        assert again.probes[0].conditioning["steer_signs"] == {"upper": 1, "lower": -1}


def test_the_sweep_intervals_come_from_the_one_statistics_module():
    """Compliance and gain intervals of a sweep cell are `steerer.stats`' (no copy of the formulas here)."""
    from probes.steering import arms, gate
    from steerer import stats

    assert arms.wilson is stats.wilson and arms.paired_gain_ci is gate.paired_gain_ci is stats.paired_gain_ci
    assert arms.ppl_ratio_ci is stats.ratio_of_means_ci
    low, high = stats.paired_gain_ci([True] * 15 + [False] * 5, [False] * 20)
    assert low < 0.75 < high and low > 0.4
    low, high = stats.ratio_of_means_ci([0.1] * 10)
    assert low == pytest.approx(np.exp(0.1)) and high == pytest.approx(np.exp(0.1))


def test_no_sys_path_edits_in_the_packages():
    """The held-out prompts live in `probes.heldout`; nothing reaches a script folder through sys.path."""
    for folder in ("steerer", "probes", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            assert "sys.path.insert" not in path.read_text() and "sys.path.append" not in path.read_text(), path


def test_benchmark_prompts_take_a_split():
    from probes.dataset import SPLIT_SEED
    from probes.heldout import held_out_prompts
    from probes.templates import split_base_requests

    train_ids, test_ids = split_base_requests(SPLIT_SEED)
    test = held_out_prompts("lowercase", 40, 0)
    train = held_out_prompts("lowercase", 40, 0, split="train")
    assert {p.base_id for p in test} <= set(test_ids) and {p.base_id for p in train} <= set(train_ids)
    assert test == held_out_prompts("lowercase", 40, 0, split="test")
    with pytest.raises(ValueError):
        held_out_prompts("lowercase", 4, 0, split="heldout_phrasing")


def test_gate_choice_and_bank_thresholds(tmp_path):
    cells = [{"gate_threshold": g, "compliance": 0.2 + gain, "compliance_baseline": 0.2, "perplexity_ratio": ppl}
             for g, gain, ppl in ((0.3, 0.1, 1.01), (0.6, 0.3, 1.05), (0.9, 0.3, 1.05), (0.95, 0.5, 1.2))]
    assert steering.choose_gate(cells)["gate_threshold"] == 0.6  # ties at equal cost: the lower threshold
    assert steering.choose_gate(cells[:1] + [dict(cells[0], compliance=0.1)], ppl_limit=1.0) is None
    if not steering.gate_supported():
        pytest.skip("this runtime has no Probe.gate_threshold")
    bank = steering.with_gate_thresholds(small_bank(), {"lowercase": 0.6})
    loaded = ProbeBank.load(bank.save(tmp_path / "gated"))
    assert loaded.probes[loaded.index("lowercase")].gate_threshold == 0.6
    assert loaded.probes[loaded.index("word_count")].gate_threshold is None


def test_the_steer_command_parses_and_refuses_to_overwrite_its_source(tmp_path):
    from probes.cli import cmd_steer
    from steerer.bank import DEFAULT_BANK
    from steerer.cli import build_parser

    args = build_parser().parse_args(["probes", "steer", "--out", str(tmp_path / "b"), "--layers", "6,12",
                                      "--fractions", "0.1,0.2", "--n", "4", "--threads", "1"])
    assert args.handler is cmd_steer and args.layers == "6,12" and args.n == 4
    assert args.gate_thresholds == "0.3,0.6,0.9" and args.where_tasks == "lowercase"
    if (DEFAULT_BANK / "manifest.json").exists():
        same = build_parser().parse_args(["probes", "steer", "--out", str(DEFAULT_BANK)])
        with pytest.raises((ValueError, FileNotFoundError)):
            cmd_steer(same)


def test_repetition():
    assert steering.repetition([1, 2]) is None
    assert steering.repetition([1, 2, 3, 4]) == 0.0
    assert steering.repetition([1, 2, 1, 2, 1, 2]) == pytest.approx(0.5)  # 4 trigrams, 2 distinct


def test_a_gain_counts_only_where_repetition_stays_near_the_unsteered_run():
    off = cell(0, 1.0, 0, alpha=0.0, rep=0.2)
    loop, fluent = cell(0.5, 0.95, rep=0.6), cell(0.2, 1.05, 0.2, rep=0.24)
    assert steering.choose([off, loop, fluent]) is fluent  # the loop is cheaper by perplexity, but loops
    assert steering.choose([off, loop, fluent], rep_margin=None) is loop  # the ratio-only rule took it
    assert steering.choose([off, loop]) is None and steering.choose([loop, fluent]) is None  # no unsteered rep-3
    assert steering.loop_only([off, loop]).startswith("off: every gaining cell of the sweep loops (rep-3 0.60-0.60")
    assert steering.loop_only([off, loop, fluent]) is None and steering.loop_only([off, cell(-0.1, 1.0)]) is None
    assert steering.choose_gate([dict(loop, gate_threshold=0.3)], base_repetition=0.2) is None
    assert steering.choose_gate([dict(loop, gate_threshold=0.3)])["gate_threshold"] == 0.3


def test_looping_steering_is_marked_off_and_the_bank_stays_loadable(tmp_path):
    bank = small_bank()
    bank = type(bank)(**{**bank.__dict__, "extra": {"steering": {"lowercase": {"layer": 2, "alpha": 5.0,
                                                                                "fraction": 0.1}}}})
    doc = {"tasks": {"lowercase": {"cells": [cell(0, 1.0, 0, alpha=0.0), cell(0.4, 0.9, rep=0.7)]},
                     "word_count": {"cells": [cell(0, 1.0, 0, alpha=0.0), cell(0.3, 1.0, rep=0.21)]}}}
    marked = steering.without_looping_steering(bank, doc)
    loaded = ProbeBank.load(marked.save(tmp_path / "bank"))
    entry = loaded.extra["steering"]["lowercase"]
    assert entry["steerable"] is False and entry["alpha"] == 5.0 and "loops" in entry["steerable_reason"]
    assert "word_count" not in loaded.extra["steering"]  # a loop-free gain: the sweep's choice stands


def test_distinct_2():
    assert steering.distinct([1]) is None
    assert steering.distinct([1, 2, 3]) == 1.0
    assert steering.distinct([1, 2, 1, 2, 1]) == pytest.approx(0.5)  # 4 bigrams, 2 distinct


def test_the_benchmark_recounts_a_result_with_the_loop_free_rule(tmp_path):
    """`steering_efficacy.py --recount` on a written result: no model, the loop-free bar beside the old one."""
    import json
    import subprocess
    import sys

    def bcell(policy, gain, ppl, rep, alpha=10.0):
        return {"policy": policy, "alpha": alpha, "fraction": 0.1, "scale": 1.0, "gain": gain, "gain_ci": [gain - 0.1,
                gain + 0.1], "perplexity_ratio": ppl, "perplexity_ratio_ci": [ppl, ppl], "compliance": 0.2 + gain,
                "compliance_ci": [0.1, 0.9], "compliance_baseline": 0.2, "compliance_baseline_ci": [0.1, 0.3],
                "repetition": rep}

    tasks = {"lowercase": [bcell("off", 0, 1.0, 0.26, 0.0), bcell("constant", 0.33, 0.95, 0.66),
                           bcell("conditional", 0.0, 0.96, 0.65)],
             "register": [bcell("off", 0, 1.0, 0.32, 0.0), bcell("constant", 0.28, 1.0, 0.34),
                          bcell("conditional", 0.25, 0.99, 0.35)]}
    path = tmp_path / "steering_efficacy.json"
    path.write_text(json.dumps({"tasks": tasks, "summary": {"verdict_calibration": {"off": {}}}, "config": {}}))
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "steering_efficacy.py"), "--recount", "--output",
                    str(path)], check=True, capture_output=True, timeout=300)
    summary = json.loads(path.read_text())["summary"]
    assert summary["bar"]["steering_gain"]["tasks"] == ["register"]
    assert summary["bar"]["ppl_only_rule_for_comparison"]["steering_gain"] == ["lowercase", "register"]
    assert summary["conditional_matches_constant_loop_free"] == ["register"]
    assert summary["not_steerable_without_loops"] == ["lowercase"]
    assert summary["verdict_calibration"] == {"off": {}}
