"""Your own constraints: declarative task files (YAML) and task plugins (entry-point group ``steerer.tasks``),
one registry for both and the built-ins, banks that carry their task files, and serving a file task through
the controller on the real default model."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from steerer.tasks import (
    TASKS,
    TaskFileError,
    get_task,
    load_task_file,
    register_definition,
    register_task,
    registry,
)
from steerer.tasks.declarative import count_units, parse_task

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "tasks"
PLUGIN = EXAMPLES / "line_length_plugin"
BUILTIN = tuple(TASKS)

FAMILIES = """
phrasings:
  - {name: plain, placement: after, templates: ["Follow the rule."]}
  - {name: system, placement: system, templates: ["Always follow the rule."]}
  - {name: listed, placement: list, templates: ["The rule"]}
  - {name: upfront, placement: before, heldout: true, templates: ["First: follow the rule."]}
"""


def yaml_task(rule: str, params: str = "", task_id: str = "t_rule", extra: str = "") -> str:
    """A complete task file around one rule (flow-style YAML mapping) and optional params block."""
    text = f"id: {task_id}\nsummary: a test rule\nrule: {rule}\n"
    if params:
        text += "params:\n" + textwrap.indent(textwrap.dedent(params).strip("\n"), "  ") + "\n"
    return text + extra + FAMILIES


def make(rule: str, params: str = "", extra: str = ""):
    return parse_task(yaml_task(rule, params, extra=extra))


@pytest.fixture(autouse=True)
def _registry_restored():
    """Tests register tasks; later test modules must see only the built-ins."""
    yield
    for task_id in [t for t in TASKS if t not in BUILTIN]:
        registry.unregister(task_id)
    assert tuple(TASKS) == BUILTIN


# --------------------------------------------------------------------------------------------------
# checker verdicts on hand-made texts
# --------------------------------------------------------------------------------------------------

VERDICTS = [
    ("{type: forbid, phrases: [Acme, big co]}", {}, [
        ("We like ACME tools.", False), ("Acmes are fine.", True), ("the Big  co", True), ("a BIG CO here", False)]),
    ("{type: forbid, phrases: [acme], match: substring}", {}, [("Acmes are not fine.", False), ("ac me", True)]),
    ("{type: require, phrases: $words, match: word}", {"words": ["refund", "policy"]}, [
        ("Our Refund policy.", True), ("Refunds policy", False), ("policy", False)]),
    ("{type: require, phrases: [disclaimer], match: substring}", {}, [("DISCLAIMERS apply", True), ("none", False)]),
    (r"{type: regex, pattern: '\[\d+\]', must: match}", {"demo": "Libraries lend books [1]."}, [("as shown [12].", True), ("as shown [a].", False)]),
    (r"{type: regex, pattern: 'https?://', must: not_match, ignore_case: true}", {}, [
        ("see HTTP://x", False), ("see x", True)]),
    (r"{type: regex, pattern: '^- ', must: match, scope: line}", {"demo": "- Libraries lend books."}, [
        ("- a\n\n- b\n", True), ("- a\nb", False), ("", True)]),
    (r"{type: regex, pattern: 'TODO', must: not_match, scope: line}", {}, [("ok\nfine", True), ("ok\nTODO x", False)]),
    ("{type: starts_with, text: 'Dear customer'}", {"demo": "Dear customer, libraries lend books."}, [
        ("  dear Customer, hi", True), ("Hi, dear customer", False), ("Dear", False)]),
    ("{type: starts_with, text: 'Dear', ignore_case: false}", {"demo": "Dear reader."}, [("dear", False), ("Dear x", True)]),
    ("{type: ends_with, text: '?'}", {"demo": "Libraries lend books. Do you read?"}, [("Why?  \n", True), ("Why? No.", False), ("", False)]),
    ("{type: ends_with, text: $closing}", {"closing": "Best regards", "demo": "Books. {closing}"}, [("...\nbest REGARDS", True),
                                                                        ("Best regards,", False)]),
    ("{type: at_most, unit: sentences, limit: 2}", {}, [
        ("One. Two!", True), ("One. Two! Three?", False), ("Dr.Who is here. Ok", True), ('He said "hi." Then', True),
        ("He said \"hi.\" Then more. And", False), ("", True)]),
    ("{type: at_most, unit: paragraphs, limit: $n}", {"n": 1}, [("a\nb\n", True), ("a\n \nb", False),
                                                                 ("\n\na\n\n", True)]),
    ("{type: at_most, unit: bullets, limit: 1}", {}, [("- a\nb - c\n  * d", False), ("- a\n-b\n12) c", False),
                                                       ("- a\n1234. b\n**bold**", True)]),
]
PARAM_BLOCKS = {"words": "words: {choose: [refund, policy], k: 2}", "closing": "closing: {one_of: [Best regards]}",
                "n": "n: {range: [4, 1]}"}


@pytest.mark.parametrize("rule, params, cases", VERDICTS)
def test_checker_verdicts_on_hand_made_texts(rule, params, cases):
    demo = params.pop("demo", None)  # rules the built-in demonstration cannot satisfy need their own
    task = make(rule, "\n".join(PARAM_BLOCKS[p] for p in params), extra=f"demo: '{demo}'\n" if demo else "")
    for text, expected in cases:
        assert task.check(text, params) is expected, (rule, text)


def test_counting_units():
    assert count_units("sentences", "Hi there. How are you?  Fine... thanks! ok") == 5
    assert count_units("paragraphs", "one\ntwo\n\n\nthree\n \t\nfour") == 3
    assert count_units("bullets", "Intro:\n- a\n  * b\n3. c\n4.d\n• e") == 4


# --------------------------------------------------------------------------------------------------
# detectors: the same verdict whatever the cut, and exactly the checker's violations
# --------------------------------------------------------------------------------------------------

DETECTING = [
    ("{type: forbid, phrases: [ab, b c]}", "ab c.\n -"),
    ("{type: forbid, phrases: [ab, bab], match: substring}", "abB .\n"),
    (r"{type: regex, pattern: 'a\.', must: not_match, scope: line}", "a. b\n"),
    (r"{type: regex, pattern: '^[-a]', must: match, scope: line}", "a -.\n ", "a library"),
    ("{type: starts_with, text: 'Ab.'}", "aAbB. \n", "Ab. Libraries lend books."),
    ("{type: at_most, unit: sentences, limit: 2}", "a.!? \n\""),
    ("{type: at_most, unit: paragraphs, limit: 1}", "a \n\n"),
    ("{type: at_most, unit: bullets, limit: 0}", "- 1.a\n"),
]


def feed(detector, pieces: list[str]) -> int | None:
    for i, piece in enumerate(pieces):
        found = detector.feed(piece, i == len(pieces) - 1)
        if found is not None:
            return found
    return None


def cuts(text: str, rng: random.Random) -> list[list[str]]:
    points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 5)))) if len(text) > 1 else []
    return [[text], list(text) or [""], [text[a:b] for a, b in itertools.pairwise([0, *points, len(text)])] or [""]]


@pytest.mark.parametrize("rule, alphabet, demo", [(*d, "")[:3] for d in DETECTING])
def test_a_file_task_detector_ignores_the_cut_and_agrees_with_the_checker(rule, alphabet, demo):
    task = make(rule, extra=f"demo: '{demo}'\n" if demo else "")
    rng = random.Random(rule)
    violations = 0
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        if demo and rng.random() < 0.5:  # often from a compliant start, so both verdicts occur
            text = demo[:rng.randint(0, len(demo))] + text
        found = {feed(task.detect({}), pieces) for pieces in cuts(text, rng)}
        assert len(found) == 1, (rule, text, found)
        position = found.pop()
        assert (position is not None) == (not task.check(text, {})), (rule, text, position)
        if position is not None:
            violations += 1
            assert (1 if text else 0) <= position <= len(text), (rule, text, position)
    assert 5 < violations < 295, violations  # both verdicts occurred


def test_tasks_without_a_prefix_verdict_have_no_detector():
    for rule in ("{type: require, phrases: [x]}", "{type: ends_with, text: '?'}",
                 "{type: regex, pattern: zz, must: not_match}"):
        assert make(rule, extra="demo: 'Do you read?'\n").detect({}) is None


def test_the_onset_rule_is_the_detector_over_prefixes():
    task = make("{type: at_most, unit: sentences, limit: 1}")
    prefixes = ["One", "One.", "One. Two", "One. Two."]
    assert task.onset({}, prefixes, ended_by_eos=True) == 2


# --------------------------------------------------------------------------------------------------
# parameters, phrasings, demonstrations
# --------------------------------------------------------------------------------------------------


def test_params_are_sampled_with_difficulty_and_validated():
    task = make("{type: forbid, phrases: $names}", "names: {choose: [[a1, a2, a3], [b1, b2, b3]], k: [1, 3]}")
    rng = random.Random(0)
    easy = [task.sample_params(rng, 0.0)["names"] for _ in range(40)]
    hard = [task.sample_params(rng, 1.0)["names"] for _ in range(40)]
    assert all(n[0].startswith("a") for n in easy) and all(n[0].startswith("b") for n in hard)
    assert sum(map(len, easy)) < sum(map(len, hard))
    task.validate({"names": ["Anything"]})  # a request may name its own phrases
    for bad, why in (({}, "missing param"), ({"names": []}, "must not be empty"), ({"names": "x"}, "list"),
                     ({"names": ["x"], "other": 1}, "unexpected param")):
        with pytest.raises(ValueError, match=why):
            task.validate(bad)
    limit = make("{type: at_most, unit: bullets, limit: $n}", "n: {range: [9, 1]}")
    assert limit.sample_params(random.Random(1), 0.0)["n"] > limit.sample_params(random.Random(1), 1.0)["n"]
    with pytest.raises(ValueError, match="integer >= 0"):
        limit.validate({"n": True})


def test_example_files_load_with_phrasings_demo_and_instruction():
    from probes import phrasings

    for path in sorted(EXAMPLES.glob("*.yaml")):
        task = load_task_file(path)
        assert get_task(task.id) is task
        params = task.sample_params(random.Random(3), 0.7)
        assert task.check(task.demo(params), params)
        assert len(phrasings.families(task.id)) >= 4 and 1 <= len(phrasings.HELDOUT[task.id]) <= 2
        held = phrasings.HELDOUT[task.id][0]
        assert phrasings.family_split(task.id, held) == "heldout"
        prompt = phrasings.render(task.id, held, 0, "Describe a bicycle.", params, layout=1)
        assert prompt.instruction and "{" not in prompt.instruction and prompt.instruction in (prompt.user +
                                                                                               (prompt.system or ""))


# --------------------------------------------------------------------------------------------------
# bad input: one line naming the problem, nothing registered
# --------------------------------------------------------------------------------------------------

BAD = [
    ("unknown field", yaml_task("{type: forbid, phrases: [x]}", extra="colour: blue\n"), "unknown field 'colour'"),
    ("unknown rule field", yaml_task("{type: forbid, phrases: [x], case: upper}"), "unknown field 'case' in rule"),
    ("regex", yaml_task("{type: regex, pattern: 'a(b', must: match}"), "rule.pattern 'a\\(b' does not compile"),
    ("no phrasings", "id: t_rule\nsummary: s\nrule: {type: forbid, phrases: [x]}\n", "missing the field 'phrasings'"),
    ("few families", yaml_task("{type: forbid, phrases: [x]}").split("  - {name: listed")[0],
     "at least 4"),
    ("no heldout", yaml_task("{type: forbid, phrases: [x]}").replace("heldout: true", "heldout: false"),
     "0 families heldout"),
    ("placeholder", yaml_task("{type: forbid, phrases: [x]}").replace("Follow the rule.", "Avoid {word}."),
     "unknown placeholder {word}"),
    ("param ref", yaml_task("{type: forbid, phrases: $names}"), "names the param '\\$names'"),
    ("param type", yaml_task("{type: forbid, phrases: $n}", "n: {range: [1, 2]}"), "samples integer"),
    ("shadow", yaml_task("{type: forbid, phrases: [x]}", task_id="term_exclusion"), "shadows the built-in"),
    ("yaml", "id: [unclosed\n", "not valid YAML"),
    ("rule type", yaml_task("{type: forbidden, phrases: [x]}"), "unknown rule type 'forbidden'"),
    ("demo", yaml_task("{type: ends_with, text: '?'}", extra="demo: No question here.\n"),
     "demo does not satisfy the rule"),
]


@pytest.mark.parametrize("name, text, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_task_file_is_one_line_naming_the_problem(tmp_path, name, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TaskFileError, match=message) as info:
        load_task_file(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))
    assert tuple(TASKS) == BUILTIN


def test_a_missing_task_file_is_one_line(tmp_path):
    with pytest.raises(TaskFileError, match="cannot read the task file"):
        load_task_file(tmp_path / "none.yaml")


# --------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------


def test_registry_is_idempotent_for_one_definition_and_refuses_another():
    text = yaml_task("{type: forbid, phrases: [x]}", task_id="t_same")
    first = register_definition(text)
    assert register_definition(text) is first and TASKS["t_same"] is first
    assert registry.origin("t_same") == "file" and registry.definition("t_same") == text
    with pytest.raises(TaskFileError, match="already registered"):
        register_definition(text.replace("[x]", "[y]"))
    assert get_task("t_same").check("y", {})
    with pytest.raises(TaskFileError, match="shadows the built-in"):
        register_task(dataclasses.replace(get_task("lowercase")))
    assert registry.origin("lowercase") == "builtin"
    api = register_task(dataclasses.replace(get_task("lowercase"), id="my_lowercase", phrasings=()))
    assert get_task("my_lowercase") is api and registry.origin("my_lowercase") == "api"
    with pytest.raises(TaskFileError, match="built-in task"):
        registry.unregister("lowercase")


def _dist_info(root: Path, entry: str) -> None:
    info = root / "steerer_line_length-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: steerer-line-length\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[steerer.tasks]\n{entry}\n")


def _python(code: str, path: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path)), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=REPO)


def test_an_installed_plugin_joins_the_registry(tmp_path):
    _dist_info(tmp_path, "line_length = steerer_line_length:TASK")
    done = _python(
        "import json; from steerer.tasks import get_task, registry; from probes import phrasings\n"
        "t = get_task('line_length'); p = t.sample_params(__import__('random').Random(0), 0.5)\n"
        "d = t.detect({'limit': 5})\n"
        "print(json.dumps([registry.origin('line_length'), t.check('ab\\ncd', {'limit': 2}),"
        " t.check('abc', {'limit': 2}), t.check(t.demo(p), p), d.feed('abcd\\nabcdef'), phrasings.HELDOUT['line_length']]))",
        [PLUGIN, tmp_path])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["plugin steerer-line-length", True, False, True, 11, ["upfront"]]


def test_a_broken_plugin_is_one_line_naming_it_and_the_rest_still_loads(tmp_path):
    _dist_info(tmp_path, "line_length = steerer_no_such_module:TASK")
    done = _python("from steerer.tasks import TASKS, registry; print(len(TASKS), len(registry.PLUGIN_ERRORS))",
                   [tmp_path])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(BUILTIN)), "1"]
    lines = [line for line in done.stderr.splitlines() if "line_length" in line]
    assert len(lines) == 1 and "steerer-line-length" in lines[0] and "ModuleNotFoundError" in lines[0], done.stderr


def test_task_files_named_in_the_environment_are_registered_in_every_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_task("{type: regex, pattern: '(', must: match}"))
    env = {**os.environ, registry.FILES_ENV: os.pathsep.join([str(EXAMPLES / "short_reply.yaml"), str(bad)])}
    code = ("from steerer.tasks import get_task; from steerer.service.client import check_request\n"
            "check_request('Hi.', [('short_reply', {'limit': 2})]); print(get_task('short_reply').check('A. B. C.', {'limit': 2}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        f"steerer: {registry.FILES_ENV}={bad}: {bad} (t_rule): rule.pattern '(' does not compile: missing ), "
        "unterminated subpattern at position 0"]


# --------------------------------------------------------------------------------------------------
# banks carry their task files; serving needs nothing else
# --------------------------------------------------------------------------------------------------


def _bank_for(task_id: str, source: str = "json_format"):
    """The shipped bank cut to one probe, renamed to `task_id` (a probe without parameter conditioning)."""
    from steerer.bank import ProbeBank

    bank = ProbeBank.load().subset([source])
    rename = [dataclasses.replace(p, task=task_id) for p in bank.probes]
    warning = bank.warning and dataclasses.replace(
        bank.warning, probes=[dataclasses.replace(p, task=task_id) for p in bank.warning.probes])
    return dataclasses.replace(bank, probes=rename, warning=warning)


def test_a_bank_carries_its_task_file_and_registers_it_when_loaded(tmp_path):
    from steerer.ab.experiments import parse as parse_experiments
    from steerer.bank import ProbeBank

    task = load_task_file(EXAMPLES / "no_competitor.yaml")
    _bank_for(task.id).save(tmp_path / "bank")
    carried = tmp_path / "bank" / "tasks" / "no_competitor.yaml"
    assert carried.read_text() == (EXAMPLES / "no_competitor.yaml").read_text()
    assert json.loads((tmp_path / "bank" / "manifest.json").read_text())["task_sources"] == {"no_competitor": "file"}
    registry.unregister(task.id)
    assert "no_competitor" not in TASKS
    bank = ProbeBank.load(tmp_path / "bank")
    assert bank.tasks == ["no_competitor"] and get_task("no_competitor").check("Ask Google.", {
        "competitors": ["Microsoft"]})
    assert ProbeBank.load(tmp_path / "bank").tasks == ["no_competitor"]  # loading it again changes nothing
    arms = [{"name": "control", "policies": {"no_competitor": "off"}},
            {"name": "steered", "policies": {"no_competitor": "constant:40"}}]
    experiments = parse_experiments({"experiments": [{"name": "nc", "salt": "s", "arms": arms}]})
    assert experiments[0].tasks == {"no_competitor"}  # an A/B arm may steer a file task the bank brought


def test_a_bank_with_a_missing_plugin_or_a_broken_task_file_fails_in_one_line(tmp_path):
    from steerer.bank import BankError, ProbeBank

    _dist_info(tmp_path, "line_length = steerer_line_length:TASK")  # built where the plugin is installed
    built = _python(f"from tests.test_task_files import _bank_for; _bank_for('line_length').save({str(tmp_path / 'plugin')!r})",
                    [PLUGIN, tmp_path, REPO])
    assert built.returncode == 0, built.stderr
    sources = json.loads((tmp_path / "plugin" / "manifest.json").read_text())["task_sources"]
    assert sources == {"line_length": "plugin steerer-line-length"} and not (tmp_path / "plugin" / "tasks").exists()
    with pytest.raises(BankError, match="plugin package 'steerer-line-length', which is not installed") as info:
        ProbeBank.load(tmp_path / "plugin")
    assert "\n" not in str(info.value)

    load_task_file(EXAMPLES / "short_reply.yaml")
    _bank_for("short_reply").save(tmp_path / "file")
    registry.unregister("short_reply")
    carried = tmp_path / "file" / "tasks" / "short_reply.yaml"
    carried.write_text(carried.read_text().replace("heldout: true", "heldout: false"))
    with pytest.raises(BankError, match="short_reply.yaml \\(short_reply\\): phrasings marks 0 families heldout"):
        ProbeBank.load(tmp_path / "file")
    assert "short_reply" not in TASKS


def test_a_file_task_is_served_with_live_detection_on_the_real_model(lm, tmp_path):
    from steerer.bank import ProbeBank
    from steerer.constraints import Constraint
    from steerer.core import Steerer
    from steerer.request import Request, SamplingParams

    load_task_file(EXAMPLES / "no_competitor.yaml")
    _bank_for("no_competitor").save(tmp_path / "bank")
    registry.unregister("no_competitor")
    bank = ProbeBank.load(tmp_path / "bank")  # the bank alone brings the task back
    sampling = SamplingParams(max_new_tokens=24, temperature=0.0)
    requests = [Request("Write one sentence about the moon.", (Constraint("no_competitor", {"competitors": [w]}),),
                        sampling=sampling, id=w) for w in ("the", "Globex")]
    with Steerer(lm, bank) as steerer:
        results = {r.request_id: r for r in steerer.run(requests)}
    broken, kept = results["the"].verdicts[0], results["Globex"].verdicts[0]
    assert broken.satisfied is False and broken.detected_at is not None
    decoded = lm.tokenizer.decode(results["the"].tokens[:broken.detected_at + 1])
    assert not get_task("no_competitor").check(decoded + " ", {"competitors": ["the"]})
    assert kept.satisfied is True and kept.detected_at is None
    assert broken.p_satisfied_end is not None  # the renamed probe still reads


def test_the_cli_serves_a_bank_built_with_a_task_file(tmp_path):
    load_task_file(EXAMPLES / "short_reply.yaml")
    _bank_for("short_reply").save(tmp_path / "bank")
    done = subprocess.run(
        [sys.executable, "-m", "steerer.cli", "generate", "--bank", str(tmp_path / "bank"), "--constraint",
         'short_reply:{"limit": 1}', "--max-new-tokens", "40", "--prompt", "Tell me about cats in three sentences."],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "[short_reply: " in done.stderr and "checker: " in done.stderr, done.stderr
