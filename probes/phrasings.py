"""Many wordings of each task's instruction, grouped into phrasing families, for the probe corpus.

A probe trained on one fixed sentence per task ("Answer in at most 25 words.") learns that sentence; on a
prompt phrased any other way it is at chance. So the corpus states every instruction in several
*families* (where the instruction sits and how it is worded: after or before the request, in a system
message, terse, polite, inside a list of requirements, with other names for the same limit, with a
reason, negated, as a question), each with several wording variants. Two families per task are held
out (``HELDOUT``): never trained on, they measure whether a probe generalises to unseen phrasing.

Every variant states exactly the task's parameters (relation, limit, terms, polarity, topic, register),
so the checker's verdict on a response is the right label for the prompt; ``tests/test_corpus.py``
checks that for every family and variant.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from probes.tasks import TASKS
from steerer.tasks.registry import builtin_ids

Params = Mapping[str, Any]
Sentence = Callable[[Params], str]
PLACEMENTS = ("after", "before", "system", "list")


@dataclass(frozen=True)
class Family:
    """A way of stating an instruction: where it goes (``placement``) and its wording variants."""

    name: str
    placement: str
    sentences: tuple[Sentence, ...]


@dataclass(frozen=True)
class Phrased:
    """A rendered prompt: the system message (if any), the user message and the instruction as stated."""

    system: str | None
    user: str
    instruction: str


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------


def _fmt(template: str) -> Sentence:
    """A sentence from a str.format template over the task's slots."""
    return lambda p: template.format(**_slots(p))


def _by(key: str, **templates: str) -> Sentence:
    """A sentence whose template depends on one parameter (the relation, the polarity, the register)."""
    table = {k.replace("_", " "): v for k, v in templates.items()}
    return lambda p: table[p[key]].format(**_slots(p))


def _quoted(terms: Sequence[str], conj: str, quote: str = "'", oxford: bool = False) -> str:
    quoted = [f"{quote}{t}{quote}" for t in terms]
    if len(quoted) == 1:
        return quoted[0]
    comma = "," if oxford and len(quoted) > 2 else ""
    return ", ".join(quoted[:-1]) + f"{comma} {conj} " + quoted[-1]


def _slots(p: Params) -> dict[str, str]:
    """Every name a template may use, derived from the parameters (unused ones are harmless)."""
    slots: dict[str, str] = {}
    if "limit" in p:
        slots["n"] = str(p["limit"])
    if "terms" in p:
        terms = list(p["terms"])
        many = len(terms) > 1
        slots |= {
            "noun": "words" if many else "word", "it": "them" if many else "it", "is": "are" if many else "is",
            "appear": "appear" if many else "appears", "each": "all of them" if many else "it",
            "or1": _quoted(terms, "or"), "or2": _quoted(terms, "or", '"', oxford=True),
            "and1": _quoted(terms, "and"), "and2": _quoted(terms, "and", '"', oxford=True),
            "list": ", ".join(terms),
        }
    if "polarity" in p:
        slots["pol"] = p["polarity"]
    if "topic" in p:
        slots["topic"] = str(p["topic"]).strip()
    if "register" in p:
        slots["reg"] = p["register"]
    return slots


# --------------------------------------------------------------------------------------------------
# length: char_count and word_count share templates, with {unit} filled per task
# --------------------------------------------------------------------------------------------------

_PLAIN_REL = {"less than": "fewer than", "at most": "at most", "at least": "at least"}


