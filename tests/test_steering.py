"""Per-request steering policies in `Steerer`, and `generate()` + `SteererLogitsProcessor` parity with it.

Real model, stand-in probe banks (random weights, fixed seeds) for the nine real task names: what is tested
here is the plumbing (which alpha reaches which row at which step, what the monitor reads), not probe
quality. Thresholds are chosen so flags actually occur (0.99: every probe says "violation").
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LogitsProcessorList

from probes.tasks import TASKS
from steerer.bank import BankError, Probe, ProbeBank
from steerer.constraints import Constraint
from steerer.core import Request, Result, Steerer, TokenEvent
from steerer.generation import SamplingParams
from steerer.hf_processor import RowSpec, attach_steerer
from steerer.model import chat_prompt
from steerer.policy import OFF, SteeringPolicy
from steerer.service.testing import split_stream
from steerer.taps import unit_directions

LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26)
PROMPT = "Name three colors."
LOWER = Constraint("lowercase")
WORDS = Constraint("word_count", {"relation": "at most", "limit": 10})


def stand_in_bank(lm, seed: int = 0, threshold: float = 0.5, fingerprint: str | None = None) -> ProbeBank:
    """Random probes for the real task names, one per layer; weights scaled so logits are O(1)."""
    g = torch.Generator().manual_seed(seed)
    k, d = len(TASKS), lm.hidden_size
    probes = [Probe(task=t, layer=layer, threshold=threshold, reliable=True) for t, layer in zip(TASKS, LAYERS, strict=True)]
    return ProbeBank("dev", fingerprint or lm.fingerprint, d, probes, torch.randn(k, d, generator=g) / 100,
                     torch.zeros(k), unit_directions(torch.randn(k, d, generator=g)), version="dev")


def run_steerer(lm, bank, requests: list[Request]) -> tuple[list[Result], dict[str, list[TokenEvent]]]:
    with Steerer(lm, bank, record=True) as steerer:
        results, events = split_stream(steerer.generate(requests))
    return [results[r.id] for r in requests], events


def request(policy: SteeringPolicy = OFF, rid: str = "r", tokens: int = 16, prompt: str = PROMPT,
            constraints: tuple[Constraint, ...] = (LOWER, WORDS)) -> Request:
    return Request(prompt, constraints, policy, sampling=SamplingParams(max_new_tokens=tokens), id=rid)


@pytest.fixture(scope="module")
def bank(lm):
    return stand_in_bank(lm)


@pytest.fixture(scope="module")
def flagging_bank(lm):
    return stand_in_bank(lm, seed=1, threshold=0.99)


# -- Steerer policies ---------------------------------------------------------------------------------------
def test_an_off_request_is_untouched_by_heavily_steered_neighbours(lm, flagging_bank):
    (alone,), _ = run_steerer(lm, flagging_bank, [request(rid="off")])
    heavy = [request(SteeringPolicy("constant", 300.0), rid="c"), request(rid="off"),
             request(SteeringPolicy("conditional", 300.0), rid="d")]
    results, events = run_steerer(lm, flagging_bank, heavy)
    assert results[1].tokens == alone.tokens
    assert all(alpha == 0 for e in events["off"] for alpha in e.steering.values())
    assert results[0].tokens != alone.tokens  # the neighbours really were steered
    assert results[1].steered_tokens == {"lowercase": 0, "word_count": 0}


def test_conditional_steering_follows_the_previous_steps_flags(lm, flagging_bank):
    alpha = 6.0
    (result,), events = run_steerer(lm, flagging_bank, [request(SteeringPolicy("conditional", alpha))])
    up = dict.fromkeys(("lowercase", "word_count"), False)
    detected: dict[str, int] = {}  # from the reading of the detected token on, the gate stays up
    seen = {True: 0, False: 0}
    for event in events["r"]:
        for task, was_up in up.items():
            gate = was_up or detected.get(task, event.index) <= event.index - 2  # that reading chose this token
            assert event.steering[task] == (alpha if gate else 0.0), (event.index, task)
            seen[gate] += 1
        for flag in event.flags:
            assert flag.task not in detected or flag.token_index < detected[flag.task]  # settled: no more flags
            up[flag.task] = flag.raised
        detected |= {d.task: event.index for d in event.detections}
    assert seen[True] > 0 and seen[False] > 0  # both states occurred
    assert result.steered_tokens["lowercase"] == sum(e.steering["lowercase"] != 0 for e in events["r"])


def test_constant_steering_changes_the_text_at_a_large_alpha(lm, bank):
    (plain,), _ = run_steerer(lm, bank, [request()])
    (steered,), events = run_steerer(lm, bank, [request(SteeringPolicy("constant", 400.0))])
    assert steered.text != plain.text
    assert events["r"][0].steering == {"lowercase": 0.0, "word_count": 0.0}  # prefill: Where.GENERATED
    assert all(e.steering == {"lowercase": 400.0, "word_count": 400.0} for e in events["r"][1:])


def test_proportional_alpha_is_alpha_times_the_previous_risk(lm, bank):
    alpha = 20.0
    _, events = run_steerer(lm, bank, [request(SteeringPolicy("proportional", alpha), tokens=10)])
    trace = events["r"]
    assert len(trace) > 3
    for previous, event in itertools.pairwise(trace):
        for task, risk in previous.risks.items():
            assert event.steering[task] == pytest.approx(alpha * risk, rel=1e-5, abs=1e-6)
    assert any(0 < e.steering["lowercase"] < alpha for e in trace)


def test_a_bank_for_another_model_is_refused(lm):
    other = stand_in_bank(lm, fingerprint="0123456789abcdef")
    with pytest.raises(BankError, match="fingerprint"):
        Steerer(lm, other)
    with pytest.raises(BankError, match="fingerprint"), attach_steerer(lm.model, lm.tokenizer, other):
        pass
    narrow = ProbeBank("dev", lm.fingerprint, 8, [Probe("lowercase", 1)], torch.zeros(1, 8), torch.zeros(1),
                       unit_directions(torch.ones(1, 8)))
    with pytest.raises(BankError, match="hidden size"):
        Steerer(lm, narrow)


# -- LogitsProcessor parity ----------------------------------------------------------------------------------
def hf_generate(lm, bank, prompts: list[str], policies: list[SteeringPolicy], tokens: int = 16,
                constraints: tuple[Constraint, ...] = (LOWER, WORDS)) -> tuple[list[Result], list[TokenEvent]]:
    encoded = lm.tokenizer.pad([{"input_ids": chat_prompt(lm.tokenizer, p)} for p in prompts],
                               return_tensors="pt", padding_side="left")
    rows = [RowSpec(constraints, policy, id=f"r{i}") for i, policy in enumerate(policies)]
    with attach_steerer(lm.model, lm.tokenizer, bank, rows=rows, record=True) as proc, torch.inference_mode():
        out = lm.model.generate(**encoded, max_new_tokens=tokens, do_sample=False, return_dict_in_generate=True,
                                logits_processor=LogitsProcessorList([proc]))
        results = proc.finish(out)
        return results, proc.events()


def assert_same_run(ours: Result, ours_events: list[TokenEvent], theirs: Result, theirs_events: list[TokenEvent],
                    risk_tol: float = 1e-4) -> None:
    assert theirs.tokens == ours.tokens
    assert theirs.finish_reason == ours.finish_reason
    assert [e.index for e in theirs_events] == [e.index for e in ours_events]
    assert [e.token_id for e in theirs_events] == [e.token_id for e in ours_events]
    assert [e.steering for e in theirs_events] == [e.steering for e in ours_events]
    for a, b in zip(ours_events, theirs_events, strict=True):
        for task in a.risks:
            assert abs(a.risks[task] - b.risks[task]) <= risk_tol, (a.index, task)
        assert [(f.task, f.raised, f.token_index) for f in a.flags] == [(f.task, f.raised, f.token_index) for f in b.flags]
    for va, vb in zip(ours.verdicts, theirs.verdicts, strict=True):
        assert (va.flagged, va.first_flag_token, va.satisfied) == (vb.flagged, vb.first_flag_token, vb.satisfied)
        assert abs(va.p_satisfied_end - vb.p_satisfied_end) <= risk_tol
    assert theirs.steered_tokens == ours.steered_tokens
    if theirs.traces is not None:  # per-token P(satisfied), the EOS reading included
        assert theirs.traces.keys() == ours.traces.keys()
        for task, trace in ours.traces.items():
            assert theirs.traces[task] == pytest.approx(trace, abs=risk_tol)


def test_processor_with_policy_off_matches_steerer_tokens_and_risks(lm, bank):
    (ours,), events = run_steerer(lm, bank, [request(rid="r0")])
    (theirs,), theirs_events = hf_generate(lm, bank, [PROMPT], [OFF])
    assert ours.finish_reason == "eos"  # so the EOS pass that finish() runs is compared too
    assert any(e.flags for e in events["r0"])
    assert_same_run(ours, events["r0"], theirs, theirs_events)


@pytest.mark.parametrize("policy", [SteeringPolicy("conditional", 150.0), SteeringPolicy("constant", 150.0)])
def test_processor_steering_matches_steerer(lm, flagging_bank, policy):
    (plain,), _ = run_steerer(lm, flagging_bank, [request(rid="r0")])
    (ours,), events = run_steerer(lm, flagging_bank, [request(policy, rid="r0")])
    assert ours.tokens != plain.tokens  # the policy changes the text, so parity means something
    (theirs,), theirs_events = hf_generate(lm, flagging_bank, [PROMPT], [policy])
    assert_same_run(ours, events["r0"], theirs, theirs_events)


def test_processor_rows_are_independent_in_a_padded_batch(lm, flagging_bank):
    prompts = [PROMPT, "Write one short sentence about the moon and the stars."]
    policies = [OFF, SteeringPolicy("constant", 300.0)]
    results, events = hf_generate(lm, flagging_bank, prompts, policies, tokens=12)
    (alone,), _ = run_steerer(lm, flagging_bank, [request(rid="x", tokens=12)])
    assert results[0].tokens == alone.tokens
    assert all(e.steering == {"lowercase": 0.0, "word_count": 0.0} for e in events if e.request_id == "r0")
    steered = [e for e in events if e.request_id == "r1"]
    assert steered[0].steering == {"lowercase": 0.0, "word_count": 0.0}  # prefill untouched
    assert all(e.steering == {"lowercase": 300.0, "word_count": 300.0} for e in steered[1:])


def test_one_attached_processor_serves_consecutive_generate_calls(lm, flagging_bank):
    policy = SteeringPolicy("constant", 150.0)
    (ours,), events = run_steerer(lm, flagging_bank, [request(policy, rid="r0", tokens=8)])
    ids = torch.tensor([chat_prompt(lm.tokenizer, PROMPT)])
    with attach_steerer(lm.model, lm.tokenizer, flagging_bank, constraints=(LOWER, WORDS), policy=policy) as proc:
        runs = []
        for _ in range(2):  # the second prefill must not inherit the first run's steering or state
            out = lm.model.generate(ids, max_new_tokens=8, do_sample=False,
                                    logits_processor=LogitsProcessorList([proc]))
            runs.append((proc.finish(out)[0], proc.events()))
    for theirs, theirs_events in runs:
        assert_same_run(ours, events["r0"], theirs, theirs_events)
