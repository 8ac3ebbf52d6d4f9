"""Prompts for the probe training set: base requests x task instructions, with optional compliance aids.

A prompt is a short open-ended *base request* ("Describe how a bicycle works.") plus one task's
instruction. Splits are by base request, so no prompt text is shared between train and test. The base
requests are written for this project; IFEval's prompts (``../shared/ifeval``) are evaluation data only
and never appear here.

A small model rarely complies with some constraints (SmolLM2-135M: 0/8 "all lowercase", 1/8 JSON), which
would leave a probe with one label. A *compliance aid* raises the compliance rate for a share of prompts
so both labels occur: restating the constraint in a system prompt, repeating it around the request, or a
one-shot demonstration of a compliant answer to a different request.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steerer.tasks import get_task
from steerer.tasks.common import DEMO_REQUEST


@dataclass(frozen=True)
class BaseRequest:
    """An open-ended request; ``id`` is stable (domain-number), so splits and datasets can refer to it."""

    id: str
    domain: str
    text: str


_DOMAINS: dict[str, tuple[str, ...]] = {
    "cooking": (
        "Describe how to make a simple vegetable soup.",
        "Explain why bread dough needs to rise.",
        "Give some tips for cooking rice on the stove.",
        "Describe what a typical Italian breakfast looks like.",
        "Explain the difference between baking and roasting.",
        "Describe how to season a cast-iron pan.",
        "Suggest a quick dinner that uses eggs and spinach.",
        "Explain how to tell when pasta is cooked.",
        "Describe how pancakes are made.",
    ),
    "science": (
        "Explain why the sky looks blue.",
        "Describe how a rainbow forms.",
        "Explain what an atom is made of.",
        "Describe how magnets work.",
        "Explain why ice floats on water.",
        "Describe what happens during a chemical reaction.",
        "Explain how sound travels through the air.",
        "Describe the water cycle.",
        "Explain what gravity does.",
    ),
    "travel": (
        "Describe what to pack for a weekend camping trip.",
        "Give advice for someone taking their first long flight.",
        "Describe a good way to spend a day in a new city.",
        "Explain how to avoid jet lag.",
        "Describe what makes a road trip enjoyable.",
        "Give tips for traveling on a small budget.",
        "Describe how to plan a train journey across several countries.",
        "Explain what to do if you lose your passport abroad.",
        "Describe the experience of staying in a hostel.",
    ),
    "history": (
        "Describe how people lived in a medieval village.",
        "Explain why the printing press was important.",
        "Describe how the ancient Olympic Games worked.",
        "Explain what the Industrial Revolution changed.",
        "Describe what daily life was like for sailors on old sailing ships.",
        "Explain how the Silk Road connected different regions.",
        "Describe how the first cities appeared.",
        "Explain why castles were built on hills.",
        "Describe how people kept time before clocks existed.",
    ),
    "technology": (
        "Explain how a search engine finds web pages.",
        "Describe how a touchscreen works.",
        "Explain what a computer's memory is used for.",
        "Describe how email gets from one person to another.",
        "Explain what a password manager does.",
        "Describe how a GPS receiver knows where it is.",
        "Explain what happens when you restart a computer.",
        "Describe how a 3D printer builds an object.",
        "Explain what cloud storage is.",
    ),
    "health": (
        "Explain why sleep is important.",
        "Describe a simple morning stretching routine.",
        "Explain how vaccines help the body.",
        "Give tips for drinking enough water during the day.",
        "Describe how to take care of a small cut.",
        "Explain why people get headaches.",
        "Describe what a balanced lunch might include.",
        "Explain how stress affects the body.",
        "Give advice for protecting your eyes when using screens.",
    ),
    "sports": (
        "Explain the basic rules of tennis.",
        "Describe how to prepare for a first 5-kilometer run.",
        "Explain why warming up before exercise matters.",
        "Describe what makes a good team captain.",
        "Explain how scoring works in volleyball.",
        "Describe how to learn to swim as an adult.",
        "Explain what a referee does during a match.",
        "Describe the equipment needed for rock climbing.",
        "Explain how cyclists ride in a group to save energy.",
    ),
    "finance": (
        "Explain what a savings account is.",
        "Describe how to make a monthly budget.",
        "Explain what interest on a loan means.",
        "Describe the difference between a debit card and a credit card.",
        "Explain why people invest money.",
        "Describe how to save for a big purchase.",
        "Explain what inflation does to prices.",
        "Describe what a receipt is useful for.",
        "Explain how a small shop makes a profit.",
    ),
    "art": (
        "Describe how to start drawing a portrait.",
        "Explain what makes a painting look three-dimensional.",
        "Describe the materials needed for watercolor painting.",
        "Explain what a sculptor does.",
        "Describe how pottery is shaped on a wheel.",
        "Explain why museums keep old paintings in dim light.",
        "Describe how to take a good photograph of a landscape.",
        "Explain what street art is.",
        "Describe how colors can change the mood of a picture.",
    ),
    "music": (
        "Describe how a piano makes sound.",
        "Explain what rhythm is in music.",
        "Describe how to start learning the guitar.",
        "Explain what an orchestra conductor does.",
        "Describe how a song is recorded in a studio.",
        "Explain why some songs get stuck in your head.",
        "Describe the sound of a violin.",
        "Explain what a music festival is like.",
        "Describe how a choir practices together.",
    ),
    "nature": (
        "Describe how bees make honey.",
        "Explain why leaves change color in autumn.",
        "Describe what lives in a pond.",
        "Explain how birds find their way when they migrate.",
        "Describe a walk through a forest in the morning.",
        "Explain how trees grow taller each year.",
        "Describe how a caterpillar becomes a butterfly.",
        "Explain why some animals sleep through the winter.",
        "Describe what happens in a desert at night.",
    ),
    "education": (
        "Give tips for studying for an exam.",
        "Describe what a good teacher does.",
        "Explain how to take useful notes in a lecture.",
        "Describe how to learn a new language at home.",
        "Explain why reading to children matters.",
        "Describe a typical day at a primary school.",
        "Explain how to write a clear essay introduction.",
        "Describe how group projects can be organized.",
        "Explain what a library card lets you do.",
    ),
    "work": (
        "Describe how to prepare for a job interview.",
        "Explain how to write a short professional email.",
        "Describe how to run a productive meeting.",
        "Give tips for working from home.",
        "Explain what a resume should contain.",
        "Describe how to ask for feedback at work.",
        "Explain how to manage a busy week.",
        "Describe what a first day at a new job is like.",
        "Explain how teams can share tasks fairly.",
    ),
    "home": (
        "Describe how to keep houseplants healthy.",
        "Explain how to fix a dripping tap.",
        "Describe how to organize a small closet.",
        "Give tips for saving energy at home.",
        "Describe how to paint a room.",
        "Explain how a refrigerator keeps food cold.",
        "Describe how to clean a kitchen quickly.",
        "Explain how to hang a picture straight.",
        "Describe how to start a compost bin.",
    ),
    "transport": (
        "Describe how a bicycle works.",
        "Explain how an electric car is charged.",
        "Describe how a city bus network is planned.",
        "Explain how airplanes stay in the air.",
        "Describe how to ride a scooter safely.",
        "Explain how traffic lights are timed.",
        "Describe what a harbor does.",
        "Explain how a subway train knows when to stop.",
        "Describe how hot air balloons fly.",
    ),
    "everyday": (
        "Describe how to make a good first impression.",
        "Explain how to plan a birthday party.",
        "Describe a relaxing way to spend a rainy afternoon.",
        "Give tips for making new friends in a new town.",
        "Explain how to choose a good book to read.",
        "Describe how to wrap a present neatly.",
        "Explain how to apologize sincerely.",
        "Describe what makes a neighborhood friendly.",
        "Give advice for keeping a daily journal.",
    ),
}

def base_requests(domains: Mapping[str, tuple[str, ...]]) -> tuple[BaseRequest, ...]:
    """Requests with stable ids (domain-number) from texts grouped by domain."""
    return tuple(BaseRequest(f"{domain}-{i:02d}", domain, text)
                 for domain, texts in domains.items() for i, text in enumerate(texts, start=1))


BASE_REQUESTS: tuple[BaseRequest, ...] = base_requests(_DOMAINS)
_BY_ID: dict[str, BaseRequest] = {b.id: b for b in BASE_REQUESTS}


def get_base_request(request_id: str) -> BaseRequest:
    try:
        return _BY_ID[request_id]
    except KeyError:
        raise KeyError(f"unknown base request id {request_id!r}") from None


def _request_text(base_request: str | BaseRequest) -> str:
    """A ``BaseRequest``, a known base-request id, or literal request text."""
    if isinstance(base_request, BaseRequest):
        return base_request.text
    if base_request in _BY_ID:
        return _BY_ID[base_request].text
    text = base_request.strip()
    if not text:
        raise ValueError("base request must not be empty")
    return text


def split_base_requests(seed: int, test_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """(train ids, test ids) of the base requests: `split_requests` over `BASE_REQUESTS`."""
    return split_requests(BASE_REQUESTS, seed, test_fraction)


def split_requests(requests: Sequence[BaseRequest], seed: int,
                   test_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """(train ids, test ids): a seeded split by request, stratified by domain.

    Every domain lands in both splits, and since each prompt is one base request plus an instruction, no
    request text is shared between them.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    # Rank ids round-robin over domains (each domain shuffled, domain order shuffled per round), then
    # take the first share as test: every domain gets floor or ceil of its share.
    per_domain = []
    for domain in dict.fromkeys(r.domain for r in requests):
        ids = sorted(r.id for r in requests if r.domain == domain)
        rng.shuffle(ids)
        per_domain.append(ids)
    ranked: list[str] = []
    for rank in range(max(len(ids) for ids in per_domain)):
        layer = [ids[rank] for ids in per_domain if rank < len(ids)]
        rng.shuffle(layer)
        ranked.extend(layer)
    n_test = max(1, round(len(ranked) * test_fraction))
    test, train = ranked[:n_test], ranked[n_test:]
    return sorted(train), sorted(test)


