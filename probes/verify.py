"""Batch verification: JSONL rows ``{"id", "task", "params", "response"}`` -> ``{"id", "satisfied"}``.

This is the engine behind ``steerer verify --input --output``. It streams line by line (constant memory
for any file size), and a bad row (unparseable line, unknown task, bad params, missing or mistyped fields)
becomes ``{"id", "error"}`` while the rest still run. Errors of the environment (a checker's model that
fails to load) are not a row's fault and propagate.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from probes.tasks import UnknownTaskError, get_task

REQUIRED_FIELDS = ("id", "task", "params", "response")


class RowError(ValueError):
    """A row that cannot be verified; the message goes into the output row."""


def _check_row(row: Any) -> tuple[Any, str, Any, str]:
    if not isinstance(row, dict):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in row]
    if missing:
        raise RowError(f"missing field(s) {missing}")
    row_id, task_id, params, response = (row[f] for f in REQUIRED_FIELDS)
    if isinstance(row_id, bool) or not isinstance(row_id, str | int):
        raise RowError(f"id must be a string or integer, got {type(row_id).__name__}")
    if not isinstance(task_id, str):
        raise RowError(f"task must be a string, got {type(task_id).__name__}")
    if not isinstance(params, dict):
        raise RowError(f"params must be an object, got {type(params).__name__}")
    if not isinstance(response, str):
        raise RowError(f"response must be a string, got {type(response).__name__}")
    return row_id, task_id, params, response


def verify_row(row: Any) -> dict[str, Any]:
    """``{"id", "satisfied": bool}``, or ``{"id", "error": str}`` when the row itself is bad."""
    row_id = row.get("id") if isinstance(row, dict) else None
    try:
        row_id, task_id, params, response = _check_row(row)
        task = get_task(task_id)
        task.validate(params)
        return {"id": row_id, "satisfied": bool(task.check(response, params))}
    except UnknownTaskError as exc:
        return {"id": row_id, "error": str(exc)}
    except ValueError as exc:  # RowError and the checkers' param validation
        return {"id": row_id, "error": str(exc)}


def verify_lines(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """One result per non-blank input line, in order."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            yield {"id": None, "error": f"line {lineno}: invalid JSON: {exc}"}
            continue
        yield verify_row(row)


@contextmanager
def _open(path: str | Path, mode: str) -> Iterator[IO[str]]:
    if str(path) == "-":
        yield sys.stdin if "r" in mode else sys.stdout
        return
    with open(path, mode, encoding="utf-8") as fh:
        yield fh


def verify_file(input_path: str | Path, output_path: str | Path) -> tuple[int, int]:
    """Verify a JSONL file into another (``-`` for stdin/stdout). Returns (rows verified, rows in error)."""
    n_ok = n_err = 0
    with _open(input_path, "r") as src, _open(output_path, "w") as dst:
        for result in verify_lines(src):
            if "error" in result:
                n_err += 1
            else:
                n_ok += 1
            dst.write(json.dumps(result, ensure_ascii=False) + "\n")
    return n_ok, n_err
