"""The probe pipeline end to end on a tiny dataset: build (real generation) -> train -> bank -> score."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from steerer.bank import BankError, ProbeBank

TASKS = "char_count,word_count"


def steerer_cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    dataset, bank, report = root / "ds", root / "bank", root / "report"
    steerer_cli("probes", "build", "--out", str(dataset), "--tasks", TASKS, "--prompts-per-task", "8",
                "--samples", "2", "--max-new-tokens", "16", "--layers", "3,20", "--token-layers", "3",
                "--batch-size", "16")
    steerer_cli("probes", "train", "--dataset", str(dataset), "--out", str(bank), "--report", str(report))
    return dataset, bank, report


def test_build_writes_labelled_rows_and_all_positions(tiny):
    dataset, _, _ = tiny
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["layers"] == [3, 20] and len(manifest["positions"]) == 13
    from probes.dataset import load_task

    data = load_task(dataset, "char_count")
    assert data.positions.shape == (16, 13, 2, 576)
    assert set(data.split) == {"train", "test"}
    train_bases = {r["base_id"] for r in data.rows if r["split"] == "train"}
    assert not train_bases & {r["base_id"] for r in data.rows if r["split"] == "test"}
    from probes.tasks import TASKS as ALL

    for row in data.rows:  # labels are the checker's verdicts on the stored responses
        assert row["satisfied"] == ALL["char_count"].check(row["response"], row["params"])
    assert int(data.offsets[-1]) == data.tokens.shape[0]


def test_a_rerun_resumes_without_regenerating(tiny):
    dataset, _, _ = tiny
    chunk = next((dataset / "chunks" / "char_count").glob("*.safetensors"))
    before = chunk.stat().st_mtime_ns
    steerer_cli("probes", "build", "--out", str(dataset), "--tasks", TASKS, "--prompts-per-task", "8",
                "--samples", "2", "--max-new-tokens", "16", "--layers", "3,20", "--token-layers", "3",
                "--batch-size", "16")
    assert chunk.stat().st_mtime_ns == before


def test_bank_is_data_with_a_manifest_and_refuses_other_models(tiny, lm):
    _, bank_dir, report = tiny
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["fingerprint"] == lm.fingerprint
    assert {p["task"] for p in manifest["probes"]} == set(TASKS.split(","))
    for probe in manifest["probes"]:
        # The bank's layer is one stored at every token (3 here), so its flag threshold is calibrated on
        # the per-token readings the live monitor sees.
        assert probe["layer"] == 3 and 0 < probe["threshold"] < 1 and 0 < probe["flag_threshold"] < 1
        assert probe["position"] in ("eos", "tokens")
        assert {"test_auroc", "test_auroc_ci", "test_false_flag_rate", "test_violations_flagged"} <= set(probe["metrics"])
        ci = probe["metrics"]["test_auroc_ci"]  # None when the tiny test split lacks a class
        assert probe["reliable"] is (ci is not None and ci[0] > 0.5)
    bank = ProbeBank.load(bank_dir)
    bank.check_model(lm.fingerprint, lm.hidden_size)
    with pytest.raises(BankError, match="fingerprint"):
        bank.check_model("0" * 16, lm.hidden_size)
    with pytest.raises(BankError, match="hidden size"):
        bank.check_model(lm.fingerprint, 1024)
    assert torch.allclose(bank.directions.norm(dim=1), torch.ones(len(bank.probes)))
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["tasks"]) == set(TASKS.split(","))
    assert (report / "transfer.png").stat().st_size > 1000


def test_score_writes_one_row_per_input_and_errors_for_bad_rows(tiny, tmp_path):
    _, bank_dir, _ = tiny
    rows = [{"id": "a", "prompt": "Describe a cat. Answer in at most 40 characters.", "task": "char_count",
             "params": {"relation": "at most", "limit": 40}},
            {"id": "b", "prompt": "Hi", "task": "nope", "params": {}},
            {"id": "c", "prompt": "Describe a dog. Use at least 10 words.", "task": "word_count",
             "params": {"relation": "at least", "limit": 10}}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    proc = steerer_cli("probes", "score", "--input", str(inp), "--output", str(out), "--bank", str(bank_dir),
                       "--max-new-tokens", "12")
    assert "score: 100%" in proc.stderr and "2/2" in proc.stderr  # a progress bar over the scorable rows
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g.get("id") for g in got] == ["a", "b", "c", None]
    assert "unknown task" in got[1]["error"] and "error" in got[3]
    for g, row in ((got[0], rows[0]), (got[2], rows[2])):
        assert (g["task"], g["params"]) == (row["task"], row["params"])  # rows stand alone, no join needed
        assert isinstance(g["satisfied"], bool) and 0 <= g["score_eos"] <= 1
        assert 1 <= len(g["scores"]) <= 13 and all(0 <= s <= 1 for s in g["scores"])
