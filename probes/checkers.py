"""The nine constraints' checkers, as the probes (training labels) and older callers name them.

The checkers live with their tasks in `steerer.tasks` (one module per task); this module re-exports them
under their historical names. See each task module for what its checker does and how it matches IFEval.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from steerer.tasks import TASKS
from steerer.tasks.common import MAX_TERM_CHARS, MAX_TERMS, RELATIONS, count_words
from steerer.tasks.common import compare as _compare
from steerer.tasks.common import whole_word_pattern as _whole_word_pattern
from steerer.tasks.json_format import strip_json_fence
from steerer.tasks.lowercase import detect_language
from steerer.tasks.register import REGISTER_MARGIN, REGISTERS, register_score
from steerer.tasks.semantic import sentence_split
from steerer.tasks.sentiment import POLARITIES, sentiment_scores
from steerer.tasks.topic import MAX_TOPIC_CHARS, REFERENCE_TOPICS, topic_scores

Checker = Callable[[str, Mapping[str, Any]], bool]

CHECKERS: dict[str, Checker] = {task_id: task.checker for task_id, task in TASKS.items()}
VALIDATORS: dict[str, Callable[[Any], object]] = {task_id: task.validator for task_id, task in TASKS.items()}

char_count = CHECKERS["char_count"]
word_count = CHECKERS["word_count"]
json_format = CHECKERS["json_format"]
lowercase = CHECKERS["lowercase"]
term_exclusion = CHECKERS["term_exclusion"]
keyword_inclusion = CHECKERS["keyword_inclusion"]
sentiment = CHECKERS["sentiment"]
topic = CHECKERS["topic"]
register = CHECKERS["register"]

__all__ = [
    "CHECKERS", "MAX_TERMS", "MAX_TERM_CHARS", "MAX_TOPIC_CHARS", "POLARITIES", "REFERENCE_TOPICS", "REGISTERS",
    "REGISTER_MARGIN", "RELATIONS", "VALIDATORS", "_compare", "_whole_word_pattern", "char_count", "count_words",
    "detect_language", "json_format", "keyword_inclusion", "lowercase", "register", "register_score",
    "sentence_split", "sentiment", "sentiment_scores", "strip_json_fence", "term_exclusion", "topic",
    "topic_scores", "word_count",
]
