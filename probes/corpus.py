"""The probe corpus: the model's responses to many phrasings of each instruction, as text, with labels.

Probes trained on one sentence per task do not transfer to other wordings, so this corpus varies the
wording (``probes.phrasings``: >= 8 families per task, two held out), the base request (``probes.requests``:
the original requests plus new domains and styles, split train/test by request) and the parameters
(difficulty spread over [0, 1], wider term and topic pools). It stores text only (activations are
recomputed later by teacher forcing on ``token_ids``), so it is small enough to commit.

Class balance comes from rounds. Each round generates ``round_size`` rows per unfinished task (all tasks
in one continuously refilled batch); the next round's mix follows the labels so far: below ~35% compliant it leans on compliance aids (the ones that worked
best for that task) and easier parameters, above ~65% on no aid and harder parameters. Once a class holds
``class_cap`` (70%) of the target, further responses of that class are discarded (rejection sampling), so
a finished task has >= 30% of each class; likewise once one aid value fills 60% of a class, so that
neither class is mostly one aid (a probe could read the demonstration instead of the behaviour). Every row records how it was obtained (aid, difficulty,
temperature, seed, round, strategy).

``--ranges ifeval`` (issue 22) builds a sibling corpus over IFEval's ranges without IFEval's prompts (word
limits 50-800 with the budget to reach them, 1-3 instructions per prompt, word lists of 1-8): see ``RANGES``.

Layout of the output folder (resumable: a rerun continues after the last finished round):
    {task}.jsonl.gz   one gzip member per round (kept rows only); rewritten atomically per round
    rounds.jsonl      one line per task and round: strategy, generated, kept, discarded, by-aid counts, engine
    manifest.json     model, fingerprint, families and held-out families, counts, config, command, engines

Generation runs on the transformers loop (``HFGenerator``) or on vLLM (``probes.corpus_vllm``, ``--engine``).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from probes import checkers, phrasings
from probes.requests import ALL_REQUESTS, base_splits
from probes.tasks import EXCLUSION_TIERS, INCLUSION_TIERS, SPECIFIC_TOPICS, TASKS
from probes.templates import AIDS, DEMO_REQUEST, SYSTEM_TEMPLATE, demo_response
from steerer.tasks import TOKEN_BUDGET

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO / "probes" / "corpora"
AID_NAMES: tuple[str | None, ...] = (None, *sorted(AIDS))

# Wider parameter pools than the tasks' own samplers, tier by tier (same difficulty order).
EXTRA_EXCLUSION: tuple[tuple[str, ...], ...] = (
    ("submarine", "telescope", "avocado", "giraffe", "trumpet", "meteor", "kettle", "compass"),
    ("need", "just", "great", "first", "well", "more", "different", "really"),
    ("with", "on", "be", "this", "or", "as", "your", "can"),
)
EXTRA_INCLUSION: tuple[tuple[str, ...], ...] = (
    ("with", "this", "your", "more", "from", "people"),
    ("garden", "window", "morning", "paper", "music", "river", "bridge", "candle"),
    ("saxophone", "flamingo", "quartz", "igloo", "harpoon", "tangerine", "hedgehog", "trampoline"),
)
EXTRA_TOPICS: tuple[str, ...] = (
    "Antarctica", "submarines", "the Olympic Games", "ancient Greece", "rainforests", "deep-sea creatures",
    "steam trains", "mushrooms", "the Renaissance", "ballet", "skateboarding", "cheese making", "pirates",
    "earthquakes", "video games",
)


# IFEval-range rows (issue 22): the three tasks IFEval scores, with its parameter ranges and 1-3 instructions
# per prompt. They go to their own folder (``default_out(model, "ifeval")``) with ``tag`` = RANGE_TAG on
# every row, so that training takes them or not; the shipped corpus is untouched.
RANGES: tuple[str, ...] = ("default", "ifeval")
RANGE_TASKS: tuple[str, ...] = ("word_count", "term_exclusion", "keyword_inclusion")
RANGE_TAG = "ifeval-range"
WORD_LIMITS = (50, 800)  # IFEval's number_words limits are mostly 50-800 (a few 20-46 and 900-1200)
TOKENS_PER_WORD = 1.5  # SmolLM2's tokenizer spends ~1.3 tokens per English word; the rest is margin
INSTRUCTION_COUNTS = {1: 0.56, 2: 0.33, 3: 0.11}  # IFEval's prompts carry 1-3 instructions in these shares
TERM_COUNTS = {1: 0.22, 2: 0.42, 3: 0.18, 4: 0.08, 5: 0.05, 6: 0.03, 8: 0.02}  # forbidden/required list sizes
# Instructions that may join a primary one in a prompt: none contradicts it (no char limit beside a word
# limit, no topic change beside a request, required and forbidden words kept disjoint).
COMPANIONS: dict[str, tuple[str, ...]] = {
    "word_count": ("lowercase", "json_format", "term_exclusion", "keyword_inclusion", "sentiment", "register"),
    "term_exclusion": ("lowercase", "json_format", "word_count", "keyword_inclusion", "sentiment", "register"),
    "keyword_inclusion": ("lowercase", "json_format", "word_count", "term_exclusion", "sentiment", "register"),
}
_COMPANION_JOINS = (" ", "\n", "\n\n")


@dataclass(frozen=True)
class CorpusConfig:
    tasks: tuple[str, ...] = tuple(TASKS)
    per_task: int = 640  # kept responses per task
    batch_size: int = 48  # rows decoding together (continuous batching)
    round_size: int = 48  # responses per task per round
    seed: int = 0
    temperature: float = 0.7
    greedy_fraction: float = 0.1  # share of rows decoded greedily (temperature 0)
    max_new_tokens: int = 160  # length tasks: their labels need the whole response
    max_new_tokens_other: int = 112
    class_cap: float = 0.7  # a class stops being kept at class_cap * per_task
    aid_cap: float = 0.6  # within a class, one aid value (None included) fills at most this share of the cap
    max_generated_factor: float = 5.0  # give a task up after per_task * this many responses
    max_rounds: int | None = None  # rounds in this run (None: until every task is done)
    ranges: str = "default"  # "ifeval": IFEval's ranges (``RANGE_TASKS`` only; see ``sample_range_params``)
    range_budget_cap: int = 448  # token budget cap of IFEval-range word limits (a CPU cost; see ``range_budget``)

    def __post_init__(self) -> None:
        if self.ranges not in RANGES:
            raise ValueError(f"unknown ranges {self.ranges!r}; expected one of {list(RANGES)}")
        if self.ranges == "ifeval" and set(self.tasks) - set(RANGE_TASKS):
            raise ValueError(f"--ranges ifeval covers {', '.join(RANGE_TASKS)} only; got "
                             f"{', '.join(sorted(set(self.tasks) - set(RANGE_TASKS)))}")

    @property
    def cap(self) -> int:
        return math.ceil(self.per_task * self.class_cap)

    @property
    def cell_cap(self) -> int:
        return math.ceil(self.cap * self.aid_cap)


def default_out(model_name: str, ranges: str = "default") -> Path:
    """probes/corpora/{model}: one corpus per model (its responses are the model's own); IFEval-range rows
    in the sibling probes/corpora/{model}-ifeval."""
    name = re.sub(r"[^a-z0-9._-]+", "--", model_name.lower()).strip("-")
    return CORPORA / (name if ranges == "default" else f"{name}-{ranges}")


# --------------------------------------------------------------------------------------------------
# parameters and prompts
# --------------------------------------------------------------------------------------------------


def _tiered(tiers: tuple[tuple[str, ...], ...], extra: tuple[tuple[str, ...], ...], rng: random.Random,
            d: float) -> dict:
    """The tasks' tiered-term sampler over the wider pools: harder = rarer-to-satisfy tier, more terms."""
    t = min(1.0, max(0.0, d + rng.uniform(-0.2, 0.2)))
    i = min(len(tiers) - 1, int(t * len(tiers)))
    tier = tuple(dict.fromkeys((*tiers[i], *extra[i])))
    n = 1 + (rng.random() < d) + (rng.random() < d / 2)
    return {"terms": rng.sample(tier, k=min(n, len(tier)))}


def sample_params(task_id: str, rng: random.Random, difficulty: float) -> dict:
    """A task's parameters at this difficulty, from wider pools where the corpus has them; validated."""
    if task_id == "term_exclusion":
        params = _tiered(EXCLUSION_TIERS, EXTRA_EXCLUSION, rng, difficulty)
    elif task_id == "keyword_inclusion":
        params = _tiered(INCLUSION_TIERS, EXTRA_INCLUSION, rng, difficulty)
    elif task_id == "topic":
        pool = (*SPECIFIC_TOPICS, *EXTRA_TOPICS) if rng.random() < difficulty else checkers.REFERENCE_TOPICS
        params = {"topic": rng.choice(pool)}
    else:
        return TASKS[task_id].sample_params(rng, difficulty)
    TASKS[task_id].validate(params)
    return params


def _weighted(rng: random.Random, shares: dict[int, float]) -> int:
    return rng.choices(list(shares), weights=list(shares.values()))[0]


def sample_range_params(task_id: str, rng: random.Random, difficulty: float) -> dict:
    """IFEval's ranges: word limits 50-800 ("at least" 60%, "less than" 40%, as IFEval; harder = a higher
    floor or a lower ceiling, log scale) and lists of 1-8 words (IFEval: mostly 1-3, up to 12) from the
    corpus's tiered pools. Validated."""
    if task_id == "word_count":
        t = min(1.0, max(0.0, difficulty + rng.uniform(-0.2, 0.2)))
        lo, hi = WORD_LIMITS
        if rng.random() < 0.6:
            params: dict = {"relation": "at least", "limit": round(lo * (hi / lo) ** t)}
        else:
            params = {"relation": "less than", "limit": round(hi * (lo / hi) ** t)}
        params["limit"] = max(lo, min(hi, int(round(params["limit"] / 10) * 10)))
    elif task_id in ("term_exclusion", "keyword_inclusion"):
        tiers, extra = (EXCLUSION_TIERS, EXTRA_EXCLUSION) if task_id == "term_exclusion" else \
            (INCLUSION_TIERS, EXTRA_INCLUSION)
        t = min(1.0, max(0.0, difficulty + rng.uniform(-0.2, 0.2)))
        i = min(len(tiers) - 1, int(t * len(tiers)))
        pool = tuple(dict.fromkeys((*tiers[i], *extra[i])))
        params = {"terms": rng.sample(pool, k=min(_weighted(rng, TERM_COUNTS), len(pool)))}
    else:
        raise ValueError(f"--ranges ifeval has no ranges for {task_id!r}; expected one of {list(RANGE_TASKS)}")
    TASKS[task_id].validate(params)
    return params


def range_budget(task_id: str, params: dict, config: CorpusConfig) -> int:
    """New tokens for an IFEval-range row: for a word limit, enough to pass it (``TOKENS_PER_WORD``) so the
    verdict is the model's, capped at ``range_budget_cap`` for this CPU (above ~290 words a response cut by
    the cap is ``censored`` and not kept); other tasks keep their usual budget."""
    if task_id == "word_count":
        return min(config.range_budget_cap, math.ceil(TOKENS_PER_WORD * params["limit"]) + 16)
    return config.max_new_tokens_other


def censored(task_id: str, params: dict, satisfied: bool, finish_reason: str) -> bool:
    """A length verdict the budget decided rather than the model: cut short below an "at least" limit, or
    still within an upper limit when cut (the rest of the answer might have crossed it)."""
    if task_id != "word_count" or finish_reason != "length":
        return False
    return not satisfied if params["relation"] == "at least" else satisfied


def sample_companions(task_id: str, params: dict, rng: random.Random) -> list[dict]:
    """0-2 further instructions for a prompt (IFEval's 1-3 per prompt), each from a train-split family of
    its own task, with parameters in IFEval's ranges; required and forbidden words kept apart."""
    n = _weighted(rng, INSTRUCTION_COUNTS) - 1
    out: list[dict] = []
    for other in rng.sample(COMPANIONS[task_id], k=n):
        d = rng.random()
        other_params = sample_range_params(other, rng, d) if other in RANGE_TASKS else sample_params(other, rng, d)
        taken = {t for c in [{"params": params}, *out] for t in c["params"].get("terms", ())}
        if "terms" in other_params:
            other_params["terms"] = [t for t in other_params["terms"] if t not in taken]
            if not other_params["terms"]:
                continue
        family = rng.choice([f for f in phrasings.families(other)
                             if phrasings.family_split(other, f.name) == "train"])
        variant = rng.randrange(len(family.sentences))
        out.append({"task": other, "params": other_params, "family": family.name, "variant": variant,
                    "text": phrasings.instruction(other, family.name, variant, other_params),
                    "join": rng.choice(_COMPANION_JOINS), "before": rng.random() < 0.3})
    return out


def with_companions(messages: list[dict[str, str]], companions: list[dict]) -> list[dict[str, str]]:
    """The final user turn with each companion instruction before or after it."""
    user = messages[-1]["content"]
    for c in companions:
        user = f"{c['text']}{c['join']}{user}" if c["before"] else f"{user}{c['join']}{c['text']}"
    return [*messages[:-1], {"role": "user", "content": user}]


def prompt_messages(task_id: str, family: str, variant: int, request: str, params: dict, aid: str | None,
                    layout: int) -> list[dict[str, str]]:
    """Chat messages for one family variant, with a compliance aid on top (``templates.AIDS``):

    system  - a system message restating the instruction as a hard rule (the family's own wording)
    repeat  - the instruction also before and after the user message (inside the system message for the
              system family, so its instruction stays out of the user turn)
    oneshot - a demonstration turn first: the same phrasing applied to another request, answered compliantly
    """
    phrased = phrasings.render(task_id, family, variant, request, params, layout)
    text, system, user = phrased.instruction, phrased.system, phrased.user
    prefix: list[dict[str, str]] = []
    if aid == "system":
        system = SYSTEM_TEMPLATE.format(instruction=text)
    elif aid == "repeat":
        if system is not None:
            system = f"Important rule: {text}\n\nRemember: {text}"
        else:
            user = f"Important rule: {text}\n\n{user}\n\nRemember: {text}"
    elif aid == "oneshot":
        demo = phrasings.render(task_id, family, variant, DEMO_REQUEST, params, layout)
        prefix = [{"role": "user", "content": demo.user},
                  {"role": "assistant", "content": demo_response(task_id, params)}]
    elif aid is not None:
        raise ValueError(f"unknown aid {aid!r}; expected None or one of {sorted(AIDS)}")
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, *prefix, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------------------------
# round planning
# --------------------------------------------------------------------------------------------------


@dataclass
class TaskState:
    """What earlier rounds left for one task: kept counts and the compliance each aid achieved."""

    satisfied: int = 0
    violated: int = 0
    generated: int = 0
    discarded: int = 0
    last_round: int = -1
    by_aid: dict[str, list[int]] = field(default_factory=dict)  # aid -> [generated, satisfied]
    cells: Counter = field(default_factory=Counter)  # (satisfied, aid) -> kept rows

    def keep(self, row: dict) -> None:
        self.satisfied += row["satisfied"]
        self.violated += not row["satisfied"]
        self.cells[(bool(row["satisfied"]), str(row["aid"]))] += 1

    @property
    def kept(self) -> int:
        return self.satisfied + self.violated

    def aid_rate(self, aid: str | None) -> float:
        n, s = self.by_aid.get(str(aid), (0, 0))
        return (s + 1) / (n + 2)  # Beta(1, 1) posterior mean: untried aids look like a coin flip


def choose_strategy(state: TaskState, config: CorpusConfig) -> str:
    """"aid" (push toward compliance), "hard-params" (toward violation) or "plain"; "+rejection" once a
    class is full and its further responses are discarded."""
    sat_full, viol_full = state.satisfied >= config.cap, state.violated >= config.cap
    if sat_full or viol_full:
        return ("hard-params" if sat_full else "aid") + "+rejection"
    if state.kept < config.round_size // 2:
        return "plain"
    share = state.satisfied / state.kept
    if share < 0.35:
        return "aid"
    if share > 0.65:
        return "hard-params"
    return "plain"


def _pick_aid(rng: random.Random, strategy: str, state: TaskState, config: CorpusConfig) -> str | None:
    """Plain rounds: no aid for 60% of rows. Pushing toward a class: each aid (None included) in
    proportion to how often it has produced that class, among the aids whose cell of that class is open."""
    if strategy == "plain":
        return rng.choice(sorted(AIDS)) if rng.random() < 0.4 else None
    want = strategy.startswith("aid")  # the class wanted: satisfied for "aid", violated for "hard-params"
    options = [a for a in AID_NAMES if state.cells[(want, str(a))] < config.cell_cap] or list(AID_NAMES)
    weights = [(state.aid_rate(a) if want else 1 - state.aid_rate(a)) + 0.05 for a in options]
    return rng.choices(options, weights=weights)[0]


def _difficulty(rng: random.Random, strategy: str) -> float:
    if strategy.startswith("aid"):
        return rng.uniform(0.0, 0.5)
    if strategy.startswith("hard-params"):
        return rng.uniform(0.5, 1.0)
    return rng.random()


def plan_round(task_id: str, round_index: int, state: TaskState, config: CorpusConfig,
               size: int | None = None) -> list[dict]:
    """The rows of one task's round (``size``, default ``round_size``): deterministic given the seed, the
    round and the state before it."""
    rng = random.Random(f"{config.seed}:{task_id}:{round_index}")
    strategy = choose_strategy(state, config)
    splits = base_splits()
    # Tasks whose label needs the whole response (a long `Task.token_budget`: the length tasks) get the long one.
    long = TASKS[task_id].token_budget > TOKEN_BUDGET
    budget = config.max_new_tokens if long else config.max_new_tokens_other
    fams = phrasings.families(task_id)
    rows = []
    for i in range(size or config.round_size):
        family = rng.choice(fams)
        variant = rng.randrange(len(family.sentences))
        layout = rng.randrange(2**16)
        base = rng.choice(ALL_REQUESTS)
        difficulty = _difficulty(rng, strategy)
        ranged = config.ranges == "ifeval"
        params = (sample_range_params if ranged else sample_params)(task_id, rng, difficulty)
        aid = _pick_aid(rng, strategy, state, config)
        if ranged and aid == "oneshot" and params.get("limit", 0) > 150:
            aid = "repeat"  # a demonstration of hundreds of words would double the prompt
        temperature = 0.0 if rng.random() < config.greedy_fraction else config.temperature
        seed = rng.randrange(2**31)
        try:
            messages = prompt_messages(task_id, family.name, variant, base.text, params, aid, layout)
        except ValueError:  # no compliant demonstration for these params: restate the rule instead
            aid = "system"
            messages = prompt_messages(task_id, family.name, variant, base.text, params, aid, layout)
        extra: dict = {}
        if ranged:
            crng = random.Random(f"{config.seed}:{task_id}:{round_index}:{i}:companions")
            companions = sample_companions(task_id, params, crng)
            messages = with_companions(messages, companions)
            extra = {"tag": RANGE_TAG, "instructions": [{"task": task_id, "params": params}] + [
                {k: c[k] for k in ("task", "params", "family", "variant")} for c in companions]}
        rows.append(extra | {
            "id": f"{task_id}:r{round_index:03d}:{i:03d}", "task": task_id, "params": params,
            "difficulty": round(difficulty, 3), "family": family.name, "variant": variant, "layout": layout,
            "family_split": phrasings.family_split(task_id, family.name), "base_id": base.id,
            "base_split": splits[base.id], "messages": messages, "aid": aid, "temperature": temperature,
            "seed": seed, "max_new_tokens": range_budget(task_id, params, config) if ranged else budget,
            "round": round_index, "strategy": strategy,
        })
    return rows


# --------------------------------------------------------------------------------------------------
# generation and labels
# --------------------------------------------------------------------------------------------------


def generate_rows(lm, engine, rows: list[dict], capacity: int, on_row=None, in_given_order: bool = False,
                  on_labelled=None) -> list[dict]:
    """Sample every row's response and label it: checker verdict and violation onset. Results in row order.

    Continuous batching: up to ``capacity`` rows decode together and finished rows are replaced at once,
    so short responses do not wait for the longest one; rows join in prompt-length order so that a
    prefill pads little (`in_given_order`: in the rows' order, for a caller that wants the first rows done
    first). Sampling noise depends only on (seed, step), not on the batch a row shares. `on_labelled(row)` sees
    each labelled row as it finishes (a resumable caller writes it then).
    """
    from collections import deque

    from steerer.generation import RunningBatch, SamplingParams
    from steerer.model import chat_prompt

    prompts = [chat_prompt(lm.tokenizer, r["messages"]) for r in rows]
    params = [SamplingParams(r["max_new_tokens"], r["temperature"], 1.0, r["seed"]) for r in rows]
    queue = deque(range(len(rows)) if in_given_order else sorted(range(len(rows)), key=lambda i: len(prompts[i])))
    refill = max(1, capacity // 8)  # join in groups: each join is a prefill and a cache merge
    batch = RunningBatch(engine)
    labelled: dict[int, dict] = {}

    def finish(generations) -> None:
        for gen in generations:
            labelled[gen.row] = label_row(lm, rows[gen.row], gen)
            if on_labelled is not None:
                on_labelled(labelled[gen.row])
            if on_row is not None:
                on_row(len(labelled), len(rows))

    while queue or len(batch):
        free = capacity - len(batch)
        if queue and (free >= min(refill, len(queue)) or not len(batch)):
            join = [queue.popleft() for _ in range(min(free, len(queue)))]
            finish(batch.add(join, [prompts[i] for i in join], [params[i] for i in join]))
        if len(batch):
            finish(batch.step())
    return [labelled[i] for i in range(len(rows))]


def label_row(lm, row: dict, gen) -> dict:
    """The row with its response, the checker's verdict and, for a violation, the violating token."""
    from probes.violations import token_prefixes, violating_token

    def decode(ids: list[int]) -> str:
        return lm.tokenizer.decode(ids, skip_special_tokens=True)

    response = decode(gen.tokens)
    satisfied = bool(TASKS[row["task"]].check(response, row["params"]))
    onset = None
    if not satisfied:
        onset = violating_token(row["task"], row["params"], token_prefixes(decode, gen.tokens),
                                gen.finish_reason == "eos")
    out = row | {"response": response, "token_ids": gen.tokens, "n_tokens": len(gen.tokens),
                 "prompt_tokens": gen.prompt_tokens, "finish_reason": gen.finish_reason,
                 "satisfied": satisfied, "onset": onset}
    if row.get("tag") == RANGE_TAG:  # every instruction's verdict; the row's label stays its own task's
        out["labels"] = {i["task"]: bool(TASKS[i["task"]].check(response, i["params"])) for i in row["instructions"]}
        out["censored"] = censored(row["task"], row["params"], satisfied, gen.finish_reason)
    return out


def select_rows(rows: list[dict], state: TaskState, config: CorpusConfig) -> tuple[list[dict], int]:
    """(kept rows, discarded count). A response is discarded when its class already holds ``cap`` rows,
    or its (class, aid) cell ``cell_cap``: otherwise a weak model's compliant rows would nearly all carry
    a demonstration and its violations none, and a probe could read the aid instead of the behaviour."""
    counts = Counter({True: state.satisfied, False: state.violated})
    cells = Counter(state.cells)
    kept = []
    for row in rows:
        if row.get("censored"):  # the budget, not the model, decided it: no label to keep
            continue
        label, cell = bool(row["satisfied"]), (bool(row["satisfied"]), str(row["aid"]))
        if counts[label] < config.cap and cells[cell] < config.cell_cap:
            counts[label] += 1
            cells[cell] += 1
            kept.append(row)
    return kept, len(rows) - len(kept)


# --------------------------------------------------------------------------------------------------
# storage: gzip members appended atomically; a truncated trailing member is ignored
# --------------------------------------------------------------------------------------------------


def read_members(path: Path) -> tuple[list[str], int]:
    """(decoded text of each complete gzip member, byte length of the complete prefix).

    A file cut short mid-member (a copy interrupted, a disk full) still yields every complete member.
    """
    data = path.read_bytes() if path.exists() else b""
    texts, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(wbits=31)
        try:
            text = d.decompress(data[pos:])
        except zlib.error:
            break
        if not d.eof:
            break
        texts.append(text.decode())
        pos = len(data) - len(d.unused_data)
    return texts, pos


def append_member(path: Path, lines: Iterable[str]) -> None:
    """Append one gzip member: written to a temporary file with the old complete members, fsynced and
    renamed over the old file, so an interrupt leaves the old file or the new one, never half of one."""
    _, valid = read_members(path)
    old = path.read_bytes()[:valid] if path.exists() else b""
    member = gzip.compress("".join(lines).encode(), mtime=0)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(old + member)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def relabel_onsets(folder: Path, tokenizer) -> dict[str, int]:
    """Recompute every row's checker verdict and violation onset with today's task rules (after a rule
    changed), rewriting each task file atomically with its rounds (gzip members) kept; returns the number
    of rows whose label or onset changed, per task."""
    from probes.violations import token_prefixes, violating_token

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    changed = {}
    for path in sorted(folder.glob("*.jsonl.gz")):
        members, n = [], 0
        for text in read_members(path)[0]:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            for row in rows:
                satisfied = bool(TASKS[row["task"]].check(row["response"], row["params"]))
                onset = None if satisfied else violating_token(
                    row["task"], row["params"], token_prefixes(decode, row["token_ids"]), row["finish_reason"] == "eos")
                n += (satisfied, onset) != (row["satisfied"], row["onset"])
                row["satisfied"], row["onset"] = satisfied, onset
            members.append(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(members))
        os.replace(tmp, path)
        changed[path.name.split(".")[0]] = n
    return changed


def _append_line(path: Path, line: str) -> None:
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut by an interrupt: start on a fresh one
                line = "\n" + line
        f.write((line + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def load_corpus(folder: Path | str, task: str | None = None) -> list[dict]:
    """Every kept row (of one task, or of all), in generation order."""
    folder = Path(folder)
    paths = [folder / f"{task}.jsonl.gz"] if task else sorted(folder.glob("*.jsonl.gz"))
    rows = []
    for path in paths:
        for text in read_members(path)[0]:
            rows += [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows


def load_rounds(folder: Path) -> list[dict]:
    path = folder / "rounds.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interrupt
            continue
    return out


def task_states(folder: Path, tasks: Iterable[str]) -> dict[str, TaskState]:
    """Rebuild each task's state from its rows and the round log (rows are the truth for kept counts)."""
    states = {t: TaskState() for t in tasks}
    for record in load_rounds(folder):
        state = states.get(record["task"])
        if state is None:
            continue
        state.generated += record["generated"]
        state.discarded += record["discarded"]
        state.last_round = max(state.last_round, record["round"])
        for aid, (n, s) in record["by_aid"].items():
            cell = state.by_aid.setdefault(aid, [0, 0])
            cell[0] += n
            cell[1] += s
    for task_id, state in states.items():
        for row in load_corpus(folder, task_id):
            state.keep(row)
            state.last_round = max(state.last_round, row["round"])
        state.generated = max(state.generated, state.kept)
    return states


# --------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------


def task_done(state: TaskState, config: CorpusConfig) -> bool:
    return state.kept >= config.per_task or state.generated >= config.per_task * config.max_generated_factor


class HFGenerator:
    """The transformers loop (``generate_rows`` on ``steerer.engine.hf``): the default corpus generator.

    A generator has a ``name`` (logged per round) and ``generate(lm, rows, capacity, on_row)`` -> the rows
    labelled by ``label_row``, in row order; ``probes.corpus_vllm.VLLMCorpusGenerator`` is the other one."""

    name = "hf"

    def __init__(self, lm):
        from steerer.engine.hf import HFEngine

        self.engine = HFEngine(lm)

    def generate(self, lm, rows: list[dict], capacity: int, on_row=None) -> list[dict]:
        return generate_rows(lm, self.engine, rows, capacity, on_row)


def build_corpus(lm, out: Path, config: CorpusConfig, progress: bool = True, command: str | None = None,
                 generator=None) -> dict:
    """Run rounds until every task holds ``per_task`` rows (or gives up, or ``max_rounds`` is reached).

    A round plans ``round_size`` rows (more when few tasks are left) for every unfinished task and
    generates them all in one continuous batch; each task's kept rows are then appended as one gzip member, so an interrupt loses at most the
    round in progress. ``generator``: what samples and labels the rows (default ``HFGenerator(lm)``); ``lm``
    needs only ``name``, ``fingerprint`` and ``tokenizer`` when one is given."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    _check_model(out, lm)
    for stale in out.glob("*.tmp"):  # left by an interrupted atomic write; the real file is intact
        stale.unlink()
    states = task_states(out, config.tasks)
    generator = generator or HFGenerator(lm)
    total = config.per_task * len(config.tasks)
    bar = tqdm(total=total, initial=sum(min(s.kept, config.per_task) for s in states.values()),
               desc="probe corpus", unit="resp", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    counts = lambda: " ".join(f"{t[:4]}={states[t].satisfied}/{states[t].violated}"  # noqa: E731
                              for t in config.tasks)
    rounds_run = 0
    try:
        while config.max_rounds is None or rounds_run < config.max_rounds:
            active = [t for t in config.tasks if not task_done(states[t], config)]
            if not active:
                break
            # with few tasks left, bigger rounds keep the running batch full (no long tail per round)
            size = max(config.round_size, math.ceil(3 * config.batch_size / len(active)))
            plans = {t: plan_round(t, states[t].last_round + 1, states[t], config, size) for t in active}
            rows = [row for plan in plans.values() for row in plan]

            def tick(done: int, n: int) -> None:
                bar.set_postfix_str(f"{counts()} (round: {done}/{n} generated)", refresh=done % 8 == 0)

            start = time.perf_counter()
            labelled = generator.generate(lm, rows, config.batch_size, tick if progress else None)
            seconds = time.perf_counter() - start
            by_id = {r["id"]: r for r in labelled}
            for task_id, plan in plans.items():
                state = states[task_id]
                before = min(state.kept, config.per_task)
                task_rows = [by_id[r["id"]] for r in plan]
                _record_round(out, task_id, task_rows, state, config, seconds * len(plan) / len(rows),
                              generator.name)
                bar.update(min(state.kept, config.per_task) - before)
            bar.set_postfix_str(counts())
            rounds_run += 1
            write_manifest(out, lm, config, command)  # fresh after every round, for an interrupted run
    finally:
        bar.close()
    return write_manifest(out, lm, config, command)


def _record_round(out: Path, task_id: str, rows: list[dict], state: TaskState, config: CorpusConfig,
                  seconds: float, engine: str = "hf") -> None:
    """Keep what the class caps allow, append it, log the round, and update the task's state."""
    kept, discarded = select_rows(rows, state, config)
    by_aid: dict[str, list[int]] = {}
    for row in rows:
        cell = by_aid.setdefault(str(row["aid"]), [0, 0])
        cell[0] += 1
        cell[1] += row["satisfied"]
    append_member(out / f"{task_id}.jsonl.gz", (json.dumps(r) + "\n" for r in kept))
    round_index = rows[0]["round"]
    record = {"task": task_id, "round": round_index, "strategy": rows[0]["strategy"], "generated": len(rows),
              "kept": len(kept), "discarded": discarded, "satisfied": sum(r["satisfied"] for r in rows),
              "by_aid": by_aid, "seconds": round(seconds, 2), "new_tokens": sum(r["n_tokens"] for r in rows),
              "engine": engine}
    _append_line(out / "rounds.jsonl", json.dumps(record))
    for row in kept:
        state.keep(row)
    state.generated += len(rows)
    state.discarded += discarded
    state.last_round = round_index
    for aid, (n, s) in by_aid.items():
        cell = state.by_aid.setdefault(aid, [0, 0])
        cell[0] += n
        cell[1] += s


def _check_model(out: Path, lm) -> None:
    path = out / "manifest.json"
    if path.exists():
        found = json.loads(path.read_text()).get("fingerprint")
        if found and found != lm.fingerprint:
            raise ValueError(f"{out} holds a corpus of another model (fingerprint {found}, this model "
                             f"{lm.fingerprint}); use another --out")


def summarise(out: Path, config: CorpusConfig) -> dict[str, dict]:
    """Per task: counts by class, family, aid, strategy and split, plus what the round log says."""
    states = task_states(out, config.tasks)
    rounds = load_rounds(out)
    tasks = {}
    for task_id in config.tasks:
        rows = load_corpus(out, task_id)
        state = states[task_id]

        def classes(key, rows=rows):
            cells: dict[str, Counter] = defaultdict(Counter)
            for r in rows:
                cells[str(r[key])]["satisfied" if r["satisfied"] else "violated"] += 1
            return {k: _classes(v) for k, v in sorted(cells.items())}

        cells: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
        for r in rows:
            cells[r["family"]][str(r["aid"])]["satisfied" if r["satisfied"] else "violated"] += 1
        n = len(rows)
        task_rounds = [r for r in rounds if r["task"] == task_id]
        tasks[task_id] = {
            "n": n, "satisfied": state.satisfied, "violated": state.violated,
            "minority_share": round(min(state.satisfied, state.violated) / n, 4) if n else None,
            "complete": state.kept >= config.per_task,
            "gave_up": state.kept < config.per_task and task_done(state, config),
            "generated": state.generated, "discarded": state.discarded, "rounds": state.last_round + 1,
            "generation_seconds": round(sum(r["seconds"] for r in task_rounds), 1),
            "generated_tokens": sum(r.get("new_tokens", 0) for r in task_rounds),
            "compliance_by_aid_all_generated": {a: round(s / m, 4) for a, (m, s) in sorted(state.by_aid.items())
                                                if m},
            "by_family": classes("family"), "by_aid": classes("aid"), "by_strategy": classes("strategy"),
            "by_family_split": classes("family_split"), "by_base_split": classes("base_split"),
            "by_finish_reason": classes("finish_reason"), "by_temperature": classes("temperature"),
            "by_family_aid": {f: {a: _classes(c) for a, c in sorted(v.items())} for f, v in sorted(cells.items())},
        }
    return tasks


def _classes(counter: Counter) -> dict[str, int]:
    return {"satisfied": counter["satisfied"], "violated": counter["violated"]}


def write_manifest(out: Path, lm, config: CorpusConfig, command: str | None = None) -> dict:
    path = out / "manifest.json"
    commands = json.loads(path.read_text()).get("commands", []) if path.exists() else []
    if command and command not in commands:
        commands.append(command)  # every command that added to the corpus (resumed runs included)
    manifest = {
        "model": lm.name, "fingerprint": lm.fingerprint,
        "command": command, "commands": commands,
        "engines": sorted({r.get("engine", "hf") for r in load_rounds(out)}),  # what generated the rows
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "class_cap": config.cap, "aid_cell_cap": config.cell_cap,
        "base_requests": {"n": len(ALL_REQUESTS), "split_seed": 13,
                          "n_test": sum(v == "test" for v in base_splits().values())},
        "families": {t: {f.name: {"placement": f.placement, "variants": len(f.sentences),
                                  "split": phrasings.family_split(t, f.name)} for f in phrasings.families(t)}
                     for t in config.tasks},
        "heldout_families": {t: list(phrasings.HELDOUT[t]) for t in config.tasks},
        "row_fields": ["id", "task", "params", "difficulty", "family", "variant", "layout", "family_split",
                       "base_id", "base_split", "messages", "aid", "temperature", "seed", "max_new_tokens",
                       "round", "strategy", "response", "token_ids", "n_tokens", "prompt_tokens",
                       "finish_reason", "satisfied", "onset"] + (
                           ["tag", "instructions", "labels", "censored"] if config.ranges == "ifeval" else []),
        "tasks": summarise(out, config),
    }
    _write_json(out / "manifest.json", manifest)
    return manifest
