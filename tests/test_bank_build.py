"""`steerer bank build`: the plan (from config.json alone, priced on the layout the feature writer uses),
resumable stages, and a bounded corpus for a model that never produces one class (a tiny random Llama)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from probes import bank_build, plan
from probes.features import featurise, load_features

GiB = 1024**3
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_hidden_layers": 32, "vocab_size": 128256, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from steerer.model import load_model
    from steerer.testing.tiny import build_tiny

    folder = build_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")
    return folder, load_model(str(folder))


def test_default_model_keeps_the_shipped_layout():
    """The 135M model's cache fits the budget as it is: every layer at the positions, every third at tokens."""
    layout = plan.feature_layout(30, 576, rows=5760, passes=124)
    assert layout.position_layers is None and layout.token_layers == plan.default_token_layers(30)


def test_8b_plan_fits_20_gib_disk_and_16_gib_ram_from_config_only(tmp_path):
    """The Bar: a folder holding only a Llama-3.1-8B-shape config.json, planned through the CLI; nothing is
    written to --out and no weights or tokenizer are read."""
    model = tmp_path / "llama-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    out = tmp_path / "bank"
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", "bank", "build", "--model", str(model), "--out",
                           str(out), "--dry-run", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["rows"] == 9 * 640 and doc["generated_tokens"] > 0
    assert doc["disk_bytes"] <= 20 * GiB and doc["peak_ram_bytes"] <= 16 * GiB
    assert len(doc["layout"]["token_layers"]) >= 2 and doc["layout"]["position_layers"] is not None
    assert not out.exists()


def _shape(folder, config: dict):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return plan.shape_from_config(folder)


def test_auto_plans_cpu_when_the_model_fits_and_cuda_when_it_cannot(tmp_path):
    """`--device auto` without CUDA: the CPU for a model whose fp32 weights fit this machine's RAM, CUDA (with the
    reason) for one that cannot, and a real run of that CUDA plan is refused here in one line."""
    small = _shape(tmp_path / "small", LLAMA_8B | {"num_hidden_layers": 1, "hidden_size": 256,
                                                   "intermediate_size": 512, "vocab_size": 1000})
    big = _shape(tmp_path / "big", LLAMA_8B)
    ram = 24 * GiB
    if torch.cuda.is_available():
        pytest.skip("auto resolves to CUDA on a CUDA machine")
    assert plan.resolve_plan_device("auto", small, ram)[0] == "cpu"
    device, why = plan.resolve_plan_device("auto", big, ram)
    assert device == "cuda" and "do not fit" in why
    planned = plan.make_plan("llama-8b", big, ["char_count"], 640, device, flops=1e12, device_note=why)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        plan.check_runnable(planned, ram)
    on_cpu = plan.make_plan("llama-8b", big, ["char_count"], 640, "cpu", flops=1e12)
    with pytest.raises(ValueError, match="GiB of RAM on the CPU"):
        plan.check_runnable(on_cpu, ram)


def test_bad_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="lacks 'num_attention_heads'"):
        plan.shape_from_config(tmp_path)


def _rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Say something {i}."}],
             "token_ids": list(range(100, 100 + 3 + i)), "finish_reason": "eos" if i % 2 else "length"}
            for i in range(n)]


def test_writer_stores_exactly_the_planned_bytes(tiny, tmp_path):
    """The plan's per-row bytes are the writer's: a reduced layout (one position layer, one token layer) on a
    tiny model stores row_bytes(passes) per row, and readers still index positions by layer number."""
    _, lm = tiny
    layout = plan.FeatureLayout(lm.num_layers, lm.hidden_size, (1,), (1,))
    rows = _rows(3)
    featurise(lm, {"demo": rows}, tmp_path, layout=layout, progress=False)
    arrays = load_file(str(tmp_path / "demo" / "0000.safetensors"))
    passes = (arrays["offsets"][1:] - arrays["offsets"][:-1]).tolist()
    stored = arrays["positions"].nbytes + arrays["tokens"].nbytes + arrays["offsets"][1:].nbytes
    assert stored == sum(layout.row_bytes(p) for p in passes)
    data = load_features(tmp_path, "demo", rows)
    assert tuple(data.positions.shape) == (3, plan.N_POSITIONS, lm.num_layers, lm.hidden_size)
    assert data.positions[:, :, 0].abs().sum() == 0 and data.positions[:, :, 1].abs().sum() > 0


