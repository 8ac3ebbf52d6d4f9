"""Experiments and arm assignment: the one pure function the server and `steerer ab assign` share.

An experiment file (JSON or YAML) names experiments; each has arms (a steering policy per task; exactly one
arm is the control), traffic weights and a status. A request with an experiment key enters every running
experiment that steers one of the tasks it constrains, and lands in the arm that `assign` picks:

    u = first 8 bytes of sha256(name NUL salt NUL key) as an integer / 2**64      (uniform in [0, 1))
    arm = the first arm whose cumulative normalized weight exceeds u

so an assignment is sticky (same key, same arm, in any process, after any restart), uniform over keys, and
independent between experiments (the name and salt enter the hash). Changing the salt reshuffles everyone;
changing weights moves only the keys near the boundaries that moved.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerer.policy import SteeringPolicy

STATUSES = ("running", "stopped")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # safe as a metrics label value and a file name
MAX_EXPERIMENTS = 16
MAX_ARMS = 8


class ExperimentError(ValueError):
    """An experiments file that cannot be used: the message names the problem."""


@dataclass(frozen=True)
class Arm:
    name: str
    weight: float
    policies: Mapping[str, SteeringPolicy]  # task -> policy; replaces the request's own policy for that task
    control: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight": self.weight,
            "control": self.control,
            # "guard" only where set, so the version of an experiment without a guard is unchanged
            "policies": {t: {"kind": p.kind, "alpha": p.alpha} | ({"guard": True} if p.guard else {})
                         for t, p in sorted(self.policies.items())},
        }


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[Arm, ...]
    status: str = "running"
    salt: str = ""
    description: str = ""

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def tasks(self) -> frozenset[str]:
        """The tasks any arm steers: a request constraining one of them enters the experiment."""
        return frozenset(t for arm in self.arms for t in arm.policies)

    @property
    def control(self) -> Arm:
        return next(a for a in self.arms if a.control)

    @property
    def shares(self) -> dict[str, float]:
        """Each arm's share of traffic (weights normalized to sum 1)."""
        total = sum(a.weight for a in self.arms)
        return {a.name: a.weight / total for a in self.arms}

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(
            f"experiment {self.name!r} has no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "salt": self.salt,
            "description": self.description,
            "arms": [a.as_dict() for a in self.arms],
        }

    @property
    def version(self) -> str:
        """A hash of what decides assignment and treatment (arms, weights, policies, salt; not the status):
        records under different versions are not one randomized experiment."""
        body = {k: v for k, v in self.as_dict().items() if k in ("name", "salt", "arms")}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ExperimentSet:
    experiments: tuple[Experiment, ...] = ()
    source: str = ""  # the file it came from
    mtime: float | None = None

    def get(self, name: str) -> Experiment:
        for exp in self.experiments:
            if exp.name == name:
                return exp
        known = ", ".join(e.name for e in self.experiments) or "none"
        raise KeyError(f"no experiment {name!r}; experiments: {known}")

    @property
    def running(self) -> tuple[Experiment, ...]:
        return tuple(e for e in self.experiments if e.running)

    def labels(self) -> list[tuple[str, str]]:
        """Every (experiment, arm) pair: the metrics label values this set may use."""
        return [(e.name, a.name) for e in self.experiments for a in e.arms]


@dataclass(frozen=True)
class Assignment:
    experiment: str
    arm: str
    forced: bool
    version: str
    policies: Mapping[str, SteeringPolicy] = field(default_factory=dict)


