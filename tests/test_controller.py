"""The controller and its engine interface: incremental text, backend-neutral taps (flattened tokens,
`(hidden, residual)` layer outputs), batch-membership events, an injected engine, and any device."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from steerer.constraints import Constraint
from steerer.controller import SlotMap
from steerer.core import Request, Result, Steerer, TokenEvent
from steerer.detokenize import IncrementalDetokenizer
from steerer.engine.hf import HFEngine
from steerer.generation import SamplingParams
from steerer.monitor import MonitorConfig
from steerer.policy import SteeringPolicy
from steerer.service.testing import placeholder_bank, split_stream
from steerer.taps import LayerHooks, LayerLayout, LayerSteering, Where, layout_for

TEXTS = ["Héllo 🌍 wörld — 日本語 😀👍🏽 ok", "👨‍👩‍👧‍👦 family: Ελληνικά, العربية, 한국어!", "plain ascii.\n\nnew line"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from steerer.model import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(None))


# -- incremental detokenizer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id] + tokenizer.encode(" after 🎉")
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)  # split characters are held back, never emitted broken
    assert "" in deltas[:-1]  # some token completed no character on its own


def test_an_incomplete_character_at_the_end_is_flushed_as_the_full_decode_has_it(tokenizer):
    ids = tokenizer.encode("x 🌍")[:-1]  # cut inside the emoji's bytes
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids, skip_special_tokens=True)


# -- backend-neutral taps: a vLLM-shaped toy model ---------------------------------------------------------------
class SplitLayer(nn.Module):
    """Returns (hidden, residual) like vLLM's decoder layers: the residual stream is their sum."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        self.proj = nn.Linear(d, d)
        nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(seed))

    def forward(self, hidden, residual):
        stream = hidden if residual is None else hidden + residual
        return torch.tanh(self.proj(stream)), stream


class ToyModel(nn.Module):
    def __init__(self, d: int = 8, n: int = 3):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(SplitLayer(d, i) for i in range(n))

    def forward(self, x):  # x: [N, d] flattened tokens
        hidden, residual = x, None
        streams = []
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual)
            streams.append(hidden + residual)
        return streams


def test_flattened_tokens_with_split_outputs_are_tapped_and_steered_per_token():
    torch.manual_seed(0)
    model = ToyModel()
    layout = LayerLayout("model.layers", "hidden_residual")
    starts = torch.tensor([0, 3, 4, 6])  # three rows: a 3-token prefill, one decode token, a 2-token prefill
    generated = torch.tensor([False, False, False, True, False, False])
    x = torch.randn(6, 8)
    with torch.no_grad():
        plain = model(x)
    direction = torch.zeros(1, 8)
    direction[0, 2] = 1.0
    steer = LayerSteering(direction, Where.GENERATED)
    steer.set_coeffs(torch.tensor([[5.0], [7.0], [0.0]]))
    with LayerHooks(model, tap_layers=(1,), steering={1: steer}, layout=layout) as hooks, torch.no_grad():
        hooks.set_pass(generated, starts)
        steered = model(x)
        tapped = hooks.captured[1]
    torch.testing.assert_close(tapped, steered[1][starts[1:] - 1])  # each row's last token, the summed stream
    delta = steered[1] - plain[1]
    assert torch.equal(delta[[0, 1, 2, 4, 5]], torch.zeros(5, 8))  # prompt tokens: untouched (exact)
    torch.testing.assert_close(delta[3], 7.0 * direction[0])  # row 1's generated token: its own alpha
    with LayerHooks(model, tap_layers=(0, 2), layout=layout) as hooks, torch.no_grad():
        hooks.set_pass(True, starts)
        model(x)
        torch.testing.assert_close(hooks.captured[2], plain[2][starts[1:] - 1])


def test_layouts_are_data_per_architecture(lm):
    assert layout_for(lm.model) == LayerLayout("model.layers", "first")
    with pytest.raises(ValueError):
        LayerLayout("model.layers", "interleaved")


def test_slot_map_follows_added_removed_and_moved_rows():
    rows = SlotMap()
    rows.apply(added=[(0, 5), (1, 2), (2, 9)])
    assert rows.rows().tolist() == [5, 2, 9]
    rows.apply(removed=[1], moved=[(2, 1, False)])  # vLLM condenses: the last row fills the hole
    assert rows.rows().tolist() == [5, 9]
    rows.apply(added=[(2, 4)], moved=[(0, 2, True)])
    assert rows.rows().tolist() == [4, 9, 5]


# -- the Steerer drives the controller over an injected engine ----------------------------------------------
def run(steerer: Steerer, requests: list[Request]) -> tuple[dict[str, Result], dict[str, list[TokenEvent]]]:
    return split_stream(steerer.generate(requests))


def test_an_injected_engine_gets_the_taps_and_the_text_streams_exactly(lm):
    bank = placeholder_bank(lm.fingerprint, lm.hidden_size, "t", {"lowercase": -4.0})
    engine = HFEngine(lm)
    requests = [Request("Name three colors.", (Constraint("lowercase"),), SteeringPolicy("conditional", 4.0),
                        sampling=SamplingParams(max_new_tokens=8), id="a"),
                Request("Say hi.", sampling=SamplingParams(max_new_tokens=5), id="b")]
    with Steerer(lm, bank, engine=engine, monitor_config=MonitorConfig(warmup_tokens=0)) as steerer:
        assert engine.hooks.attached and set(engine.hooks.tap_layers) == set(bank.layers)
        results, events = run(steerer, requests)
    assert not engine.hooks.attached
    for rid, result in results.items():
        assert "".join(e.text for e in events[rid]) == result.text
    assert results["a"].verdicts[0].flagged and results["a"].steered_tokens["lowercase"] > 0


def test_generate_runs_on_the_cpu_device():
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", "generate", "--prompt", "Say hi.", "--device", "cpu",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_tables_stay_on_the_device_and_tokens_match_cpu(lm):
    from steerer.model import load_model

    gpu = load_model(device="cuda")
    bank = placeholder_bank(lm.fingerprint, lm.hidden_size, "t", {"lowercase": -4.0})
    request = Request("Name three colors.", (Constraint("lowercase"),), SteeringPolicy("constant", 4.0),
                      sampling=SamplingParams(max_new_tokens=8), id="a")
    with Steerer(lm, bank) as steerer:
        (cpu_result,) = steerer.run([request])
    with Steerer(gpu, bank) as steerer:
        assert steerer.monitor.smoothed.device.type == "cuda"
        assert steerer.controller.steering[bank.probes[0].layer].directions.device.type == "cuda"
        (gpu_result,) = steerer.run([request])
    assert gpu_result.tokens[:4] == cpu_result.tokens[:4]  # kernels differ; the first tokens agree
    assert gpu_result.steered_tokens == cpu_result.steered_tokens
