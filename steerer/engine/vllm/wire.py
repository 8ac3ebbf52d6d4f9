"""What crosses between `VLLMSteerer`'s front and its driver inside vLLM's engine-core process (`core_side.py`).

vLLM's multiprocess engine core talks to its client over ZMQ with msgpack, which carries dicts, lists, strings,
numbers, booleans and None (no pickled objects unless VLLM_ALLOW_INSECURE_SERIALIZATION is set, which steerer
does not ask for). So a request's steerer part rides in `SamplingParams.extra_args[REQUEST_KEY]` and each
step's token events and final result ride back in the request's `EngineCoreOutput.kv_transfer_params[
PAYLOAD_KEY]` (vLLM hands that dict to the `RequestOutput` untouched), as the plain dicts below.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from steerer.constraints import Constraint
from steerer.monitor import FlagEvent
from steerer.policy import SteeringPolicy
from steerer.request import Detection, Request, Result, SamplingParams, TokenEvent, Verdict

SLOT_KEY = "steerer_slot"  # SamplingParams.extra_args: the controller slot the op steers the row by (rows.py)
REQUEST_KEY = "steerer_request"  # SamplingParams.extra_args: the request's constraints, policies, sampling, id
PAYLOAD_KEY = "steerer"  # kv_transfer_params of an EngineCoreOutput: {"events": [...], "result": {...} | None}
INSTALL = "steerer_install"  # EngineCore utility methods the plugin adds in the engine-core process
UNINSTALL = "steerer_uninstall"


def _policy(data: dict[str, Any]) -> SteeringPolicy:
    return SteeringPolicy(data["kind"], data["alpha"], data["guard"])


def request_to_wire(request: Request, request_id: str) -> dict[str, Any]:
    """The request as the engine core's driver needs it (the prompt travels as vLLM's token ids)."""
    return {"id": request_id, "constraints": [asdict(c) for c in request.constraints],
            "policy": asdict(request.policy), "policies": {t: asdict(p) for t, p in request.policies.items()},
            "sampling": asdict(request.sampling)}


def request_from_wire(data: dict[str, Any]) -> Request:
    return Request("", tuple(Constraint(c["task"], dict(c["params"])) for c in data["constraints"]),
                   _policy(data["policy"]), {t: _policy(p) for t, p in data["policies"].items()},
                   SamplingParams(**data["sampling"]), id=data["id"])


def event_to_wire(event: TokenEvent) -> dict[str, Any]:
    return asdict(event)


def event_from_wire(data: dict[str, Any]) -> TokenEvent:
    data = dict(data)
    data["flags"] = [FlagEvent(**f) for f in data["flags"]]
    data["detections"] = [Detection(**d) for d in data["detections"]]
    return TokenEvent(**data)


def result_to_wire(result: Result) -> dict[str, Any]:
    return asdict(result)


def result_from_wire(data: dict[str, Any]) -> Result:
    data = dict(data)
    data["verdicts"] = [Verdict(**v) for v in data["verdicts"]]
    return Result(**data)
