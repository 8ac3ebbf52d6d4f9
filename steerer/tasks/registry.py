"""The task registry: built-in task modules, plugins (entry-point group ``steerer.tasks``) and declarative task
files (YAML) all land in the one ``steerer.tasks.TASKS`` dict that checkers, the controller, the corpus and
serving read. This module is the one way in:

- `register_task(task)`: a `Task` object (a plugin's, a test's);
- `load_task_file(path)` / `register_definition(text)`: a YAML task (`steerer.tasks.declarative`);
- `load_plugins()`: every installed ``steerer.tasks`` entry point (run once when `steerer.tasks` is imported);
- `load_env_task_files()`: the task files named in ``STEERER_TASK_FILES`` (also run on import);
- `save_bank_tasks` / `load_bank_tasks`: a bank folder carries the YAML of its file tasks in ``tasks/`` and
  names the plugin package of its plugin tasks, so loading the bank registers the former and checks the latter.

A task id never shadows a built-in one, and an id already registered with another definition is refused;
re-registering the same definition (a bank loaded twice) is a no-op. Every refusal is one line naming it,
and nothing is registered from a file or plugin that fails part-way.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import steerer.tasks as _pkg
from steerer.tasks.base import Task
from steerer.tasks.declarative import ID_RE, TaskFileError, parse_task

GROUP = "steerer.tasks"  # the entry-point group of task plugins
TASKS_DIR = "tasks"  # a bank folder's sub-folder holding its file tasks' definitions
SOURCES_KEY = "task_sources"  # manifest key: task -> "file" | "plugin <distribution>"
FILES_ENV = "STEERER_TASK_FILES"  # task files (os.pathsep-separated) every process registers on import
_log = logging.getLogger("steerer.tasks")

_builtin: frozenset[str] | None = None
_definitions: dict[str, str] = {}  # file task id -> its YAML text
_origins: dict[str, str] = {}  # registered (non-built-in) task id -> "file" | "plugin <distribution>" | "api"
PLUGIN_ERRORS: dict[str, str] = {}  # entry-point name -> the line its failure logged


def builtin_ids() -> frozenset[str]:
    """The ids of the tasks defined by modules of `steerer.tasks` (fixed when the package was imported)."""
    global _builtin
    if _builtin is None:
        _builtin = frozenset(t for t in _pkg.TASKS if t not in _origins)
    return _builtin


def origin(task_id: str) -> str:
    """"builtin", "file", "plugin <distribution>" or "api"; KeyError for an unknown id."""
    if task_id in builtin_ids():
        return "builtin"
    return _origins[task_id]


def definition(task_id: str) -> str | None:
    """The YAML text a file task was registered from (None for other tasks)."""
    return _definitions.get(task_id)


def _admit(task: object, source: str | None) -> Task:
    """The checks of `register_task`, without registering: a Task, a well-formed id, no clash."""
    if not isinstance(task, Task):
        raise TaskFileError(f"a task must be a steerer.tasks.Task, got {type(task).__name__}")
    if not isinstance(task.id, str) or not ID_RE.fullmatch(task.id):
        raise TaskFileError(f"task id {task.id!r} must be lower_snake_case (2-48 characters, starting with a letter)")
    if task.id in builtin_ids():
        raise TaskFileError(f"task id {task.id!r} shadows the built-in task of that name; choose another id")
    existing = _pkg.TASKS.get(task.id)
    if existing is not None and not (source is not None and _definitions.get(task.id) == source):
        raise TaskFileError(f"task id {task.id!r} is already registered ({_origins.get(task.id, 'builtin')}) "
                            "with another definition")
    return task


def _store(task: Task, how: str, source: str | None = None) -> Task:
    if source is not None and _definitions.get(task.id) == source:
        return _pkg.TASKS[task.id]  # the same definition again: keep the registered object
    _pkg.TASKS[task.id] = task
    _origins[task.id] = how
    if source is not None:
        _definitions[task.id] = source
    return task


def register_task(task: Task) -> Task:
    """Add a `Task` object to ``TASKS``; `TaskFileError` (a ValueError) if its id is taken or malformed."""
    return _store(_admit(task, None), "api")


def register_definition(text: str, where: str = "<task definition>") -> Task:
    """Parse a YAML task definition and register it (idempotent for the same text)."""
    task = parse_task(text, where)
    return _store(_admit(task, text), "file", text)


def load_task_file(path: str | Path) -> Task:
    """Read, check and register one YAML task file; the task. `TaskFileError` naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFileError(f"{path}: cannot read the task file ({exc.__class__.__name__}: {exc})") from None
    try:
        return register_definition(text, str(path))
    except TaskFileError as exc:
        message = str(exc)
        raise TaskFileError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def unregister(task_id: str) -> None:
    """Remove a registered (non-built-in) task: for tests, and for a process that reloads definitions."""
    if task_id in builtin_ids():
        raise TaskFileError(f"{task_id!r} is a built-in task; it cannot be unregistered")
    _pkg.TASKS.pop(task_id, None)
    _origins.pop(task_id, None)
    _definitions.pop(task_id, None)


