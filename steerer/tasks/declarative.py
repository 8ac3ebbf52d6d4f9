"""Declarative tasks: a team's own constraint written as a YAML file, turned into the same `Task` the built-in
modules define (checker, validation, instruction, parameter sampler, demonstration, detector, phrasings).

One file is one task with one rule. The rule types are the ones production teams ask for: phrases that must
not / must appear (whole words or substrings, case-insensitive), a regex that must / must not match (the
whole text or every non-blank line), starts with / ends with, at most N sentences, paragraphs or bullets.
A rule field may name a sampled parameter (``$name``) instead of a literal, so the corpus varies it with
difficulty. Where a prefix can decide a violation (a forbidden phrase written, a finished line that breaks a
per-line regex, a start that no longer matches, a count passed) the task gets a detector whose verdict does
not depend on how the text was cut into deltas. The schema is in docs/TASKS.md.

Every problem with a file is one `TaskFileError` line naming the file and the field; nothing is registered
until the whole file checks out (`steerer.tasks.registry`).
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from steerer.tasks import common
from steerer.tasks.base import TOKEN_BUDGET, Detector, Params, PhrasingFamily, Task, no_detector
from steerer.tasks.term_exclusion import TermDetector

FIELDS = ("id", "summary", "kind", "rule", "params", "phrasings", "demo", "instruction", "token_budget")
REQUIRED = ("id", "summary", "rule", "phrasings")
RULE_FIELDS: dict[str, tuple[str, ...]] = {  # rule type -> its fields (first ones required)
    "forbid": ("phrases", "match"),
    "require": ("phrases", "match"),
    "regex": ("pattern", "must", "scope", "ignore_case"),
    "starts_with": ("text", "ignore_case"),
    "ends_with": ("text", "ignore_case"),
    "at_most": ("unit", "limit"),
}
RULE_REQUIRED = {"forbid": ("phrases",), "require": ("phrases",), "regex": ("pattern", "must"),
                 "starts_with": ("text",), "ends_with": ("text",), "at_most": ("unit", "limit")}
KINDS = ("structural", "lexical", "semantic")
PLACEMENTS = ("after", "before", "system", "list")  # as `probes.phrasings.PLACEMENTS`
UNITS = ("sentences", "paragraphs", "bullets")
PARAM_KINDS = ("choose", "range", "one_of")
ID_RE = re.compile(r"[a-z][a-z0-9_]{1,47}")
MIN_FAMILIES = 4
MAX_TEXT_CHARS = 200  # a starts/ends-with text a request may pass
ORDER = 2000  # after the built-in tasks in `TASKS`


class TaskFileError(ValueError):
    """A task file (or task definition) that cannot become a task; the message is one line naming the problem."""


# --------------------------------------------------------------------------------------------------
# counting units, one character at a time (so the checker and the detector count alike)
# --------------------------------------------------------------------------------------------------

TERMINATORS = ".!?"
CLOSERS = "\"')]}\u201d\u2019"  # may follow a terminator inside the same sentence end
BULLET = re.compile(r"[ \t]*(?:[-*\u2022+]|\d{1,3}[.)])[ \t]")
BULLET_PREFIX = re.compile(r"[ \t]*(?:[-*\u2022+]|\d{1,3}[.)]?)?")


class SentenceCounter:
    """A sentence starts at the first non-space character, and at a non-space character after whitespace that
    follows a terminator (.!? then optional closing quotes/brackets). Abbreviations ("e.g. this") count as
    ends: a cheap rule, the same in checker and detector."""

    def __init__(self) -> None:
        self.started = self.ended = self.gap = False

    def step(self, c: str) -> bool:
        if c.isspace():
            self.gap = True
            return False
        new = not self.started or (self.ended and self.gap)
        if not (self.ended and not self.gap and c in CLOSERS):
            self.ended = c in TERMINATORS
        self.started, self.gap = True, False
        return new


class ParagraphCounter:
    """Paragraphs are separated by a blank line (a whitespace run holding two or more newlines)."""

    def __init__(self) -> None:
        self.started = False
        self.newlines = 0

    def step(self, c: str) -> bool:
        if c.isspace():
            self.newlines += c == "\n"
            return False
        new = not self.started or self.newlines >= 2
        self.started, self.newlines = True, 0
        return new


class BulletCounter:
    """A bullet is a line that starts (after spaces or tabs) with -, *, +, a bullet sign or a number of up to
    three digits with . or ), then a space or tab; counted at that space."""

    def __init__(self) -> None:
        self.line = ""
        self.decided = False

    def step(self, c: str) -> bool:
        if c == "\n":
            self.line, self.decided = "", False
            return False
        if self.decided:
            return False
        self.line += c
        if BULLET.fullmatch(self.line):
            self.decided = True
            return True
        self.decided = BULLET_PREFIX.fullmatch(self.line) is None
        return False


COUNTERS: dict[str, Callable[[], Any]] = {"sentences": SentenceCounter, "paragraphs": ParagraphCounter,
                                           "bullets": BulletCounter}


def count_units(unit: str, text: str) -> int:
    counter = COUNTERS[unit]()
    return sum(counter.step(c) for c in text)


class UnitDetector:
    """At most `limit` units: decided at the character that starts unit limit + 1."""

    def __init__(self, unit: str, limit: int) -> None:
        self.counter, self.limit, self.count, self.length = COUNTERS[unit](), limit, 0, 0

    def feed(self, delta: str, final: bool = False) -> int | None:
        for i, c in enumerate(delta):
            if self.counter.step(c):
                self.count += 1
                if self.count > self.limit:
                    return self.length + i + 1
        self.length += len(delta)
        return None


# --------------------------------------------------------------------------------------------------
# the other detectors
# --------------------------------------------------------------------------------------------------


class SubstringDetector:
    """A forbidden substring (case-insensitive) is decided the moment it is complete. Per token it searches the
    delta plus the last (longest phrase - 1) characters, where a match may have begun."""

    def __init__(self, phrases: Sequence[str]) -> None:
        self.patterns = [re.compile(re.escape(p), re.IGNORECASE) for p in phrases]
        self.keep = max(len(p) for p in phrases) - 1
        self.tail, self.start = "", 0

    def feed(self, delta: str, final: bool = False) -> int | None:
        text = self.tail + delta
        ends = [m.end() for p in self.patterns if (m := p.search(text))]
        if ends:
            return self.start + min(ends)
        cut = max(0, len(text) - self.keep)
        self.tail, self.start = text[cut:], self.start + cut
        return None


class LineRegexDetector:
    """A per-line regex is decided on each finished non-blank line (a newline arrived, or the text ended):
    must-not at the end of the line's first match, must at the character that finished the line."""

    def __init__(self, pattern: re.Pattern[str], must: bool) -> None:
        self.pattern, self.must = pattern, must
        self.parts: list[str] = []  # the unfinished line's pieces (joined once, when it finishes: linear cost)
        self.start = 0  # its position in the whole text

    def _judge(self, line: str, start: int, newline: bool) -> int | None:
        if not line.strip():
            return None
        m = self.pattern.search(line)
        if self.must:
            return None if m else start + len(line) + newline
        return None if m is None else max(start + m.end(), start + 1)

    def feed(self, delta: str, final: bool = False) -> int | None:
        *done, rest = delta.split("\n")
        for i, piece in enumerate(done):
            line = "".join([*self.parts, piece]) if i == 0 else piece
            found = self._judge(line, self.start, True)
            if found is not None:
                return found
            self.start += len(line) + 1
        if done:
            self.parts = [rest]
        else:
            self.parts.append(rest)
        return self._judge("".join(self.parts), self.start, False) if final else None


