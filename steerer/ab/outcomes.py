"""The outcome log: one record per finished response, in an embedded SQLite database (WAL mode).

Durability promise (tested in tests/test_ab_service.py):
- A record is committed *before* its response's final message is sent, one transaction per record, on the
  RPC thread. So every response a client received has its record, and the log never holds half a record.
- SIGTERM: the server drains (streams in flight get `--grace` seconds), every response that finishes writes
  its record, then the log is checkpointed and closed. No finished response lacks its record.
- SIGKILL (or an OOM kill, a crash of the process): nothing committed is lost, since a WAL commit is in the
  operating system's file cache when `write` returns. The window is zero records: a request killed before
  its commit had not finished and was never answered.
- Power loss or an OS crash: with the default `synchronous=NORMAL`, WAL mode may lose the commits since the
  last checkpoint (SQLite's auto-checkpoint: at most ~1000 pages, some thousands of records); with
  `--outcome-sync full` every commit is fsynced first and the window is zero there too, at ~1 fsync per record.
A record can exist for a response the client never saw (the connection dropped after the commit): the
log counts finished generations, at least once from the client's side, exactly once from the server's.

The prompt and response text are kept (the offline perplexity needs them): treat the file as user data.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1"
SYNC_MODES = ("normal", "full")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    version TEXT PRIMARY KEY,      -- Experiment.version: a hash of name, salt, arms, weights and policies
    name TEXT NOT NULL,
    config TEXT NOT NULL,          -- the experiment as JSON (arms, weights, policies, control)
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order of finished responses: the sequential analysis' clock
    ts REAL NOT NULL,                      -- unix time the record was written
    request_id TEXT NOT NULL,
    key_hash TEXT,                         -- sha256(experiment key)[:16]; NULL without a key
    model TEXT NOT NULL,
    bank_version TEXT NOT NULL,
    prompt TEXT NOT NULL,                  -- JSON: a string, or chat messages
    system TEXT,
    response TEXT NOT NULL,
    token_ids TEXT NOT NULL,               -- JSON list of the response's token ids
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,               -- RPC arrival to the finished result
    ttft_s REAL,                           -- RPC arrival to the first token event
    repetition REAL                        -- online fluency stand-in: rep-3 of the token ids (NULL: < 3 tokens)
);
CREATE TABLE IF NOT EXISTS assignments (
    outcome_id INTEGER NOT NULL REFERENCES outcomes(id),
    experiment TEXT NOT NULL,
    arm TEXT NOT NULL,
    forced INTEGER NOT NULL,               -- 1: the request forced the arm (QA), not randomized
    version TEXT NOT NULL,
    PRIMARY KEY (outcome_id, experiment)
);
CREATE TABLE IF NOT EXISTS verdicts (
    outcome_id INTEGER NOT NULL REFERENCES outcomes(id),
    task TEXT NOT NULL,
    params TEXT NOT NULL,
    policy TEXT NOT NULL,                  -- the policy the request ran with for this task (after its arm);
                                           -- its kind, 'guard+KIND' when it guards
    alpha REAL NOT NULL,
    satisfied INTEGER,                     -- the checker's verdict; NULL: not checkable
    predicted_violation INTEGER NOT NULL,
    p_satisfied_end REAL,
    probe_muted INTEGER NOT NULL,
    flagged INTEGER NOT NULL,
    first_flag_token INTEGER,
    flags_raised INTEGER NOT NULL,
    steered_tokens INTEGER NOT NULL,
    PRIMARY KEY (outcome_id, task)
);
CREATE TABLE IF NOT EXISTS perplexity (     -- filled offline by `steerer ab report --model`
    outcome_id INTEGER NOT NULL REFERENCES outcomes(id),
    model TEXT NOT NULL,                   -- the scoring model's weight fingerprint
    nll REAL,                              -- mean NLL per response token (EOS not scored); NULL: nothing to score
    tokens INTEGER NOT NULL,
    PRIMARY KEY (outcome_id, model)
);
CREATE INDEX IF NOT EXISTS assignments_by_experiment ON assignments (experiment, version);
"""


@dataclass(frozen=True)
class VerdictRecord:
    task: str
    params: Mapping[str, Any]
    policy: str
    alpha: float
    satisfied: bool | None
    predicted_violation: bool
    p_satisfied_end: float | None
    probe_muted: bool
    flagged: bool
    first_flag_token: int | None
    flags_raised: int
    steered_tokens: int


