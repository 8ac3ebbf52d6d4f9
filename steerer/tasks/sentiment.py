"""sentiment: the tone has the requested polarity by a margin (VADER). No IFEval equivalent; validated
against the hand-labelled set in ``tests/data/semantic_labels.jsonl``."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from steerer.tasks import common, semantic
from steerer.tasks.base import Params, Task

POLARITIES: tuple[str, ...] = ("positive", "negative")
# VADER's compound over a whole response saturates on long texts (it sums valences), and a single lexicon
# word ("good way to", "flat tire") gives neutral instructions a sentence-level score of +-0.3. So a tone
# must show in two ways at once: the mean sentence compound AND the share of polar words (VADER's pos/neg
# proportions) both past a margin, with the same sign. Neutral text passes neither polarity.
SENTIMENT_COMPOUND_MARGIN = 0.25
SENTIMENT_DENSITY_MARGIN = 0.15


def validate(params: Any) -> str:
    return common.validate_choice("sentiment", params, "polarity", POLARITIES)


def sentiment_scores(text: str) -> tuple[float, float]:
    """(mean sentence compound, polar-word density pos - neg), both in [-1, 1]; 0 for empty text."""
    body = semantic.strip_preamble(text)
    sentences = semantic.sentence_split(body)
    if not sentences:
        return 0.0, 0.0
    vader = semantic.get_vader()
    compound = sum(vader.polarity_scores(s)["compound"] for s in sentences) / len(sentences)
    whole = vader.polarity_scores(body)
    return compound, whole["pos"] - whole["neg"]


def check(response: str, params: Mapping[str, Any]) -> bool:
    """The tone has the requested polarity by a margin (VADER); neutral or mixed text satisfies neither."""
    polarity = validate(params)
    compound, density = sentiment_scores(common.require_text("sentiment", response))
    sign = 1.0 if polarity == "positive" else -1.0
    return sign * compound >= SENTIMENT_COMPOUND_MARGIN and sign * density >= SENTIMENT_DENSITY_MARGIN


def sample(rng: random.Random, d: float) -> Params:
    # Assistant models drift positive; negative is the hard polarity.
    return {"polarity": "negative" if rng.random() < 0.3 + 0.4 * d else "positive"}


DEMO_POSITIVE = (
    "A public library is a wonderful place! It is full of amazing books, friendly librarians and cozy, "
    "peaceful corners. Visiting one is always a joy, and everything is free for everyone."
)
DEMO_NEGATIVE = (
    "A public library can be a dreary, frustrating place. The books are old and damaged, the rooms are cold "
    "and gloomy, and the strict rules are annoying. Waiting in line for a broken computer is miserable."
)

TASK = Task(
    id="sentiment", kind="semantic", summary="VADER tone has the requested polarity by a margin",
    checker=check, validator=validate, render=lambda p: f"Write in a clearly {p['polarity']} tone.",
    sampler=sample, demo_text=lambda p: DEMO_POSITIVE if p["polarity"] == "positive" else DEMO_NEGATIVE,
    order=70,
)