def _length_families(unit: str, short: str, exact_units: tuple[str, str, str]) -> list[Family]:
    """``unit`` e.g. "words"; ``short`` the terse form ("words", "chars"); ``exact_units`` three ways of
    naming the unit precisely ("characters including spaces")."""

    def plain(template: str) -> Sentence:
        return lambda p: template.format(rel=_PLAIN_REL[p["relation"]], n=p["limit"], unit=unit)

    def rel(**templates: str) -> Sentence:
        table = {k.replace("_", " "): v for k, v in templates.items()}
        return lambda p: table[p["relation"]].format(n=p["limit"], unit=unit, short=short,
                                                    u0=exact_units[0], u1=exact_units[1], u2=exact_units[2])

    return [
        Family("after", "after", (
            plain("Answer in {rel} {n} {unit}."),
            plain("Make your response {rel} {n} {unit} long."),
            plain("Spend {rel} {n} {unit} on the answer."),
            plain("Write your reply in {rel} {n} {unit}."),
        )),
        Family("before", "before", (
            plain("Answer the following in {rel} {n} {unit}."),
            plain("Length requirement: {rel} {n} {unit}."),
            plain("Read the request that follows and reply using {rel} {n} {unit}."),
        )),
        Family("system", "system", (
            plain("Every answer you give must be {rel} {n} {unit} long."),
            plain("You are an assistant whose replies always contain {rel} {n} {unit}."),
            plain("Length rule for all replies: {rel} {n} {unit}."),
        )),
        Family("terse", "after", (
            rel(less_than="Under {n} {short}.", at_most="Max {n} {short}.", at_least="Min {n} {short}."),
            rel(less_than="Fewer than {n} {short}.", at_most="{n} {short} max.", at_least="{n}+ {short}."),
            rel(less_than="Below {n} {short}.", at_most="{n} {short} or fewer.", at_least="{n} {short} minimum."),
        )),
        Family("polite", "after", (
            rel(less_than="Could you please keep your answer shorter than {n} {unit}?",
                at_most="Could you please keep your answer to {n} {unit} at most?",
                at_least="Could you please make your answer at least {n} {unit} long?"),
            plain("I'd really appreciate it if you answered in {rel} {n} {unit}. Thank you!"),
            plain("Would you mind using {rel} {n} {unit}? Thanks a lot."),
        )),
        Family("list", "list", (
            plain("Use {rel} {n} {unit}"),
            plain("Length: {rel} {n} {unit}"),
            plain("Write {rel} {n} {unit} in total"),
        )),
        Family("synonym", "after", (
            rel(less_than="Keep it below {n} {u0}.", at_most="Use no more than {n} {u0}.",
                at_least="Use a minimum of {n} {u0}."),
            rel(less_than="The response must stay under {n} {u1}.",
                at_most="Your answer has a limit of {n} {u1}; do not exceed it.",
                at_least="Write no fewer than {n} {u1}."),
            rel(less_than="Write less than {n} {u2}.", at_most="A maximum of {n} {u2} is allowed.",
                at_least="The response needs a minimum length of {n} {u2}."),
        )),
        Family("scenario", "after", (
            rel(less_than="This goes on a sticky note, so the answer has to be shorter than {n} {unit}.",
                at_most="I'm pasting this into a form that accepts at most {n} {unit}, so keep within that.",
                at_least="This is for an assignment that requires at least {n} {unit}."),
            rel(less_than="It's for a small display that only fits fewer than {n} {unit}.",
                at_most="My slide has room for no more than {n} {unit}.",
                at_least="The editor needs a piece of at least {n} {unit} to fill the page."),
            rel(less_than="It has to fit on a label with room for less than {n} {unit}.",
                at_most="It's going on a sign with space for {n} {unit} at most.",
                at_least="My teacher asked for a minimum of {n} {unit}."),
        )),
        Family("negated", "after", (
            rel(less_than="Do not let your answer reach {n} {unit}.", at_most="Don't exceed {n} {unit}.",
                at_least="Don't write fewer than {n} {unit}."),
            rel(less_than="Don't write {n} {unit} or more.", at_most="Do not go over {n} {unit}.",
                at_least="Do not go below {n} {unit}."),
            rel(less_than="Never use as many as {n} {unit}.", at_most="Never write more than {n} {unit}.",
                at_least="Never give an answer shorter than {n} {unit}."),
        )),
    ]


# --------------------------------------------------------------------------------------------------
# the other tasks
# --------------------------------------------------------------------------------------------------


