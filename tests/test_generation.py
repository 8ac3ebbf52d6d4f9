"""The generation loop: parity with transformers, seeded sampling, EOS handling, joining a running batch."""

from __future__ import annotations

import pytest
import torch

from steerer.engine.hf import HFEngine
from steerer.generation import RunningBatch, SamplingParams, generate
from steerer.taps import LayerHooks


def test_greedy_batch_matches_transformers_generate(lm, prompts):
    engine = HFEngine(lm)
    ours = generate(engine, prompts, SamplingParams(max_new_tokens=16))
    encoded = lm.tokenizer.pad([{"input_ids": p} for p in prompts], return_tensors="pt", padding_side="left")
    with torch.inference_mode():
        theirs = lm.model.generate(**encoded, max_new_tokens=16, do_sample=False)
    for row, result in enumerate(ours):
        reference = theirs[row, encoded.input_ids.shape[1]:].tolist()
        assert reference[: len(result.tokens)] == result.tokens
        if result.finish_reason == "eos":
            assert reference[len(result.tokens)] in engine.eos_token_ids


def test_seeded_sampling_is_reproducible_and_independent_of_batch_company(lm, prompts):
    engine = HFEngine(lm)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, seed=7)
    alone = generate(engine, prompts[1:2], params)[0].tokens
    in_batch = generate(engine, prompts, [SamplingParams(max_new_tokens=10), params, params])[1].tokens
    assert alone == in_batch
    other_seed = generate(engine, prompts[1:2], SamplingParams(max_new_tokens=10, temperature=0.9, seed=8))[0]
    assert other_seed.tokens != alone


def test_temperatures_below_the_floor_are_greedy(lm, prompts):
    """1e-40 used to overflow the scaled logits (every token id 0); below MIN_TEMPERATURE is greedy."""
    from steerer.sampling import MIN_TEMPERATURE

    engine = HFEngine(lm)
    greedy = generate(engine, prompts[:1], SamplingParams(max_new_tokens=4, ignore_eos=True))[0].tokens
    for temperature in (1e-40, 1e-30, MIN_TEMPERATURE / 2):
        params = SamplingParams(max_new_tokens=4, temperature=temperature, seed=3, ignore_eos=True)
        assert generate(engine, prompts[:1], params)[0].tokens == greedy, temperature
    assert set(greedy) != {0}


def test_a_row_joining_a_running_batch_decodes_as_it_would_alone(lm, prompts):
    engine = HFEngine(lm)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    expected = [generate(engine, [p], params)[0].tokens for p in prompts]
    batch = RunningBatch(engine)
    done = batch.add(["a"], [prompts[0]], [params])
    done += batch.step() + batch.step()
    done += batch.add(["b", "c"], prompts[1:], [params, params])
    while len(batch):
        done += batch.step()
    got = {g.row: g.tokens for g in done}
    assert [got["a"], got["b"], got["c"]] == expected
    assert all(g.finish_reason == "length" and len(g.tokens) == 8 for g in done)


def test_tap_eos_reads_the_eos_residual_once(lm, prompts):
    seen = []

    class Hooks:
        def before_forward(self, rows, index):
            pass

        def after_forward(self, view):
            seen.append((view.index.tolist(), view.closing.tolist()))

    with LayerHooks(lm.model, tap_layers=(3,)) as hooks:
        result = generate(HFEngine(lm, hooks), prompts[:1], SamplingParams(max_new_tokens=40), Hooks(),
                          tap_eos=True)[0]
    assert result.finish_reason == "eos"
    assert seen[-1] == ([len(result.tokens)], [True])
    assert sum(c[0] for _, c in seen) == 1


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(temperature=float("nan")),
                                 dict(top_p=0.0)])
def test_bad_sampling_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()
