"""What crosses between `VLLMSteerer`'s front and its driver in vLLM's engine-core process (`steerer.engine.vllm.wire`):
plain msgpack-able data that rebuilds the same request, token events and results (no vLLM needed)."""

from __future__ import annotations

import json
import math

from steerer.constraints import Constraint
from steerer.engine.vllm.wire import (
    event_from_wire,
    event_to_wire,
    request_from_wire,
    request_to_wire,
    result_from_wire,
    result_to_wire,
)
from steerer.monitor import FlagEvent
from steerer.policy import SteeringPolicy
from steerer.request import Detection, Request, Result, SamplingParams, TokenEvent, Verdict


def _plain(value) -> bool:
    """Only what msgpack carries without pickling: dicts with str keys, lists, str, numbers, bools, None."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def _through_json(data):
    """As msgpack gives it back: tuples become lists (JSON does the same)."""
    return json.loads(json.dumps(data))


def test_request_round_trip_keeps_constraints_policies_and_sampling():
    request = Request("Describe the sea.", (Constraint("word_count", {"relation": "at most", "limit": 20}),
                                            Constraint("lowercase")),
                      SteeringPolicy.parse("conditional:6.25"), {"lowercase": SteeringPolicy.parse("guard+constant:3")},
                      SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.9, seed=5, ignore_eos=True), id="r1")
    wire = request_to_wire(request, "r1")
    assert _plain(wire)
    back = request_from_wire(_through_json(wire))
    assert (back.constraints, back.policy, back.policies, back.sampling, back.id) == (
        request.constraints, request.policy, request.policies, request.sampling, "r1")


def test_events_and_results_round_trip_with_flags_detections_and_verdicts():
    event = TokenEvent("r1", 3, 42, " sea", {"lowercase": 0.25}, {"lowercase": 6.0},
                       [FlagEvent(0, 3, "lowercase", 0.75, True)], [Detection("word_count", 2)], {"lowercase": 2})
    result = Result("r1", "the sea", [5, 42], "eos",
                    [Verdict("word_count", {"limit": 20}, True, None, True, 1, False, detected_at=2, probe_note="x"),
                     Verdict("lowercase", {}, False, 0.5, False, None, None)],
                    7, {"lowercase": 2}, "v1", traces={"lowercase": [0.5, math.inf]})
    assert _plain(event_to_wire(event)) and _plain(result_to_wire(result))
    assert event_from_wire(_through_json(event_to_wire(event))) == event
    assert result_from_wire(_through_json(result_to_wire(result))) == result