def _fixed(*sentences: str) -> tuple[Sentence, ...]:
    return tuple(_fmt(s) for s in sentences)


_JSON = [
    Family("after", "after", _fixed(
        "Reply only with valid JSON.", "Format your entire answer as JSON.",
        "Give your answer as valid JSON and nothing else.")),
    Family("before", "before", _fixed(
        "Answer the following in valid JSON only.", "Output format: JSON.",
        "Your whole reply must be valid JSON.")),
    Family("system", "system", _fixed(
        "You are an API that responds only with valid JSON.", "Always answer with valid JSON and no other text.",
        "Output must be machine-readable JSON. Never add prose outside the JSON.")),
    Family("terse", "after", _fixed("JSON only.", "Output: valid JSON.", "json, nothing else.", "Respond in JSON.")),
    Family("polite", "after", _fixed(
        "Could you please format your whole answer as valid JSON?", "Would you kindly reply only in JSON? Thanks!",
        "I'd appreciate it if the answer were valid JSON with no extra text.")),
    Family("list", "list", _fixed(
        "Reply only with valid JSON", "Format the whole answer as JSON", "Output nothing but JSON")),
    Family("synonym", "after", _fixed(
        "The output must parse as JSON.", "Return a JSON object only.",
        "Make the response a well-formed JSON document with no extra text.",
        "Respond with JSON-formatted data and nothing else.")),
    Family("scenario", "after", _fixed(
        "My parser only accepts JSON, so reply with valid JSON and nothing else.",
        "Your reply goes straight into json.loads() in my script, so it has to be valid JSON with no extra text.",
        "This feeds an app that reads JSON; anything that isn't valid JSON will crash it.")),
    Family("negated", "after", _fixed(
        "Do not write anything outside of valid JSON.", "Don't reply with prose; reply with valid JSON only.",
        "No plain text, no explanations: only valid JSON.")),
]

_LOWERCASE = [
    Family("after", "after", _fixed(
        "Write everything in lowercase letters; do not use any capital letters.",
        "Keep your whole reply in lowercase.", "Use only lowercase letters in your answer.")),
    Family("before", "before", _fixed(
        "Reply to the following in lowercase letters only.", "Formatting rule: your whole answer must be lowercase.",
        "Write the entire response in lowercase, with no capital letters.")),
    Family("system", "system", _fixed(
        "You are an assistant that writes only in lowercase letters and never uses capitals.",
        "Every reply must be entirely in lowercase.", "Output rule: no uppercase letters anywhere in the response.")),
    Family("terse", "after", _fixed("lowercase only.", "All lowercase.", "no caps.", "Lowercase, no capitals.")),
    Family("polite", "after", _fixed(
        "Could you please write your whole answer in lowercase?", "Would you mind not using any capital letters? "
        "Thanks!", "I'd appreciate it if everything were in lowercase letters.")),
    Family("list", "list", _fixed(
        "Write in lowercase letters only", "Use no capital letters", "Keep every letter lowercase")),
    Family("synonym", "after", _fixed(
        "Write in all small letters.", "No capitals at all, not even at the start of sentences.",
        "Do not use any uppercase letters.", "Keep every letter in lower case.")),
    Family("scenario", "after", _fixed(
        "This is for a minimalist poster that uses lowercase text only, so don't capitalize anything.",
        "my shift key is broken and i want your reply to match mine: all lowercase, please.",
        "The font on my sign only has lowercase letters, so write the whole answer in lowercase.")),
    Family("negated", "after", _fixed(
        "Don't capitalize anything, not even names or the word 'i'.", "Never use capital letters.",
        "Do not write a single uppercase letter.")),
]

