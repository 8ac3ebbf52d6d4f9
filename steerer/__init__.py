"""steerer: generation-time probe monitoring and activation steering for LLM inference."""

from steerer.bank import ProbeBank
from steerer.constraints import Constraint
from steerer.core import Request, Result, Steerer, TokenEvent, Verdict
from steerer.generation import SamplingParams
from steerer.model import load_model
from steerer.policy import SteeringPolicy

__all__ = ["Constraint", "ProbeBank", "Request", "Result", "SamplingParams", "Steerer", "SteeringPolicy",
           "TokenEvent", "Verdict", "load_model"]
