"""steerer: generation-time probe monitoring and activation steering for LLM inference.

Names load on first use, so light entry points (the gRPC client, `steerer --help`) do not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "Constraint": "steerer.constraints", "ProbeBank": "steerer.bank", "Request": "steerer.request",
    "Result": "steerer.request", "Steerer": "steerer.core", "TokenEvent": "steerer.request",
    "Verdict": "steerer.request", "SamplingParams": "steerer.request", "RowSpec": "steerer.request",
    "Backend": "steerer.backend", "load_model": "steerer.model", "SteeringPolicy": "steerer.policy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'steerer' has no attribute {name!r}")
