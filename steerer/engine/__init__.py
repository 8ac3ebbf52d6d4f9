"""Inference backends behind one small interface (`base.Engine`)."""

from steerer.engine.base import BatchState, Engine
from steerer.engine.hf import HFEngine

__all__ = ["BatchState", "Engine", "HFEngine"]