@dataclass(frozen=True)
class ArmRecord:
    experiment: str
    arm: str
    forced: bool
    version: str


@dataclass(frozen=True)
class OutcomeRecord:
    request_id: str
    key_hash: str | None
    model: str
    bank_version: str
    prompt: str | list[dict]
    system: str | None
    response: str
    token_ids: Sequence[int]
    finish_reason: str
    prompt_tokens: int
    latency_s: float
    ttft_s: float | None
    verdicts: Sequence[VerdictRecord] = ()
    arms: Sequence[ArmRecord] = ()
    ts: float = field(default_factory=time.time)

    @property
    def repetition(self) -> float | None:
        return repetition(self.token_ids)


def repetition(tokens: Sequence[int], n: int = 3) -> float | None:
    """rep-n: 1 - distinct n-grams / n-grams (0: no repeated phrase; near 1: a loop). None under n tokens.

    The online fluency stand-in: cheap, needs no model, and catches what over-strong steering does first
    (loops such as "they they they"); the offline unsteered perplexity is the proper measure."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else None


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection to an outcome log. `readonly`: never create one (opened read-write all the same, so a
    log left by a killed server can replay its WAL)."""
    if readonly:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no outcome log at {path}")
        db = sqlite3.connect(
            f"file:{Path(path).resolve()}?mode=rw",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=30,
        )
    else:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    db.row_factory = sqlite3.Row
    return db


class OutcomeLog:
    """Appends records; safe to call from many RPC threads (one connection behind a lock)."""

    def __init__(self, path: str | Path, synchronous: str = "normal"):
        if synchronous not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNC_MODES)}")
        self.path = Path(path)
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = self._open()

    def _open(self) -> sqlite3.Connection:
        if self.path.parent and not self.path.parent.exists():
            raise FileNotFoundError(f"outcome log folder does not exist: {self.path.parent}")
        db = connect(self.path)
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise OSError(f"cannot put the outcome log {self.path} in WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        return db

    def note_experiments(self, experiments: Sequence[Any]) -> None:
        """Keep each experiment version's configuration (the report reads weights and the control here)."""
        with self._lock:
            db = self._db or self._open()
            with _transaction(db):
                for exp in experiments:
                    db.execute(
                        "INSERT OR IGNORE INTO experiments VALUES (?, ?, ?, ?)",
                        (exp.version, exp.name, json.dumps(exp.as_dict(), sort_keys=True), time.time()),
                    )
            if self._db is None:
                db.close()

    def write(self, record: OutcomeRecord) -> int:
        """Commit one record (durable against a process kill when this returns); returns its id."""
        with self._lock:
            db = self._db or self._open()  # after close(): a late record still lands, on its own connection
            try:
                with _transaction(db):
                    return _insert(db, record)
            finally:
                if self._db is None:
                    db.close()

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close (graceful shutdown)."""
        with self._lock:
            if self._db is not None:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
                self._db = None


class _transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _insert(db: sqlite3.Connection, r: OutcomeRecord) -> int:
    cursor = db.execute(
        "INSERT INTO outcomes (ts, request_id, key_hash, model, bank_version, prompt, system, response, token_ids, "
        "finish_reason, prompt_tokens, completion_tokens, latency_s, ttft_s, repetition) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            r.ts,
            r.request_id,
            r.key_hash,
            r.model,
            r.bank_version,
            json.dumps(r.prompt),
            r.system,
            r.response,
            json.dumps(list(r.token_ids)),
            r.finish_reason,
            r.prompt_tokens,
            len(r.token_ids),
            r.latency_s,
            r.ttft_s,
            r.repetition,
        ),
    )
    outcome_id = int(cursor.lastrowid)
    db.executemany(
        "INSERT INTO assignments VALUES (?, ?, ?, ?, ?)",
        [(outcome_id, a.experiment, a.arm, int(a.forced), a.version) for a in r.arms],
    )
    db.executemany(
        "INSERT INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                outcome_id,
                v.task,
                json.dumps(v.params, sort_keys=True),
                v.policy,
                v.alpha,
                None if v.satisfied is None else int(v.satisfied),
                int(v.predicted_violation),
                v.p_satisfied_end,
                int(v.probe_muted),
                int(v.flagged),
                v.first_flag_token,
                v.flags_raised,
                v.steered_tokens,
            )
            for v in r.verdicts
        ],
    )
    return outcome_id


def count(path: str | Path) -> int:
    """Records in a log (tests and scripts)."""
    db = connect(path, readonly=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0])
    finally:
        db.close()
