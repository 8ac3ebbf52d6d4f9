"""The service's Prometheus metrics. The definitions live in `steerer.metrics`, which imports no grpc (the
`vllm serve` plugin uses them without the gRPC service); this module re-exports them under their old
names for the gRPC server and its clients.

`Metrics.request_done(method, code)` takes a `grpc.StatusCode` (or its name): the servicer and the server's
interceptors record every finished or refused RPC exactly once, where they set its status."""

from __future__ import annotations

from steerer.metrics import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    LEAD_BUCKETS,
    MAX_ARM_LABELS,
    METHODS,
    OTHER,
    REQUEST_LATENCY_BUCKETS,
    RISK_BUCKETS,
    Metrics,
)

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "LEAD_BUCKETS", "MAX_ARM_LABELS", "METHODS", "OTHER",
           "REQUEST_LATENCY_BUCKETS", "RISK_BUCKETS", "Metrics"]
