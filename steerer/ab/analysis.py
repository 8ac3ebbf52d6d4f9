"""The A/B report: per arm and task compliance, differences to the control, latency and fluency, the
sample-ratio check and the always-valid sequential result, from an outcome log.

    from steerer.ab.analysis import analyse
    from steerer.ab.render import write_report
    report = analyse("outcomes.sqlite", "lowercase-strength")
    write_report(report, "reports/ab")          # report.md, report.json, compliance.png

The report is split by job: `records` reads the log, this module decides (per arm and task),
`render` writes markdown, JSON and the plot, and the statistics are the project's `steerer.stats` (Wilson
intervals per proportion, Newcombe's interval and a score test for a difference, Welch's t interval for
latency and fluency, a chi-square test of the arm counts against the weights) and `steerer.ab.sequential`
(the always-valid confidence sequence).

Which records: the latest version of the experiment (arms, weights, policies and salt unchanged), not
forced (forced arms are QA traffic, not randomized). A task's compliance counts the responses whose
checker gave a verdict. The unit of analysis is the response; randomization is per key, so when keys send
many responses each, intervals are optimistic (the report says how many responses per key it saw).
"""

from __future__ import annotations

import dataclasses
import math
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steerer.ab import records
from steerer.ab.outcomes import connect
from steerer.ab.records import Row, experiments_in
from steerer.ab.sequential import difference_sequence
from steerer.stats import chi_square, needed_per_arm, two_proportions, welch, wilson

MIN_PER_ARM = 30  # checked responses per arm before any interval of a proportion is trusted
BURN_IN = 2 * MIN_PER_ARM  # responses (arm + control) before a crossing of zero by the sequence counts
SRM_P = 0.001  # a sample-ratio mismatch: the arm counts are this unlikely under the configured weights

__all__ = ["BURN_IN", "MIN_PER_ARM", "SRM_P", "ArmInfo", "Compliance", "Difference", "MeanDifference", "Report",
           "SampleRatio", "analyse", "experiments_in", "sample_ratio", "wilson"]  # wilson: old import path


@dataclass(frozen=True)
class ArmInfo:
    name: str
    share: float
    control: bool
    policies: dict[str, dict]
    responses: int
    keys: int


@dataclass(frozen=True)
class Compliance:
    task: str
    arm: str
    n: int  # responses with a checker verdict
    satisfied: int
    rate: float | None
    low: float | None  # Wilson interval
    high: float | None
    steered_share: float | None  # share of response tokens generated with steering on this task


@dataclass(frozen=True)
class Difference:
    task: str
    arm: str
    control: str
    primary: (
        bool  # the experiment steers this task (else a guardrail: another constraint of the same requests)
    )
    n_arm: int
    n_control: int
    difference: float | None  # rate(arm) - rate(control)
    low: (
        float | None
    )  # Newcombe interval (fixed horizon: valid for one look at a sample size fixed in advance)
    high: float | None
    p_value: float | None  # two-proportion z-test
    cs_n: int | None
    cs_low: float | None  # always-valid confidence sequence, read now (valid at every look)
    cs_high: float | None
    cs_first_excluding_zero: int | None  # first n (arm + control, at or after cs_burn_in) it excluded 0
    cs_burn_in: int | None  # the floor: crossings before this n are not counted (the variance is unsettled)
    cs_first_is_floor: bool | None  # True: it already excluded 0 at the floor; the figure is not a measurement
    needed_per_arm: (
        int | None
    )  # fixed-horizon responses per arm (equal split) for 80% power at the observed rates
    decision: str


@dataclass(frozen=True)
class MeanDifference:
    metric: str
    arm: str
    control: str
    n_arm: int
    n_control: int
    mean_arm: float | None
    mean_control: float | None
    difference: float | None
    low: float | None  # Welch t interval
    high: float | None
    p_value: float | None


@dataclass(frozen=True)
class SampleRatio:
    unit: str
    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float | None
    p_value: float | None
    mismatch: bool


@dataclass
class Report:
    experiment: str
    version: str
    description: str
    alpha: float
    arms: list[ArmInfo]
    records: int
    excluded_forced: int
    excluded_other_versions: int
    responses_per_key: float | None
    compliance: list[Compliance]
    differences: list[Difference]
    metrics: list[MeanDifference]
    sample_ratio: SampleRatio
    perplexity_model: str | None
    summary: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return _finite(dataclasses.asdict(self))


