"""The nine instruction constraints, as the probes name them: re-exported from `steerer.tasks`, where each
task (checker, validation, instruction text, sampler, demonstration, onset rule, budget) is one module."""

from __future__ import annotations

from steerer.tasks import TASKS, Kind, Params, Task, UnknownTaskError, get_task
from steerer.tasks.keyword_inclusion import INCLUSION_TIERS
from steerer.tasks.term_exclusion import EXCLUSION_TIERS
from steerer.tasks.topic import SPECIFIC_TOPICS

__all__ = ["EXCLUSION_TIERS", "INCLUSION_TIERS", "SPECIFIC_TOPICS", "TASKS", "Kind", "Params", "Task",
           "UnknownTaskError", "get_task"]
