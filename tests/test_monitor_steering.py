"""The monitor under steering, on the real model: readings take back out what this pass's steering added.

On the first steered pass the prefix is the unsteered run's (steering covers generated tokens; the first one
was chosen from the unsteered prompt pass), so an exact deduction reads what the unsteered run read there.
char_count's probe reads layer 6, where its steering is added: the deduction is exact. keyword_inclusion's
reads layer 9, six layers above its steering (layer 3): the deduction removes the direct path only.
"""

from __future__ import annotations

import pytest

from steerer import Constraint, ProbeBank, Request, SamplingParams, SteeringPolicy
from steerer.core import Result, Steerer
from steerer.monitor import MonitorConfig
from steerer.policy import OFF

PROMPTS = ["Describe the ocean.", "Explain how a bicycle works.", "Write about your favourite food."]


@pytest.fixture(scope="module")
def bank():
    return ProbeBank.load(None)


def first_steered_readings(lm, bank, task: str, params: dict, policy, deduct: bool) -> list[float]:
    """Each prompt's end-probe reading at response index 0 (the first pass that steering reaches)."""
    requests = [Request(text, (Constraint(task, params),), policy, sampling=SamplingParams(max_new_tokens=2),
                        id=str(i)) for i, text in enumerate(PROMPTS)]
    with Steerer(lm, bank, MonitorConfig(deduct_steering=deduct), capacity=4, record=True,
                 use_unreliable_probes=True) as steerer:
        results = sorted((r for r in steerer.generate(requests) if isinstance(r, Result)), key=lambda r: r.request_id)
    return [r.traces[task][0] for r in results]


def test_at_the_steering_layer_the_deducted_reading_is_the_unsteered_one(lm, bank):
    probe = bank.probes[bank.index("char_count")]
    assert probe.layer == probe.steering_layer == 6  # the premise: read where the steering is added
    params, steer = {"relation": "at most", "limit": 300}, SteeringPolicy("constant", 100.0)  # under the bank's bound (105.8)
    off = first_steered_readings(lm, bank, "char_count", params, OFF, True)
    deducted = first_steered_readings(lm, bank, "char_count", params, steer, True)
    raw = first_steered_readings(lm, bank, "char_count", params, steer, False)
    assert deducted == pytest.approx(off, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(raw, off, strict=True)) > 0.02  # without it the steering shows


def test_downstream_the_deduction_takes_out_the_direct_path_only(lm, bank):
    probe = bank.probes[bank.index("keyword_inclusion")]
    assert probe.steering_layer < probe.layer  # read six layers above the steering
    params, steer = {"terms": ["lighthouse"]}, SteeringPolicy("constant", 60.0)
    off = first_steered_readings(lm, bank, "keyword_inclusion", params, OFF, True)
    deducted = first_steered_readings(lm, bank, "keyword_inclusion", params, steer, True)
    raw = first_steered_readings(lm, bank, "keyword_inclusion", params, steer, False)
    gaps = [abs(d - o) for d, o in zip(deducted, off, strict=True)]
    raw_gaps = [abs(r - o) for r, o in zip(raw, off, strict=True)]
    assert sum(gaps) < sum(raw_gaps)  # closer than the raw reading ...
    assert max(gaps) > 1e-4  # ... but not exact: what layers 4-9 did with the added vector stays in
