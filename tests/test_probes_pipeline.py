"""The probe pipeline end to end on a tiny corpus: corpus (real generation) -> features (teacher forcing) ->
train (choose, measure, bank, report) -> score with the bank."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from probes import corpus as corpus_mod
from steerer.bank import BankError, ProbeBank

TASKS = "char_count,sentiment"


def steerer_cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    corpus, features, bank, report = root / "corpus", root / "features", root / "bank", root / "report"
    steerer_cli("probes", "corpus", "--out", str(corpus), "--tasks", TASKS, "--per-task", "40", "--round-size", "40",
                "--batch-size", "40", "--max-new-tokens", "12", "--max-new-tokens-other", "12", "--max-rounds", "1",
                "--threads", "2")
    steerer_cli("probes", "build", "--corpus", str(corpus), "--features", str(features), "--tasks", TASKS,
                "--token-layers", "3,20", "--threads", "2")
    steerer_cli("probes", "train", "--corpus", str(corpus), "--features", str(features), "--tasks", TASKS,
                "--out", str(bank), "--report", str(report))
    return corpus, features, bank, report


def test_features_cover_every_corpus_row(tiny):
    corpus, features, _, _ = tiny
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["token_layers"] == [3, 20] and manifest["layers"] == list(range(30))
    from probes.evaluation import load_task

    data = load_task(corpus, features, "char_count")
    assert data.positions.shape == (len(corpus_mod.load_corpus(corpus, "char_count")), 13, 30, 576)
    assert set(data.split) <= {"train", "test", "heldout_phrasing"}
    assert int(data.offsets[-1]) == data.tokens.shape[0]


def test_bank_is_conditioned_data_with_a_manifest_and_refuses_other_models(tiny, lm):
    _, _, bank_dir, report = tiny
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["fingerprint"] == lm.fingerprint
    assert {p["task"] for p in manifest["probes"]} == set(TASKS.split(","))
    for probe in manifest["probes"]:
        # bank layers are stored at every token, so flag thresholds are calibrated on per-token readings
        assert probe["layer"] in (3, 20) and 0 < probe["threshold"] < 1 and 0 < probe["flag_threshold"] < 1
        assert {"test_auroc", "test_auroc_ci", "heldout_phrasing_auroc", "design"} <= set(probe["metrics"])
        assert probe["metrics"]["design"] in probe["metrics"]["design_cv"]  # why it won: every design's training CV
    sentiment = next(p for p in manifest["probes"] if p["task"] == "sentiment")
    assert {"mean", "per_polarity+mean", "single"} <= set(sentiment["metrics"]["design_cv"])  # pooled: candidates
    bank = ProbeBank.load(bank_dir)
    assert bank.version == manifest["version"] and bank.version.startswith(lm.fingerprint[:8])
    bank.check_model(lm.fingerprint, lm.hidden_size)
    with pytest.raises(BankError, match="fingerprint"):
        bank.check_model("0" * 16, lm.hidden_size)
    assert torch.allclose(bank.directions.norm(dim=1), torch.ones(len(bank.probes)))
    # a conditioned probe reads a different weight row for each value of its parameter
    k = bank.index("sentiment")
    cond = bank.probes[k].conditioning
    if cond and cond.get("variant"):
        pos, _ = bank.request_rows({"sentiment": {"polarity": "positive"}})
        neg, _ = bank.request_rows({"sentiment": {"polarity": "negative"}})
        assert pos[k] != neg[k]
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["tasks"]) == set(TASKS.split(","))
    for task in summary["tasks"].values():
        assert {"specialist", "heldout_phrasing", "ifeval", "n_test"} <= set(task)
        assert "auroc_ci" in task["specialist"]
    assert (report / "generalisation.png").stat().st_size > 1000


def test_score_writes_one_row_per_input_and_errors_for_bad_rows(tiny, tmp_path):
    _, _, bank_dir, _ = tiny
    rows = [{"id": "a", "prompt": "Describe a cat. Answer in at most 40 characters.", "task": "char_count",
             "params": {"relation": "at most", "limit": 40}},
            {"id": "b", "prompt": "Hi", "task": "nope", "params": {}},
            {"id": "c", "prompt": "Describe a dog in a cheerful tone.", "task": "sentiment",
             "params": {"polarity": "positive"}}]
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