def test_random_model_ends_bounded_untrainable_and_resumes(tiny, tmp_path):
    """A random model never writes JSON: the corpus gives up after per_task x factor responses, the task is
    reported untrainable in the card, and a rerun skips the finished corpus stage."""
    folder, _ = tiny
    config = bank_build.BuildConfig(str(folder), tmp_path / "bank", ("json_format",), per_task=4, device="cpu",
                                    batch_size=2, max_generated_factor=1.0, max_new_tokens=8)
    doc = bank_build.plan_for(config, flops=1e9).to_json()
    first: list[str] = []
    state = bank_build.run_build(config, doc, log=first.append, stop_after="corpus")
    assert state["stages"]["corpus"]["done"] and "features" not in state["stages"]
    assert state["trainable"] == [] and "json_format" in state["untrainable"]
    assert state["stages"]["corpus"]["generated"] <= 6  # one round: no endless loop
    again: list[str] = []
    state = bank_build.run_build(config, doc, log=again.append)
    assert any("corpus: done earlier, skipped" in line for line in again)
    assert all(state["stages"][s]["done"] for s in bank_build.STAGES)
    card = (config.out / "README.md").read_text()
    assert "## Untrainable tasks" in card and "| json_format |" in card
    with pytest.raises(ValueError, match="another --out"):
        bank_build.run_build(bank_build.BuildConfig(str(folder), config.out, ("lowercase",), per_task=4), doc)


def test_plan_prices_ifeval_only_for_tasks_it_asks():
    """The reliability stage generates IFEval's prompts only for tasks IFEval covers: none for char_count (or a
    team's own rule), so its plan has no reliability time."""
    assert plan.ifeval_rows(["char_count"]) == 0
    assert plan.ifeval_rows(["word_count"]) > 0
    shape = plan.ModelShape("llama", num_layers=30, hidden_size=576, intermediate_size=1536, vocab_size=49152,
                            num_heads=9, num_kv_heads=3, tied=True)
    assert plan.make_plan("m", shape, ["char_count"], 48, "cpu", flops=1e12).stages["reliability"]["forward_tokens"] == 0


def test_forecast_layers_are_the_token_layers_three_to_five_tenths_up():
    """The warnings stage's forecast candidates: the default model's 30 layers give `probes forecast`'s 9, 12, 15."""
    assert bank_build.forecast_layers(plan.default_token_layers(30), 30) == [9, 12, 15]
    assert bank_build.forecast_layers([0, 8, 16, 24, 31], 32) == [16]
    assert bank_build.forecast_layers([0, 1], 32) == [0, 1]  # none in the band: every stored layer


def test_pace_follows_the_stages_actually_run():
    pace = bank_build.Pace()
    assert pace.factor == 1.0 and pace.note() == ""
    pace.add(1.0, 50.0)  # overhead-bound stage: ignored
    pace.add(100.0, 25.0)
    assert pace.factor == 0.25 and "x0.25" in pace.note()