# --------------------------------------------------------------------------------------------------
# compliance aids
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aid:
    """A way to raise a weak model's compliance for some prompts (``None`` = no aid)."""

    name: str
    description: str


AIDS: dict[str, Aid] = {
    "system": Aid("system", "a system prompt that restates the constraint as a hard rule"),
    "repeat": Aid("repeat", "the constraint stated before the request and repeated after it"),
    "oneshot": Aid("oneshot", "a demonstration turn: another request answered in compliance"),
}

SYSTEM_TEMPLATE = (
    "You are a helpful assistant that always follows the user's formatting and style rules exactly. "
    "Rule for this answer: {instruction}"
)
# DEMO_REQUEST (the one-shot aid's request) comes with the tasks, whose demonstrations answer it.


def _check_aid(aid: str | None) -> None:
    if aid is not None and aid not in AIDS:
        raise ValueError(f"unknown aid {aid!r}; expected None or one of {list(AIDS)}")


def build_prompt(task_id: str, base_request: str | BaseRequest, params: Mapping[str, Any],
                 aid: str | None = None) -> str:
    """The user message: base request followed by the task's instruction (and, for ``repeat``, the
    instruction also before the request)."""
    _check_aid(aid)
    instruction = get_task(task_id).instruction(params)
    request = _request_text(base_request)
    if aid == "repeat":
        return f"Important rule: {instruction}\n\n{request} {instruction}\n\nRemember: {instruction}"
    return f"{request} {instruction}"


def prompt_messages(task_id: str, base_request: str | BaseRequest, params: Mapping[str, Any],
                    aid: str | None = None) -> list[dict[str, str]]:
    """Chat messages for the prompt: an optional system message and demonstration turn, then the user."""
    _check_aid(aid)
    user = {"role": "user", "content": build_prompt(task_id, base_request, params, aid)}
    if aid == "system":
        instruction = get_task(task_id).instruction(params)
        return [{"role": "system", "content": SYSTEM_TEMPLATE.format(instruction=instruction)}, user]
    if aid == "oneshot":
        return [
            {"role": "user", "content": build_prompt(task_id, DEMO_REQUEST, params)},
            {"role": "assistant", "content": demo_response(task_id, params)},
            user,
        ]
    return [user]


# --------------------------------------------------------------------------------------------------
# one-shot demonstrations (answers to DEMO_REQUEST that satisfy the constraint): `Task.demo`
# --------------------------------------------------------------------------------------------------


def demo_response(task_id: str, params: Mapping[str, Any]) -> str:
    """A compliant answer to ``DEMO_REQUEST`` for the one-shot aid (checked before it is returned)."""
    return get_task(task_id).demo(params)
