"""`verify_file` against IFEval's own strict verdicts, and its handling of bad rows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from probes.verify import verify_file, verify_lines, verify_row

IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "ifeval"
ROWS = IFEVAL / "verifier_rows.jsonl"
ORACLE = IFEVAL / "verifier_oracle.jsonl"


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_agrees_with_ifeval_oracle(tmp_path: Path) -> None:
    assert ROWS.exists() and ORACLE.exists(), f"IFEval verifier data missing under {IFEVAL}"
    out = tmp_path / "verdicts.jsonl"
    n_ok, n_err = verify_file(ROWS, out)
    results, oracle = _read_jsonl(out), _read_jsonl(ORACLE)

    assert n_err == 0, [r for r in results if "error" in r][:3]
    assert n_ok == len(oracle) == len(results)
    # Ids repeat (a prompt with two number_words instructions), so rows are matched by position.
    agree, total = Counter(), Counter()
    disagreements = []
    for got, want in zip(results, oracle, strict=True):
        assert got["id"] == want["id"]
        total[want["task"]] += 1
        if got["satisfied"] == want["satisfied"]:
            agree[want["task"]] += 1
        else:
            disagreements.append((want["id"], want["satisfied"]))

    overall = sum(agree.values()) / sum(total.values())
    print(f"\noracle agreement overall: {overall:.4f} ({sum(agree.values())}/{sum(total.values())})")
    for task in sorted(total):
        print(f"  {task:18s} {agree[task] / total[task]:.4f} ({agree[task]}/{total[task]})")
    print("  disagreements:", disagreements[:10])
    assert overall >= 0.98
    for task in total:
        assert agree[task] / total[task] >= 0.95, task


def test_bad_rows_are_reported_and_the_rest_still_run(tmp_path: Path) -> None:
    good = {"id": "ok-1", "task": "word_count", "params": {"relation": "at most", "limit": 3},
            "response": "one two three"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"id": "unknown", "task": "haiku", "params": {}, "response": "x"}),
        json.dumps({"id": "badparams", "task": "word_count", "params": {"relation": "around", "limit": 3},
                    "response": "x"}),
        json.dumps({"id": "missing", "task": "lowercase", "params": {}}),
        json.dumps({"id": "notstr", "task": "lowercase", "params": {}, "response": 42}),
        json.dumps({"id": "paramslist", "task": "lowercase", "params": [], "response": "x"}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"id": 7, "task": "lowercase", "params": {}, "response": "this is fine"}),
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")

    n_ok, n_err = verify_file(src, dst)
    out = _read_jsonl(dst)
    assert (n_ok, n_err) == (2, 7)
    assert len(out) == 9  # the blank line is not a row
    assert out[0] == {"id": "ok-1", "satisfied": True}
    assert out[1]["id"] is None and "line 2" in out[1]["error"] and "invalid JSON" in out[1]["error"]
    assert out[2]["id"] == "unknown" and "haiku" in out[2]["error"] and "word_count" in out[2]["error"]
    assert out[3]["id"] == "badparams" and "relation" in out[3]["error"]
    assert out[4]["id"] == "missing" and "response" in out[4]["error"]
    assert out[5]["id"] == "notstr" and "response" in out[5]["error"]
    assert out[6]["id"] == "paramslist" and "params" in out[6]["error"]
    assert out[7]["id"] is None and "object" in out[7]["error"]
    assert out[8] == {"id": 7, "satisfied": True}
    for row in out:
        assert set(row) in ({"id", "satisfied"}, {"id", "error"})
        assert "\n" not in row.get("error", "")


def test_verify_row_and_lines() -> None:
    row = {"id": "a", "task": "keyword_inclusion", "params": {"terms": ["lantern"]}, "response": "Lanterns!"}
    assert verify_row(row) == {"id": "a", "satisfied": True}
    assert verify_row({**row, "response": "nothing here"}) == {"id": "a", "satisfied": False}
    assert "error" in verify_row({**row, "params": {"terms": []}})
    assert "error" in verify_row({**row, "id": ["list"]})
    results = list(verify_lines([json.dumps(row), "   ", json.dumps({**row, "id": "b"})]))
    assert [r["id"] for r in results] == ["a", "b"]


def test_missing_input_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        verify_file(tmp_path / "nope.jsonl", tmp_path / "out.jsonl")
