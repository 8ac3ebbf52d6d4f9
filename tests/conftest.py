"""Shared fixtures: the real default model, loaded once per test session (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def lm():
    from steerer.model import load_model

    return load_model()


@pytest.fixture(scope="session")
def prompts(lm):
    from steerer.model import chat_prompt

    texts = ["Name three colors.", "Write one sentence about the moon.", "What is the capital of France?"]
    return [chat_prompt(lm.tokenizer, t) for t in texts]
