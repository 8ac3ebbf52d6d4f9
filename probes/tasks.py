"""The nine instruction constraints: instruction text, checker, validation and parameter sampling.

Parameters vary per prompt (the limit, the word, the polarity, the topic) so a probe has to read the
model's state rather than the prompt; ``sample_params`` spreads them from easy (a small model usually
complies) to hard (it usually does not) so both labels occur.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from probes import checkers

Kind = Literal["structural", "lexical", "semantic"]
Params = dict[str, Any]


class UnknownTaskError(KeyError):
    """A task id that is not in ``TASKS``; the message lists the known ids."""

    def __init__(self, task_id: object) -> None:
        self.task_id = task_id
        super().__init__(f"unknown task {task_id!r}; known tasks: {', '.join(TASKS)}")

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0])


@dataclass(frozen=True)
class Task:
    """One constraint. Use the methods; the callables behind them are fields so the registry stays data."""

    id: str
    kind: Kind
    summary: str
    checker: Callable[[str, Mapping[str, Any]], bool]
    validator: Callable[[Any], object]
    render: Callable[[Mapping[str, Any]], str]
    sampler: Callable[[random.Random, float], Params]

    def validate(self, params: Any) -> None:
        """Raise ``ValueError`` (one line) if ``params`` are malformed for this task."""
        self.validator(params)

    def instruction(self, params: Mapping[str, Any]) -> str:
        """The natural-language instruction added to a prompt, e.g. "Use at most 25 words."."""
        self.validate(params)
        return self.render(params)

    def check(self, response: str, params: Mapping[str, Any]) -> bool:
        """Whether ``response`` satisfies the constraint (the probe's label)."""
        return self.checker(response, params)

    def sample_params(self, rng: random.Random, difficulty: float) -> Params:
        """Random parameters; ``difficulty`` 0 is easy for a small model, 1 hard."""
        if isinstance(difficulty, bool) or not isinstance(difficulty, int | float) or not 0 <= difficulty <= 1:
            raise ValueError(f"difficulty must be a number in [0, 1], got {difficulty!r}")
        params = self.sampler(rng, float(difficulty))
        self.validate(params)
        return params


# --------------------------------------------------------------------------------------------------
# instruction text
# --------------------------------------------------------------------------------------------------

_RELATION_TEXT = {"less than": "fewer than", "at most": "at most", "at least": "at least"}


def _quoted_list(terms: list[str], conj: str) -> str:
    quoted = [f"'{t}'" for t in terms]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + f" {conj} " + quoted[-1]


def _render_chars(p: Mapping[str, Any]) -> str:
    return f"Answer in {_RELATION_TEXT[p['relation']]} {p['limit']} characters."


def _render_words(p: Mapping[str, Any]) -> str:
    return f"Answer in {_RELATION_TEXT[p['relation']]} {p['limit']} words."


def _render_exclusion(p: Mapping[str, Any]) -> str:
    terms = list(p["terms"])
    noun = "word" if len(terms) == 1 else "words"
    return f"Do not use the {noun} {_quoted_list(terms, 'or')}."


def _render_inclusion(p: Mapping[str, Any]) -> str:
    terms = list(p["terms"])
    noun = "word" if len(terms) == 1 else "words"
    return f"Mention the {noun} {_quoted_list(terms, 'and')}."


def _render_register(p: Mapping[str, Any]) -> str:
    if p["register"] == "formal":
        return "Use a formal register."
    return "Use an informal, casual register."


# --------------------------------------------------------------------------------------------------
# parameter sampling
# --------------------------------------------------------------------------------------------------


def _loglerp(lo: float, hi: float, t: float) -> float:
    return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * t)


def _jitter(rng: random.Random, d: float, spread: float = 0.15) -> float:
    """Difficulty with noise, clipped to [0, 1], so neighbouring difficulties overlap."""
    return min(1.0, max(0.0, d + rng.uniform(-spread, spread)))


def _round_nice(x: float) -> int:
    step = 1 if x < 20 else 5 if x < 200 else 10 if x < 1000 else 50
    return max(step, int(round(x / step) * step))


def _length_sampler(upper_easy: float, upper_hard: float, lower_easy: float, lower_hard: float):
    """Upper bounds shrink and lower bounds grow with difficulty (log scale: a small model's lengths vary
    over an order of magnitude). Lower bounds stay reachable within the dataset's 160-token budget, so a
    response cut off by the budget is not labelled a failure the model would not have made."""

    def sample(rng: random.Random, d: float) -> Params:
        relation = rng.choices(checkers.RELATIONS, weights=(0.4, 0.3, 0.3))[0]
        t = _jitter(rng, d)
        if relation == "at least":
            limit = _loglerp(lower_easy, lower_hard, t)
        else:
            limit = _loglerp(upper_easy, upper_hard, t)
        return {"relation": relation, "limit": _round_nice(limit)}

    return sample


def _no_params(rng: random.Random, d: float) -> Params:
    return {}