_EXCLUSION = [
    Family("after", "after", _fixed(
        "Do not use the {noun} {or1}.", "Avoid the {noun} {or2} in your answer.",
        "Your answer must not contain the {noun} {or1}.")),
    Family("before", "before", _fixed(
        "Answer the following without using the {noun} {or1}.", "Rule: the {noun} {or2} must not be used.",
        "Note that the {noun} {or1} must not appear in your reply.")),
    Family("system", "system", _fixed(
        "Never use the {noun} {or1} in your replies.", "You are an assistant whose answers never contain the "
        "{noun} {or2}.", "Forbidden vocabulary for this conversation: {list}. Do not use {it}.")),
    Family("terse", "after", _fixed("No {or1}.", "Banned: {list}.", "Avoid: {list}.", "Forbidden {noun}: {list}.")),
    Family("polite", "after", _fixed(
        "Could you please avoid using the {noun} {or1}?", "If you don't mind, please leave out the {noun} {or2}. "
        "Thanks!", "I'd be grateful if you didn't use the {noun} {or1}.")),
    Family("list", "list", _fixed(
        "Never use the {noun} {or1}", "Avoid the {noun} {or2}", "The {noun} {or1} must not appear")),
    Family("synonym", "after", _fixed(
        "Never say {or1}.", "The {noun} {or2} {is} banned.", "Steer clear of the {noun} {or1}.",
        "Leave out the {noun} {or1} entirely.")),
    Family("scenario", "after", _fixed(
        "This is for a word game where saying {or1} loses the round, so don't use {it}.",
        "Our style guide bans the {noun} {or2}, so keep {it} out of the answer.",
        "My little brother gets upset by the {noun} {or1}, so please avoid {it}.")),
    Family("question", "after", _fixed(
        "Can you answer without using the {noun} {or1}?", "Could you reply without ever saying {or2}?",
        "Is it possible to answer this without the {noun} {or1}? Please do.")),
]

_INCLUSION = [
    Family("after", "after", _fixed(
        "Mention the {noun} {and1}.", "Include the {noun} {and2} in your answer.",
        "Use the {noun} {and1} somewhere in your reply.")),
    Family("before", "before", _fixed(
        "Answer the following and mention the {noun} {and1}.", "Rule: include the {noun} {and2}.",
        "When you answer the following, mention the {noun} {and1}.")),
    Family("system", "system", _fixed(
        "Every reply you write must include the {noun} {and1}.",
        "You are an assistant that always works the {noun} {and2} into its answers.",
        "Required vocabulary for this conversation: {list}. Use {each} in every reply.")),
    Family("terse", "after", _fixed(
        "Must include: {list}.", "Required {noun}: {list}.", "Include {and1}.", "Keywords (all required): {list}.")),
    Family("polite", "after", _fixed(
        "Could you please mention the {noun} {and1}?", "Would you mind including the {noun} {and2} in your reply? "
        "Thanks!", "I'd appreciate it if you used the {noun} {and1} somewhere.")),
    Family("list", "list", _fixed(
        "Mention the {noun} {and1}", "Include the {noun} {and2}", "Use the {noun} {and1} at least once")),
    Family("synonym", "after", _fixed(
        "Make sure your answer includes the {noun} {and1}.", "Work in the {noun} {and2}.", "Your answer has to contain {and1}.",
        "Be sure the {noun} {and1} {appear} in the text.")),
    Family("scenario", "after", _fixed(
        "I'm playing a word game with friends where your answer has to contain {and1}, so please use {it}.",
        "For a search-engine keyword test, the text needs the {noun} {and2}.",
        "My teacher checks that the {noun} {and1} {appear} in the answer, so include {it}.")),
    Family("question", "after", _fixed(
        "Can you answer and mention the {noun} {and1} along the way?",
        "Could you work the {noun} {and2} into your answer?")),
]


def _pol(positive: str, negative: str) -> Sentence:
    return _by("polarity", positive=positive, negative=negative)


