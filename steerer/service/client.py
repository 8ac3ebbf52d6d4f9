"""A small Python client for the steerer gRPC service (no torch import: clients stay light).

    from steerer.service.client import SteererClient
    with SteererClient("127.0.0.1:50051") as client:
        reply = client.generate("Describe the moon.", constraints=[("word_count", {"relation": "at most",
                                "limit": 30})], policy="conditional:8", max_new_tokens=64)
        for message in client.stream("Hi!", max_new_tokens=16):
            ...  # message.token (per token) ... message.final (verdicts, usage, bank version)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from steerer.constraints import Constraint, validate_request
from steerer.policy import SteeringPolicy, split_guard, split_policy
from steerer.service.proto import POLICY_KIND_CODES, pb2, pb2_grpc

ConstraintSpec = tuple[str, Mapping[str, Any]] | tuple[str, Mapping[str, Any], str] | str
POLICY_KINDS = tuple(POLICY_KIND_CODES)  # the one vocabulary, `steerer.policy.POLICY_KINDS`


def policy_message(policy: str | pb2.SteeringPolicy | None, check: bool = False) -> pb2.SteeringPolicy | None:
    """'conditional:8' (kind:alpha, as `steerer generate` takes it) or a message; None stays None.

    The kind must be one of `POLICY_KINDS` and alpha a number; with `check`, alpha must also be one the
    server accepts (finite, within `MAX_ALPHA`), else it is the server that refuses it."""
    if policy is None or isinstance(policy, pb2.SteeringPolicy):
        return policy
    if check:
        parsed = SteeringPolicy.parse(policy)
        kind, alpha, guard = parsed.kind, parsed.alpha, parsed.guard
    else:
        guard, rest = split_guard(policy)
        kind, alpha = split_policy(rest)
    return pb2.SteeringPolicy(kind=POLICY_KIND_CODES[kind], alpha=alpha, guard=guard)


def _specs(constraints: Iterable[ConstraintSpec]) -> list[tuple[str, Mapping[str, Any], str | None]]:
    return [(spec, {}, None) if isinstance(spec, str) else (*spec, None)[:3] for spec in constraints]


def check_request(prompt: str | list[dict] | None, constraints: Iterable[ConstraintSpec] = (),
                  policy: str | None = None) -> None:
    """The library's request validation (`steerer.constraints.validate_request`), on the client: ValueError
    for a blank prompt, an unknown task, bad params, a task named twice or a bad policy, before any RPC.
    (The server checks what depends on it: token limits and its bank's tasks.)"""
    specs = _specs(constraints)
    request = SimpleNamespace(
        prompt=prompt,
        constraints=[Constraint(task, dict(params)) for task, params, _ in specs],
        policies={task: SteeringPolicy.parse(own) for task, _, own in specs if isinstance(own, str)},
        policy=SteeringPolicy.parse(policy) if isinstance(policy, str) else None)
    validate_request(request)


def build_request(prompt: str | list[dict] | None = None, *, constraints: Iterable[ConstraintSpec] = (),
                  policy: str | pb2.SteeringPolicy | None = None, system: str | None = None,
                  max_new_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, seed: int | None = None, ignore_eos: bool = False,
                  request_id: str = "", experiment_key: str = "", force_arms: Mapping[str, str] | None = None,
                  check: bool = False) -> pb2.GenerateRequest:
    """A GenerateRequest. Constraints are 'task', (task, params) or (task, params, 'policy:alpha').
    `experiment_key` enters the server's running experiments; `force_arms` ({experiment: arm}) picks arms (QA).

    `check=True` runs `check_request` first, so a request the server would refuse as invalid fails here
    with ValueError; by default the server is the judge (tests send it bad requests on purpose)."""
    specs = _specs(constraints)
    if check:
        check_request(prompt, specs, policy if isinstance(policy, str) else None)
    request = pb2.GenerateRequest(system=system or "", request_id=request_id, experiment_key=experiment_key,
                                  force_arms=dict(force_arms or {}))
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.messages.CopyFrom(pb2.ChatMessages(messages=[pb2.ChatMessage(**m) for m in prompt]))
    for task, params, own in specs:
        constraint = request.constraints.add(task=task)
        constraint.params.update(dict(params))
        if own is not None:
            constraint.policy.CopyFrom(policy_message(own, check))
    if policy is not None:
        request.policy.CopyFrom(policy_message(policy, check))
    sampling = request.sampling
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    sampling.ignore_eos = ignore_eos
    return request


def event_lines(token: pb2.TokenEvent) -> list[str]:
    """One line per flag change (a probe's prediction) and per detection (a certain violation) of a token
    message, worded apart, for a terminal (`steerer client generate --stream` prints them on stderr)."""
    lines = [f"[flag {'raised' if f.raised else 'cleared'}: {f.task} at token {f.token_index}, risk {f.risk:.2f}]"
             for f in token.flags]
    lines += [f"[DETECTED violation: {d.task} broken at token {d.token_index}]" for d in token.detections]
    return lines


def detection_note(verdict: pb2.Verdict) -> str:
    """', detected at token N' for a verdict whose violation a prefix decided, else ''."""
    return f", detected at token {verdict.detected_at}" if verdict.HasField("detected_at") else ""


class SteererClient:
    """One channel to a server. `token` sends `authorization: Bearer <token>`; `tls_ca` turns on TLS."""

    def __init__(self, target: str, token: str | None = None, tls_ca: str | bytes | None = None,
                 server_name: str | None = None):
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        if tls_ca is not None:
            root = tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes()
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb2_grpc.SteererStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SteererClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str | list[dict] | pb2.GenerateRequest, *, timeout: float | None = None,
                 **kwargs) -> pb2.GenerateResponse:
        """The whole response. kwargs as for `build_request`; raises grpc.RpcError on a non-OK status."""
        request = prompt if isinstance(prompt, pb2.GenerateRequest) else build_request(prompt, **kwargs)
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def stream(self, prompt: str | list[dict] | pb2.GenerateRequest, *, timeout: float | None = None,
               **kwargs) -> Iterator[pb2.GenerateStreamResponse]:
        """Per-token messages, then a final one. The returned call has `.cancel()` (frees the server slot)."""
        request = prompt if isinstance(prompt, pb2.GenerateRequest) else build_request(prompt, **kwargs)
        return self.stub.GenerateStream(request, timeout=timeout, metadata=self.metadata)

    def list_probes(self, timeout: float | None = 10) -> pb2.ListProbesResponse:
        return self.stub.ListProbes(pb2.ListProbesRequest(), timeout=timeout, metadata=self.metadata)

    def model_info(self, timeout: float | None = 10) -> pb2.ModelInfo:
        return self.stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    def reload_bank(self, path: str, timeout: float | None = 300) -> pb2.ReloadProbeBankResponse:
        return self.stub.ReloadProbeBank(pb2.ReloadProbeBankRequest(path=path), timeout=timeout,
                                         metadata=self.metadata)

    def health(self, service: str = "", timeout: float | None = 5) -> str:
        """'SERVING', 'NOT_SERVING', 'SERVICE_UNKNOWN'...; raises grpc.RpcError if unreachable."""
        reply = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                       metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