def sample_ratio(observed: dict[str, int], shares: dict[str, float], unit: str) -> SampleRatio:
    total = sum(observed.values())
    expected = {arm: total * share for arm, share in shares.items()}
    if total == 0 or len(shares) < 2:
        return SampleRatio(unit, observed, expected, None, None, False)
    chi2, p = chi_square([observed.get(a, 0) for a in shares], [expected[a] for a in shares])
    return SampleRatio(unit, observed, expected, chi2, p, bool(p < SRM_P))


# -- the report -------------------------------------------------------------------------------------------
def analyse(
    log: str | Path | sqlite3.Connection,
    experiment: str | None = None,
    *,
    alpha: float = 0.05,
    version: str | None = None,
    perplexity_model: str | None = None,
    t_opt: float = 500,
) -> Report:
    """The report for one experiment (the only one in the log when `experiment` is None).

    `perplexity_model`: the weight fingerprint whose cached perplexities to use (`fluency.fill_perplexity`
    fills them); None: the only model that scored this log, if any."""
    db = log if isinstance(log, sqlite3.Connection) else connect(log, readonly=True)
    try:
        return _analyse(db, experiment, alpha, version, perplexity_model, t_opt)
    finally:
        if db is not log:
            db.close()


def _analyse(
    db: sqlite3.Connection,
    experiment: str | None,
    alpha: float,
    version: str | None,
    perplexity_model: str | None,
    t_opt: float,
) -> Report:
    names = experiments_in(db)
    if experiment is None:
        if len(names) != 1:
            raise ValueError(
                f"the log has {len(names)} experiments ({', '.join(names) or 'none'}); name one with "
                f"--experiment"
            )
        experiment = names[0]
    version, config = records.config(db, experiment, version)
    if perplexity_model is None:
        models = [r[0] for r in db.execute("SELECT DISTINCT model FROM perplexity")]
        perplexity_model = models[0] if len(models) == 1 else None
    rows = records.rows(db, experiment, version, perplexity_model)
    forced = db.execute(
        "SELECT COUNT(*) FROM assignments WHERE experiment = ? AND forced = 1", (experiment,)
    ).fetchone()[0]
    others = db.execute(
        "SELECT COUNT(*) FROM assignments WHERE experiment = ? AND forced = 0 AND version != ?",
        (experiment, version),
    ).fetchone()[0]
    total_weight = sum(a["weight"] for a in config["arms"])
    shares = {a["name"]: a["weight"] / total_weight for a in config["arms"]}
    control = next(a["name"] for a in config["arms"] if a["control"])
    primary = sorted({t for a in config["arms"] for t in a["policies"]})
    by_arm: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_arm[row.arm].append(row)
    arms = [
        ArmInfo(
            a["name"],
            shares[a["name"]],
            a["control"],
            a["policies"],
            len(by_arm[a["name"]]),
            len({r.key_hash for r in by_arm[a["name"]] if r.key_hash}),
        )
        for a in config["arms"]
    ]
    keys = sum(a.keys for a in arms)
    tasks = primary + sorted({t for r in rows for t in r.verdicts} - set(primary))
    compliance = [_compliance(task, arm.name, by_arm[arm.name], alpha) for task in tasks for arm in arms]
    rate = {(c.task, c.arm): c for c in compliance}
    differences = [
        _difference(task, arm.name, control, task in primary, rate, rows, shares, alpha, t_opt)
        for task in tasks
        for arm in arms
        if arm.name != control
    ]
    metrics = []
    for metric, values in (
        ("latency_s", lambda r: r.latency_s),
        ("ttft_s", lambda r: r.ttft_s),
        ("completion_tokens", lambda r: r.completion_tokens),
        ("repetition", lambda r: r.repetition),
        ("perplexity_nll", lambda r: r.nll),
    ):
        for arm in arms:
            if arm.name == control:
                continue
            a = [v for r in by_arm[arm.name] if (v := values(r)) is not None]
            b = [v for r in by_arm[control] if (v := values(r)) is not None]
            if metric == "perplexity_nll" and not (a or b):
                continue
            metrics.append(MeanDifference(metric, arm.name, control, len(a), len(b), *welch(a, b, alpha)))
    srm_counts = {a.name: a.keys for a in arms} if keys else {a.name: a.responses for a in arms}
    report = Report(
        experiment,
        version,
        config.get("description", ""),
        alpha,
        arms,
        len(rows),
        forced,
        others,
        len(rows) / keys if keys else None,
        compliance,
        differences,
        metrics,
        sample_ratio(srm_counts, shares, "keys" if keys else "responses"),
        perplexity_model,
    )
    report.summary = _summary(report)
    return report