_SENTIMENT = [
    Family("after", "after", _fixed(
        "Write in a clearly {pol} tone.", "Make the tone of your answer {pol}.", "Your answer should sound clearly {pol}.")),
    Family("before", "before", _fixed(
        "Answer the following in a clearly {pol} tone.", "Tone requirement: {pol}.",
        "Keep a {pol} tone throughout your answer to this.")),
    Family("system", "system", (
        _pol("You are a relentlessly cheerful assistant: every reply you write is upbeat and positive.",
             "You are a grumpy, pessimistic assistant: every reply you write sounds negative and gloomy."),
        _fmt("Always answer in a clearly {pol} tone."),
        _fmt("Style rule: the tone of every answer is {pol}."),
    )),
    Family("terse", "after", (
        _fmt("Tone: {pol}."), _pol("Positive tone only.", "Negative tone only."),
        _pol("Keep it upbeat.", "Keep it gloomy."), _fmt("Be {pol}."))),
    Family("polite", "after", (
        _fmt("Could you please write your answer in a {pol} tone?"),
        _pol("Would you mind making the answer sound upbeat? Thank you!",
             "Would you mind making the answer sound gloomy? Thank you!"),
        _fmt("I'd appreciate a clearly {pol} tone in your reply."))),
    Family("list", "list", (
        _fmt("Use a clearly {pol} tone"), _pol("Sound optimistic", "Sound pessimistic"),
        _fmt("Keep the tone {pol}"))),
    Family("synonym", "after", (
        _pol("Sound upbeat and cheerful.", "Sound gloomy and downbeat."),
        _pol("Be optimistic and enthusiastic throughout.", "Be pessimistic and critical throughout."),
        _pol("Give the answer a sunny, happy feel.", "Give the answer a bleak, dismal feel."))),
    Family("scenario", "after", (
        _pol("This is for a motivational poster, so make it sound enthusiastic and positive.",
             "This is for a grumpy complaint column, so make it sound negative and fed up."),
        _pol("I need cheering up today, so please keep the answer upbeat and positive.",
             "I'm writing a gloomy monologue for a play, so make the answer sound negative and bleak."),
        _pol("It's going on a birthday card, so keep the tone warm and positive.",
             "It's for a scene where a disappointed critic speaks, so the tone should be negative and sour."))),
    Family("question", "after", (
        _fmt("Can you answer in a clearly {pol} tone?"),
        _pol("Could you make the answer sound optimistic?", "Could you make the answer sound pessimistic?"))),
]

_TOPIC = [
    Family("after", "after", _fixed(
        "Talk only about {topic}.", "Make your answer entirely about {topic}.",
        "Your whole answer should be about {topic}.")),
    Family("before", "before", _fixed(
        "Answer the following, but talk only about {topic}.", "Subject rule: your reply must be about {topic} only.",
        "Whatever the request below says, answer only about {topic}.")),
    Family("system", "system", _fixed(
        "You are an assistant that only ever talks about {topic}.",
        "Every reply you give must be entirely about {topic}.",
        "Stay on the subject of {topic} in all of your answers.")),
    Family("terse", "after", _fixed("Topic: {topic} only.", "Only {topic}.", "Subject: {topic}, nothing else.")),
    Family("polite", "after", _fixed(
        "Could you please talk only about {topic}?", "Would you mind keeping the whole answer about {topic}? Thanks!",
        "I'd appreciate it if your reply stayed entirely on {topic}.")),
    Family("list", "list", _fixed(
        "Talk only about {topic}", "Keep the whole answer about {topic}", "Write only about {topic}")),
    Family("synonym", "after", _fixed(
        "Stick to the subject of {topic}.", "Keep the answer focused entirely on {topic}.",
        "Do not drift away from {topic}; it is the only subject.", "Your answer should be about {topic} and nothing else.")),
    Family("scenario", "after", _fixed(
        "This is for a newsletter about {topic}, so the answer has to be entirely about {topic}.",
        "I'm only interested in {topic}, so please talk about nothing but {topic}.",
        "It's for a class on {topic}, so make the whole answer about {topic}.")),
    Family("question", "after", _fixed(
        "Can you answer by talking only about {topic}?", "Could you make your whole reply about {topic}?")),
]


