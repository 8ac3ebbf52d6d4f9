"""The task registry, the dependency direction (steerer never imports probes), the one policy vocabulary and
the one request validation shared by every entry point. No model is loaded here."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from steerer import tasks as task_pkg
from steerer.constraints import Constraint, validate_request
from steerer.policy import POLICY_KINDS, PolicyKind, SteeringPolicy
from steerer.tasks import TASKS, Task

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return names


def test_nothing_under_steerer_imports_probes():
    offenders = {str(path.relative_to(ROOT)): sorted(m for m in _imported_modules(path)
                                                     if m == "probes" or m.startswith("probes."))
                 for path in (ROOT / "steerer").rglob("*.py") if "_gen" not in path.parts}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_light_entry_points_do_not_import_torch():
    code = ("import sys; import steerer.tasks, steerer.constraints, steerer.policy, steerer.service.client; "
            "from steerer.cli import build_parser; build_parser(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_every_task_module_defines_one_task_and_the_registry_finds_them_in_order():
    modules = sorted(p.stem for p in Path(task_pkg.__file__).parent.glob("*.py")
                     if p.stem not in ("__init__", "base", "common", "semantic", "declarative", "registry"))
    assert sorted(TASKS) == modules  # one module per task, named after it
    assert list(TASKS) == ["char_count", "word_count", "json_format", "lowercase", "term_exclusion",
                           "keyword_inclusion", "sentiment", "topic", "register"]
    assert all(isinstance(t, Task) for t in TASKS.values())
    assert {t: TASKS[t].token_budget for t in ("char_count", "word_count", "lowercase")} == {
        "char_count": 160, "word_count": 160, "lowercase": 112}


def test_each_task_is_one_object_with_everything_it_needs():
    rng = random.Random(5)
    for task_id, task in TASKS.items():
        if task_id == "topic":
            continue  # its demo is checked with the embedding model (test_checkers covers it)
        params = task.sample_params(rng, 0.5)
        assert task.instruction(params)
        demo = task.demo(params)
        assert task.check(demo, params)
        prefixes = [demo[: i + 1] for i in range(len(demo))]
        assert 0 <= task.onset(params, prefixes, True) <= len(prefixes)


def test_policy_vocabulary_is_one_list_everywhere():
    from steerer.cli import build_parser
    from steerer.service import convert
    from steerer.service.client import POLICY_KINDS as CLIENT_KINDS
    from steerer.service.proto import pb2

    assert POLICY_KINDS == tuple(k.name.lower() for k in PolicyKind) == CLIENT_KINDS
    assert set(convert.POLICY_NAMES) == set(pb2.PolicyKind.values())
    assert set(convert.POLICY_NAMES.values()) == set(POLICY_KINDS)
    parser = build_parser()
    for prefix in (["generate", "--prompt", "x"], ["client", "generate", "--target", "t", "--prompt", "x"]):
        for kind in POLICY_KINDS:
            assert parser.parse_args([*prefix, "--policy", kind]).policy == kind
        with pytest.raises(SystemExit):
            parser.parse_args([*prefix, "--policy", "sometimes"])
    assert SteeringPolicy.parse(" Conditional : 12 ") == SteeringPolicy("conditional", 12.0)


BAD = [
    (dict(constraints=(Constraint("haiku"),)), "unknown task 'haiku'"),
    (dict(constraints=(Constraint("word_count", {"limit": 3}),)), "missing"),
    (dict(constraints=(Constraint("lowercase"), Constraint("lowercase"))), "once per request"),
    (dict(constraints=(Constraint("lowercase"),), policies={"json_format": SteeringPolicy("constant", 1.0)}),
     "without a constraint"),
    (dict(constraints=(Constraint("lowercase"),), policies={"lowercase": "constant:1"}), "SteeringPolicy"),
    (dict(constraints=(Constraint("sentiment", {"polarity": "positive"}),)), "no probe for task 'sentiment'"),
    (dict(prompt="  "), "prompt is empty"),
]


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_one_request_validation_for_every_entry_point(fields, message):
    from steerer.service.client import build_request

    request = SimpleNamespace(**({"prompt": "Hi", "constraints": (), "policies": {}, "policy": SteeringPolicy()}
                                 | fields))
    with pytest.raises(ValueError, match=message):
        validate_request(request, bank_tasks=("lowercase", "word_count", "json_format"))
    if "no probe" in message or request.policies:
        return  # the client does not know the server's bank, and names policies only beside their constraint
    specs = [(c.task, c.params) for c in request.constraints]
    with pytest.raises(ValueError, match=message):
        build_request(request.prompt, constraints=specs, check=True)
    build_request(request.prompt, constraints=specs)  # unchecked: the server is the judge
