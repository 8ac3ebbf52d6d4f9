"""Held-out prompts for the benchmarks: test-split base requests x task params over a spread of difficulty.

Shared by the benchmarks (`benchmarks/steering_efficacy.py`, `early_warning.py`, and the plain prompts of
`overhead_hf.py` and `grpc_load.py`) and the steering sweep (`probes.steering`), so all measure on the same
prompts; it lives in `probes/` so both import it as a module, without any `sys.path` edit. The base
requests come from the dataset's test split (`split_base_requests(SPLIT_SEED)[1]`), so no prompt text was
seen by the probes in training; there is no compliance aid (`aid=None`), as a real user would not add one.
`split="train"` builds the same kind of prompts from the training split's base requests instead (the
steering sweep of `steerer probes steer` chooses its strengths there, never on the benchmark's prompts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from probes.dataset import SPLIT_SEED
from probes.tasks import get_task
from probes.templates import get_base_request, prompt_messages, split_base_requests
from steerer.bank import ProbeBank

# Plain requests with no constraint, for the throughput benchmarks (overhead_hf, grpc_load).
GENERIC_PROMPTS = [
    "Describe how a bicycle works.", "Give me a recipe for pancakes.", "Explain photosynthesis simply.",
    "What should I pack for a beach trip?", "Write a short poem about autumn.", "How do vaccines work?",
    "Summarise the plot of Romeo and Juliet.", "What is a black hole?", "Tips for learning a new language?",
    "Explain how a credit card works.", "Why is the sky blue?", "Describe a typical day of a nurse.",
    "How do I start running?", "What is machine learning?", "Explain the rules of chess briefly.",
    "Write a thank-you note to a teacher.",
]


@dataclass(frozen=True)
class HeldOutPrompt:
    id: str
    task: str
    base_id: str
    params: dict
    difficulty: float
    messages: list[dict]


SPLITS = ("train", "test")


def held_out_prompts(task_id: str, n: int, seed: int = 0, split: str = "test") -> list[HeldOutPrompt]:
    """`n` prompts for one task from the base requests of `split` (the 36 test requests by default, or the
    108 training ones); difficulty spreads evenly over [0, 1). Base requests are drawn without repeats until
    the split's requests are used up, then reused with other params."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    task = get_task(task_id)
    # the test split keeps its original seed string, so the benchmarks' prompts are unchanged
    rng = random.Random(f"heldout:{seed}:{task_id}" if split == "test" else f"{split}:{seed}:{task_id}")
    base_ids = split_base_requests(SPLIT_SEED)[SPLITS.index(split)]
    order: list[str] = []
    while len(order) < n:
        order += rng.sample(base_ids, len(base_ids))
    prompts = []
    for i, base_id in enumerate(order[:n]):
        difficulty = (i + rng.random()) / n
        params = task.sample_params(rng, difficulty)
        messages = prompt_messages(task_id, get_base_request(base_id), params, aid=None)
        prompts.append(HeldOutPrompt(f"{task_id}:{i}:{base_id}", task_id, base_id, params, round(difficulty, 3),
                                     messages))
    return prompts


def load_bank(path: str | None) -> ProbeBank:
    """The bank at `path`, or the trained default bank."""
    return ProbeBank.load(path)
