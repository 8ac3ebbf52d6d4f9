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
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from steerer.service.proto import pb2, pb2_grpc

ConstraintSpec = tuple[str, Mapping[str, Any]] | tuple[str, Mapping[str, Any], str] | str
POLICY_KINDS = {"off": pb2.POLICY_KIND_OFF, "constant": pb2.POLICY_KIND_CONSTANT,
                "conditional": pb2.POLICY_KIND_CONDITIONAL, "proportional": pb2.POLICY_KIND_PROPORTIONAL}


def policy_message(policy: str | pb2.SteeringPolicy | None) -> pb2.SteeringPolicy | None:
    """'conditional:8' (kind:alpha, as `steerer generate` takes it) or a message; None stays None."""
    if policy is None or isinstance(policy, pb2.SteeringPolicy):
        return policy
    kind, _, alpha = policy.partition(":")
    kind = kind.strip().lower()
    if kind not in POLICY_KINDS:
        raise ValueError(f"unknown steering policy {kind!r}; choose one of {', '.join(POLICY_KINDS)}")
    try:
        value = float(alpha) if alpha.strip() else 0.0
    except ValueError:
        raise ValueError(f"bad steering strength in policy {policy!r}") from None
    return pb2.SteeringPolicy(kind=POLICY_KINDS[kind], alpha=value)


def build_request(prompt: str | list[dict] | None = None, *, constraints: Iterable[ConstraintSpec] = (),
                  policy: str | pb2.SteeringPolicy | None = None, system: str | None = None,
                  max_new_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, seed: int | None = None, ignore_eos: bool = False,
                  request_id: str = "", experiment_key: str = "") -> pb2.GenerateRequest:
    """A GenerateRequest. Constraints are 'task', (task, params) or (task, params, 'policy:alpha')."""
    request = pb2.GenerateRequest(system=system or "", request_id=request_id, experiment_key=experiment_key)
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.messages.CopyFrom(pb2.ChatMessages(messages=[pb2.ChatMessage(**m) for m in prompt]))
    for spec in constraints:
        task, params, own = (spec, {}, None) if isinstance(spec, str) else (*spec, None)[:3]
        constraint = request.constraints.add(task=task)
        constraint.params.update(dict(params))
        if own is not None:
            constraint.policy.CopyFrom(policy_message(own))
    if policy is not None:
        request.policy.CopyFrom(policy_message(policy))
    sampling = request.sampling
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    sampling.ignore_eos = ignore_eos
    return request


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
