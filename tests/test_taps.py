"""Taps read exactly what transformers returns as hidden states; steering is per row and removable."""

from __future__ import annotations

import pytest
import torch

from steerer.engine.hf import HFEngine
from steerer.generation import ChainedHooks, SamplingParams, generate
from steerer.taps import FixedSteering, LayerHooks, LayerSteering, Where, decoder_layers, unit_directions

LAYERS = (0, 7, 15, 28)
GREEDY = SamplingParams(max_new_tokens=12)


class Recorder:
    def __init__(self):
        self.views = []

    def before_forward(self, rows, index):
        pass

    def after_forward(self, view):
        self.views.append(view)


def hidden_states_for(lm, ids: list[int]) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


def test_taps_match_output_hidden_states_in_prefill_and_decode(lm, prompts):
    recorder = Recorder()
    with LayerHooks(lm.model, tap_layers=LAYERS) as hooks:
        result = generate(HFEngine(lm, hooks), prompts[:1], GREEDY, recorder)[0]
    full = prompts[0] + result.tokens  # the last view may have chosen EOS: its input is the last token
    hidden = hidden_states_for(lm, full)
    prompt_len = len(prompts[0])
    assert len(recorder.views) == len(result.tokens) + (result.finish_reason == "eos")
    for step, view in enumerate(recorder.views):
        position = prompt_len - 1 + step  # step 0 = prefill (last prompt token), then each decode input
        for layer in LAYERS:
            expected = hidden[layer + 1][0, position]
            torch.testing.assert_close(view.residuals[layer][0], expected, rtol=1e-4, atol=1e-3)


def test_taps_in_a_left_padded_batch_match_single_rows(lm, prompts):
    recorder = Recorder()
    with LayerHooks(lm.model, tap_layers=(5, 20)) as hooks:
        generate(HFEngine(lm, hooks), prompts, SamplingParams(max_new_tokens=2), recorder)
    prefill = recorder.views[0]
    for row, ids in enumerate(prompts):
        hidden = hidden_states_for(lm, ids)
        for layer in (5, 20):
            torch.testing.assert_close(prefill.residuals[layer][row], hidden[layer + 1][0, -1], rtol=1e-4, atol=2e-3)


def test_alpha_zero_is_bit_identical_to_no_steering(lm, prompts):
    plain_recorder, steered_recorder = Recorder(), Recorder()
    with LayerHooks(lm.model, tap_layers=(12,)) as hooks:
        plain = generate(HFEngine(lm, hooks), prompts, GREEDY, plain_recorder)
    direction = unit_directions(torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0)))
    steer = LayerSteering(direction, Where.BOTH)

    class ZerosAdded(FixedSteering):
        def before_forward(self, rows, index):
            super().before_forward(rows, index)
            steer.active = True  # force the add of exact zeros, the path a mixed batch takes

    fixed = ZerosAdded({10: steer}, {10: torch.zeros(len(prompts), 1)})
    with LayerHooks(lm.model, tap_layers=(12,), steering={10: steer}) as hooks:
        steered = generate(HFEngine(lm, hooks), prompts, GREEDY, ChainedHooks([fixed, steered_recorder]))
    assert [g.tokens for g in plain] == [g.tokens for g in steered]
    for a, b in zip(plain_recorder.views, steered_recorder.views, strict=True):
        assert torch.equal(a.residuals[12], b.residuals[12])


def test_steering_one_row_leaves_the_others_unchanged_and_changes_its_text(lm, prompts):
    with LayerHooks(lm.model) as hooks:
        plain = generate(HFEngine(lm, hooks), prompts, GREEDY)
    direction = unit_directions(torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(1)))
    steer = LayerSteering(direction, Where.BOTH)
    fixed = FixedSteering({8: steer}, {8: torch.tensor([[0.0], [400.0], [0.0]])})
    with LayerHooks(lm.model, steering={8: steer}) as hooks:
        steered = generate(HFEngine(lm, hooks), prompts, GREEDY, fixed)
    assert steered[0].tokens == plain[0].tokens
    assert steered[2].tokens == plain[2].tokens
    assert steered[1].tokens != plain[1].tokens


@pytest.mark.parametrize("where", [Where.PROMPT, Where.GENERATED])
def test_steering_where_limits_the_tokens_it_touches(lm, prompts, where):
    direction = unit_directions(torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(2)))
    steer = LayerSteering(direction, where)
    steer.set_coeffs(torch.tensor([[200.0]]))
    recorder, plain_recorder = Recorder(), Recorder()
    with LayerHooks(lm.model, tap_layers=(8,)) as hooks:
        generate(HFEngine(lm, hooks), prompts[:1], SamplingParams(max_new_tokens=3), plain_recorder)
    with LayerHooks(lm.model, tap_layers=(8,), steering={8: steer}) as hooks:
        generate(HFEngine(lm, hooks), prompts[:1], SamplingParams(max_new_tokens=3), recorder)
    prefill_changed = not torch.equal(recorder.views[0].residuals[8], plain_recorder.views[0].residuals[8])
    assert prefill_changed == (where is Where.PROMPT)
    if where is Where.GENERATED:
        delta = recorder.views[1].residuals[8] - plain_recorder.views[1].residuals[8]
        assert float(delta.norm()) > 100


def test_hooks_are_removed_and_the_model_is_untouched(lm, prompts):
    layers = decoder_layers(lm.model)
    before = [len(layer._forward_hooks) for layer in layers]
    steer = LayerSteering(unit_directions(torch.ones(lm.hidden_size)), Where.BOTH)
    steer.set_coeffs(torch.tensor([[50.0]]))
    with LayerHooks(lm.model, tap_layers=(1, 2), steering={3: steer}) as hooks:
        assert sum(len(layer._forward_hooks) for layer in layers) == sum(before) + 3
        generate(HFEngine(lm, hooks), prompts[:1], SamplingParams(max_new_tokens=2))
    assert [len(layer._forward_hooks) for layer in layers] == before
    assert not hooks.captured
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([prompts[0]]), output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[4][0, -1], hidden_states_for(lm, prompts[0])[4][0, -1])


def test_bad_layers_and_directions_are_rejected(lm):
    with pytest.raises(ValueError, match="out of range"):
        LayerHooks(lm.model, tap_layers=(lm.num_layers,))
    with pytest.raises(ValueError, match="non-zero"):
        unit_directions(torch.zeros(lm.hidden_size))