# Words to avoid, by how hard they are to avoid in an ordinary answer.
EXCLUSION_TIERS: tuple[tuple[str, ...], ...] = (
    ("ocean", "lantern", "volcano", "penguin", "castle", "dragon", "violin", "glacier", "umbrella", "pirate",
     "rainbow", "cactus"),
    ("very", "also", "important", "many", "people", "time", "way", "help", "make", "good", "can", "use",
     "like", "example"),
    ("the", "a", "and", "is", "of", "to", "in", "it", "you", "that", "for", "are"),
)
# Words to include, by how unlikely an ordinary answer is to contain them anyway (substring match).
INCLUSION_TIERS: tuple[tuple[str, ...], ...] = (
    ("the", "and", "is", "use", "can", "make", "time", "also"),
    ("example", "simple", "history", "future", "friend", "journey", "balance", "energy", "secret", "color"),
    ("lantern", "marmalade", "zeppelin", "kaleidoscope", "accordion", "walrus", "origami", "tambourine",
     "cinnamon", "lighthouse", "pelican", "velvet"),
)


def _tiered_terms(tiers: tuple[tuple[str, ...], ...]):
    """1-3 terms from a tier chosen by (jittered) difficulty; harder prompts also ask for more terms."""

    def sample(rng: random.Random, d: float) -> Params:
        t = _jitter(rng, d, 0.2)
        tier = tiers[min(len(tiers) - 1, int(t * len(tiers)))]
        n = 1 + (rng.random() < d) + (rng.random() < d / 2)
        return {"terms": rng.sample(tier, k=min(n, len(tier)))}

    return sample


def _sample_sentiment(rng: random.Random, d: float) -> Params:
    # Assistant models drift positive; negative is the hard polarity.
    return {"polarity": "negative" if rng.random() < 0.3 + 0.4 * d else "positive"}


# Specific topics a user might name, beyond the broad reference topics.
SPECIFIC_TOPICS: tuple[str, ...] = (
    "beekeeping", "volcanoes", "chess", "jazz music", "dinosaurs", "origami", "knitting", "ancient Egypt",
    "the Roman Empire", "coral reefs", "black holes", "coffee", "photography", "gardening", "robotics",
    "medieval castles", "the ocean", "mountain climbing", "birdwatching", "board games",
)


def _sample_topic(rng: random.Random, d: float) -> Params:
    # A broad topic leaves room to connect it to any request; a narrow one forces a change of subject.
    pool = SPECIFIC_TOPICS if rng.random() < d else checkers.REFERENCE_TOPICS
    return {"topic": rng.choice(pool)}


def _sample_register(rng: random.Random, d: float) -> Params:
    # Assistant prose is formal-ish by default; informal is the hard register.
    return {"register": "informal" if rng.random() < 0.3 + 0.4 * d else "formal"}


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

V = checkers.VALIDATORS

TASKS: dict[str, Task] = {
    t.id: t
    for t in (
        Task("char_count", "structural", "response length in characters against a limit",
             checkers.char_count, V["char_count"], _render_chars, _length_sampler(600, 30, 40, 500)),
        Task("word_count", "structural", "word count against a limit (IFEval number_words)",
             checkers.word_count, V["word_count"], _render_words, _length_sampler(120, 8, 10, 90)),
        Task("json_format", "structural", "the whole response is valid JSON (IFEval json_format)",
             checkers.json_format, V["json_format"], lambda p: "Reply only with valid JSON.", _no_params),
        Task("lowercase", "structural", "no capital letters (IFEval english_lowercase)",
             checkers.lowercase, V["lowercase"],
             lambda p: "Write everything in lowercase letters; do not use any capital letters.", _no_params),
        Task("term_exclusion", "lexical", "none of the words occurs (IFEval forbidden_words)",
             checkers.term_exclusion, V["term_exclusion"], _render_exclusion, _tiered_terms(EXCLUSION_TIERS)),
        Task("keyword_inclusion", "lexical", "every word occurs (IFEval keywords:existence)",
             checkers.keyword_inclusion, V["keyword_inclusion"], _render_inclusion,
             _tiered_terms(INCLUSION_TIERS)),
        Task("sentiment", "semantic", "VADER tone has the requested polarity by a margin",
             checkers.sentiment, V["sentiment"], lambda p: f"Write in a clearly {p['polarity']} tone.",
             _sample_sentiment),
        Task("topic", "semantic", "MiniLM: the named topic ranks first among reference topics",
             checkers.topic, V["topic"], lambda p: f"Talk only about {p['topic'].strip()}.", _sample_topic),
        Task("register", "semantic", "lexical formality score past a margin",
             checkers.register, V["register"], _render_register, _sample_register),
    )
}


def get_task(task_id: str) -> Task:
    """The task with this id; ``UnknownTaskError`` (a ``KeyError``) listing the known ids otherwise."""
    try:
        return TASKS[task_id]
    except (KeyError, TypeError):
        raise UnknownTaskError(task_id) from None
