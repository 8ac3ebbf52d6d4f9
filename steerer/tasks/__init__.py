"""The constraints a request can name, one `Task` per module of this package.

Each task module defines ``TASK`` (see `steerer.tasks.base.Task`): checker, parameter validation,
instruction text, parameter sampler, compliant demonstration, violation detector (where a prefix can decide a
violation; the onset rule is made from it) or onset rule, and token budget.
Adding a task is one new file here; ``TASKS`` discovers it. Modules without ``TASK`` (``base``, ``common``,
``semantic``) are shared helpers. A team's own tasks join the same ``TASKS`` through ``registry`` (YAML task
files parsed by ``declarative``, plugins of the entry-point group ``steerer.tasks``; docs/TASKS.md).

Parameters vary per prompt (the limit, the word, the polarity, the topic) so a probe has to read the
model's state rather than the prompt; ``Task.sample_params`` spreads them from easy (a small model usually
complies) to hard (it usually does not) so both labels occur.
"""

from __future__ import annotations

import importlib
import pkgutil

from steerer.tasks.base import LONG_TOKEN_BUDGET, TOKEN_BUDGET, Kind, Params, Task

__all__ = ["LONG_TOKEN_BUDGET", "TASKS", "TOKEN_BUDGET", "Kind", "Params", "Task", "TaskFileError", "UnknownTaskError",
           "get_task", "load_task_file", "register_definition", "register_task"]


def _discover() -> dict[str, Task]:
    found: list[Task] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        task = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TASK", None)
        if isinstance(task, Task):
            found.append(task)
    tasks: dict[str, Task] = {}
    for task in sorted(found, key=lambda t: (t.order, t.id)):
        if task.id in tasks:
            raise RuntimeError(f"two task modules define the task id {task.id!r}")
        tasks[task.id] = task
    return tasks


TASKS: dict[str, Task] = _discover()


class UnknownTaskError(KeyError):
    """A task id that is not in ``TASKS``; the message lists the known ids."""

    def __init__(self, task_id: object) -> None:
        self.task_id = task_id
        super().__init__(f"unknown task {task_id!r}; known tasks: {', '.join(TASKS)}")

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0])


def get_task(task_id: str) -> Task:
    """The task with this id; ``UnknownTaskError`` (a ``KeyError``) listing the known ids otherwise."""
    try:
        return TASKS[task_id]
    except (KeyError, TypeError):
        raise UnknownTaskError(task_id) from None


# Task files and plugins (`steerer.tasks.registry`): installed plugins and the files in STEERER_TASK_FILES join
# ``TASKS`` now, other task files when a caller (the bank builder, a bank folder's ``tasks/``) loads them.
from steerer.tasks.declarative import TaskFileError  # noqa: E402
from steerer.tasks.registry import (  # noqa: E402
    load_env_task_files,
    load_plugins,
    load_task_file,
    register_definition,
    register_task,
)

load_plugins()
load_env_task_files()
