"""Constraints a request names, validated and checked by the task definitions in `probes.tasks`.

The nine tasks (instructions, parameters, checkers) are pure data and functions that live with the
probes; this module is the one place the serving side reaches for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Constraint:
    task: str
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the problem: unknown task or bad parameters."""
        from probes.tasks import TASKS

        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        TASKS[self.task].validate(self.params)

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """'TASK' or 'TASK:{json params}' (the CLI's --constraint)."""
        import json

        task, _, params = text.partition(":")
        try:
            parsed = json.loads(params) if params.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"constraint {text!r}: params are not valid JSON ({exc.msg})") from exc
        if not isinstance(parsed, dict):
            raise ValueError(f"constraint {text!r}: params must be a JSON object")
        return cls(task.strip(), parsed)


def known_tasks() -> tuple[str, ...]:
    """Every task id a constraint may name."""
    from probes.tasks import TASKS

    return tuple(TASKS)


def check_constraint(constraint: Constraint, text: str) -> bool | None:
    """The checker's verdict on a final response, or None where the task has no checker."""
    from probes.tasks import TASKS

    task = TASKS.get(constraint.task)
    return None if task is None else bool(task.check(text, constraint.params))
