"""lowercase: IFEval ``change_case:english_lowercase``, with IFEval's own check.

IFEval (google-research ``instruction_following_eval/instructions.py``, ``LowercaseLettersEnglishChecker
.check_following``)::

    try:
        return value.islower() and langdetect.detect(value) == "en"
    except langdetect.LangDetectException:
        return True  # "Count as instruction is followed."

So: at least one cased letter and none upper/title case (``str.islower()``), **and** langdetect calls the
text English; a text langdetect cannot judge (no features, e.g. no letters it knows) counts as followed.
We do exactly that, with one difference: langdetect is a randomised guesser and IFEval leaves it unseeded,
so a verdict on a borderline text can change between runs; ours uses its own detector factory with seed 0
(as ``DetectorFactory.seed = 0`` would, without changing anyone else's), so a verdict is a fixed function of
the text. Profiles load once, on the first check (~0.3 s); a check then takes a few milliseconds.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
from langdetect.lang_detect_exception import LangDetectException

from steerer.tasks import common
from steerer.tasks.base import Task

LANGDETECT_SEED = 0
# The guard's loop veto (`steerer.guard`), request params `loop_ngram` / `loop_occurrence` (docs/GUARD.md rule 9).
LOOP_NGRAM = 3  # tokens (0: no loop veto); see `CapitalDetector.loop_ngram`
LOOP_OCCURRENCE = 2  # the occurrence vetoed: 2 = the first repeat, 3 = the third occurrence
LOOP_PARAMS = {"loop_ngram": (LOOP_NGRAM, 0, 16), "loop_occurrence": (LOOP_OCCURRENCE, 2, 8)}  # default, min, max
_FACTORY: DetectorFactory | None = None
_FACTORY_LOCK = threading.Lock()


def _factory() -> DetectorFactory:
    """The seeded detector factory, its profiles loaded once (checkers run on several threads)."""
    global _FACTORY
    with _FACTORY_LOCK:
        if _FACTORY is None:
            factory = DetectorFactory()
            factory.load_profile(PROFILES_DIRECTORY)
            factory.set_seed(LANGDETECT_SEED)
            _FACTORY = factory
        return _FACTORY


def detect_language(text: str) -> str | None:
    """langdetect's language code for `text` (seeded: deterministic), or None when it cannot judge."""
    detector = _factory().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None


def validate(params: Any) -> None:
    """No params but the guard's optional loop rule (`loop_rule`)."""
    loop_rule(params)


def loop_rule(params: Any) -> tuple[int, int]:
    """(n-gram size, occurrence vetoed) of the guard's loop veto under `params` (both optional; defaults
    `LOOP_NGRAM`, `LOOP_OCCURRENCE`): the one place that reads and validates them."""
    params = common.require_mapping("lowercase", params)
    extra = sorted(str(k) for k in params if k not in LOOP_PARAMS)
    if extra:
        raise ValueError(f"lowercase: unexpected param(s) {extra}; only the guard's optional {list(LOOP_PARAMS)}")
    values = []
    for key, (default, low, high) in LOOP_PARAMS.items():
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"lowercase: {key} must be an integer from {low} to {high}, got {value!r}")
        values.append(value)
    return values[0], values[1]


def check(response: str, params: Mapping[str, Any]) -> bool:
    """IFEval ``english_lowercase``: no uppercase letter (and at least one letter), and langdetect says English
    (or cannot say: IFEval counts that as followed)."""
    validate(params)
    return followed(common.require_text("lowercase", response))


def followed(text: str) -> bool:
    """IFEval's whole check on a text: a cased letter, none upper or title case, and langdetect's "en" (or none)."""
    return text.islower() and detect_language(text) in ("en", None)


class CapitalDetector:
    """Decided at the first uppercase or titlecase letter (then ``str.islower()`` is False whatever follows):
    O(delta) per token. No letter at all, or text that is not English, is only known at the end."""

    def __init__(self, loop_ngram: int = LOOP_NGRAM, loop_occurrence: int = LOOP_OCCURRENCE) -> None:
        self.length = 0
        # The guard's loop veto (`steerer.guard`): a repeated phrase is what makes langdetect call a lowercase
        # text Afrikaans or Welsh, so under guard no token may make the `loop_occurrence`-th occurrence of an
        # n-gram of `loop_ngram` tokens (0: no loop veto).
        self.loop_ngram = loop_ngram
        self.loop_occurrence = loop_occurrence

    def feed(self, delta: str, final: bool = False) -> int | None:
        for i, c in enumerate(delta):
            if c.isupper() or c.istitle():
                return self.length + i + 1
        self.length += len(delta)
        return None

    def end_ok(self, text: str) -> bool:
        """The guard's end veto: the response may end on `text` only if IFEval's whole check passes (a text with
        no cased letter, or one langdetect does not call English, fails what no prefix decides)."""
        return followed(text)

    def repair(self, delta: str) -> str | None:
        """The guard's fix for a vetoed token: the same text lower-cased (" The" -> " the")."""
        fixed = delta.lower()
        return fixed if fixed != delta else None


def detector(params: Mapping[str, Any]) -> CapitalDetector:
    return CapitalDetector(*loop_rule(params))


TASK = Task(
    id="lowercase", kind="structural", summary="no capital letters (IFEval english_lowercase)",
    checker=check, validator=validate,
    render=lambda p: "Write everything in lowercase letters; do not use any capital letters.",
    sampler=common.no_params,
    demo_text=lambda p: " ".join(common.DEMO_SENTENCES[:3]).lower(),
    detector=detector, order=40,
)
