"""Teacher forcing reproduces the generation-time taps: the residuals recomputed from a response's tokens
equal the ones the live batch read while sampling them (every pass, every layer, EOS included), and the
cache is incremental."""

from __future__ import annotations

import json

import pytest
import torch

from probes import features
from probes.dataset import POSITIONS
from steerer.engine.hf import HFEngine
from steerer.generation import RunningBatch, SamplingParams
from steerer.model import chat_prompt
from steerer.taps import LayerHooks

LAYERS = (0, 7, 15, 29)
PROMPTS = ["Name three colours, in one short sentence.", "Write one long sentence about the sea and boats."]


class _Recorder:
    """Every pass's residuals per row in fp32, keyed by reading index."""

    def __init__(self):
        self.readings: dict[int, dict[int, torch.Tensor]] = {}

    def before_forward(self, rows, index) -> None:
        pass

    def after_forward(self, view) -> None:
        stacked = torch.stack([view.residuals[layer].float() for layer in LAYERS], dim=1).cpu()
        for i, row in enumerate(view.rows):
            self.readings.setdefault(row, {})[int(view.index[i])] = stacked[i].clone()


@pytest.fixture(scope="module")
def generated(lm):
    """Two rows sampled live, one ending with EOS and one cut by the budget, with their taps."""
    recorder = _Recorder()
    rows = []
    with LayerHooks(lm.model, tap_layers=LAYERS) as hooks:
        batch = RunningBatch(HFEngine(lm, hooks), recorder, tap_eos=True)
        prompts = [chat_prompt(lm.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
        params = [SamplingParams(40, 0.0, 1.0, 0), SamplingParams(6, 0.0, 1.0, 0)]
        done = batch.add([0, 1], prompts, params)
        while len(batch):
            done += batch.step()
    for gen in sorted(done, key=lambda g: g.row):
        rows.append({"id": f"r{gen.row}", "messages": [{"role": "user", "content": PROMPTS[gen.row]}],
                     "token_ids": list(gen.tokens), "finish_reason": gen.finish_reason})
    assert [r["finish_reason"] for r in rows] == ["eos", "length"]
    return rows, recorder.readings


def test_teacher_forced_residuals_equal_generation_taps(lm, generated):
    rows, live = generated
    seqs = [features.sequence_for(lm, r) for r in rows]
    forced = features.residual_passes(lm, seqs, LAYERS)
    for row, seq, res, taps in zip(rows, seqs, forced, [live[0], live[1]], strict=True):
        n = len(row["token_ids"])
        # live passes: -1 .. n for the EOS row (index n fed the EOS token), -1 .. n-2 for the cut row
        expected = set(range(-1, n + 1)) if row["finish_reason"] == "eos" else set(range(-1, n - 1))
        assert set(taps) == expected and seq.last_index == max(expected)
        for index, reading in taps.items():
            got = res[seq.position(index)]
            scale = reading.abs().max(dim=-1, keepdim=True).values
            assert torch.allclose(got / scale, reading / scale, atol=2e-4), (row["id"], index)


def test_cache_is_incremental_and_matches_the_dataset_layout(lm, generated, tmp_path):
    rows, live = generated
    out = tmp_path / "features"
    features.featurise(lm, {"demo": rows[:1]}, out, token_layers=(0, 29), progress=False)
    first = (out / "demo" / "0000.safetensors").stat().st_mtime_ns
    features.featurise(lm, {"demo": rows[:1]}, out, token_layers=(0, 29), progress=False)
    assert (out / "demo" / "0000.safetensors").stat().st_mtime_ns == first  # nothing recomputed
    features.featurise(lm, {"demo": rows}, out, token_layers=(0, 29), progress=False)  # the chunk grew
    data = features.load_features(out, "demo", rows)
    assert json.loads((out / "demo" / "0000.json").read_text())["ids"] == ["r0", "r1"]
    n0, n1 = (len(r["token_ids"]) for r in rows)
    assert data.positions.shape == (2, len(POSITIONS), lm.num_layers, lm.hidden_size)
    assert data.offsets.tolist() == [0, n0 + 1, n0 + 1 + n1 - 1]  # passes 0 .. EOS; 0 .. n-2
    eos = POSITIONS.index("eos")
    torch.testing.assert_close(data.positions[0, eos, 29], live[0][n0][LAYERS.index(29)], rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(data.positions[1, eos, 0], live[1][n1 - 2][LAYERS.index(0)], rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(data.tokens[n0, 1].float(), data.positions[0, eos, 29])  # the EOS pass, fp16
    with pytest.raises(ValueError, match="another model or layout"):
        features.featurise(lm, {"demo": rows}, out, token_layers=(0, 3), progress=False)
    with pytest.raises(FileNotFoundError, match="steerer probes build"):
        features.load_features(out, "demo", rows + [dict(rows[0], id="r9")])
