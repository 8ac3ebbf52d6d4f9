"""IFEval-range retraining (`probes.ifeval_ranges`): the range corpus's held-out rows never train, the merged
data keeps every row's residuals, and the side-by-side rule and intervals behave."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from probes.dataset import TaskData
from probes.ifeval_ranges import better, column_masks, concat, paired_difference_ci, range_split, side_by_side


def _row(family_split: str, base_split: str, satisfied: bool = True) -> dict:
    return {"family_split": family_split, "base_split": base_split, "satisfied": satisfied, "base_id": "b",
            "params": {}}


def test_range_rows_held_out_by_request_or_wording_never_train():
    assert range_split(_row("train", "train")) == "train"
    assert range_split(_row("train", "test")) == "range_test"
    assert range_split(_row("heldout", "train")) == "range_heldout_phrasing"
    assert range_split(_row("heldout", "test")) == "range_heldout_phrasing"


def _data(rows: list[dict], lengths: list[int], start: float) -> TaskData:
    positions = torch.arange(len(rows), dtype=torch.float32)[:, None, None, None].expand(-1, 2, 1, 3) + start
    tokens = torch.cat([torch.full((n, 1, 3), start + i) for i, n in enumerate(lengths)]).half()
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.long)
    return TaskData(rows, positions, tokens, offsets)


def test_concat_keeps_each_rows_residuals_and_tokens():
    shipped = [_row("train", "train") | {"split": s} for s in ("train", "test", "heldout_phrasing")]
    ranged = [_row("train", "train") | {"split": s} for s in ("train", "range_test")]
    merged = concat(_data(shipped, [2, 1, 3], 0.0), _data(ranged, [4, 2], 100.0))
    assert len(merged.rows) == 5 and merged.positions.shape[0] == 5
    for i, value in enumerate([0, 1, 2, 100, 101]):
        assert float(merged.positions[i, 0, 0, 0]) == value
        start, end = int(merged.offsets[i]), int(merged.offsets[i + 1])
        assert end - start == [2, 1, 3, 4, 2][i]
        assert torch.all(merged.tokens[start:end] == value).item()
    masks = column_masks(merged)
    assert masks["test"].tolist() == [False, True, False, False, False]
    assert masks["range_heldout"].tolist() == [False, False, False, False, True]


def test_paired_difference_interval_excludes_zero_only_for_a_real_gain():
    rng = np.random.default_rng(1)
    y = np.array([1] * 60 + [0] * 60)
    noise = rng.normal(size=120)
    old = noise.copy()  # chance
    new = noise + 2.0 * y  # separates well
    low, high = paired_difference_ci(y, old, new)
    assert low > 0.2 and high <= 1.0
    same = paired_difference_ci(y, old, old.copy())
    assert same == [0.0, 0.0]
    assert paired_difference_ci(np.ones(5, dtype=int), old[:5], new[:5]) is None


def test_adopt_needs_an_ifeval_gain_and_no_column_worse_beyond_its_interval():
    y = np.array([1] * 30 + [0] * 30)
    good, bad = np.r_[np.ones(30), np.zeros(30)] + np.linspace(0, 0.1, 60), np.linspace(0, 1, 60)
    cols = {name: side_by_side(name, y, good, good) for name in ("test", "heldout_phrasing", "range_heldout")}
    assert better(cols | {"ifeval": side_by_side("ifeval", y, bad, good)})["adopt"]
    assert not better(cols | {"ifeval": side_by_side("ifeval", y, good, bad)})["adopt"]
    worse = cols | {"test": side_by_side("test", y, good, bad), "ifeval": side_by_side("ifeval", y, bad, good)}
    assert better(worse) == {"ifeval_higher": True, "worse_columns": ["test"], "adopt": False}


def test_command_refuses_bad_input_in_one_line(tmp_path):
    cases = [(["--tasks", "topic"], "--tasks must be among"), ([], "no features at")]
    for extra, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "steerer.cli", "probes", "ranges", "--features",
                               str(tmp_path / "f"), "--range-features", str(tmp_path / "r"), *extra],
                              capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], proc.stderr


def test_budget_decided_ifeval_rows_are_set_apart():
    from probes.ifeval_ranges import model_decided

    def row(relation, finish, satisfied, task="word_count"):
        return {"task": task, "params": {"relation": relation, "limit": 300}, "finish_reason": finish,
                "satisfied": satisfied}

    rows = [row("at least", "length", False), row("less than", "length", True), row("at least", "eos", False),
            row("less than", "length", False), row("at least", "length", False, task="term_exclusion")]
    assert model_decided(rows).tolist() == [False, False, True, True, True]
