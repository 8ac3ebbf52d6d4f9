"""`cache_salt`: what keeps prefix caching from sharing KV between steering configurations.

vLLM's prefix cache keys blocks by their tokens (and a per-request salt). A steered request writes steered
keys and values, so a later request with the same prefix would silently reuse them. Requests that steer
get a salt derived from everything that decides what is added (bank, probes, policies, monitor settings,
where); requests that steer nothing get none and share the cache with plain vLLM traffic.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from steerer.bank import ProbeBank
from steerer.monitor import MonitorConfig
from steerer.policy import PolicyKind


def steering_config(spec, bank: ProbeBank, muted: list[bool]) -> list[tuple[str, str, float]]:
    """(task, policy kind, alpha) of each constraint that can steer (not off, not zero, probe not muted)."""
    out = []
    for constraint in spec.constraints:
        policy = spec.policy_for(constraint.task)
        if policy.code == PolicyKind.OFF or policy.alpha == 0 or muted[bank.index(constraint.task)]:
            continue
        out.append((constraint.task, policy.kind, float(policy.alpha)))
    return sorted(out)


def cache_salt(spec, bank: ProbeBank, muted: list[bool], where: str,
               monitor: MonitorConfig | None = None) -> str | None:
    """None when the request steers nothing; else a stable salt for its steering configuration."""
    steered = steering_config(spec, bank, muted)
    if not steered:
        return None
    payload = {"bank": [bank.fingerprint, bank.version, bank.tasks], "where": str(where), "steer": steered,
               "monitor": asdict(monitor or MonitorConfig())}
    return "steerer-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
