"""The A/B report: per arm and task compliance, differences to the control, latency and fluency, the
sample-ratio check and the always-valid sequential result, from an outcome log.

    from steerer.ab.analysis import analyse, write_report
    report = analyse("outcomes.sqlite", "lowercase-strength")
    write_report(report, "reports/ab")          # report.md, report.json, compliance.png

Statistics come from statsmodels and scipy: Wilson intervals per proportion, Newcombe's (Wilson-based)
interval and a two-proportion z-test for a difference, Welch's t interval for latency and fluency,
a chi-square test of the arm counts against the weights. The sequential result is `steerer.ab.sequential`.

Which records: the latest version of the experiment (arms, weights, policies and salt unchanged), not
forced (forced arms are QA traffic, not randomized). A task's compliance counts the responses whose
checker gave a verdict. The unit of analysis is the response; randomization is per key, so when keys send
many responses each, intervals are optimistic (the report says how many responses per key it saw).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steerer.ab.outcomes import connect
from steerer.ab.sequential import difference_sequence

MIN_PER_ARM = 30  # checked responses per arm before any interval of a proportion is trusted
SRM_P = 0.001  # a sample-ratio mismatch: the arm counts are this unlikely under the configured weights
POWER = 0.8


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
    cs_first_excluding_zero: int | None
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


# -- loading ----------------------------------------------------------------------------------------------
@dataclass
class _Row:
    id: int
    arm: str
    key_hash: str | None
    latency_s: float
    ttft_s: float | None
    repetition: float | None
    completion_tokens: int
    nll: float | None = None
    verdicts: dict[str, tuple[bool | None, int]] = field(default_factory=dict)  # task -> (satisfied, steered)


def experiments_in(db: sqlite3.Connection) -> list[str]:
    return [r[0] for r in db.execute("SELECT DISTINCT experiment FROM assignments ORDER BY experiment")]


def _config(db: sqlite3.Connection, experiment: str, version: str | None) -> tuple[str, dict]:
    if version is None:  # the version of the latest record (what is running now)
        row = db.execute(
            "SELECT version FROM assignments WHERE experiment = ? AND forced = 0 "
            "ORDER BY outcome_id DESC LIMIT 1",
            (experiment,),
        ).fetchone()
        if row is None:
            row = db.execute(
                "SELECT version FROM experiments WHERE name = ? ORDER BY first_seen DESC LIMIT 1",
                (experiment,),
            ).fetchone()
        if row is None:
            raise ValueError(f"no records and no configuration of experiment {experiment!r} in the log")
        version = row[0]
    config = db.execute("SELECT config FROM experiments WHERE version = ?", (version,)).fetchone()
    if config is None:
        raise ValueError(f"the log has no configuration for version {version} of {experiment!r}")
    return version, json.loads(config[0])


def _rows(db: sqlite3.Connection, experiment: str, version: str, perplexity_model: str | None) -> list[_Row]:
    rows: dict[int, _Row] = {}
    query = (
        "SELECT o.id, a.arm, o.key_hash, o.latency_s, o.ttft_s, o.repetition, o.completion_tokens, p.nll "
        "FROM assignments a JOIN outcomes o ON o.id = a.outcome_id "
        "LEFT JOIN perplexity p ON p.outcome_id = o.id AND p.model = ? "
        "WHERE a.experiment = ? AND a.version = ? AND a.forced = 0 ORDER BY o.id"
    )
    for r in db.execute(query, (perplexity_model or "", experiment, version)):
        rows[r[0]] = _Row(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
    if rows:
        for r in db.execute(
            "SELECT v.outcome_id, v.task, v.satisfied, v.steered_tokens FROM verdicts v "
            "JOIN assignments a ON a.outcome_id = v.outcome_id "
            "WHERE a.experiment = ? AND a.version = ? AND a.forced = 0",
            (experiment, version),
        ):
            rows[r[0]].verdicts[r[1]] = (None if r[2] is None else bool(r[2]), int(r[3]))
    return list(rows.values())


# -- statistics -------------------------------------------------------------------------------------------
def wilson(successes: int, n: int, alpha: float = 0.05) -> tuple[float | None, float | None]:
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return None, None
    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return float(low), float(high)


def two_proportions(
    s1: int, n1: int, s0: int, n0: int, alpha: float = 0.05
) -> tuple[float, float, float, float]:
    """(difference, Newcombe low, high, two-sided z-test p) for rate1 - rate0."""
    from statsmodels.stats.proportion import confint_proportions_2indep, test_proportions_2indep

    with np.errstate(divide="ignore", invalid="ignore"):  # statsmodels also computes ratios, undefined at 0
        low, high = confint_proportions_2indep(s1, n1, s0, n0, method="newcomb", compare="diff", alpha=alpha)
        test = test_proportions_2indep(s1, n1, s0, n0, method="score", compare="diff")
    p = float(test.pvalue)
    return s1 / n1 - s0 / n0, float(low), float(high), p if math.isfinite(p) else 1.0


def needed_per_arm(p1: float, p0: float, alpha: float = 0.05, power: float = POWER) -> int | None:
    """Responses per arm (equal split) a fixed-horizon test needs to detect p1 vs p0 with 80% power (Cohen's
    h); None if p1 == p0. A planning figure, not a stopping rule."""
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    h = proportion_effectsize(p1, p0)
    if not math.isfinite(h) or abs(h) < 1e-9:
        return None
    n = NormalIndPower().solve_power(effect_size=abs(h), alpha=alpha, power=power, ratio=1.0)
    return int(math.ceil(float(np.asarray(n).item())))


def welch(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> tuple[float | None, ...]:
    """(mean a, mean b, difference, low, high, p) by Welch's t-test; None where there are too few values."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    mean_a = float(a.mean()) if len(a) else None
    mean_b = float(b.mean()) if len(b) else None
    if len(a) < 2 or len(b) < 2:
        diff = None if mean_a is None or mean_b is None else mean_a - mean_b
        return mean_a, mean_b, diff, None, None, None
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # no spread: the test is undefined; the difference is exact
        return (
            mean_a,
            mean_b,
            mean_a - mean_b,
            mean_a - mean_b,
            mean_a - mean_b,
            1.0 if mean_a == mean_b else 0.0,
        )
    with warnings.catch_warnings():  # scipy warns on nearly constant samples; the interval is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_ind(a, b, equal_var=False)
        ci = test.confidence_interval(1 - alpha)
    return mean_a, mean_b, mean_a - mean_b, float(ci.low), float(ci.high), float(test.pvalue)