def _compliance(task: str, arm: str, rows: list[Row], alpha: float) -> Compliance:
    verdicts = [r.verdicts[task] for r in rows if task in r.verdicts]
    checked = [s for s, _ in verdicts if s is not None]
    n, ok = len(checked), sum(checked)
    low, high = wilson(ok, n, alpha) or (None, None)
    tokens = sum(r.completion_tokens for r in rows if task in r.verdicts)
    steered = sum(st for _, st in verdicts)
    return Compliance(
        task, arm, n, ok, ok / n if n else None, low, high, steered / tokens if tokens else None
    )


def _difference(
    task: str,
    arm: str,
    control: str,
    primary: bool,
    rate: dict,
    rows: list[Row],
    shares: dict[str, float],
    alpha: float,
    t_opt: float,
) -> Difference:
    a, c = rate[(task, arm)], rate[(task, control)]
    diff = low = high = p = None
    if a.n and c.n:
        diff, low, high, p = two_proportions(a.satisfied, a.n, c.satisfied, c.n, alpha)
    pairs = [
        (r.verdicts[task][0], r.arm == arm)
        for r in rows
        if r.arm in (arm, control) and task in r.verdicts and r.verdicts[task][0] is not None
    ]
    seq = None
    if pairs:
        y, in_arm = np.array([float(s) for s, _ in pairs]), np.array([x for _, x in pairs])
        seq = difference_sequence(
            y, in_arm, shares[arm] / (shares[arm] + shares[control]), alpha, t_opt, burn_in=BURN_IN
        )
    needed = None
    if a.n and c.n:
        needed = needed_per_arm(a.rate, c.rate, alpha)
    return Difference(
        task,
        arm,
        control,
        primary,
        a.n,
        c.n,
        diff,
        low,
        high,
        p,
        seq.n if seq else None,
        seq.low if seq else None,
        seq.high if seq else None,
        seq.first_excluding_zero if seq else None,
        seq.burn_in if seq else None,
        seq.first_is_floor if seq else None,
        needed,
        _decision(a.n, c.n, diff, low, high, seq, needed, alpha),
    )


def _decision(n_arm: int, n_control: int, diff, low, high, seq, needed: int | None, alpha: float) -> str:
    level = f"{100 * (1 - alpha):g}%"
    if min(n_arm, n_control) < MIN_PER_ARM:
        more = f"; about {needed} per arm would detect the difference seen so far" if needed else ""
        return (
            f"too small to decide: {n_arm} vs {n_control} checked responses, fewer than {MIN_PER_ARM} in an "
            f"arm{more}"
        )
    if seq is not None and (seq.low > 0 or seq.high < 0):
        direction = "higher" if seq.low > 0 else "lower"
        return (
            f"compliance is {direction} than control: the always-valid {level} interval "
            f"[{seq.low:+.3f}, {seq.high:+.3f}] excludes 0"
        )
    if low is not None and (low > 0 or high < 0):
        return (
            "not yet decided: the fixed-horizon interval excludes 0 but the always-valid one does not; "
            "keep the experiment running (stopping on this look would inflate false positives)"
        )
    more = f"; about {needed} per arm would detect the difference seen so far" if needed else ""
    return f"no difference detected{more}"


def _summary(report: Report) -> list[str]:
    lines = []
    if report.records == 0:
        return [f"no randomized records of {report.experiment} (version {report.version}) yet"]
    if report.sample_ratio.mismatch:
        lines.append(
            f"SAMPLE RATIO MISMATCH (chi-square p = {report.sample_ratio.p_value:.2g}): the arms' "
            f"{report.sample_ratio.unit} do not match the weights; assignment or logging is broken, "
            f"do not trust the comparisons"
        )
    for d in report.differences:
        if d.primary:
            lines.append(f"{d.task}, {d.arm} vs {d.control}: {d.decision}")
    if report.excluded_other_versions:
        lines.append(
            f"{report.excluded_other_versions} records under earlier versions of the experiment (other "
            f"weights, arms or salt) are left out"
        )
    if report.responses_per_key is not None and report.responses_per_key > 1.5:
        lines.append(
            f"{report.responses_per_key:.1f} responses per key: intervals treat responses as independent "
            f"and are optimistic"
        )
    return lines


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