def same_char(a: str, b: str, ignore_case: bool) -> bool:
    return a == b or (ignore_case and a.lower() == b.lower())


def starts(text: str, prefix: str, ignore_case: bool) -> bool:
    return len(text) >= len(prefix) and all(same_char(a, b, ignore_case) for a, b in zip(text, prefix, strict=False))


class StartDetector:
    """Starts with `prefix` (leading whitespace skipped): decided at the first character that differs, or at the
    end of a text that stopped short of it."""

    def __init__(self, prefix: str, ignore_case: bool) -> None:
        self.prefix, self.ignore_case = prefix, ignore_case
        self.matched, self.length, self.begun, self.done = 0, 0, False, False

    def feed(self, delta: str, final: bool = False) -> int | None:
        for i, c in enumerate(delta):
            if self.done:
                return None
            if not self.begun and c.isspace():
                continue
            self.begun = True
            if not same_char(c, self.prefix[self.matched], self.ignore_case):
                return self.length + i + 1
            self.matched += 1
            self.done = self.matched == len(self.prefix)
        self.length += len(delta)
        return self.length if final and not self.done else None


# --------------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One sampled parameter: ``choose`` phrases from a list (or from tiers, easy to hard) ``k`` at a time,
    an integer from a ``range`` [easy, hard], or ``one_of`` some texts."""

    name: str
    kind: str  # choose | range | one_of
    options: tuple = ()  # choose: tiers of phrases; one_of: texts
    k: tuple[int, int] = (1, 1)  # choose: how many, easy -> hard
    span: tuple[int, int] = (0, 0)  # range: easy -> hard

    @property
    def type(self) -> str:
        return {"choose": "phrases", "range": "integer", "one_of": "text"}[self.kind]

    def sample(self, rng: random.Random, d: float) -> Any:
        t = common.jitter(rng, d)
        if self.kind == "range":
            return int(round(self.span[0] + (self.span[1] - self.span[0]) * t))
        if self.kind == "one_of":
            return rng.choice(self.options)
        tier = self.options[min(len(self.options) - 1, int(t * len(self.options)))]
        k = int(round(self.k[0] + (self.k[1] - self.k[0]) * common.jitter(rng, d)))
        return rng.sample(tier, k=max(1, min(k, len(tier))))

    def check(self, task: str, value: Any) -> None:
        """Request-time validation: the type, not membership (a request may name its own phrases)."""
        if self.kind == "range":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{task}: param {self.name!r} must be an integer >= 0, got {value!r}")
        elif self.kind == "one_of":
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT_CHARS:
                raise ValueError(f"{task}: param {self.name!r} must be a non-blank string of at most "
                                 f"{MAX_TEXT_CHARS} characters")
        else:
            try:
                common.validate_terms(task, {"terms": value})
            except ValueError as exc:
                raise ValueError(str(exc).replace("terms", f"param {self.name!r}", 1)) from None


def _slots(specs: Mapping[str, ParamSpec], params: Mapping[str, Any]) -> dict[str, str]:
    """Template placeholders: every param, lists quoted and joined with "and" ({name}) or "or" ({name_or})."""
    out: dict[str, str] = {}
    for name, spec in specs.items():
        value = params[name]
        if spec.kind == "choose":
            out[name], out[f"{name}_or"] = common.quoted_list(value, "and"), common.quoted_list(value, "or")
        else:
            out[name] = str(value)
    return out


# --------------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One rule with its literals and ``$param`` references (resolved per request by `value`)."""

    type: str
    fields: Mapping[str, Any]
    pattern: re.Pattern[str] | None = None  # regex rules, compiled once

    def value(self, name: str, params: Mapping[str, Any]) -> Any:
        raw = self.fields.get(name)
        return params[raw[1:]] if isinstance(raw, str) and raw.startswith("$") else raw

    def check(self, text: str, params: Mapping[str, Any]) -> bool:
        t = self.type
        if t in ("forbid", "require"):
            patterns = phrase_patterns(self.value("phrases", params), self.fields.get("match", "word"))
            found = [bool(p.search(text)) for p in patterns]
            return not any(found) if t == "forbid" else all(found)
        if t == "regex":
            must = self.fields["must"] == "match"
            if self.fields.get("scope", "text") == "text":
                return bool(self.pattern.search(text)) == must
            lines = [line for line in text.split("\n") if line.strip()]
            hits = [bool(self.pattern.search(line)) for line in lines]
            return all(hits) if must else not any(hits)
        ignore_case = bool(self.fields.get("ignore_case", True))
        if t == "starts_with":
            return starts(text.lstrip(), self.value("text", params), ignore_case)
        if t == "ends_with":
            return starts(text.rstrip()[::-1], self.value("text", params)[::-1], ignore_case)
        return count_units(self.fields["unit"], text) <= self.value("limit", params)  # at_most

    def detector(self, params: Mapping[str, Any]) -> Detector | None:
        t = self.type
        if t == "forbid":
            phrases = list(self.value("phrases", params))
            return TermDetector(phrases) if self.fields.get("match", "word") == "word" else SubstringDetector(phrases)
        if t == "regex" and self.fields.get("scope", "text") == "line":
            return LineRegexDetector(self.pattern, self.fields["must"] == "match")
        if t == "starts_with":
            return StartDetector(self.value("text", params), bool(self.fields.get("ignore_case", True)))
        if t == "at_most":
            return UnitDetector(self.fields["unit"], self.value("limit", params))
        return None  # require, ends_with, a whole-text regex: only the end decides


