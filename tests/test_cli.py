"""The command line as a user runs it: real process, real model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_generate_prints_a_sensible_answer():
    out = run("generate", "--prompt", "Name three colors.", "--max-new-tokens", "24").stdout.lower()
    assert sum(color in out for color in ("red", "blue", "green", "yellow", "white", "black", "purple")) >= 2


def test_generate_json_reports_norms_per_tapped_layer():
    out = json.loads(run("generate", "--prompt", "Hi!", "--max-new-tokens", "3", "--layers", "0,10", "--json").stdout)
    assert 1 <= len(out["tokens"]) <= 3
    assert set(out["tokens"][0]["norms"]) == {"0", "10"}
    assert all(v > 0 for t in out["tokens"] for v in t["norms"].values())


def test_generate_with_a_strong_steering_vector_changes_the_text(tmp_path):
    direction = tmp_path / "d.npy"
    np.save(direction, np.random.RandomState(0).randn(576).astype("float32"))
    base = ["generate", "--prompt", "Name three colors.", "--max-new-tokens", "16"]
    plain = run(*base).stdout
    steered = run(*base, "--steer-direction", str(direction), "--steer-layer", "10", "--alpha", "300").stdout
    assert plain != steered


def test_bad_arguments_give_one_clear_line(tmp_path):
    wrong = tmp_path / "w.npy"
    np.save(wrong, np.ones(7, dtype="float32"))
    cases = [
        (["--layers", "1,x"], "comma-separated"),
        (["--layers", "99"], "out of range"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--steer-direction", str(wrong), "--steer-layer", "3", "--alpha", "1"], "hidden size"),
        (["--steer-direction", str(tmp_path / "missing.npy"), "--steer-layer", "3"], "not found"),
        (["--steer-layer", "3"], "go together"),
        (["--alpha", "nan", "--steer-layer", "3", "--steer-direction", str(wrong)], "finite"),
    ]
    for extra, needle in cases:
        proc = run("generate", "--prompt", "Hi", *extra, check=False)
        assert proc.returncode == 2, (extra, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], (extra, proc.stderr)