# --------------------------------------------------------------------------------------------------
# plugins
# --------------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def load_plugin(entry: importlib.metadata.EntryPoint) -> list[Task]:
    """Register the tasks one entry point yields (a Task, a list of them, or a callable returning either);
    all or none. `TaskFileError` naming the entry point otherwise."""
    dist = entry.dist.name if entry.dist is not None else "an unknown distribution"
    try:
        value = entry.load()
        if callable(value) and not isinstance(value, Task):
            value = value()
        tasks = [value] if isinstance(value, Task) else list(value)
        if not tasks:
            raise TaskFileError("it yields no task")
        for task in tasks:
            _admit(task, None)
        if len({t.id for t in tasks}) != len(tasks):
            raise TaskFileError("it yields two tasks with one id")
    except Exception as exc:
        raise TaskFileError(f"task plugin {entry.name!r} ({entry.value}, from {dist}) failed to load: "
                            f"{_one_line(exc)}") from None
    return [_store(task, f"plugin {dist}") for task in tasks]


def load_plugins(entries: Iterable[importlib.metadata.EntryPoint] | None = None) -> list[Task]:
    """Register every installed task plugin. A broken one is skipped with one warning line naming it (kept in
    `PLUGIN_ERRORS`), so one bad package does not take serving down; a bank that needs its task says so."""
    loaded: list[Task] = []
    for entry in importlib.metadata.entry_points(group=GROUP) if entries is None else entries:
        try:
            loaded += load_plugin(entry)
        except TaskFileError as exc:
            PLUGIN_ERRORS[entry.name] = str(exc)
            _log.warning("steerer: %s", exc)
    return loaded


def load_env_task_files(value: str | None = None) -> list[Task]:
    """Register the task files named in ``STEERER_TASK_FILES``: a build's worker processes and a client that
    validates before it sends see the same tasks as the process that set it. A bad file is one warning line
    (importing `steerer.tasks` must not fail); the task is then unknown, which its users report."""
    loaded: list[Task] = []
    for path in filter(None, (os.environ.get(FILES_ENV, "") if value is None else value).split(os.pathsep)):
        try:
            loaded.append(load_task_file(path))
        except TaskFileError as exc:
            _log.warning("steerer: %s=%s: %s", FILES_ENV, path, exc)
    return loaded


# --------------------------------------------------------------------------------------------------
# banks
# --------------------------------------------------------------------------------------------------


def save_bank_tasks(folder: Path, task_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """Write the definitions of a bank's file tasks into ``folder/tasks/<id>.yaml``; the manifest entry naming
    every non-built-in task's source ({} when the bank has only built-in tasks)."""
    sources = {t: _origins[t] for t in task_ids if t in _origins}
    for task_id, how in sources.items():
        if how == "file":
            (folder / TASKS_DIR).mkdir(exist_ok=True)
            (folder / TASKS_DIR / f"{task_id}.yaml").write_text(_definitions[task_id], encoding="utf-8")
    return {SOURCES_KEY: sources} if sources else {}


def load_bank_tasks(folder: Path, task_ids: Iterable[str], sources: Mapping[str, str] | None) -> None:
    """Register the task files a bank carries and check that its plugin tasks are installed; a ValueError
    (one line) for a bad definition or a missing plugin package."""
    task_dir = folder / TASKS_DIR
    if task_dir.is_dir():
        for path in sorted(task_dir.glob("*.yaml")):
            load_task_file(path)
    sources = sources if isinstance(sources, Mapping) else {}
    for task_id in task_ids:
        how = str(sources.get(task_id, ""))
        if task_id in _pkg.TASKS or not how:
            continue
        if how.startswith("plugin "):
            dist = how.removeprefix("plugin ")
            failed = [m for m in PLUGIN_ERRORS.values() if dist in m]
            raise TaskFileError(f"the bank's task {task_id!r} comes from the plugin package {dist!r}, which is "
                                + (f"installed but broken ({failed[0]})" if failed
                                   else "not installed here: pip install it into this environment"))
        raise TaskFileError(f"the bank's task {task_id!r} is a task file, but {task_dir / (task_id + '.yaml')} is "
                            "missing")

