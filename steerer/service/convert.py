"""Protobuf messages <-> the library's dataclasses, with every check a request needs before it queues.

Everything here raises `ValueError` with a message meant for the caller; the servicer turns it into
INVALID_ARGUMENT. Checks that depend on the server (token limits, the bank's tasks) take the limits as
arguments, so the same code serves the unary and the streaming RPC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, struct_pb2

from steerer.constraints import Constraint, known_tasks
from steerer.core import Request, Result, TokenEvent
from steerer.generation import SamplingParams
from steerer.policy import SteeringPolicy
from steerer.service.proto import POLICY_KIND_CODES, pb2

ROLES = ("system", "user", "assistant")
MAX_ID_CHARS = 128
MAX_FORCED_ARMS = 16  # experiments a request may force an arm in (an experiments file holds at most 16)
CHARS_PER_TOKEN_BOUND = 16  # a prompt this many characters per allowed token is too long without tokenizing
# Bounds checked on the protobuf message itself (C code, no Python loop over its contents), so that an
# oversized request is refused in microseconds instead of holding the GIL while it is converted.
MAX_PARAMS_BYTES = 8192  # a constraint's serialized params; the nine tasks need well under 1 KiB
MAX_PARAMS_DEPTH = 4  # objects and lists inside params ({"terms": [...]} is 2)
# Proto enum value -> policy name, from the one vocabulary (`steerer.policy.POLICY_KINDS` via
# `proto.POLICY_KIND_CODES`); UNSPECIFIED is "off".
POLICY_NAMES: dict[int, str] = {pb2.POLICY_KIND_UNSPECIFIED: "off",
                                **{code: name for name, code in POLICY_KIND_CODES.items()}}


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024
    default_new_tokens: int = 128


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values; whole numbers become ints (Struct stores every number as a double)."""
    return _ints(json_format.MessageToDict(struct))


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def params_from_pb(struct: struct_pb2.Struct, where: str) -> dict[str, Any]:
    """A constraint's params, refused when too large or too deeply nested before any Python walks them."""
    size = struct.ByteSize()
    if size > MAX_PARAMS_BYTES:
        raise ValueError(f"{where} is too large: {size} bytes serialized; at most {MAX_PARAMS_BYTES}")
    params = struct_to_dict(struct)
    if _depth(params) > MAX_PARAMS_DEPTH:
        raise ValueError(f"{where} is nested too deeply: at most {MAX_PARAMS_DEPTH} levels of objects and lists")
    return params


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def policy_from_pb(message: pb2.SteeringPolicy, where: str) -> SteeringPolicy:
    kind = POLICY_NAMES.get(message.kind)
    if kind is None:
        raise ValueError(f"{where}: unknown steering policy kind {message.kind}")
    try:
        return SteeringPolicy(kind, float(message.alpha), guard=bool(message.guard))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def sampling_from_pb(message: pb2.SamplingParams, limits: Limits) -> SamplingParams:
    new_tokens = message.max_new_tokens if message.HasField("max_new_tokens") else limits.default_new_tokens
    if not 1 <= new_tokens <= limits.max_new_tokens:
        raise ValueError(f"max_new_tokens must be in 1..{limits.max_new_tokens} on this server, got {new_tokens}")
    params = SamplingParams(
        max_new_tokens=int(new_tokens),
        temperature=message.temperature if message.HasField("temperature") else 0.0,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
        seed=message.seed if message.HasField("seed") else 0,
        ignore_eos=message.ignore_eos)
    return params.validate()


def prompt_from_pb(message: pb2.GenerateRequest, max_messages: int = 2048) -> str | list[dict]:
    which = message.WhichOneof("input")
    if which is None:
        raise ValueError("prompt is empty: set prompt or messages")
    if which == "prompt":
        if not message.prompt.strip():
            raise ValueError("prompt is empty")
        return message.prompt
    if len(message.messages.messages) > max_messages:  # before the loop below walks them
        raise ValueError(f"prompt is too long: {len(message.messages.messages)} messages; at most {max_messages}")
    chat = [{"role": m.role, "content": m.content} for m in message.messages.messages]
    if not chat:
        raise ValueError("prompt is empty: messages has no message")
    for i, m in enumerate(chat):
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r}")
    if not any(m["content"].strip() for m in chat):
        raise ValueError("prompt is empty: every message is blank")
    return chat


def forced_arms_from_pb(message: pb2.GenerateRequest) -> dict[str, str]:
    """`force_arms` (experiment -> arm), bounded like the ids; whether they exist is the servicer's check."""
    if len(message.force_arms) > MAX_FORCED_ARMS:
        raise ValueError(f"force_arms names {len(message.force_arms)} experiments; at most {MAX_FORCED_ARMS}")
    forced = dict(message.force_arms)
    for name, arm in forced.items():
        if not 0 < len(name) <= MAX_ID_CHARS or not 0 < len(arm) <= MAX_ID_CHARS or not (name + arm).isprintable():
            raise ValueError(f"force_arms entries must be non-empty and at most {MAX_ID_CHARS} printable characters")
    return forced