def phrase_patterns(phrases: Sequence[str], match: str) -> list[re.Pattern[str]]:
    if match == "word":
        return [common.whole_word_pattern(p) for p in phrases]
    return [re.compile(re.escape(p), re.IGNORECASE) for p in phrases]


# --------------------------------------------------------------------------------------------------
# parsing a file
# --------------------------------------------------------------------------------------------------


def _fail(where: str, message: str) -> TaskFileError:
    return TaskFileError(f"{where}: {message}")


def _mapping(where: str, value: Any, name: str, allowed: Sequence[str], required: Sequence[str]) -> dict:
    if not isinstance(value, Mapping):
        raise _fail(where, f"{name} must be a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise _fail(where, f"unknown field {unknown[0]!r} in {name}; allowed: {', '.join(allowed)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise _fail(where, f"{name} is missing the field {missing[0]!r}")
    return dict(value)


def _strings(where: str, value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise _fail(where, f"{name} must be a non-empty list of strings")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(where, f"{name} must hold only non-blank strings")
    return tuple(value)


def _int_pair(where: str, value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise _fail(where, f"{name} must be an integer >= 0 or a pair [easy, hard] of them")
    return int(value[0]), int(value[1])


def parse_params(where: str, raw: Any) -> dict[str, ParamSpec]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _fail(where, f"params must be a mapping of name -> sampler, got {type(raw).__name__}")
    specs: dict[str, ParamSpec] = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise _fail(where, f"param name {name!r} must be lower_snake_case")
        label = f"params.{name}"
        spec = _mapping(where, spec, label, (*PARAM_KINDS, "k"), ())
        kinds = [k for k in PARAM_KINDS if k in spec]
        if len(kinds) != 1:
            raise _fail(where, f"{label} needs exactly one of {', '.join(PARAM_KINDS)}")
        kind = kinds[0]
        if "k" in spec and kind != "choose":
            raise _fail(where, f"{label}: k goes with choose")
        if kind == "range":
            specs[name] = ParamSpec(name, kind, span=_int_pair(where, spec["range"], f"{label}.range"))
        elif kind == "one_of":
            specs[name] = ParamSpec(name, kind, options=_strings(where, spec["one_of"], f"{label}.one_of"))
        else:
            options = spec["choose"]
            tiered = isinstance(options, Sequence) and options and all(isinstance(o, list) for o in options)
            tiers = tuple(_strings(where, o, f"{label}.choose") for o in (options if tiered else [options]))
            k = _int_pair(where, spec.get("k", 1), f"{label}.k")
            if min(k) < 1:
                raise _fail(where, f"{label}.k must be at least 1")
            specs[name] = ParamSpec(name, kind, options=tiers, k=k)
        for option in itertools.chain.from_iterable(specs[name].options) if kind == "choose" else \
                specs[name].options:  # every value the sampler may draw is one a request may pass
            try:
                specs[name].check("x", [option] if kind == "choose" else option)
            except ValueError as exc:
                raise _fail(where, f"{label}: option {option!r}: {str(exc).removeprefix('x: ')}") from None
    return specs


def _ref(where: str, rule: Mapping[str, Any], name: str, specs: Mapping[str, ParamSpec], want: str) -> Any:
    """A rule field's literal (checked against `want`) or its ``$param`` (which must sample a `want`)."""
    value = rule[name]
    if isinstance(value, str) and value.startswith("$"):
        spec = specs.get(value[1:])
        if spec is None:
            raise _fail(where, f"rule.{name} names the param {value!r}, which params does not declare")
        if spec.type != want:
            raise _fail(where, f"rule.{name}: param {value!r} samples {spec.type}, the field needs {want}")
        return value
    try:
        ParamSpec(name, {"phrases": "choose", "integer": "range", "text": "one_of"}[want]).check("rule", value)
    except ValueError as exc:
        raise _fail(where, f"rule.{name}: {str(exc).removeprefix('rule: ')}") from None
    return value


def parse_rule(where: str, raw: Any, specs: Mapping[str, ParamSpec]) -> Rule:
    if not isinstance(raw, Mapping) or "type" not in raw:
        raise _fail(where, f"rule must be a mapping with a type ({', '.join(RULE_FIELDS)})")
    rtype = raw["type"]
    if rtype not in RULE_FIELDS:
        raise _fail(where, f"unknown rule type {rtype!r}; known: {', '.join(RULE_FIELDS)}")
    rule = _mapping(where, raw, f"rule ({rtype})", ("type", *RULE_FIELDS[rtype]), RULE_REQUIRED[rtype])
    del rule["type"]

    def choice(name: str, options: Sequence[Any], default: Any) -> None:
        if rule.get(name, default) not in options:
            raise _fail(where, f"rule.{name} must be one of {', '.join(map(str, options))}, got {rule[name]!r}")

    pattern = None
    if rtype in ("forbid", "require"):
        _ref(where, rule, "phrases", specs, "phrases")
        choice("match", ("word", "substring"), "word")
    elif rtype == "regex":
        choice("must", ("match", "not_match"), None)
        choice("scope", ("text", "line"), "text")
        choice("ignore_case", (True, False), False)
        if not isinstance(rule["pattern"], str) or not rule["pattern"]:
            raise _fail(where, "rule.pattern must be a non-empty string")
        try:
            pattern = re.compile(rule["pattern"], re.IGNORECASE if rule.get("ignore_case") else 0)
        except re.error as exc:
            raise _fail(where, f"rule.pattern {rule['pattern']!r} does not compile: {exc}") from None
    elif rtype in ("starts_with", "ends_with"):
        _ref(where, rule, "text", specs, "text")
        choice("ignore_case", (True, False), True)
    else:
        choice("unit", UNITS, None)
        _ref(where, rule, "limit", specs, "integer")
    return Rule(rtype, rule, pattern)


def _template(where: str, name: str, text: Any, slots: set[str]) -> str:
    if not isinstance(text, str) or not text.strip():
        raise _fail(where, f"{name} must be a non-blank string")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise _fail(where, f"{name}: bad template {text!r} ({exc}); write literal braces as {{{{ }}}}") from None
    unknown = sorted(f for f in fields if f not in slots)
    if unknown:
        raise _fail(where, f"{name}: unknown placeholder {{{unknown[0]}}}; known: "
                           f"{', '.join('{' + s + '}' for s in sorted(slots)) or 'none (no params)'}")
    return text


def parse_phrasings(where: str, raw: Any, slots: set[str],
                    fill: Callable[[str, Mapping[str, Any]], str]) -> tuple[PhrasingFamily, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise _fail(where, f"phrasings must be a list of at least {MIN_FAMILIES} families")
    families: list[PhrasingFamily] = []
    for i, fam in enumerate(raw):
        label = f"phrasings[{i}]"
        fam = _mapping(where, fam, label, ("name", "placement", "templates", "heldout"), ("name", "templates"))
        name = fam["name"]
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise _fail(where, f"{label}.name must be lower_snake_case, got {name!r}")
        if name in {f.name for f in families}:
            raise _fail(where, f"{label}: two phrasing families are named {name!r}")
        placement = fam.get("placement", "after")
        if placement not in PLACEMENTS:
            raise _fail(where, f"{label}.placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        if fam.get("heldout", False) not in (True, False):
            raise _fail(where, f"{label}.heldout must be true or false")
        templates = [_template(where, f"{label}.templates", t, slots)
                     for t in _strings(where, fam["templates"], f"{label}.templates")]
        sentences = tuple((lambda p, t=t: fill(t, p)) for t in templates)
        families.append(PhrasingFamily(name, placement, sentences, bool(fam.get("heldout", False))))
    if len(families) < MIN_FAMILIES:
        raise _fail(where, f"phrasings has {len(families)} families; a task needs at least {MIN_FAMILIES}")
    held = sum(f.heldout for f in families)
    if not 1 <= held <= 2:
        raise _fail(where, f"phrasings marks {held} families heldout; mark one or two")
    return tuple(families)


def parse_task(text: str, where: str = "<task file>") -> Task:
    """The task a YAML definition describes; `TaskFileError` (one line) for anything wrong with it."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise _fail(where, f"not valid YAML ({getattr(exc, 'problem', None) or 'parse error'}{at})") from None
    top = _mapping(where, raw, "the task file", FIELDS, REQUIRED)
    task_id = top["id"]
    if not isinstance(task_id, str) or not ID_RE.fullmatch(task_id):
        raise _fail(where, f"id must be lower_snake_case (2-48 characters, starting with a letter), got {task_id!r}")
    where = f"{where} ({task_id})"
    if not isinstance(top["summary"], str) or not top["summary"].strip():
        raise _fail(where, "summary must be a non-blank string")
    specs = parse_params(where, top.get("params"))
    rule = parse_rule(where, top["rule"], specs)
    kind = top.get("kind", "lexical" if rule.type in ("forbid", "require") else "structural")
    if kind not in KINDS:
        raise _fail(where, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    budget = top.get("token_budget", TOKEN_BUDGET)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 8 <= budget <= 4096:
        raise _fail(where, f"token_budget must be an integer in 8..4096, got {budget!r}")
    slots = {*specs, *(f"{n}_or" for n, s in specs.items() if s.kind == "choose")}

    def fill(template: str, params: Mapping[str, Any]) -> str:
        return template.format(**_slots(specs, params))

    families = parse_phrasings(where, top["phrasings"], slots, fill)
    first = next(f for f in families if not f.heldout)
    instruction = top.get("instruction")
    if instruction is not None:
        instruction = _template(where, "instruction", instruction, slots)
    demo = _template(where, "demo", top["demo"], slots) if "demo" in top else None

    def validate(params: Any) -> Params:
        params = common.require_mapping(task_id, params)
        common.check_keys(task_id, params, tuple(specs))
        for name, spec in specs.items():
            spec.check(task_id, params[name])
        return dict(params)

    def check(response: str, params: Mapping[str, Any]) -> bool:
        validate(params)
        return rule.check(common.require_text(task_id, response), params)

    def render(params: Mapping[str, Any]) -> str:
        return fill(instruction, params) if instruction is not None else first.sentences[0](params)

    def sample(rng: random.Random, d: float) -> Params:
        return {name: spec.sample(rng, d) for name, spec in specs.items()}

    def demo_text(params: Mapping[str, Any]) -> str:
        if demo is not None and rule.check(given := fill(demo, params), params):
            return given
        parts: list[str] = []  # else: up to three built-in demo sentences, kept while the rule still holds
        if rule.type == "require":  # (after one that mentions the required phrases)
            parts = [" ".join(f"You can even find a book about {p} there." for p in rule.value("phrases", params))]
        for sentence in (*common.DEMO_SENTENCES, *common.DEMO_PLAIN):
            if len(parts) < 3 and rule.check(" ".join([*parts, sentence]), params):
                parts.append(sentence)
        return " ".join(parts)

    has_detector = rule.type in ("forbid", "starts_with", "at_most") or (
        rule.type == "regex" and rule.fields.get("scope", "text") == "line")
    task = Task(id=task_id, kind=kind, summary=top["summary"].strip(), checker=check, validator=validate,
                render=render, sampler=sample, demo_text=demo_text,
                detector=rule.detector if has_detector else no_detector, token_budget=budget, order=ORDER,
                phrasings=families)
    _try_out(where, task, demo is not None)
    return task


def _try_out(where: str, task: Task, has_demo: bool) -> None:
    """Sample, render every phrasing and build the demonstration at three difficulties, so a file that would
    fail in the corpus fails at load instead."""
    rng = random.Random(0)
    for d in (0.0, 0.5, 1.0):
        try:
            params = task.sample_params(rng, d)
        except ValueError as exc:
            raise _fail(where, f"params: a sampled value is invalid ({exc})") from None
        for family in task.phrasings:
            for sentence in family.sentences:
                sentence(params)
        task.instruction(params)
        if not task.demo_text(params) or not task.check(task.demo_text(params), params):
            what = "demo does not satisfy the rule" if has_demo else "no built-in demonstration satisfies the rule"
            raise _fail(where, f"{what} for params {params}; give a compliant `demo:`")