# -- the pure assignment function ------------------------------------------------------------------------
def bucket(experiment: str, salt: str, key: str) -> float:
    """A key's position in [0, 1) for one experiment: uniform, stable, independent between experiments."""
    digest = hashlib.sha256(f"{experiment}\x00{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def pick(u: float, weights: Sequence[float]) -> int:
    """The index whose cumulative (normalized) weight first exceeds u."""
    total = float(sum(weights))
    cumulative = 0.0
    for i, w in enumerate(weights):
        cumulative += w / total
        if u < cumulative:
            return i
    return len(weights) - 1  # u within rounding of 1


def assign(experiment: Experiment, key: str) -> str:
    """The arm a key belongs to in this experiment (whatever its status)."""
    return experiment.arms[
        pick(bucket(experiment.name, experiment.salt, key), [a.weight for a in experiment.arms])
    ].name


def key_hash(key: str) -> str:
    """What the outcome log keeps of a key: enough to count distinct keys, not to read them back."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def assignments(
    experiments: ExperimentSet, key: str, tasks: Iterable[str], forced: Mapping[str, str] | None = None
) -> list[Assignment]:
    """The arms a request joins: every running experiment steering one of `tasks` when it has a key, and
    every experiment named in `forced` (running or stopped: QA before a launch) whatever its key.

    Raises KeyError for a forced experiment or arm that does not exist, ValueError for one that steers none
    of the request's tasks."""
    tasks = set(tasks)
    forced = dict(forced or {})
    out = []
    for name, arm_name in forced.items():
        exp = experiments.get(name)
        arm = exp.arm(arm_name)
        if not exp.tasks & tasks:
            raise ValueError(
                f"experiment {name!r} steers {', '.join(sorted(exp.tasks))}; the request constrains "
                f"none of them"
            )
        out.append(Assignment(exp.name, arm.name, True, exp.version, arm.policies))
    for exp in experiments.running:
        if exp.name in forced or not key or not exp.tasks & tasks:
            continue
        arm = exp.arm(assign(exp, key))
        out.append(Assignment(exp.name, arm.name, False, exp.version, arm.policies))
    return out


# -- loading and validation ------------------------------------------------------------------------------
def load(path: str | Path, known_tasks: Iterable[str] | None = None) -> ExperimentSet:
    """Read and validate an experiments file (.json, or .yaml/.yml); ExperimentError says what is wrong."""
    file = Path(path)
    try:
        text = file.read_text()
        mtime = file.stat().st_mtime
    except OSError as exc:
        raise ExperimentError(f"cannot read experiments file {path}: {exc.strerror or exc}") from None
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # JSONDecodeError, yaml.YAMLError
        raise ExperimentError(
            f"{path}: not valid {'YAML' if file.suffix in ('.yaml', '.yml') else 'JSON'}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return ExperimentSet(parse(data, known_tasks, where=str(path)), str(path), mtime)


def parse(
    data: Any, known_tasks: Iterable[str] | None = None, where: str = "experiments"
) -> tuple[Experiment, ...]:
    """Experiments from the file's data: `{"experiments": [...]}` (a bare list is accepted too)."""
    if known_tasks is None:
        from steerer.constraints import known_tasks as _known

        known_tasks = _known()
    known = set(known_tasks)
    if isinstance(data, dict) and set(data) <= {"experiments"}:
        data = data.get("experiments") or []
    if not isinstance(data, list):
        raise ExperimentError(f'{where}: expected {{"experiments": [...]}}, got {type(data).__name__}')
    if len(data) > MAX_EXPERIMENTS:
        raise ExperimentError(f"{where}: {len(data)} experiments; at most {MAX_EXPERIMENTS}")
    experiments = [_experiment(item, known, f"{where}: experiments[{i}]") for i, item in enumerate(data)]
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ExperimentError(f"{where}: experiment names must be unique")
    running = [e for e in experiments if e.running]
    for i, a in enumerate(running):
        for b in running[i + 1 :]:
            if a.tasks & b.tasks:
                raise ExperimentError(
                    f"{where}: running experiments {a.name!r} and {b.name!r} both steer "
                    f"{', '.join(sorted(a.tasks & b.tasks))}; a task can be in one running "
                    f"experiment at a time"
                )
    return tuple(experiments)


def _experiment(item: Any, known: set[str], where: str) -> Experiment:
    if not isinstance(item, dict):
        raise ExperimentError(f"{where}: expected an object")
    extra = set(item) - {"name", "arms", "status", "salt", "description"}
    if extra:
        raise ExperimentError(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
    name = _name(item.get("name"), f"{where}.name")
    where = f"{where} ({name})"
    status = item.get("status", "running")
    if status not in STATUSES:
        raise ExperimentError(f"{where}: status must be one of {', '.join(STATUSES)}, got {status!r}")
    salt = item.get("salt", "")
    if not isinstance(salt, str | int):
        raise ExperimentError(f"{where}: salt must be a string")
    arms_data = item.get("arms")
    if not isinstance(arms_data, list) or not 2 <= len(arms_data) <= MAX_ARMS:
        raise ExperimentError(f"{where}: arms must be a list of 2 to {MAX_ARMS} arms")
    arms = tuple(_arm(a, known, f"{where}.arms[{i}]") for i, a in enumerate(arms_data))
    if len({a.name for a in arms}) != len(arms):
        raise ExperimentError(f"{where}: arm names must be unique")
    controls = [a for a in arms if a.control]
    if not controls:  # an arm named "control" is the control unless another is marked
        arms = tuple(Arm(a.name, a.weight, a.policies, a.name == "control") for a in arms)
        controls = [a for a in arms if a.control]
    if len(controls) != 1:
        raise ExperimentError(
            f"{where}: exactly one arm must be the control (control: true, or named 'control')"
        )
    exp = Experiment(name, arms, status, str(salt), str(item.get("description", "")))
    if not exp.tasks:
        raise ExperimentError(f"{where}: no arm sets a policy for any task, so no request would enter it")
    return exp


def _arm(item: Any, known: set[str], where: str) -> Arm:
    if not isinstance(item, dict):
        raise ExperimentError(f"{where}: expected an object")
    extra = set(item) - {"name", "weight", "policies", "control"}
    if extra:
        raise ExperimentError(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
    name = _name(item.get("name"), f"{where}.name")
    weight = item.get("weight", 1)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight <= 0
    ):
        raise ExperimentError(f"{where} ({name}): weight must be a positive number, got {weight!r}")
    control = item.get("control", False)
    if not isinstance(control, bool):
        raise ExperimentError(f"{where} ({name}): control must be true or false")
    policies_data = item.get("policies", {})
    if not isinstance(policies_data, dict):
        raise ExperimentError(f"{where} ({name}): policies must map task -> policy")
    policies = {}
    for task, spec in policies_data.items():
        if task not in known:
            raise ExperimentError(
                f"{where} ({name}): unknown task {task!r}; known: {', '.join(sorted(known))}"
            )
        policies[task] = _policy(spec, f"{where} ({name}).policies.{task}")
    return Arm(name, float(weight), policies, control)


def _policy(spec: Any, where: str) -> SteeringPolicy:
    """'constant:80', 'off', or {kind: constant, alpha: 80}. (YAML reads a bare `off` as false: that is off.)"""
    try:
        if spec is False:
            return SteeringPolicy()
        if isinstance(spec, str):
            return SteeringPolicy.parse(spec)
        if isinstance(spec, dict) and set(spec) <= {"kind", "alpha", "guard"}:
            alpha = spec.get("alpha", 0.0)
            if isinstance(alpha, bool) or not isinstance(alpha, int | float):
                raise ValueError(f"alpha must be a number, got {alpha!r}")
            return SteeringPolicy(str(spec.get("kind", "off")), float(alpha), guard=spec.get("guard", False))
    except ValueError as exc:
        raise ExperimentError(f"{where}: {exc}") from None
    raise ExperimentError(f"{where}: expected 'kind:alpha' or {{kind, alpha}}, got {spec!r}")


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ExperimentError(
            f"{where}: a name of 1-63 letters, digits, '_', '.', '-' (starting with a letter or "
            f"digit), got {value!r}"
        )
    return value


class LiveExperiments:
    """The experiments in force for a server, replaced whole by `reload()`: a request reads `current` once
    and keeps that snapshot, so a reload never splits one request between two configurations."""

    def __init__(self, path: str | Path, known_tasks: Iterable[str] | None = None):
        self.path = Path(path)
        self.known_tasks = tuple(known_tasks) if known_tasks is not None else None
        self.current = load(self.path, self.known_tasks)

    def reload(self) -> ExperimentSet:
        """Read the file again; on any problem raise ExperimentError and keep the experiments in force."""
        self.current = load(self.path, self.known_tasks)
        return self.current