def sample_ratio(observed: dict[str, int], shares: dict[str, float], unit: str) -> SampleRatio:
    from scipy import stats

    total = sum(observed.values())
    expected = {arm: total * share for arm, share in shares.items()}
    if total == 0 or len(shares) < 2:
        return SampleRatio(unit, observed, expected, None, None, False)
    chi2, p = stats.chisquare([observed.get(a, 0) for a in shares], [expected[a] for a in shares])
    return SampleRatio(unit, observed, expected, float(chi2), float(p), bool(p < SRM_P))


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
    version, config = _config(db, experiment, version)
    if perplexity_model is None:
        models = [r[0] for r in db.execute("SELECT DISTINCT model FROM perplexity")]
        perplexity_model = models[0] if len(models) == 1 else None
    rows = _rows(db, experiment, version, perplexity_model)
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
    by_arm: dict[str, list[_Row]] = defaultdict(list)
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


def _compliance(task: str, arm: str, rows: list[_Row], alpha: float) -> Compliance:
    verdicts = [r.verdicts[task] for r in rows if task in r.verdicts]
    checked = [s for s, _ in verdicts if s is not None]
    n, ok = len(checked), sum(checked)
    low, high = wilson(ok, n, alpha)
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
    rows: list[_Row],
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
            y, in_arm, shares[arm] / (shares[arm] + shares[control]), alpha, t_opt, burn_in=2 * MIN_PER_ARM
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


