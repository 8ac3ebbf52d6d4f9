"""`benchmarks/steering_efficacy.py --merge/--table` and the bank's steering-off mark from a benchmark result:
cells of several runs recounted together, each judged against its own run's unsteered repetition. Synthetic
result documents: no model is run."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks.steering_efficacy import main, mark_bank, markdown_table, merge_cells
from probes import steering
from steerer.bank import DEFAULT_BANK, ProbeBank


def bcell(policy: str, gain: float, ppl: float, rep: float, alpha: float = 10.0, d2: float | None = 0.9,
          scale: float | None = 1.0, base: float = 0.2) -> dict:
    return {"policy": policy, "alpha": alpha, "fraction": 0.1, "scale": scale, "layer": 6, "n": 60, "gain": gain,
            "gain_ci": [gain - 0.1, gain + 0.1], "perplexity_ratio": ppl, "perplexity_ratio_ci": [ppl - 0.02, ppl + 0.02],
            "compliance": base + gain, "compliance_ci": [0.1, 0.9], "compliance_baseline": base,
            "compliance_baseline_ci": [0.1, 0.3], "repetition": rep, "distinct_2": d2, "verdict": {"auroc": 0.8,
                                                                                                  "auroc_ci": [0.7, 0.9]}}


def first_run() -> dict:
    return {"topic": [bcell("off", 0, 1.0, 0.18, 0.0, d2=None), bcell("constant", 0.38, 1.04, 0.53, d2=None),
                      bcell("conditional", 0.23, 1.0, 0.53, d2=None)],
            "register": [bcell("off", 0, 1.0, 0.32, 0.0), bcell("constant", 0.28, 1.0, 0.34)]}


def second_run(base_rep: float = 0.18) -> dict:
    return {"topic": [bcell("off", 0, 1.0, base_rep, 0.0, d2=0.8), bcell("constant", 0.2, 1.02, 0.21, 5.0, scale=0.5),
                      bcell("conditional", 0.1, 1.0, 0.2, 5.0, scale=0.5), bcell("constant", 0.3, 1.03, 0.6)],
            "char_count": [bcell("off", 0, 1.0, 0.2, 0.0), bcell("constant", 0.16, 1.05, 0.22, 5.0, scale=0.5)]}


def test_merged_cells_join_their_task_and_replace_a_rerun_cell():
    tasks = first_run()
    agree = merge_cells(tasks, second_run(), run=1)
    assert agree == {"topic": True, "char_count": True}
    topic = tasks["topic"]
    assert [(c["policy"], c["alpha"]) for c in topic] == [("off", 0.0), ("constant", 5.0), ("constant", 10.0),
                                                          ("conditional", 5.0), ("conditional", 10.0)]
    assert topic[2]["run"] == 1 and topic[2]["repetition"] == 0.6  # same policy and alpha: the new run's cell
    assert "run" not in topic[4]  # the first run's cell stays
    assert topic[0]["distinct_2"] == 0.8 and topic[0]["distinct_2_from_run"] == 1  # the unsteered cells agree
    assert tasks["char_count"][0]["run"] == 1 and tasks["char_count"][1]["repetition_baseline"] == 0.2


def test_a_merged_cell_is_judged_against_its_own_unsteered_run():
    tasks = first_run()
    agree = merge_cells(tasks, second_run(base_rep=0.30), run=1)
    assert agree["topic"] is False
    assert tasks["topic"][0].get("distinct_2") is None  # another run's unsteered cell fills nothing
    cell = tasks["topic"][1]
    assert cell["repetition_baseline"] == 0.30
    assert steering.loop_free(cell, 0.0)  # its own baseline, not the one passed (0.21 <= 0.30 + 0.05)
    assert not steering.loop_free({"repetition": 0.4}, 0.30)


def test_merge_recounts_the_bar_over_every_cell_and_prints_the_table(tmp_path, capsys):
    out, other = tmp_path / "steering_efficacy.json", tmp_path / "run.json"
    out.write_text(json.dumps({"model": "m", "n_per_task": 60, "tasks": first_run(),
                               "summary": {"verdict_calibration": {"off": {}}}, "config": {"command": "first"}}))
    other.write_text(json.dumps({"bank_version": "b2", "n_per_task": 60, "tasks": second_run(),
                                 "config": {"command": "second", "alpha_scales": [0.5]}}))
    main(["--merge", str(other), "--output", str(out)])
    doc = json.loads(out.read_text())
    bar = doc["summary"]["bar"]["steering_gain"]
    assert bar["tasks"] == ["char_count", "register", "topic"] and bar["met"] is False
    assert doc["summary"]["per_task"]["topic"]["constant_best_loop_free"]["alpha"] == 5.0
    assert doc["summary"]["not_steerable_without_loops"] == []
    assert doc["config"]["merged"][0]["command"] == "second" and doc["summary"]["verdict_calibration"] == {"off": {}}
    assert (tmp_path / "steering_efficacy.png").exists()
    capsys.readouterr()
    main(["--table", "--output", str(out)])
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 + 5 + 2 + 2
    assert "| topic | constant | 0.5 | 5.0 | 0.40 [0.10, 0.90] | +0.20 [+0.10, +0.30] | 1.02 [1.00, 1.04] | " \
           "0.21 (0.18) | 0.90 | 0.80 [0.70, 0.90] | yes |" in rows
    assert rows[-1].endswith("| 0.22 (0.20) | 0.90 | 0.80 [0.70, 0.90] | yes |")


def test_the_table_marks_loops():
    table = markdown_table(first_run())
    assert "| topic | constant | 1 | 10.0 | 0.58 [0.10, 0.90] | +0.38 [+0.28, +0.48] | 1.04 [1.02, 1.06] | " \
           "0.53 (0.18) | - | 0.80 [0.70, 0.90] | no |" in table


def test_a_benchmark_result_marks_looping_tasks_steering_off_in_its_own_words():
    doc = steering.benchmark_doc({"tasks": first_run()})
    reasons = {t: steering.loop_only(r["cells"], "the benchmark") for t, r in doc["tasks"].items()}
    assert reasons["register"] is None
    assert reasons["topic"].startswith("off: every gaining cell of the benchmark loops (rep-3 0.53-0.53 vs 0.18")


def test_mark_bank_writes_the_benchmarks_reason_through_the_sweeps_rule(tmp_path):
    folder = tmp_path / "bank"
    shutil.copytree(DEFAULT_BANK, folder)
    before = ProbeBank.load(folder)
    doc = {"model": before.model, "n_per_task": 60, "tasks": {"lowercase": first_run()["topic"],
                                                                 "register": first_run()["register"]}}
    assert mark_bank(folder, doc, "x.json") == ["lowercase"]
    after = ProbeBank.load(folder)
    record = after.extra["steering"]["lowercase"]
    assert record["steerable"] is False and record["alpha"] == before.extra["steering"]["lowercase"]["alpha"]
    assert after.unsteerable("lowercase").startswith(
        "off: every gaining cell of x.json (test-split prompts, n=60 per task) loops (rep-3 0.53-0.53 vs 0.18")
    assert after.unsteerable("register") is None and after.version == before.version
    assert mark_bank(folder, doc, "x.json") == []  # nothing new: the bank is not rewritten
    with pytest.raises(ValueError, match="the result is of model 'other'"):
        mark_bank(folder, doc | {"model": "other"}, "x.json")
