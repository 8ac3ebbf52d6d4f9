"""Writing an A/B `Report`: markdown (the tables a reviewer reads), JSON (every figure, NaN as null) and a
compliance plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from steerer.ab.analysis import SRM_P, Difference, Report


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def first_excluded(d: Difference) -> str:
    """The "first excluded 0 at n" cell: the n, or that it is the burn-in floor rather than an observation."""
    if d.cs_first_excluding_zero is None:
        return "-"
    if d.cs_first_is_floor:
        return f"{d.cs_first_excluding_zero} (at the burn-in floor)"
    return str(d.cs_first_excluding_zero)


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
            ", ".join(f"{t}: {'guard+' if p.get('guard') else ''}{p['kind']} {p['alpha']:g}"
                      for t, p in a.policies.items()) or "request's own"
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
        f"size fixed in advance). Always valid: the {level} confidence sequence, valid at every look. "
        f"\"First excluded 0 at n\" counts responses of the arm and the control together from the burn-in on "
        f"(crossings before it are not counted, the variance estimate is unsettled); \"at the burn-in floor\" "
        f"means it already excluded 0 there, so the figure is the floor, not a measured crossing.",
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
            f"[{_fmt(d.cs_low, '+.3f')}, {_fmt(d.cs_high, '+.3f')}] | {first_excluded(d)} | "
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