# -- output -----------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def to_markdown(report: Report) -> str:
    r = report
    level = f"{100 * (1 - r.alpha):g}%"
    out = [f"# A/B report: {r.experiment}", ""]
    if r.description:
        out += [r.description, ""]
    out += [
        f"Version `{r.version}`; {r.records} randomized responses"
        + (f" from {sum(a.keys for a in r.arms)} keys" if r.responses_per_key else "")
        + f"; {r.excluded_forced} forced (QA) and {r.excluded_other_versions} of other versions left out.",
        "",
        "## Summary",
        "",
    ]
    out += [f"- {line}" for line in r.summary] + [""]
    out += [
        "## Arms",
        "",
        "| arm | control | weight share | policies | responses | keys |",
        "|---|---|---|---|---|---|",
    ]
    for a in r.arms:
        policies = (
            ", ".join(f"{t}: {p['kind']} {p['alpha']:g}" for t, p in a.policies.items()) or "request's own"
        )
        out.append(
            f"| {a.name} | {'yes' if a.control else ''} | {a.share:.3f} | {policies} | {a.responses} | {a.keys} |"
        )
    srm = r.sample_ratio
    out += [
        "",
        f"Sample ratio ({srm.unit}): chi-square {_fmt(srm.chi2, '.2f')}, p = {_fmt(srm.p_value, '.3g')}"
        f" ({'MISMATCH' if srm.mismatch else 'consistent with the weights'}; mismatch below p = {SRM_P}).",
        "",
    ]
    out += [
        "## Compliance",
        "",
        f"Checker verdicts; Wilson {level} intervals.",
        "",
        "| task | arm | n | satisfied | compliance | interval | steered tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in r.compliance:
        out.append(
            f"| {c.task} | {c.arm} | {c.n} | {c.satisfied} | {_fmt(c.rate)} | [{_fmt(c.low)}, {_fmt(c.high)}] | "
            f"{_fmt(c.steered_share, '.0%')} |"
        )
    out += [
        "",
        "## Difference to control",
        "",
        f"Fixed horizon: Newcombe {level} interval and two-proportion z-test (valid for one look at a sample "
        f"size fixed in advance). Always valid: the {level} confidence sequence, valid at every look.",
        "",
        "| task | arm | n arm / control | difference | fixed interval | p | always-valid interval | "
        "first excluded 0 at n | decision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in r.differences:
        task = d.task if d.primary else f"{d.task} (guardrail)"
        out.append(
            f"| {task} | {d.arm} | {d.n_arm} / {d.n_control} | {_fmt(d.difference, '+.3f')} | "
            f"[{_fmt(d.low, '+.3f')}, {_fmt(d.high, '+.3f')}] | {_fmt(d.p_value, '.3g')} | "
            f"[{_fmt(d.cs_low, '+.3f')}, {_fmt(d.cs_high, '+.3f')}] | {d.cs_first_excluding_zero or '-'} | "
            f"{d.decision} |"
        )
    out += [
        "",
        "## Latency and fluency",
        "",
        f"Arm minus control, Welch {level} interval. `repetition` is the online fluency stand-in (rep-3: share "
        f"of repeated token 3-grams; higher is worse); `perplexity_nll` is the unsteered model's mean NLL per "
        f"response token (exp of the difference is the perplexity ratio), when `--model` scored the log.",
        "",
        "| metric | arm | n arm / control | mean arm | mean control | difference | interval | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in r.metrics:
        out.append(
            f"| {m.metric} | {m.arm} | {m.n_arm} / {m.n_control} | {_fmt(m.mean_arm, '.4g')} | "
            f"{_fmt(m.mean_control, '.4g')} | {_fmt(m.difference, '+.4g')} | "
            f"[{_fmt(m.low, '+.4g')}, {_fmt(m.high, '+.4g')}] | {_fmt(m.p_value, '.3g')} |"
        )
    return "\n".join(out) + "\n"


def plot(report: Report, path: str | Path) -> Path:
    """Compliance by arm with Wilson intervals, one panel per task (the experiment's tasks first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c.task for c in report.compliance))
    fig, axes = plt.subplots(
        1,
        max(len(tasks), 1),
        figsize=(1.8 + 2.2 * max(len(tasks), 1) * max(1, len(report.arms) / 2), 3.6),
        squeeze=False,
    )
    for ax, task in zip(axes[0], tasks, strict=False):
        rows = [c for c in report.compliance if c.task == task]
        x = np.arange(len(rows))
        rates = [c.rate if c.rate is not None else np.nan for c in rows]
        err = np.array(
            [[c.rate - c.low, c.high - c.rate] if c.rate is not None else [np.nan, np.nan] for c in rows]
        ).T
        colors = [
            "#888888" if any(a.control and a.name == c.arm for a in report.arms) else "#2a6fdb" for c in rows
        ]
        ax.bar(x, rates, color=colors, alpha=0.8)
        ax.errorbar(x, rates, yerr=err, fmt="none", ecolor="black", capsize=4)
        ax.set_xticks(x, [f"{c.arm}\nn={c.n}" for c in rows], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(task, fontsize=10)
        ax.set_ylabel("compliance")
    fig.suptitle(
        f"{report.experiment}: compliance by arm ({100 * (1 - report.alpha):g}% Wilson intervals)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: Report, out: str | Path) -> dict[str, Path]:
    """report.md, report.json and compliance.png in `out`."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": folder / "report.md",
        "json": folder / "report.json",
        "plot": folder / "compliance.png",
    }
    paths["markdown"].write_text(to_markdown(report))
    paths["json"].write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    plot(report, paths["plot"])
    return paths


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
