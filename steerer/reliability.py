"""When a probe may be trusted: one rule over every held-out column it was measured on, recomputable from the
metrics a bank stores, used by training (`probes.evaluation`), by `steerer probes reliability` (which applies
it to a shipped bank) and by bank validation (`steerer.bank`), so the three cannot disagree.

The rule: a probe is reliable when the 95% AUROC interval's low end is above 0.5 on EVERY held-out column
where both classes occur. Columns (per probe `metrics`, keys `{column}_auroc`, `{column}_auroc_ci`,
`n_{column}`):
- ``test``: held-out base requests, training wording (in distribution);
- ``heldout_phrasing``: the phrasing families never seen in training;
- ``ifeval``: IFEval's own prompts mapped onto the task (written outside the project).
A column with one class only, or no rows, says nothing either way and is reported as such.

Scoped reliability: a probe that fails a column may still be reliable within the parameter range its
corpus covers (``measured_range``, e.g. word_count's limits 8-120 while IFEval asks for 100-800 words) when
every column restricted to that range (metrics `{column}_in_range_*`; test and held-out phrasing lie in it
by construction) passes or has too little data, and at least one column passes. Such a probe stays
``reliable: false`` (the bank's bar is the whole rule), is served for requests inside the range and muted,
per request, outside it (`in_range`, `ProbeBank.reliable_for`).
"""

from __future__ import annotations

import math

COLUMNS = ("test", "heldout_phrasing", "ifeval")
PASSED, FAILED, ONE_CLASS, NOT_MEASURED = "passed", "failed", "one class", "not measured"
RULE = "95% AUROC interval's low end > 0.5 on every held-out column where both classes occur"
IN_RANGE = "in_range"  # metrics key infix of a column restricted to the measured parameter range


def column(metrics: dict, name: str, infix: str = "") -> dict:
    """One column's stored figures and status: passed / failed (interval reaches 0.5) / one class / not
    measured. `infix` "in_range" reads the column restricted to the measured range."""
    key = f"{name}_{infix}" if infix else name
    ci, n = metrics.get(f"{key}_auroc_ci"), metrics.get(f"n_{key}")
    if ci is not None:
        low = float(ci[0])
        status = PASSED if math.isfinite(low) and low > 0.5 else FAILED
        return {"auroc": metrics.get(f"{key}_auroc"), "ci": [float(ci[0]), float(ci[1])], "n": n, "status": status}
    return {"auroc": None, "ci": None, "n": n, "status": ONE_CLASS if n else NOT_MEASURED}


def _verdict(columns: dict[str, dict]) -> tuple[bool, list[str]]:
    failed = [name for name, c in columns.items() if c["status"] == FAILED]
    passed = [name for name, c in columns.items() if c["status"] == PASSED]
    return bool(passed) and not failed, failed


def assess(metrics: dict, measured_range: dict | None = None) -> dict:
    """The reliability record of a probe from its stored metrics: {"reliable", "failed" (columns whose interval
    reaches chance), "columns", "rule"} and, where the probe fails but holds within `measured_range`, a
    "scope" {"range", "reliable", "failed", "columns"}. Pure: the same metrics give the same record."""
    columns = {name: column(metrics, name) for name in COLUMNS}
    reliable, failed = _verdict(columns)
    record = {"reliable": reliable, "failed": failed, "columns": columns, "rule": RULE}
    if not reliable and failed and measured_range:
        scoped = {name: column(metrics, name, IN_RANGE) if f"n_{name}_{IN_RANGE}" in metrics else columns[name]
                  for name in COLUMNS}
        ok, still = _verdict(scoped)
        record["scope"] = {"range": {k: list(v) for k, v in measured_range.items()}, "reliable": ok,
                           "failed": still, "columns": scoped}
    return record


def scoped(record: dict | None) -> dict | None:
    """The probe's range it is reliable within (param -> [low, high]), or None (no scope, or it fails there)."""
    scope = (record or {}).get("scope")
    return scope["range"] if scope and scope.get("reliable") else None


def in_range(params: dict | None, measured: dict) -> tuple[bool, str]:
    """(True, "") when every ranged numeric param of the request lies in the measured range, else (False, why).
    A param the request does not set is no evidence against it."""
    for name, (low, high) in measured.items():
        value = (params or {}).get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not low <= value <= high:
            return False, f"{name} {value:g} outside the range it was measured reliable on [{low:g}, {high:g}]"
    return True, ""


def describe(record: dict | None) -> str:
    """One line: which columns failed and their intervals (for `probes list`, notices and verdicts)."""
    if not record:
        return "no measured reliability"
    parts = []
    for name in record["failed"]:
        ci = record["columns"][name]["ci"]
        parts.append(f"{name} [{ci[0]:.2f}, {ci[1]:.2f}]")
    text = ("failed on " + ", ".join(parts) + " (95% AUROC interval reaches chance)") if parts else \
        "no held-out column with both classes" if not record["reliable"] else "reliable on every measured column"
    limits = scoped(record)
    if limits:
        text += "; reliable within " + ", ".join(f"{k} {lo:g}-{hi:g}" for k, (lo, hi) in limits.items())
    return text


def check(record, metrics: dict, reliable: bool | None) -> str | None:
    """Why a stored reliability record does not fit its probe (a problem for `BankError`), or None."""
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("reliable"), bool) \
            or not isinstance(record.get("failed"), list) or not isinstance(record.get("columns"), dict):
        return "reliability must be an object with reliable (bool), failed (list) and columns (object)"
    if record["reliable"] != bool(reliable):
        return f"reliability.reliable is {record['reliable']} but reliable is {reliable}"
    expected = assess(metrics, (record.get("scope") or {}).get("range"))
    if (expected["reliable"], expected["failed"]) != (record["reliable"], record["failed"]):
        return (f"reliability record (reliable {record['reliable']}, failed {record['failed']}) disagrees with its "
                f"metrics (reliable {expected['reliable']}, failed {expected['failed']}); recompute it with "
                "`steerer probes reliability`")
    scope = record.get("scope")
    if scope is not None:
        ranges = scope.get("range") if isinstance(scope, dict) else None
        if not isinstance(ranges, dict) or not all(
                isinstance(v, list | tuple) and len(v) == 2 and all(_number(x) for x in v) and v[0] <= v[1]
                for v in ranges.values()):
            return "reliability.scope.range must map each param to [low, high] numbers"
        if bool(scope.get("reliable")) != bool((expected.get("scope") or {}).get("reliable")):
            return "reliability.scope.reliable disagrees with its in-range metrics"
    return None


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
