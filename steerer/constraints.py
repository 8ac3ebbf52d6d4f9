"""Constraints a request names, and the one validation every entry point runs on a request.

The tasks (instructions, parameters, checkers) are defined in `steerer.tasks`, one module each.
`validate_request` is what the library (`Steerer.validate`), the LogitsProcessor drop-in, the gRPC
conversion, the client and both command lines check before anything runs: known tasks with valid
parameters, each task at most once, policies only for constrained tasks, and (given the bank's tasks) a
probe for every constraint -- or, for a task the bank has no probe for, a detector (`detector_only`): such a
constraint is monitored by its detector alone (detections, the checker's verdict, the guard), never steered.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from steerer.tasks import TASKS, UnknownTaskError, get_task


@dataclass(frozen=True)
class Constraint:
    task: str
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the problem: unknown task or bad parameters."""
        try:
            task = get_task(self.task)
        except UnknownTaskError as exc:
            raise ValueError(str(exc)) from None
        task.validate(self.params)

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """'TASK' or 'TASK:{json params}' (the CLI's --constraint)."""
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
    return tuple(TASKS)


def check_constraint(constraint: Constraint, text: str) -> bool | None:
    """The checker's verdict on a final response, or None where the task has no checker."""
    task = TASKS.get(constraint.task)
    return None if task is None else bool(task.check(text, constraint.params))


def detector_only(constraint: Constraint, bank_tasks: Collection[str]) -> bool:
    """The bank has no probe for the constraint's task but a prefix can decide its violation (the task has a
    detector for these params): it is served on the detector alone. The params are validated first."""
    return constraint.task not in bank_tasks and get_task(constraint.task).detect(constraint.params) is not None


def validate_constraints(constraints: Iterable[Constraint], policies: Mapping[str, Any] | None = None,
                         bank_tasks: Collection[str] | None = None, policy: Any = None) -> None:
    """ValueError (a message for the caller) unless every constraint names a known task with valid params,
    each task appears at most once, every per-task policy is a `SteeringPolicy` for a constrained task, and
    (when `bank_tasks` is given) the bank has a probe for each constraint, or the task a detector for it and
    its policy (per task, else the request's `policy`) does not steer: only `off` or `guard`."""
    from steerer.policy import OFF, SteeringPolicy

    constraints = list(constraints)
    if len(constraints) > len(TASKS):
        raise ValueError(f"too many constraints: {len(constraints)}; at most {len(TASKS)}, one per task")
    for constraint in constraints:
        if not isinstance(constraint, Constraint):
            raise ValueError(f"constraints must be Constraint objects, got {type(constraint).__name__}")
        constraint.validate()
        if bank_tasks is None or constraint.task in bank_tasks:
            continue
        if not detector_only(constraint, bank_tasks):
            raise ValueError(f"the probe bank has no probe for task {constraint.task!r}, and no detector can decide "
                             "it from a prefix")
        chosen = (policies or {}).get(constraint.task, policy) or OFF
        if isinstance(chosen, SteeringPolicy) and chosen.kind != "off":
            raise ValueError(f"no probe for {constraint.task}: only `off` or `guard`")
    tasks = [c.task for c in constraints]
    if len(set(tasks)) != len(tasks):
        raise ValueError("each task may appear once per request")
    policies = policies or {}
    unknown = set(policies) - set(tasks)
    if unknown:
        raise ValueError(f"steering policies name tasks without a constraint: {', '.join(sorted(map(str, unknown)))}")
    for task, policy in policies.items():
        if not isinstance(policy, SteeringPolicy):
            raise ValueError(f"the steering policy for {task} must be a SteeringPolicy, got {type(policy).__name__}")


def validate_request(request: Any, bank_tasks: Collection[str] | None = None) -> None:
    """The checks every entry point makes on a request (a `Request`, or the drop-in's `RowSpec`, which has
    no prompt or sampling): a non-blank prompt, valid sampling, the policy, and `validate_constraints`."""
    from steerer.policy import SteeringPolicy

    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, str) and not prompt.strip():
        raise ValueError("prompt is empty")
    sampling = getattr(request, "sampling", None)
    if sampling is not None:
        sampling.validate()
    policy = getattr(request, "policy", None)
    if policy is not None and not isinstance(policy, SteeringPolicy):
        raise ValueError(f"the steering policy must be a SteeringPolicy, got {type(policy).__name__}")
    validate_constraints(request.constraints, request.policies, bank_tasks, policy)
