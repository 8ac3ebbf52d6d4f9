"""Every supported family on the transformers backend, on tiny random-weight checkpoints (`steerer.testing.tiny`):
the taps read the residual stream after the layer (`hidden_states[L + 1]`), steering adds exactly
alpha * unit(direction) there, an attached but unsteered hook changes no token, and the logit lens follows
each family's final norm (Gemma's (1 + w) included)."""

from __future__ import annotations

import pytest
import torch

from steerer.engine.hf import HFEngine
from steerer.generation import SamplingParams, generate
from steerer.lens import LensWeights
from steerer.model import chat_prompt, load_model
from steerer.taps import LayerHooks, LayerSteering, Where, layout_for, unit_directions
from steerer.testing.tiny import FAMILIES, build_tiny

ALPHA = 5.0


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    lm = load_model(str(build_tiny(request.param, tmp_path_factory.mktemp(request.param))))
    return lm, chat_prompt(lm.tokenizer, "Name three colors.")


def test_the_family_has_a_layout(tiny):
    lm, _ = tiny
    from steerer.taps import LAYOUTS

    assert lm.model.config.model_type in LAYOUTS
    assert layout_for(lm.model) is LAYOUTS[lm.model.config.model_type]


def test_taps_read_the_residual_after_each_layer(tiny):
    lm, prompt = tiny
    ids = torch.tensor([prompt])
    with torch.no_grad(), LayerHooks(lm.model, tap_layers=(0, 1)) as hooks:
        out = lm.model(ids, output_hidden_states=True)
        # hidden_states[L + 1] for every layer but the last (transformers puts the final norm on that one)
        for layer in range(lm.num_layers - 1):
            assert torch.equal(hooks.captured[layer], out.hidden_states[layer + 1][:, -1])
        assert not torch.equal(hooks.captured[0], hooks.captured[1])


def test_steering_adds_exactly_alpha_times_the_direction(tiny):
    lm, prompt = tiny
    ids = torch.tensor([prompt])
    direction = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    steer = LayerSteering(unit_directions(direction), Where.BOTH)
    steer.set_coeffs(torch.tensor([[ALPHA]]))
    with torch.no_grad():
        with LayerHooks(lm.model, tap_layers=(1,)) as plain:
            lm.model(ids)
            before = plain.captured[1].clone()
        with LayerHooks(lm.model, tap_layers=(1,), steering={1: steer}) as steered:
            lm.model(ids)
            after = steered.captured[1].clone()
    assert torch.allclose(after - before, ALPHA * unit_directions(direction), atol=1e-5)


def test_an_unsteered_hook_changes_no_token(tiny):
    lm, prompt = tiny
    params = SamplingParams(8, 0.0)
    bare = generate(HFEngine(lm), [prompt], params)[0].tokens
    steer = LayerSteering(unit_directions(torch.ones(lm.hidden_size)), Where.BOTH)
    steer.set_coeffs(torch.zeros(1, 1))
    with LayerHooks(lm.model, tap_layers=(0, 1), steering={1: steer}) as hooks:
        hooked = generate(HFEngine(lm, hooks), [prompt], params)[0].tokens
    assert hooked == bare and len(bare) > 0


def test_the_lens_matches_the_family_s_own_final_norm_and_unembedding(tiny):
    lm, prompt = tiny
    with torch.no_grad():
        out = lm.model(torch.tensor([prompt]), output_hidden_states=True)
        x = out.hidden_states[1][:, -1]  # a mid-stack residual, through the model's own final norm and head
        want = lm.model.get_output_embeddings()(lm.model.get_decoder().norm(x))
    ids = torch.tensor([[5, 17, 123]])
    got = LensWeights.of(lm.model).features(x, ids, torch.ones_like(ids, dtype=torch.bool))
    rows = want[0, ids[0]]
    assert torch.allclose(got[0], torch.stack([rows.max(), rows.mean()]), rtol=1e-4, atol=1e-4)


def test_every_family_has_a_vllm_class_and_others_are_refused_in_one_line():
    from transformers import GPT2Config

    from steerer.engine.vllm import FAMILIES as VLLM_FAMILIES
    from steerer.engine.vllm import steerer_architecture
    from steerer.engine.vllm.startup import architecture_problem
    from steerer.testing.tiny import default_tokenizer, tiny_config

    tokenizer = default_tokenizer()
    for family in FAMILIES:
        config = tiny_config(family, tokenizer)
        arch = steerer_architecture(config.architectures, config.model_type)
        assert architecture_problem(config, arch) is None
    with pytest.raises(ValueError) as refused:
        steerer_architecture(["GPT2LMHeadModel"], "gpt2")
    assert str(refused.value) == ("steerer on vLLM does not support GPT2LMHeadModel (model_type 'gpt2'); supported: "
                                  + ", ".join(VLLM_FAMILIES))
    assert "\n" not in architecture_problem(GPT2Config())
