"""Inference engines: the transformers engine behind `base.Engine` (under `steerer.core.Steerer`), and vLLM's
(`steerer.engine.vllm`). What fronts drive is `steerer.backend.Backend`; what every engine feeds its passes to is
`steerer.driver.Driver`."""

from steerer.engine.base import BatchState, Engine
from steerer.engine.hf import HFEngine

__all__ = ["BatchState", "Engine", "HFEngine"]