def _reg(formal: str, informal: str) -> Sentence:
    return _by("register", formal=formal, informal=informal)


_REGISTER = [
    Family("after", "after", (
        _reg("Use a formal register.", "Use an informal, casual register."),
        _fmt("Write your answer in a {reg} style."), _fmt("Your answer should be written in {reg} language."))),
    Family("before", "before", (
        _reg("Answer the following in a formal register.", "Answer the following in an informal register."),
        _fmt("Register requirement: {reg}."),
        _reg("Write formally when you answer this.", "Write casually when you answer this."))),
    Family("system", "system", (
        _reg("You are a formal assistant who writes in a polished, professional register.",
             "You are a laid-back assistant who writes in a casual, informal register."),
        _reg("Always write in a formal register.", "Always write in an informal register."),
        _fmt("Style rule for every reply: {reg} language."))),
    Family("terse", "after", (
        _fmt("Register: {reg}."), _reg("Formal language only.", "casual language pls."),
        _reg("Formal style.", "Informal style."))),
    Family("polite", "after", (
        _reg("Could you please answer in a formal register?", "Could you please answer in an informal register?"),
        _reg("Would you mind keeping the language formal? Thank you.",
             "Would you mind keeping the language casual and informal? Thanks!"),
        _reg("I'd appreciate it if you wrote formally.", "I'd appreciate it if you wrote informally."))),
    Family("list", "list", (
        _reg("Write in a formal register", "Write in an informal register"), _fmt("Use {reg} language"),
        _fmt("Keep the style {reg}"))),
    Family("synonym", "after", (
        _reg("Write like an academic paper.", "Write like you're texting a friend."),
        _reg("Use the language of an official business letter.",
             "Keep it chatty and relaxed, like a conversation with a buddy."),
        _reg("Sound scholarly and professional.", "Sound laid-back and conversational."))),
    Family("scenario", "after", (
        _reg("This goes into an official report for the board of directors, so write formally.",
             "This is for a group chat with my friends, so keep it casual and relaxed."),
        _reg("I'll submit this to a scientific journal, so the register must be formal.",
             "It's for a chill blog for teenagers, so write informally."),
        _reg("My professor grades on professional, formal language, so write that way.",
             "I'm reading it aloud to my little cousins, so keep the language casual."))),
    Family("question", "after", (
        _reg("Can you answer in a formal register?", "Can you answer in an informal register?"),
        _reg("Could you write this up formally, like for a professional report?",
             "Could you write this casually, like you're chatting with a friend?"))),
]

class _Registered(dict):
    """The built-in tasks' table; a task registered with its own phrasings (a task file, a plugin:
    `steerer.tasks.base.PhrasingFamily`) is looked up on its `Task`, so the corpus needs nothing else."""

    def __init__(self, table: dict, derive: Callable[[Any], Any]) -> None:
        super().__init__(table)
        self.derive = derive

    def __missing__(self, task_id: str) -> Any:
        task = TASKS.get(task_id)
        if task is None or not task.phrasings:
            raise KeyError(f"{task_id}: no phrasing families (not a registered task with phrasings)")
        return self.derive(task.phrasings)


FAMILIES: dict[str, tuple[Family, ...]] = {
    "char_count": tuple(_length_families(
        "characters", "chars",
        ("characters, spaces included", "characters including spaces", "characters (spaces count)"))),
    "word_count": tuple(_length_families("words", "words", ("words", "words in total", "words overall"))),
    "json_format": tuple(_JSON),
    "lowercase": tuple(_LOWERCASE),
    "term_exclusion": tuple(_EXCLUSION),
    "keyword_inclusion": tuple(_INCLUSION),
    "sentiment": tuple(_SENTIMENT),
    "topic": tuple(_TOPIC),
    "register": tuple(_REGISTER),
}
assert set(FAMILIES) == builtin_ids(), "every built-in task needs phrasing families"
FAMILIES = _Registered(FAMILIES, lambda fams: tuple(Family(f.name, f.placement, f.sentences) for f in fams))

