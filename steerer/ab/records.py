"""Reading an outcome log for the A/B report: which experiments it holds, the configuration of a version,
and its randomized (not forced) responses with their checker verdicts."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field


@dataclass
class Row:
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


def config(db: sqlite3.Connection, experiment: str, version: str | None) -> tuple[str, dict]:
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


def rows(db: sqlite3.Connection, experiment: str, version: str, perplexity_model: str | None) -> list[Row]:
    found: dict[int, Row] = {}
    query = (
        "SELECT o.id, a.arm, o.key_hash, o.latency_s, o.ttft_s, o.repetition, o.completion_tokens, p.nll "
        "FROM assignments a JOIN outcomes o ON o.id = a.outcome_id "
        "LEFT JOIN perplexity p ON p.outcome_id = o.id AND p.model = ? "
        "WHERE a.experiment = ? AND a.version = ? AND a.forced = 0 ORDER BY o.id"
    )
    for r in db.execute(query, (perplexity_model or "", experiment, version)):
        found[r[0]] = Row(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
    if found:
        for r in db.execute(
            "SELECT v.outcome_id, v.task, v.satisfied, v.steered_tokens FROM verdicts v "
            "JOIN assignments a ON a.outcome_id = v.outcome_id "
            "WHERE a.experiment = ? AND a.version = ? AND a.forced = 0",
            (experiment, version),
        ):
            found[r[0]].verdicts[r[1]] = (None if r[2] is None else bool(r[2]), int(r[3]))
    return list(found.values())
