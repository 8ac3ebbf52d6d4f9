"""The probe corpus generated on vLLM (`probes.corpus_vllm`) against the transformers loop: same row fields,
labels that are the task's checker on the text, onsets that are its detector over the same tokens, and greedy
rows token for token equal to the transformers loop's on the same prompts (fp32, eager; the reference runs in
the main venv, whose transformers vLLM cannot share, through `benchmarks/corpus_engines.py --worker hf`).
Sampled rows are not compared token for token: vLLM draws from its own random stream.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REQUIRED = os.environ.get("STEERER_REQUIRE_VLLM") == "1"
try:
    import vllm  # noqa: F401
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("vLLM is not installed here (scripts/setup-vllm)", allow_module_level=True)

from probes import corpus  # noqa: E402
from probes.corpus_vllm import VLLMCorpusGenerator, finished, resolve_engine  # noqa: E402
from probes.tasks import TASKS  # noqa: E402
from probes.violations import token_prefixes, violating_token  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "corpus_engines.py"
HF_PYTHON = Path(os.environ.get("STEERER_HF_PYTHON", ROOT / ".venv" / "bin" / "python"))
TASK_IDS = ["char_count", "term_exclusion"]
BUDGET = 24


def _rows() -> list[dict]:
    """Two tasks x 4 rows of a first corpus round, half greedy, at a short budget (JSON round-tripped, as the
    transformers worker receives them)."""
    config = corpus.CorpusConfig(tasks=tuple(TASK_IDS), greedy_fraction=0.5, max_new_tokens=BUDGET,
                                 max_new_tokens_other=BUDGET)
    rows = [r for t in TASK_IDS for r in corpus.plan_round(t, 0, corpus.TaskState(), config, 4)]
    return json.loads(json.dumps(rows))


@pytest.fixture(scope="module")
def generator():
    gen = VLLMCorpusGenerator(None, batch_size=8, threads=1, enforce_eager=True, max_model_len=1024)
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def hf() -> dict:
    """The transformers worker's answer: its model's fingerprint ("ready") and the labelled rows."""
    if not HF_PYTHON.exists():
        if REQUIRED:
            pytest.fail(f"no transformers-backend venv at {HF_PYTHON} (set STEERER_HF_PYTHON)")
        pytest.skip(f"no transformers-backend venv at {HF_PYTHON} (set STEERER_HF_PYTHON)")
    done = subprocess.run([str(HF_PYTHON), str(BENCH), "--worker", "hf", "--batch-size", "8", "--threads", "1"],
                          input=json.dumps({"rows": _rows()}) + "\n", capture_output=True, text=True, cwd=ROOT,
                          timeout=600, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {"fingerprint": lines[0]["fingerprint"], "rows": lines[-1]["rows"]}


def test_engine_choice():
    assert resolve_engine("auto") == "vllm"  # vLLM imports here
    assert resolve_engine("hf") == "hf"
    with pytest.raises(ValueError, match="unknown engine"):
        resolve_engine("tgi")


def test_finish_as_the_transformers_loop():
    eos = frozenset({2})
    assert finished([5, 6, 2], "stop", eos, 10, 0).tokens == [5, 6]
    assert finished([5, 6, 2], "stop", eos, 10, 0).finish_reason == "eos"
    assert finished([5, 6, 7], "length", eos, 10, 1).finish_reason == "length"


def test_rows_match_the_transformers_loop(generator, hf):
    rows, hf_rows = _rows(), hf["rows"]
    got = generator.generate(generator.model, rows, 8)
    tokenizer = generator.model.tokenizer

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    assert len(got) == len(hf_rows) == len(rows)
    greedy = 0
    for row, ref in zip(got, hf_rows, strict=True):
        assert set(row) == set(ref)  # the same schema
        assert row["id"] == ref["id"] and row["prompt_tokens"] == ref["prompt_tokens"]
        assert row["response"] == decode(row["token_ids"]) and row["n_tokens"] == len(row["token_ids"])
        assert 1 <= row["n_tokens"] <= BUDGET and row["finish_reason"] in ("eos", "length")
        assert row["satisfied"] == bool(TASKS[row["task"]].check(row["response"], row["params"]))
        expected_onset = None if row["satisfied"] else violating_token(
            row["task"], row["params"], token_prefixes(decode, row["token_ids"]), row["finish_reason"] == "eos")
        assert row["onset"] == expected_onset
        if row["temperature"] == 0:
            greedy += 1
            assert row["token_ids"] == ref["token_ids"], row["id"]
            assert (row["finish_reason"], row["satisfied"], row["onset"]) == \
                (ref["finish_reason"], ref["satisfied"], ref["onset"])
    assert 0 < greedy < len(rows)  # both kinds of row were made
    assert generator.model.fingerprint == hf["fingerprint"]  # a corpus resumes across engines


def test_build_corpus_on_vllm_resumes(generator, tmp_path):
    """One round through `build_corpus(generator=...)`, then a rerun continues with the next round."""
    # batch_size 2 keeps rounds at round_size (build_corpus enlarges them to 3 x batch_size / tasks)
    config = corpus.CorpusConfig(tasks=tuple(TASK_IDS), per_task=8, round_size=4, batch_size=2, max_rounds=1,
                                 max_new_tokens=16, max_new_tokens_other=16)
    lm = generator.model
    manifest = corpus.build_corpus(lm, tmp_path, config, progress=False, command="test", generator=generator)
    assert manifest["engines"] == ["vllm"] and manifest["fingerprint"] == lm.fingerprint
    rounds = corpus.load_rounds(tmp_path)
    assert [r["engine"] for r in rounds] == ["vllm", "vllm"] and {r["round"] for r in rounds} == {0}
    corpus.build_corpus(lm, tmp_path, config, progress=False, generator=generator)
    assert {r["round"] for r in corpus.load_rounds(tmp_path)} == {0, 1}
    rows = corpus.load_corpus(tmp_path)
    assert rows and len({r["id"] for r in rows}) == len(rows)
