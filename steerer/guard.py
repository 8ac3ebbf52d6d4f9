"""Guard: keep out of the output what a prefix already decides.

For a constraint whose policy guards it (`SteeringPolicy.guard`: 'guard', 'guard+conditional:8'), a token
is checked after the sampler draws it and before anyone sees it: a COPY of the row's live detector (the
task's `Detector`, `steerer.tasks.base`) is fed the token's text delta (decoded on a copy of the row's
incremental detokenizer, exactly as the row would decode it). If the detector would fire, the token is
vetoed: it is excluded (its logit set to -inf) and the row draws again from the rest with the same sampler
(greedy: the next best; sampled: the same Gumbel noise, so a draw from the renormalised rest). Several
guarded constraints combine: a candidate must pass every one.

Rules, all here as small pure functions:

- Words are judged as if the candidate ended one: the delta is fed with a space after it and vetoed when the
  deciding character lies within the text so far plus the candidate. So "the" is vetoed at once (a detector
  only decides a word once the next character arrives), at the cost of split spellings ("the" + "ory").
- An EOS candidate is fed the held-back text with `final=True` and vetoed if anything fires (a forbidden
  word the text ends on). What only the end decides (JSON left unfinished, an at-least limit) is not guarded.
- At an at-most limit (a detector that counts up to a bound: word_count / char_count "at most" and "less
  than") a veto ends the response: the row takes EOS instead of drawing again, so a word-count limit ends at
  a word boundary (EOS when the next token would start a word past the limit).
- At most `MAX_VETOES` vetoes per token; past that the response ends (EOS): a row that cannot continue
  within its constraints stops rather than break them.
- Repair before redraw: a vetoing detector may propose the text to write instead (an optional
  `repair(delta) -> str | None`, `steerer.tasks.base.RepairingDetector`; lowercase: the delta lower-cased,
  " The" -> " the"). When that text is one token of the vocabulary (`repair_tokens`, looked up once per
  tokenizer) and that token passes every guarded detector, the row takes it instead of drawing again: the
  next-best token after a vetoed " The" is rarely fluent (the text tends to loop), its lower-cased self is.
  An at-most limit's veto still ends the response first; a sampled row takes the repair too (a
  substitution, not a draw). Otherwise the row draws again as above.

- End veto: a detector may also say whether the text could end NOW (an optional `end_ok(text) -> bool`,
  `steerer.tasks.base.EndCheckingDetector`; lowercase: IFEval's whole check, a cased letter and langdetect's
  "en"). While it says no, EOS is vetoed like any token and the row draws again, for at most `END_EXTRA`
  tokens after the first vetoed EOS; at `max_new_tokens` the response ends anyway (the checker then says so).
- Loop veto: a detector whose end-only part a loop breaks (lowercase: langdetect calls a repeated phrase
  Afrikaans or Welsh) may name an n-gram size (`loop_ngram`, 0 = none) and the occurrence to veto
  (`loop_occurrence`, default 2: the first repeat, as `no_repeat_ngram_size`; 3: the third occurrence, so a
  phrase may repeat once but not loop); a token that would make that occurrence of an n-gram of that many
  tokens in the response is vetoed too (only in guarded rows). lowercase takes both as request params.

A task whose violation the text already decided (the detector fired before the guard could act, e.g. a
prompt-forced first token) has no live detector and is no longer guarded.
"""

from __future__ import annotations

import copy
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from steerer.detokenize import IncrementalDetokenizer
from steerer.tasks.base import Detector
from steerer.tasks.common import UpperBoundDetector

__all__ = ["END_EXTRA", "LOOP_OCCURRENCE", "LoopCache", "MAX_VETOES", "end_vetoes", "ends_at_limit", "guarded_tasks",
           "loop_rules", "loop_vetoes", "peek", "repair_tokens", "repairs", "repeating", "single_token", "vetoes"]

MAX_VETOES = 64  # candidates vetoed for one token before the response ends instead
END_EXTRA = 32  # tokens past the first vetoed EOS during which an end veto (`end_ok`) may still hold
LOOP_OCCURRENCE = 2  # the loop veto's default: veto an n-gram's 2nd occurrence (its first repeat)
WORD_END = " "  # fed after a candidate's delta: judge a word the candidate may have completed


def guarded_tasks(spec: Any) -> tuple[str, ...]:
    """The tasks of a `Request` / `RowSpec` whose policy guards them."""
    return tuple(c.task for c in spec.constraints if spec.policy_for(c.task).guard)


def peek(detok: IncrementalDetokenizer, token: int | None) -> str:
    """The text `token` would add to the row (None: the row ends, the text held back is flushed), without
    touching the row's detokenizer."""
    trial = copy.copy(detok)
    trial.tokens = list(detok.tokens)
    return trial.flush() if token is None else trial.add(token)