# Held out per task: one structural family (placement) and one wording family, chosen by hand so that
# across tasks every structural family and most wording families are held out somewhere.
HELDOUT: dict[str, tuple[str, str]] = {
    "char_count": ("system", "synonym"),
    "word_count": ("list", "scenario"),
    "json_format": ("before", "terse"),
    "lowercase": ("system", "polite"),
    "term_exclusion": ("list", "synonym"),
    "keyword_inclusion": ("before", "scenario"),
    "sentiment": ("system", "terse"),
    "topic": ("list", "polite"),
    "register": ("before", "synonym"),
}
HELDOUT = _Registered(HELDOUT, lambda fams: tuple(f.name for f in fams if f.heldout))


def families(task_id: str) -> tuple[Family, ...]:
    return FAMILIES[task_id]


def get_family(task_id: str, name: str) -> Family:
    for family in FAMILIES[task_id]:
        if family.name == name:
            return family
    raise KeyError(f"{task_id}: unknown phrasing family {name!r}; known: {[f.name for f in FAMILIES[task_id]]}")


def family_split(task_id: str, name: str) -> str:
    """"heldout" for the task's two held-out families, else "train"."""
    get_family(task_id, name)
    return "heldout" if name in HELDOUT[task_id] else "train"


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------

# Items that sit beside the instruction in a list of requirements. None of them bears on length, case,
# format, words, tone, topic or register, so they cannot change what the checker's verdict means.
NEUTRAL_ITEMS: tuple[str, ...] = (
    "Be accurate.", "Respond to my request.", "Make sure any facts are correct.", "Don't make anything up.",
    "Answer in English.",
)
_LIST_HEADERS = ("Requirements:", "Please follow these rules:", "Guidelines for your answer:", "Checklist:")
_AFTER_JOINS = (" ", "\n\n", "\n")
_BEFORE_JOINS = (" ", "\n\n", "\n\nRequest: ")


def instruction(task_id: str, family: str, variant: int, params: Params) -> str:
    """The instruction sentence of one variant (validated parameters)."""
    TASKS[task_id].validate(params)
    sentences = get_family(task_id, family).sentences
    if not 0 <= variant < len(sentences):
        raise ValueError(f"{task_id}/{family}: variant must be in 0..{len(sentences) - 1}, got {variant}")
    return sentences[variant](params)


def _as_item(sentence: str) -> str:
    return sentence if sentence.endswith((".", "?", "!")) else sentence + "."


def _list_block(items: list[str], layout: random.Random) -> str:
    header = layout.choice(_LIST_HEADERS)
    marker = layout.choice(("number", "-", "*"))
    lines = [f"{i}. {item}" if marker == "number" else f"{marker} {item}" for i, item in enumerate(items, 1)]
    return header + "\n" + "\n".join(lines)


def render(task_id: str, family: str, variant: int, request: str, params: Params, layout: int = 0) -> Phrased:
    """The prompt for one family variant. ``layout`` seeds the incidental choices (how the parts are
    joined, a list's header, markers, neutral items and order) so that they vary without new families."""
    text = instruction(task_id, family, variant, params)
    placement = get_family(task_id, family).placement
    rng = random.Random(layout)
    if placement == "after":
        return Phrased(None, f"{request}{rng.choice(_AFTER_JOINS)}{text}", text)
    if placement == "before":
        return Phrased(None, f"{text}{rng.choice(_BEFORE_JOINS)}{request}", text)
    if placement == "system":
        return Phrased(text, request, text)
    # list: 1-3 neutral items around the instruction, the block after (or, sometimes, before) the request
    items = rng.sample(NEUTRAL_ITEMS, k=rng.randint(1, 3))
    items.insert(rng.randint(0, len(items)), _as_item(text))
    block = _list_block(items, rng)
    if rng.random() < 0.25:
        return Phrased(None, f"{block}\n\nRequest: {request}", text)
    return Phrased(None, f"{request}\n\n{block}", text)
