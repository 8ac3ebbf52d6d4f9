"""The one driver seam (`steerer.driver.Driver`) and the backend interface (`steerer.backend.Backend`): the stop
rule every engine shares, one validation per path, and `stop_steering_on_detection` on the `generate()` drop-in
as on the `Steerer` (real model, real controller)."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from steerer.backend import Backend
from steerer.constraints import Constraint
from steerer.controller import Controller
from steerer.core import Steerer
from steerer.driver import Driver, Options, Stop, eos_token_ids
from steerer.hf_processor import attach_steerer
from steerer.model import chat_prompt
from steerer.policy import SteeringPolicy
from steerer.request import Request, RowSpec, SamplingParams
from steerer.service.testing import placeholder_bank, split_stream

PROMPT = "Name three colors."


@pytest.fixture(scope="module")
def bank(lm):
    # lowercase reads risk ~0.98: its conditional gate is up from the warm-up; the capital the model writes
    # first is a certain (detected) violation of it
    return placeholder_bank(lm.fingerprint, lm.hidden_size, "drv", {"lowercase": -4.0})


def test_eos_ids_merge_every_source_once():
    assert eos_token_ids([2, 7], 2, None, (9,)) == (2, 7, 9)
    assert eos_token_ids(None) == ()


def _pass(driver: Driver, slots: list[int], position: int) -> None:
    """One pass read for `slots` from zero residuals (what an engine hands over after a forward)."""
    d = driver.controller.bank.hidden_size
    residuals = {layer: torch.zeros(len(slots), d) for layer in driver.controller.tap_layers}
    driver.read(slots, [position] * len(slots), residuals)


def test_the_stop_rule_decides_eos_and_length_and_the_result_says_which(lm, bank):
    driver = Driver.build(bank, lm.tokenizer, [7], Options(capacity=4))
    spec = RowSpec((Constraint("lowercase"),))
    budget, eos = driver.join(spec, "budget", Stop(frozenset({7}), max_new_tokens=2)), driver.join(spec, "eos")
    _pass(driver, [budget, eos], -1)
    first = driver.token(budget, 100)
    assert driver.ending(budget) is None and first.index == 0
    stopped = driver.token(eos, 7)  # the engine's EOS id: not recorded, ends the row
    assert driver.ending(eos) == "eos" and stopped.text == ""
    _pass(driver, [budget], 0)
    driver.token(budget, 101)
    assert driver.ending(budget) == "length"
    ended = driver.finish(budget)
    assert (ended.finish_reason, ended.tokens) == ("length", [100, 101])
    assert driver.finish(eos).finish_reason == "eos"
    assert driver.in_flight == 0 and driver.free_slots == 4


def test_ignore_eos_records_the_eos_token_and_goes_on(lm, bank):
    driver = Driver.build(bank, lm.tokenizer, [7], Options(capacity=1))
    slot = driver.join(RowSpec(), None, Stop(frozenset({7}), max_new_tokens=5, ignore_eos=True))
    _pass(driver, [slot], -1)
    driver.token(slot, 7)
    assert driver.ending(slot) is None and driver.finish(slot).tokens == [7]


def test_a_request_is_validated_once_per_backend_and_again_on_a_new_bank(lm, bank, monkeypatch):
    calls = []
    real = Controller.validate
    monkeypatch.setattr(Controller, "validate", lambda self, spec: (calls.append(spec), real(self, spec))[1])
    req = Request(PROMPT, (Constraint("lowercase"),), sampling=SamplingParams(max_new_tokens=2), id="v")
    with Steerer(lm, bank) as steerer:
        assert isinstance(steerer, Backend)
        steerer.validate(req)  # the RPC thread
        steerer.validate(req)  # the scheduler's re-check before admission: remembered
        steerer.run([req])  # admit: remembered too
        assert len(calls) == 1
        bad = Request(PROMPT, (Constraint("no_such_task"),), id="bad")
        for _ in range(2):  # a refusal is never remembered as valid
            with pytest.raises(ValueError, match="no_such_task"):
                steerer.validate(bad)
    swapped = placeholder_bank(lm.fingerprint, lm.hidden_size, "drv2", {"lowercase": -4.0})
    with Steerer(lm, swapped) as steerer:  # a bank swap is a new backend: the request is checked again
        steerer.validate(req)
    assert len(calls) == 4


def _processor_run(lm, bank, policy: SteeringPolicy, stop: bool, tokens: int):
    ids = torch.tensor([chat_prompt(lm.tokenizer, PROMPT)])
    rows = [RowSpec((Constraint("lowercase"),), policy, id="s")]
    with attach_steerer(lm.model, lm.tokenizer, bank, rows=rows, stop_steering_on_detection=stop) as proc, \
            torch.inference_mode():
        out = lm.model.generate(ids, max_new_tokens=tokens, do_sample=False, return_dict_in_generate=True,
                                logits_processor=LogitsProcessorList([proc]))
        (result,) = proc.finish(out)
        return result, proc.events()


def test_the_drop_in_stops_steering_on_detection_exactly_as_the_steerer(lm, bank):
    policy, tokens = SteeringPolicy("conditional", 4.0), 10
    req = Request(PROMPT, (Constraint("lowercase"),), policy, sampling=SamplingParams(max_new_tokens=tokens), id="s")
    runs = {}
    for stop in (False, True):
        with Steerer(lm, bank, stop_steering_on_detection=stop) as steerer:
            results, events = split_stream(steerer.generate([req]))
        theirs, theirs_events = _processor_run(lm, bank, policy, stop, tokens)
        assert theirs.tokens == results["s"].tokens
        assert [e.steering for e in theirs_events] == [e.steering for e in events["s"]]
        assert theirs.steered_tokens == results["s"].steered_tokens
        (at,) = [e.index for e in theirs_events for _ in e.detections]
        runs[stop] = [e.steering["lowercase"] for e in theirs_events if e.index > at]
    assert runs[True] and all(alpha == 0 for alpha in runs[True])  # stopped from the pass after detection
    assert any(alpha != 0 for alpha in runs[False])  # the option is what stopped it