def request_from_pb(message: pb2.GenerateRequest, limits: Limits) -> Request:
    """The library request for a GenerateRequest (the prompt's token count is checked separately)."""
    prompt = prompt_from_pb(message, limits.max_prompt_tokens)  # each message costs tokens of its own
    chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
    chars += len(message.system)
    if chars > limits.max_prompt_tokens * CHARS_PER_TOKEN_BOUND:
        raise ValueError(f"prompt is too long: {chars} characters; this server accepts at most "
                         f"{limits.max_prompt_tokens} tokens")
    for name, value in (("request_id", message.request_id), ("experiment_key", message.experiment_key)):
        if len(value) > MAX_ID_CHARS or not value.isprintable():
            raise ValueError(f"{name} must be at most {MAX_ID_CHARS} printable characters")
    forced_arms_from_pb(message)
    known = known_tasks()
    if len(message.constraints) > len(known):  # each task at most once
        raise ValueError(f"too many constraints: {len(message.constraints)}; at most {len(known)}, one per task")
    constraints, policies = [], {}
    for i, c in enumerate(message.constraints):
        if not c.task:
            raise ValueError(f"constraints[{i}].task is empty")
        constraints.append(Constraint(c.task, params_from_pb(c.params, f"constraints[{i}].params")))
        if c.HasField("policy"):
            policies[c.task] = policy_from_pb(c.policy, f"constraints[{i}].policy")
    request = Request(prompt=prompt, constraints=tuple(constraints), policy=policy_from_pb(message.policy, "policy"),
                      policies=policies, sampling=sampling_from_pb(message.sampling, limits),
                      system=message.system or None)
    return request  # validated once, with the bank, by the backend (`Scheduler.validate`, right after this)


def token_to_pb(event: TokenEvent) -> pb2.TokenEvent:
    out = pb2.TokenEvent(index=event.index, token_id=event.token_id, text=event.text)
    out.risk.update(event.risks)
    out.steering.update(event.steering)
    for flag in event.flags:
        out.flags.add(task=flag.task, token_index=flag.token_index, risk=flag.risk, raised=flag.raised)
    for detection in event.detections:
        out.detections.add(task=detection.task, token_index=detection.token_index)
    out.redrawn.update(event.redrawn)
    return out


def result_to_pb(result: Result, request_id: str, experiment_key: str, model: str,
                 arms: Sequence[Any] = ()) -> pb2.GenerateResponse:
    """The final message; `arms` are `steerer.ab.experiments.Assignment`s (experiment, arm, forced, version)."""
    out = pb2.GenerateResponse(request_id=request_id, text=result.text, token_ids=result.tokens,
                               finish_reason=result.finish_reason, bank_version=result.bank_version,
                               experiment_key=experiment_key, model=model)
    for a in arms:
        out.arms.add(experiment=a.experiment, arm=a.arm, forced=a.forced, version=a.version)
    for v in result.verdicts:
        verdict = out.verdicts.add(task=v.task, predicted_violation=v.predicted_violation, flagged=v.flagged,
                                   probe_reliable=v.probe_reliable, probe_muted=v.probe_muted,
                                   probe_note=getattr(v, "probe_note", ""))
        if v.p_satisfied_end is not None and math.isfinite(v.p_satisfied_end):  # unset, not a made-up 0.0
            verdict.p_satisfied_end = v.p_satisfied_end
        verdict.params.CopyFrom(dict_to_struct(v.params))
        if v.first_flag_token is not None:
            verdict.first_flag_token = v.first_flag_token
        if v.satisfied is not None:
            verdict.satisfied = v.satisfied
        if v.detected_at is not None:
            verdict.detected_at = v.detected_at
    out.usage.prompt_tokens = result.prompt_tokens
    out.usage.completion_tokens = len(result.tokens)
    out.usage.steered_tokens.update({k: int(n) for k, n in result.steered_tokens.items()})
    return out



def probe_info(probe, muted: bool) -> pb2.ProbeInfo:
    """A bank probe as `ListProbes` lists it: thresholds, metrics, reliability and which held-out column failed."""
    flag_threshold = probe.threshold if probe.flag_threshold is None else probe.flag_threshold
    info = pb2.ProbeInfo(task=probe.task, layer=probe.layer, position=probe.position, threshold=probe.threshold,
                         method=probe.method, flag_threshold=flag_threshold, reliable=bool(probe.reliable),
                         muted=muted, failed_columns=probe.failed_columns,
                         unreliable_reason=probe.unreliable_reason() or "")
    info.metrics.CopyFrom(dict_to_struct(_plain(probe.metrics)))
    if probe.reliability is not None:
        info.reliability.CopyFrom(dict_to_struct(_plain(probe.reliability)))
    if probe.reliable_range is not None:
        info.reliable_range.CopyFrom(dict_to_struct(_plain(probe.reliable_range)))
    return info


def _plain(value):
    """JSON values a Struct can hold: tuples as lists, non-finite numbers as null, anything else as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)
