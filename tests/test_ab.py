"""A/B experiments without a server: the experiments file, the assignment function and `steerer ab assign`,
the outcome log, the statistics (against statsmodels/scipy and published values) and the report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from steerer import stats
from steerer.ab import analysis, render, sequential
from steerer.ab.experiments import (
    ExperimentError,
    ExperimentSet,
    LiveExperiments,
    assign,
    assignments,
    bucket,
    load,
    parse,
    pick,
)
from steerer.ab.outcomes import ArmRecord, OutcomeLog, OutcomeRecord, VerdictRecord, count, repetition
from steerer.metrics import MAX_ARM_LABELS, OTHER, Metrics

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "deploy" / "experiments.yaml"
STEERER = [sys.executable, "-m", "steerer.cli"]


def three_arms(**overrides) -> dict:
    exp = {
        "name": "lc",
        "salt": "s1",
        "arms": [
            {"name": "control", "weight": 50, "policies": {"lowercase": "off"}},
            {"name": "a", "weight": 30, "policies": {"lowercase": "constant:40"}},
            {"name": "b", "weight": 20, "policies": {"lowercase": {"kind": "constant", "alpha": 80}}},
        ],
    }
    exp.update(overrides)
    return {"experiments": [exp]}


def write(tmp_path: Path, data: dict, name: str = "experiments.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STEERER, *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "random"},
    )


# -- experiments file ---------------------------------------------------------------------------------
def test_shipped_example_loads():
    experiments = load(EXAMPLE)
    assert [e.name for e in experiments.running] == ["lowercase-strength"]
    lc = experiments.get("lowercase-strength")
    assert lc.control.name == "control" and lc.tasks == {"lowercase"}
    assert lc.shares == {"control": 0.5, "constant-40": 0.25, "constant-80": 0.25}
    assert lc.arm("constant-80").policies["lowercase"].alpha == 80
    assert not experiments.get("sentiment-conditional").running


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": "bad name"}, "a name of 1-63"),
        ({"status": "paused"}, "status must be one of running, stopped"),
        ({"arms": [{"name": "control", "policies": {"lowercase": "off"}}]}, "arms must be a list of 2"),
        (
            {
                "arms": [
                    {"name": "control", "policies": {"lowercase": "off"}},
                    {"name": "x", "weight": 0, "policies": {"lowercase": "off"}},
                ]
            },
            "weight must be a positive number",
        ),
        (
            {
                "arms": [
                    {"name": "x", "policies": {"lowercase": "off"}},
                    {"name": "y", "policies": {"lowercase": "off"}},
                ]
            },
            "exactly one arm must be the control",
        ),
        (
            {"arms": [{"name": "control", "policies": {"nope": "off"}}, {"name": "y", "policies": {}}]},
            "unknown task 'nope'",
        ),
        (
            {"arms": [{"name": "control", "policies": {"lowercase": "constant:nan"}}, {"name": "y"}]},
            "steering strength must be a finite number",
        ),
        ({"arms": [{"name": "control"}, {"name": "y"}]}, "no arm sets a policy"),
        (
            {"arms": [{"name": "control", "policies": {"lowercase": "off"}}, {"name": "control"}]},
            "arm names must be unique",
        ),
        ({"colour": "red"}, "unknown field(s) colour"),
    ],
)
def test_bad_experiments_are_refused_with_the_reason(tmp_path, change, message):
    with pytest.raises(ExperimentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(write(tmp_path, three_arms(**change)))


def test_running_experiments_may_not_share_a_task_but_a_stopped_one_may():
    first = three_arms()["experiments"][0]
    second = {**first, "name": "lc2"}
    with pytest.raises(ExperimentError, match="both steer lowercase"):
        parse([first, second])
    assert len(parse([first, {**second, "status": "stopped"}])) == 2


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(ExperimentError, match="cannot read"):
        load(tmp_path / "missing.json")
    (tmp_path / "bad.yaml").write_text("experiments: [unclosed")
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ExperimentError, match="not valid JSON"):
        load(tmp_path / "bad.json")


def test_yaml_bare_off_is_the_off_policy(tmp_path):
    (tmp_path / "e.yaml").write_text(
        "experiments:\n- name: x\n  arms:\n  - {name: control, policies: {lowercase: off}}\n"
        "  - {name: steered, policies: {lowercase: 'constant:5'}}\n"
    )
    exp = load(tmp_path / "e.yaml").get("x")
    assert exp.control.policies["lowercase"].kind == "off"


def test_version_changes_with_weights_and_salt_but_not_status():
    base = parse(three_arms())[0]
    assert parse(three_arms(status="stopped"))[0].version == base.version
    assert parse(three_arms(salt="other"))[0].version != base.version
    heavier = three_arms()
    heavier["experiments"][0]["arms"][1]["weight"] = 31
    assert parse(heavier)[0].version != base.version


def test_live_experiments_keep_the_old_set_when_a_reload_fails(tmp_path):
    path = write(tmp_path, three_arms())
    live = LiveExperiments(path)
    path.write_text(json.dumps(three_arms(status="stopped")))
    assert not live.reload().get("lc").running
    path.write_text("{")
    with pytest.raises(ExperimentError):
        live.reload()
    assert not live.current.get("lc").running  # still the last good file


# -- assignment -----------------------------------------------------------------------------------------
def test_pick_follows_cumulative_weights():
    assert [pick(u, [1, 2, 1]) for u in (0.0, 0.2499, 0.25, 0.7499, 0.75, 0.999999)] == [0, 0, 1, 1, 2, 2]


def test_bucket_is_the_documented_hash():
    import hashlib

    digest = hashlib.sha256(b"lc\x00s1\x00user-1").digest()
    assert bucket("lc", "s1", "user-1") == int.from_bytes(digest[:8], "big") / 2**64


def test_assignment_is_uniform_and_independent_between_experiments():
    exp = parse(three_arms())[0]
    keys = [f"user-{i}" for i in range(10_000)]
    arms = [assign(exp, k) for k in keys]
    counts = Counter(arms)
    for arm, share in exp.shares.items():
        assert abs(counts[arm] / len(keys) - share) < 0.02, (arm, counts)
    # Another experiment (another name) splits the same keys independently: within each arm of the first,
    # the second's split is still 50/50.
    other = parse(
        three_arms(
            name="other",
            arms=[
                {"name": "control", "policies": {"lowercase": "off"}},
                {"name": "x", "policies": {"lowercase": "constant:1"}},
            ],
        )
    )[0]
    for arm in exp.shares:
        inside = [assign(other, k) for k, a in zip(keys, arms, strict=True) if a == arm]
        assert abs(inside.count("x") / len(inside) - 0.5) < 0.05
    # A new salt reshuffles: about half the keys change arm in a 50/50 experiment.
    resalted = parse(three_arms(name="other", salt="new", arms=other.as_dict()["arms"]))[0]
    moved = sum(assign(other, k) != assign(resalted, k) for k in keys) / len(keys)
    assert 0.45 < moved < 0.55


def test_assignments_enter_running_experiments_on_their_tasks_and_honour_forcing():
    experiments = ExperimentSet(
        parse(three_arms())
        + parse(
            three_arms(
                name="sent",
                status="stopped",
                arms=[
                    {"name": "control", "policies": {"sentiment": "off"}},
                    {"name": "up", "policies": {"sentiment": "constant:9"}},
                ],
            )
        )
    )
    (only,) = assignments(experiments, "user-1", ["lowercase", "word_count"])
    assert (only.experiment, only.forced) == ("lc", False) and only.arm == assign(
        experiments.get("lc"), "user-1"
    )
    assert assignments(experiments, "", ["lowercase"]) == []  # no key: no experiment
    assert assignments(experiments, "user-1", ["word_count"]) == []  # no task of the experiment
    forced = assignments(experiments, "", ["sentiment"], {"sent": "up"})  # stopped, but QA may force it
    assert [(a.experiment, a.arm, a.forced) for a in forced] == [("sent", "up", True)]
    with pytest.raises(KeyError, match="no arm 'zz'"):
        assignments(experiments, "k", ["lowercase"], {"lc": "zz"})
    with pytest.raises(KeyError, match="no experiment 'nope'"):
        assignments(experiments, "k", ["lowercase"], {"nope": "a"})
    with pytest.raises(ValueError, match="constrains none of them"):
        assignments(experiments, "k", ["word_count"], {"lc": "a"})


def test_cli_assign_is_deterministic_across_runs_and_matches_the_weights(tmp_path):
    """The bar: the same arms in two separate processes (random hash seeds), within 2% of the weights on
    10,000 keys, and the same function the server uses."""
    path = write(tmp_path, three_arms())
    keys = [f"key-{i}" for i in range(10_000)]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    runs = [
        run_cli(
            "ab",
            "assign",
            "--experiments",
            str(path),
            "--experiment",
            "lc",
            "--keys",
            str(tmp_path / "keys.txt"),
        )
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    first = runs[0].stdout.splitlines()
    assert first == runs[1].stdout.splitlines() and len(first) == len(keys)
    exp = load(path).get("lc")
    assert first == [assign(exp, k) for k in keys]
    counts = Counter(first)
    for arm, share in exp.shares.items():
        assert abs(counts[arm] / len(keys) - share) < 0.02, counts
    piped = run_cli(
        "ab",
        "assign",
        "--experiments",
        str(path),
        "--experiment",
        "lc",
        "--keys",
        "-",
        stdin="key-0\nkey-1\n",
    )
    assert piped.stdout.splitlines() == first[:2]


def test_cli_assign_and_check_refuse_bad_input_with_one_line(tmp_path):
    path = write(tmp_path, three_arms())
    missing = run_cli(
        "ab", "assign", "--experiments", str(path), "--experiment", "nope", "--keys", "-", stdin=""
    )
    assert (
        missing.returncode == 2
        and "no experiment 'nope'" in missing.stderr
        and "Traceback" not in missing.stderr
    )
    bad = run_cli("ab", "check", "--experiments", str(write(tmp_path, three_arms(status="x"), "bad.json")))
    assert bad.returncode == 2 and "status must be one of" in bad.stderr
    ok = run_cli("ab", "check", "--experiments", str(EXAMPLE))
    assert ok.returncode == 0 and "lowercase-strength: running" in ok.stdout


# -- metrics labels ---------------------------------------------------------------------------------------
def test_arm_labels_are_bounded():
    metrics = Metrics()
    many = [
        {
            "name": f"e{i}",
            "arms": [
                {"name": f"a{j}", "control": j == 0, "policies": {"lowercase": "off"}} for j in range(8)
            ],
            "status": "stopped",
        }
        for i in range(6)
    ]
    metrics.set_experiments(ExperimentSet(parse(many)), ["lowercase"])
    pairs = {metrics.arm_label(f"e{i}", f"a{j}") for i in range(6) for j in range(8)}
    assert len(pairs - {OTHER}) == MAX_ARM_LABELS and OTHER in pairs
    assert metrics.arm_label("not", "configured") == OTHER
    assert metrics.arm_label("e0", "a0") == ("e0", "a0")


# -- outcome log -----------------------------------------------------------------------------------------
def record(
    i: int,
    arm: str,
    satisfied: bool | None,
    latency: float = 0.5,
    forced: bool = False,
    version: str = "v1",
    tokens: tuple[int, ...] = (5, 6, 7, 8),
) -> OutcomeRecord:
    verdict = VerdictRecord(
        "lowercase",
        {},
        "constant" if arm != "control" else "off",
        0.0 if arm == "control" else 80.0,
        satisfied,
        False,
        0.5,
        False,
        False,
        None,
        0,
        3 if arm != "control" else 0,
    )
    return OutcomeRecord(
        f"r{i}",
        f"k{i}",
        "m",
        "b",
        "List three tips.",
        None,
        "text",
        list(tokens),
        "length",
        10,
        latency,
        0.05,
        [verdict],
        [ArmRecord("lc", arm, forced, version)],
    )


def test_outcome_log_is_wal_and_commits_each_record(tmp_path):
    log = OutcomeLog(tmp_path / "o.sqlite")
    log.note_experiments(parse(three_arms()))
    assert log.write(record(0, "control", True)) == 1
    # Committed: another connection sees it while the writer is still open.
    other = sqlite3.connect(tmp_path / "o.sqlite")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT request_id, repetition FROM outcomes").fetchall() == [("r0", 0.0)]
    assert other.execute("SELECT task, satisfied, policy FROM verdicts").fetchall() == [
        ("lowercase", 1, "off")
    ]
    other.close()
    log.close()
    assert log.write(record(1, "a", None)) == 2  # a late record after close still lands
    assert count(tmp_path / "o.sqlite") == 2


def test_repetition_is_the_share_of_repeated_trigrams():
    assert repetition([1, 2]) is None
    assert repetition([1, 2, 3, 4]) == 0.0
    assert repetition([1, 2, 3] * 4) == pytest.approx(1 - 3 / 10)


# -- statistics ---------------------------------------------------------------------------------------------
def test_normal_mixture_boundary_matches_published_values():
    """confseq's unit tests (values from the R reference implementation of Howard et al. 2021):
    TwoSidedNormalMixture::best_rho(100, 0.05) = 12.60056 and normal_mixture_bound(100, 0.05, 100, 0.05,
    two-sided) = 30.35209."""
    assert sequential.normal_mixture_rho(100, 0.05) == pytest.approx(12.60056, abs=1e-5)
    assert sequential.normal_mixture_bound(100, 0.05, 100) == pytest.approx(30.35209, abs=1e-5)


def test_asymptotic_radius_is_the_papers_closed_form():
    """Waudby-Smith et al. (2024): sigma * sqrt(2 (t rho^2 + 1) / (t^2 rho^2) * log(sqrt(t rho^2 + 1) / alpha))
    with rho^2 = (-2 log alpha + log(-2 log alpha + 1)) / t_opt."""
    alpha, t_opt, sigma = 0.05, 500.0, 0.7
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / t_opt
    for t in (10, 100, 500, 5000):
        paper = sigma * math.sqrt(
            2 * (t * rho2 + 1) / (t * t * rho2) * math.log(math.sqrt(t * rho2 + 1) / alpha)
        )
        assert sequential.asymptotic_radius(np.array([t]), np.array([sigma]), alpha, t_opt)[
            0
        ] == pytest.approx(paper)


def test_peeking_at_the_confidence_sequence_keeps_false_positives_below_alpha():
    """Under no difference, looking after every response: the sequence excludes 0 at some look in at most
    ~5% of experiments, while the fixed-horizon z interval looked at as often does so far more often."""
    rng = np.random.default_rng(0)
    sims, n, alpha = 300, 2000, 0.05
    y = (rng.random((sims, n)) < 0.3).astype(float)
    in_arm = rng.random((sims, n)) < 0.5
    t = np.arange(1, n + 1)
    phi = np.where(in_arm, y / 0.5, -y / 0.5)
    mean = np.cumsum(phi, 1) / t
    sd = np.sqrt(np.maximum(np.cumsum(phi**2, 1) / t - mean**2, 0))
    radius = sequential.asymptotic_radius(t, sd, alpha, 500)
    burn = 60
    cs_false = (np.abs(mean[:, burn:]) > radius[:, burn:]).any(1).mean()
    naive_false = (np.abs(mean[:, burn:]) > 1.96 * sd[:, burn:] / np.sqrt(t[burn:])).any(1).mean()
    assert cs_false <= 0.06, cs_false
    assert naive_false > 3 * alpha, naive_false


def test_difference_sequence_finds_a_real_difference():
    rng = np.random.default_rng(1)
    in_arm = rng.random(400) < 0.5
    y = np.where(in_arm, rng.random(400) < 0.8, rng.random(400) < 0.2).astype(float)
    result = sequential.difference_sequence(y, in_arm, 0.5)
    assert result.low > 0.3 and result.high < 0.9 and 30 <= result.first_excluding_zero < 400
    assert result.burn_in == 30 and result.first_is_floor == (result.first_excluding_zero == 30)


def test_a_crossing_at_the_burn_in_is_reported_as_the_floor_not_a_measurement():
    """A difference so large that the sequence excludes 0 as soon as crossings count: the report must say the
    n is the burn-in floor (JSON flag and markdown wording), not quote it as when the difference showed."""
    rng = np.random.default_rng(3)
    in_arm = np.arange(400) % 2 == 0
    y = np.where(in_arm, rng.random(400) < 0.97, rng.random(400) < 0.02).astype(float)
    strong = sequential.difference_sequence(y, in_arm, 0.5, burn_in=60)
    assert strong.first_excluding_zero == 60 and strong.first_is_floor
    weak = sequential.difference_sequence(y, in_arm, 0.5, burn_in=4)
    assert weak.first_excluding_zero < 60 and not weak.first_is_floor  # what was observed without the floor
    floor = analysis.Difference("t", "a", "c", True, 200, 200, 0.9, 0.8, 1.0, 0.0, 400, 0.7, 1.0, 60, 60, True,
                                None, "decided")
    assert render.first_excluded(floor) == "60 (at the burn-in floor)"
    later = dataclasses.replace(floor, cs_first_excluding_zero=153, cs_first_is_floor=False)
    assert render.first_excluded(later) == "153"


def test_two_proportions_and_wilson_agree_with_the_libraries():
    from statsmodels.stats.proportion import proportion_confint

    for s, n, alpha in ((7, 20, 0.05), (1, 50, 0.05), (29, 30, 0.1), (0, 12, 0.05), (12, 12, 0.01)):
        assert stats.wilson(s, n, alpha) == pytest.approx(proportion_confint(s, n, alpha=alpha, method="wilson"))
    assert stats.wilson(0, 20)[0] == 0.0 and stats.wilson(20, 20)[1] == 1.0 and stats.wilson(0, 0) is None
    with pytest.raises(ValueError, match="successes <= n"):
        stats.wilson(3, 2)
    diff, low, high, p = stats.two_proportions(30, 40, 5, 40)
    assert diff == pytest.approx(0.625) and 0.4 < low < diff < high < 0.8 and p < 1e-6
    # Newcombe's hybrid score interval for 56/70 vs 48/80 (Newcombe 1998, Table II, example (a)):
    # difference 0.2, interval [0.0524, 0.3339].
    _, low, high, _ = stats.two_proportions(56, 70, 48, 80)
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=1e-4)


# -- the report --------------------------------------------------------------------------------------------
@pytest.fixture
def synthetic_log(tmp_path) -> Path:
    """Control complies 20%, arm a 80% (b: 50%); latency higher in the steered arms; plus noise that the
    report must leave out: forced QA records and records of an older version."""
    rng = np.random.default_rng(2)
    exp = parse(three_arms())[0]
    log = OutcomeLog(tmp_path / "o.sqlite")
    log.note_experiments([exp])
    rates = {"control": 0.2, "a": 0.8, "b": 0.5}
    log.write(record(901, "control", True, version="old"))  # before a change of weights
    for i in range(600):
        arm = assign(exp, f"k{i}")
        tokens = (1, 2, 3, 1, 2, 3) if arm != "control" else (1, 2, 3, 4, 5, 6)
        log.write(
            record(
                i,
                arm,
                bool(rng.random() < rates[arm]),
                0.5 + 0.1 * (arm != "control") + rng.random() * 0.05,
                version=exp.version,
                tokens=tokens,
            )
        )
    log.write(record(900, "a", False, forced=True, version=exp.version))
    log.close()
    return tmp_path / "o.sqlite"


def test_report_finds_the_difference_and_says_when_the_sample_is_too_small(synthetic_log, tmp_path):
    report = analysis.analyse(synthetic_log)
    assert report.records == 600 and report.excluded_forced == 1 and report.excluded_other_versions == 1
    assert not report.sample_ratio.mismatch
    by = {(d.task, d.arm): d for d in report.differences}
    a = by[("lowercase", "a")]
    assert 0.5 < a.difference < 0.7 and a.low > 0.4 and a.cs_low > 0 and "higher than control" in a.decision
    latency = next(m for m in report.metrics if m.metric == "latency_s" and m.arm == "a")
    assert latency.low > 0.08 and latency.high < 0.12
    repeat = next(m for m in report.metrics if m.metric == "repetition" and m.arm == "a")
    assert repeat.difference == pytest.approx(0.25)
    paths = render.write_report(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["experiment"] == "lc"
    assert "## Difference to control" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"

    # The first 40 records only: every arm under 30 checked responses -> "too small to decide".
    db = sqlite3.connect(synthetic_log)
    db.execute("DELETE FROM verdicts WHERE outcome_id > 41")
    db.execute("DELETE FROM assignments WHERE outcome_id > 41")
    db.execute("DELETE FROM outcomes WHERE id > 41")
    db.commit()
    small = analysis.analyse(db, "lc")
    assert all(d.decision.startswith("too small to decide") for d in small.differences)
    assert any("too small to decide" in line for line in small.summary)


def test_report_flags_a_sample_ratio_mismatch(synthetic_log):
    db = sqlite3.connect(synthetic_log)
    control = [
        r[0]
        for r in db.execute("SELECT outcome_id FROM assignments WHERE arm = 'control' AND version != 'old'")
    ]
    drop = control[: len(control) // 3]  # a third of the control arm's records lost: logging is broken
    db.executemany("DELETE FROM assignments WHERE outcome_id = ?", [(i,) for i in drop])
    db.commit()
    report = analysis.analyse(db, "lc")
    assert report.sample_ratio.mismatch and report.sample_ratio.p_value < 0.001
    assert report.summary[0].startswith("SAMPLE RATIO MISMATCH")


def test_report_cli(synthetic_log, tmp_path):
    out = run_cli("ab", "report", "--log", str(synthetic_log), "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# A/B report: lc") and (tmp_path / "r" / "compliance.png").is_file()
    missing = run_cli("ab", "report", "--log", str(tmp_path / "nope.sqlite"))
    assert missing.returncode == 2 and "no outcome log" in missing.stderr
    unknown = run_cli("ab", "report", "--log", str(synthetic_log), "--experiment", "zz")
    assert unknown.returncode == 2 and "zz" in unknown.stderr


def test_serve_refuses_a_bad_experiments_file_with_one_line(tmp_path):
    bad = run_cli(
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--experiments",
        str(write(tmp_path, three_arms(status="paused"))),
    )
    assert bad.returncode == 2 and "status must be one of running, stopped" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run_cli(
        "serve", "--port", "0", "--metrics-port", "-1", "--experiments", str(tmp_path / "nope.yaml")
    )
    assert missing.returncode == 2 and "experiments file not found" in missing.stderr
