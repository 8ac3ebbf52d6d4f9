"""register: a lexical formality score past a margin. No IFEval equivalent; validated against the
hand-labelled set in ``tests/data/semantic_labels.jsonl``."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

from steerer.tasks import common, semantic
from steerer.tasks.base import Params, Task

REGISTERS: tuple[str, ...] = ("formal", "informal")
# Score units: cue points per 10 words. Plain expository prose sits around +1.5..+3, academic or legal prose
# above +3, chatty text below 0.
REGISTER_MARGIN = 1.5

_CONTRACTION = re.compile(
    r"\b\w+(n't|'re|'ll|'ve|'m|'d)\b|\b(it|that|there|here|what|who|he|she|let|where|how|everyone|"
    r"nothing|something|everything)'s\b|'em\b|\by'all\b|\b\w+in'(?=\s|$)",
    re.IGNORECASE,
)
_SLANG = common.wordset(
    """
    gonna wanna gotta kinda sorta dunno lemme gimme ain't yeah yep yup nope nah hey hiya ok okay lol lmao
    haha hahaha omg btw tbh imo imho ngl idk fyi dude bro guys buddy cool awesome super stuff totally
    basically literally pretty crazy wild insane tho cuz coz ya yall y'all u ur thx pls plz bucks
    oops yikes wow whoa ugh meh slaps vibe vibes legit chill kid kids folks anyway anyways
    """
)
_INTERJECTION_START = re.compile(r"^(so|well|oh|hey|okay|ok|yeah|wow|honestly|anyway|like|look)\b",
                                 re.IGNORECASE)
_FORMAL_MARKERS = common.wordset(
    """
    furthermore moreover consequently therefore thus hence however nevertheless nonetheless accordingly
    whereas whereby therein herein thereof hereby pursuant notwithstanding additionally subsequently
    regarding concerning respectively approximately significantly substantially demonstrate demonstrates
    indicate indicates indicated require requires required ensure facilitate obtain sufficient commence
    commenced shall hereinafter aforementioned sincerely dear regards kindly request inform anticipate
    thereby within prior upon whom which
    """
)
_PERSONAL = frozenset({"i", "me", "my", "you", "your", "we", "us"})
# Shouting for emphasis ("you HAVE to"), as opposed to acronyms (NASA, DNA).
_SHOUTED = frozenset({"have", "so", "must", "love", "need", "best", "ever", "never", "really", "not", "very"})
_EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf]")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")


def _syllables(word: str) -> int:
    word = word.lower()
    n = len(_VOWEL_GROUPS.findall(word))
    if word.endswith("e") and not word.endswith(("le", "ee")) and n > 1:
        n -= 1
    return max(1, n)


def register_score(text: str) -> float:
    """Formality: formal cue points minus informal cue points per 10 words. Positive = formal.

    Formal cues: long (7+ letters, 3+ syllables, i.e. mostly Latinate) words, formal connectives and
    vocabulary. Informal cues: contractions, slang and chat abbreviations, exclamation marks, emoji,
    sentences that start lower-case or with an interjection, "..."/"?!", shouting, and (weakly) first and
    second person pronouns.
    """
    text = semantic.strip_preamble(text)
    words = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text)
    if not words:
        return 0.0
    lower = [w.lower() for w in words]
    formal = sum(1.0 for w in lower if len(w) >= 7 and _syllables(w) >= 3)
    formal += 2.0 * sum(1 for w in lower if w in _FORMAL_MARKERS)

    sentences = semantic.sentence_split(text)
    informal = 1.5 * len(_CONTRACTION.findall(text))
    informal += 2.0 * sum(1 for w in lower if w in _SLANG)
    informal += 1.5 * text.count("!") + 2.0 * len(_EMOJI.findall(text))
    informal += 1.0 * (text.count("...") + text.count("?!"))
    informal += 1.5 * sum(1 for s in sentences if s[:1].islower())
    informal += 1.5 * sum(1 for s in sentences if _INTERJECTION_START.match(s))
    informal += 0.4 * sum(1 for w in lower if w in _PERSONAL)
    informal += 2.0 * sum(1 for w in words if len(w) > 1 and w.isupper() and w.lower() in _SHOUTED)
    return 10.0 * (formal - informal) / len(words)


def validate(params: Any) -> str:
    return common.validate_choice("register", params, "register", REGISTERS)


def check(response: str, params: Mapping[str, Any]) -> bool:
    """Formal: score >= +margin; informal: score <= -margin. Plain text in between satisfies neither."""
    wanted = validate(params)
    score = register_score(common.require_text("register", response))
    return score >= REGISTER_MARGIN if wanted == "formal" else score <= -REGISTER_MARGIN


def render(p: Mapping[str, Any]) -> str:
    if p["register"] == "formal":
        return "Use a formal register."
    return "Use an informal, casual register."


def sample(rng: random.Random, d: float) -> Params:
    # Assistant prose is formal-ish by default; informal is the hard register.
    return {"register": "informal" if rng.random() < 0.3 + 0.4 * d else "formal"}


DEMO_FORMAL = (
    "A public library is an institution that provides access to books, periodicals and digital resources. "
    "Furthermore, it facilitates independent research and supports lifelong education within the community."
)
DEMO_INFORMAL = (
    "Oh, a library? It's basically a place where you can grab books for free! Super handy, honestly. You just "
    "walk in, pick stuff you like and take it home. Pretty cool, right?"
)

TASK = Task(
    id="register", kind="semantic", summary="lexical formality score past a margin",
    checker=check, validator=validate, render=render, sampler=sample,
    demo_text=lambda p: DEMO_FORMAL if p["register"] == "formal" else DEMO_INFORMAL, order=90,
)
