"""Probe tasks: the nine instruction constraints, their checkers, prompt templates and the verifier.

Heavy dependencies (VADER, MiniLM) load lazily, on the first semantic check, so importing is cheap.
"""

from probes.tasks import TASKS, Task, UnknownTaskError, get_task

__all__ = ["TASKS", "Task", "UnknownTaskError", "get_task"]