def vetoes(detectors: Mapping[str, Detector], delta: str, length: int, end: bool) -> list[str]:
    """The guarded tasks whose detector would fire on a candidate: `delta` its text, `length` the characters
    the detectors have been fed so far, `end` the candidate is EOS. The live detectors are not touched."""
    out = []
    for task, detector in detectors.items():
        trial = copy.deepcopy(detector)
        if end:
            fired = trial.feed(delta, True) is not None
        else:
            position = trial.feed(delta + WORD_END, False)
            fired = position is not None and position <= length + len(delta)
        if fired:
            out.append(task)
    return out


def ends_at_limit(detectors: Mapping[str, Detector], tasks: Iterable[str]) -> bool:
    """A veto by one of these tasks ends the response: its detector counts towards an upper bound, which every
    continuation would pass too (it only grows)."""
    return any(isinstance(detectors.get(task), UpperBoundDetector) for task in tasks)


def repairs(detectors: Mapping[str, Detector], vetoed: Iterable[str], delta: str) -> list[str]:
    """The texts the vetoing tasks' detectors propose instead of `delta` (their optional `repair`), in veto
    order, distinct, none equal to `delta`."""
    out: list[str] = []
    for task in vetoed:
        repair = getattr(detectors.get(task), "repair", None)
        fixed = repair(delta) if callable(repair) and delta else None
        if fixed and fixed != delta and fixed not in out:
            out.append(fixed)
    return out


_SINGLE: weakref.WeakKeyDictionary[Any, dict[str, int | None]] = weakref.WeakKeyDictionary()


def single_token(tokenizer: Any, text: str) -> int | None:
    """The one vocabulary token that encodes `text` and decodes back to it, or None (cached per tokenizer)."""
    try:
        cache = _SINGLE.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        cache = {}
    if text not in cache:
        ids = tokenizer.encode(text, add_special_tokens=False)
        cache[text] = int(ids[0]) if len(ids) == 1 and tokenizer.decode(ids) == text else None
    return cache[text]


def repair_tokens(detectors: Mapping[str, Detector], vetoed: Iterable[str], delta: str,
                  tokenizer: Any) -> list[int]:
    """The tokens to try, in order, before drawing again for a candidate `delta` vetoed by `vetoed`: each
    repair text that is one token. The caller still checks each against every guarded detector (`vetoes`)."""
    tokens = (single_token(tokenizer, text) for text in repairs(detectors, vetoed, delta))
    return list(dict.fromkeys(t for t in tokens if t is not None))


def end_vetoes(detectors: Mapping[str, Detector], text: str) -> list[str]:
    """The guarded tasks whose detector says the response may not end on `text` (its optional `end_ok`)."""
    out = []
    for task, detector in detectors.items():
        end_ok = getattr(detector, "end_ok", None)
        if callable(end_ok) and not end_ok(text):
            out.append(task)
    return out


def repeating(tokens: Sequence[int], n: int, occurrence: int = LOOP_OCCURRENCE) -> frozenset[int]:
    """The tokens that, after `tokens`, would make the `occurrence`-th occurrence of an n-gram of `n` tokens
    (`tokens` already holds it `occurrence` - 1 times; 2: any repeat)."""
    if n < 1 or len(tokens) < n:
        return frozenset()
    head = list(tokens[len(tokens) - n + 1:]) if n > 1 else []
    counts = Counter(tokens[i + n - 1] for i in range(len(tokens) - n + 1) if list(tokens[i:i + n - 1]) == head)
    return frozenset(t for t, c in counts.items() if c >= occurrence - 1)


def loop_rules(detectors: Mapping[str, Detector]) -> dict[str, tuple[int, int]]:
    """task -> (n-gram size, occurrence vetoed) its detector asks the guard for (`loop_ngram`, optional
    `loop_occurrence`), for those that ask (a size of 0 or none: no loop veto)."""
    out = {}
    for task, detector in detectors.items():
        n = getattr(detector, "loop_ngram", None)
        occurrence = getattr(detector, "loop_occurrence", LOOP_OCCURRENCE)
        if isinstance(n, int) and n > 0:
            out[task] = (n, occurrence if isinstance(occurrence, int) and occurrence >= 2 else LOOP_OCCURRENCE)
    return out


LoopCache = dict[tuple[int, int], tuple[int, frozenset[int]]]  # (n, occurrence) -> (tokens seen, `repeating`)


def loop_vetoes(detectors: Mapping[str, Detector], tokens: Sequence[int], token: int, cache: LoopCache) -> list[str]:
    """The tasks whose loop rule (`loop_rules`) forbids `token` after the row's `tokens`. `cache` is the row's:
    one scan per rule and token position, however many candidates are checked there."""
    out = []
    for task, rule in loop_rules(detectors).items():
        seen, forbidden = cache.get(rule, (-1, frozenset()))
        if seen != len(tokens):
            forbidden = repeating(tokens, *rule)
            cache[rule] = (len(tokens), forbidden)
        if token in forbidden:
            out.append(task)
    return out
