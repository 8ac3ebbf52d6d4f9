"""topic: the named topic ranks first among reference topics (MiniLM embedding similarity). No IFEval
equivalent; validated against the hand-labelled set in ``tests/data/semantic_labels.jsonl``."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from steerer.tasks import common, semantic
from steerer.tasks.base import Params, Task

MAX_TOPIC_CHARS = 200
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
# Specific topics a user might name, beyond the broad reference topics (parameter sampling).
SPECIFIC_TOPICS: tuple[str, ...] = (
    "beekeeping", "volcanoes", "chess", "jazz music", "dinosaurs", "origami", "knitting", "ancient Egypt",
    "the Roman Empire", "coral reefs", "black holes", "coffee", "photography", "gardening", "robotics",
    "medieval castles", "the ocean", "mountain climbing", "birdwatching", "board games",
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

_topic_cache: dict[str, Any] = {}


def validate(params: Any) -> str:
    params = common.require_mapping("topic", params)
    common.check_keys("topic", params, ("topic",))
    topic = params["topic"]
    if not isinstance(topic, str) or not topic.strip():
        raise ValueError("topic: topic must be a non-empty string")
    if len(topic) > MAX_TOPIC_CHARS:
        raise ValueError(f"topic: topic must be at most {MAX_TOPIC_CHARS} characters")
    return topic.strip()


def _topic_vectors(topics: Sequence[str]) -> Any:
    import numpy as np

    # MiniLM's tokenizer is uncased, so the lower-cased name is a faithful key.
    key_missing = [t for t in topics if t.lower() not in _topic_cache]
    if key_missing:
        vecs = semantic.embed([TOPIC_TEMPLATE.format(topic=t) for t in key_missing])
        with semantic.embed_lock:
            if len(_topic_cache) > _TOPIC_CACHE_MAX:  # user-named topics are unbounded
                _topic_cache.clear()
            for t, v in zip(key_missing, vecs, strict=True):
                _topic_cache[t.lower()] = v
    return np.stack([_topic_cache[t.lower()] for t in topics])


def _chunks(text: str) -> list[str]:
    """~120-word chunks: MiniLM truncates at 256 tokens, a drift late on must count."""
    words = text.split()
    return [" ".join(words[i : i + TOPIC_CHUNK_WORDS]) for i in range(0, len(words), TOPIC_CHUNK_WORDS)] or [""]


def _response_vectors(texts: Sequence[str]) -> list[Any]:
    """Per text, the mean of its normalised chunk embeddings (renormalised): every chunk of every text in one
    encode, so N responses cost one call rather than N."""
    import numpy as np

    chunks = [_chunks(t) for t in texts]
    vecs = semantic.embed([c for cs in chunks for c in cs])
    out, at = [], 0
    for cs in chunks:
        mean = vecs[at : at + len(cs)].mean(axis=0)
        at += len(cs)
        out.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return out


def _response_vector(text: str) -> Any:
    return _response_vectors([text])[0]


def _scores(resp: Any, topic: str) -> tuple[float, float, str]:
    competitors = [t for t in REFERENCE_TOPICS if t.lower() != topic.lower()]
    vecs = _topic_vectors([topic, *competitors])
    named_vec, comp_vecs = vecs[0], vecs[1:]
    # Competitors that mean (nearly) the same as the named topic are not competition.
    keep = [i for i, v in enumerate(comp_vecs) if float(v @ named_vec) < TOPIC_SYNONYM_SIM]
    named_sim = float(resp @ named_vec)
    if not keep:
        return named_sim, -1.0, ""
    sims = comp_vecs[keep] @ resp
    best = int(sims.argmax())
    return named_sim, float(sims[best]), competitors[keep[best]]


def topic_scores(response: str, topic: str) -> tuple[float, float, str]:
    """(similarity to the named topic, best competing similarity, best competitor's name)."""
    return _scores(_response_vector(semantic.strip_preamble(response)), topic)


def check(response: str, params: Mapping[str, Any]) -> bool:
    """The named topic ranks first: the response is closer to it than to every other reference topic.

    Similarity is cosine between MiniLM embeddings of the response (mean over ~120-word chunks, preamble
    dropped) and of "This text is about {topic}."; the named topic may be any string, built-in or not.
    Competitors are ``REFERENCE_TOPICS`` minus the named one and minus its near-synonyms (cosine >=
    ``TOPIC_SYNONYM_SIM`` between the topic sentences). Satisfied iff
    ``sim(named) >= max(sim(competitor)) - TOPIC_MARGIN``. An empty response satisfies no topic.
    """
    return check_many([response], [params])[0]


def check_many(responses: Sequence[str], params: Sequence[Mapping[str, Any]]) -> list[bool]:
    """`check` for several responses, their embeddings in one batched encode (the end-of-response checks of
    every row a pass finished; one MiniLM call costs about as much as a few texts in one)."""
    names = [validate(p) for p in params]
    texts = [common.require_text("topic", r) for r in responses]
    todo = [i for i, t in enumerate(texts) if t.strip()]  # an empty response satisfies no topic
    stripped = [semantic.strip_preamble(texts[i]) for i in todo]
    vectors = dict(zip(todo, _response_vectors(stripped) if todo else [], strict=True))
    out = [False] * len(texts)
    for i in todo:
        named_sim, best_other, _ = _scores(vectors[i], names[i])
        out[i] = named_sim >= best_other - TOPIC_MARGIN
    return out


def sample(rng: random.Random, d: float) -> Params:
    # A broad topic leaves room to connect it to any request; a narrow one forces a change of subject.
    pool = SPECIFIC_TOPICS if rng.random() < d else REFERENCE_TOPICS
    return {"topic": rng.choice(pool)}


def demo(params: Mapping[str, Any]) -> str:
    name = params["topic"].strip()
    return (
        f"I will talk only about {name}. {name[0].upper() + name[1:]} is a subject with a long history and "
        f"many fascinating details. People who study {name} learn its main ideas, its key terms and its "
        f"practical uses, and there is always more to discover about {name}."
    )


TASK = Task(
    id="topic", kind="semantic", summary="MiniLM: the named topic ranks first among reference topics",
    checker=check, validator=validate, render=lambda p: f"Talk only about {p['topic'].strip()}.",
    sampler=sample, demo_text=demo, batch_checker=check_many, order=80,
)