@pytest.fixture(scope="module")
def tiny_corpus(tiny, tmp_path_factory):
    """A build run normally up to its corpus: char_count, which the random model answers both ways."""
    folder, _ = tiny
    config = bank_build.BuildConfig(str(folder), tmp_path_factory.mktemp("first") / "bank", ("char_count",),
                                    per_task=16, device="cpu", batch_size=8, max_generated_factor=1.0,
                                    max_new_tokens=8)
    state = bank_build.run_build(config, bank_build.plan_for(config, flops=1e9).to_json(), log=lambda m: None,
                                 stop_after="corpus")
    assert state["trainable"] == ["char_count"], state["untrainable"]
    return config.out / "corpus"


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_build_from_an_existing_corpus_generates_nothing_and_serves(tiny, tiny_corpus, tmp_path, capsys):
    """--corpus: the plan prices no corpus stage, the corpus stage checks and copies the folder (the source is
    left as it was), the later stages run on it, the card names it, and the bank serves a request."""
    from dataclasses import replace

    from steerer.bank import ProbeBank
    from steerer.cli import main
    from steerer.constraints import Constraint
    from steerer.core import Steerer
    from steerer.request import Request, SamplingParams

    folder, lm = tiny
    source = _files(tiny_corpus)
    rows = json.loads((tiny_corpus / "manifest.json").read_text())["tasks"]["char_count"]["n"]
    out = tmp_path / "bank"
    assert main(["bank", "build", "--model", str(folder), "--out", str(out), "--tasks", "char_count", "--corpus",
                 str(tiny_corpus), "--device", "cpu", "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["corpus"] == str(tiny_corpus.resolve()) and doc["rows"] == rows
    assert doc["generated_tokens"] == 0 and doc["stages"]["corpus"] == {"forward_tokens": 0, "seconds": 0.0}
    assert not out.exists()

    config = bank_build.BuildConfig(str(folder), out, ("char_count",), device="cpu", batch_size=8,
                                    steer_prompts=4, corpus=tiny_corpus.resolve())
    fresh = bank_build.plan_for(replace(config, corpus=None), flops=1e9)
    assert fresh.stages["corpus"]["forward_tokens"] > 0 and fresh.generated_tokens > 0  # what --corpus drops
    state = bank_build.run_build(config, bank_build.plan_for(config, flops=1e9).to_json(), log=lambda m: None)
    corpus = state["stages"]["corpus"]
    assert corpus["generated"] == 0 and corpus["engine"] == "given" and corpus["rows"] == rows
    assert state["key"]["corpus"] == str(tiny_corpus.resolve()) and state["corpus_source"]["rows"] == {
        "char_count": rows}
    assert _files(tiny_corpus) == source and _files(out / "corpus") == source
    assert all(state["stages"][s]["done"] for s in bank_build.STAGES)
    assert f"corpus given: `{tiny_corpus.resolve()}`" in (out / "README.md").read_text()
    bank = ProbeBank.load(out)
    assert bank.tasks == ["char_count"] and bank.extra["corpus_source"] == str(tiny_corpus.resolve())
    request = Request("Say hello.", (Constraint("char_count", {"relation": "less than", "limit": 20}),),
                      sampling=SamplingParams(max_new_tokens=8, temperature=0.0))
    with Steerer(lm, bank) as steerer:
        (result,) = steerer.run([request])
    verdict = result.verdicts[0]
    assert verdict.task == "char_count" and verdict.satisfied == (len(result.text) < 20) and result.tokens


def test_a_given_corpus_with_ifeval_responses_featurises_them_for_training(tiny, tiny_corpus, tmp_path):
    """A corpus that already holds IFEval's responses (the shipped one does): the features stage teacher-forces
    them beside the corpus, so the probes stage can measure the ifeval column (it stopped on missing features)."""
    import shutil

    from probes import ifeval

    folder, lm = tiny
    source = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, source)
    ifeval.generate(lm, source, batch_size=64, tasks=["word_count"])
    answered = ifeval.load(source)
    config = bank_build.BuildConfig(str(folder), tmp_path / "bank", ("char_count",), device="cpu", batch_size=8,
                                    corpus=source.resolve())
    planned = bank_build.plan_for(config, flops=1e9)
    state = bank_build.run_build(config, planned.to_json(), log=lambda m: None, stop_after="probes")
    assert state["stages"]["probes"]["done"]
    stored = load_features(config.out / "features", ifeval.TASK, answered)
    assert len(stored.rows) == len(answered) > 0


def test_a_corpus_of_another_model_or_without_a_task_is_refused_in_one_line(tiny_corpus, tmp_path):
    """The corpus stage checks the fingerprint once the model is loaded (nothing is copied); the plan checks the
    folder is a corpus holding every requested task."""
    from steerer.testing.tiny import build_tiny

    other = build_tiny("qwen2", tmp_path / "qwen2")
    config = bank_build.BuildConfig(str(other), tmp_path / "bank", ("char_count",), device="cpu",
                                    corpus=tiny_corpus.resolve())
    with pytest.raises(ValueError, match="is a corpus of another model") as refused:
        bank_build.run_build(config, bank_build.plan_for(config, flops=1e9).to_json(), log=lambda m: None)
    assert "\n" not in str(refused.value) and not (config.out / "corpus").exists()
    with pytest.raises(ValueError, match=r"lacks task\(s\) lowercase \(it holds char_count\)"):
        plan.read_given_corpus(tiny_corpus, ["char_count", "lowercase"])
    with pytest.raises(ValueError, match="no manifest.json there, so not a corpus"):
        plan.read_given_corpus(tmp_path, ["char_count"])
