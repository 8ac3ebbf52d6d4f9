"""Guard benchmark: compliance, fluency, latency and vetoes of the `guard` policy (docs/GUARD.md).

Per detectable task (a prefix decides its violation: term_exclusion, lowercase, word_count and char_count with
an at-most / less-than limit, json_format), on held-out prompts (`probes.heldout`: the test split's base
requests and phrasing families; for the count tasks only prompts whose params a prefix can decide), greedy:

  compliance        the checker on the final text, off vs guard, Wilson 95% intervals (`steerer.stats.wilson`)
  perplexity ratio  exp(mean NLL of guard's response - off's) under the unsteered model, paired per prompt,
                    bootstrap interval (`steerer.stats.ratio_of_means_ci`; the steering benchmark's measure)
  repetition        mean rep-3 of the responses (`probes.steering.repetition`)
  latency           seconds per generated token, off and guard chunks interleaved (same prompts, same
                    batch size, alternating order), ratio of the summed times per token; and per decoding
                    step (`step_latency_ratio`: a chunk's seconds over its longest response's tokens, the
                    gap between a stream's tokens), since a guard that ends responses at a limit leaves
                    shorter batches whose tokens cost more each without any step being slower
  vetoes            candidates vetoed per response under guard and under guard+conditional at the bank's
                    swept strength (where the bank has one): how many vetoes steering saves

term_exclusion runs twice: with the prompt's own terms (`term_exclusion`; a small model rarely writes them, so
the guard has little to do) and `term_exclusion:written`, whose terms are the 3 most frequent content words
the unguarded (off) response to the same base request actually wrote (`written_terms`), so the guard has
something to veto. Each variant's off and guard arms answer the same prompt (the written terms are in its
instruction).

    .venv/bin/python -m benchmarks.guard --n 60            # -> benchmarks/results/guard.json

`--split train` measures on training-split prompts instead (`held_out_prompts(..., split="train")`: the
training split's base requests, disjoint from the test split's), so a rule can be chosen without the held-out
set; its figures go to their own file (default `benchmarks/results/guard_train.json`), never into guard.json.
`--loop-rules 0,3,4,3:3` (lowercase only) replaces the guard arm by one guard arm per loop rule of the guard's
loop veto (lowercase's request params `loop_ngram` N and `loop_occurrence` K, given as N or N:K; 0 = no loop
veto), each against the same off arm, all interleaved; the entry then names the rule `chosen` by the criterion
fixed before the run (`LOOP_CRITERION`: most responses compliant, ties broken by the lower perplexity ratio):

    .venv/bin/python -m benchmarks.guard --split train --tasks lowercase --no-steering --n 60 \
        --max-new-tokens 48 --batch 20 --loop-rules 0,3,4,3:3 --out benchmarks/results/guard_train_loop.json

Results are written after every task, so a cut-short run leaves the finished tasks (and `n` says how many
prompts each had). `--merge` reruns some tasks into an existing file, keeping the others' entries (each
entry's `run` is the command that made it); `--responses FILE` also writes every response, to read failures:

    .venv/bin/python -m benchmarks.guard --tasks lowercase --merge --responses /tmp/lowercase.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from probes.heldout import SPLITS, HeldOutPrompt, held_out_prompts
from probes.steering import repetition
from probes.templates import get_base_request, prompt_messages
from steerer.ab.fluency import response_nll, scored_tokens
from steerer.bank import DEFAULT_BANK, ProbeBank
from steerer.constraints import Constraint
from steerer.core import Steerer
from steerer.model import chat_prompt, load_model
from steerer.policy import SteeringPolicy, strength_bounds
from steerer.request import Request, Result, SamplingParams, TokenEvent
from steerer.stats import ratio_of_means_ci, wilson
from steerer.tasks import get_task
from steerer.tasks.common import WORD_RE, wordset

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("term_exclusion", "lowercase", "word_count", "char_count", "json_format")
WRITTEN = "term_exclusion:written"  # term_exclusion with terms the off response wrote
GOAL_TASKS = ("term_exclusion", WRITTEN, "lowercase", "word_count", "char_count")  # the goal
WRITTEN_TERMS = 3
COMPLIANCE_GOAL = 0.99
LOOP_TASK = "lowercase"  # the task whose params carry the guard's loop rule (`steerer.tasks.lowercase.loop_rule`)
LOOP_CRITERION = "most responses compliant (checker), ties broken by the lower perplexity ratio"
LATENCY_GOAL = 1.05
# Frequent English function words: never a `written_terms` term (forbidding "the" tests nothing new).
FUNCTION_WORDS = wordset(
    """
    a an the and or but nor of to in on at for with by from into onto about as than then so if
    is are was were be been being am do does did have has had will would can could should may might must
    it its this that these those there here i me my mine you your yours he him his she her hers we us our
    they them their what which who whom whose how when where why not no all some any each every more most
    very just also only too up out over under after before because while although though until
    """
)


def detectable_prompts(task: str, n: int, seed: int = 0, split: str = "test") -> list:
    """`n` prompts of `split` (held-out: "test") whose params a prefix can decide (the count tasks' at-most
    limits)."""
    out, want = [], n
    while len(out) < n:
        want *= 2
        out = [p for p in held_out_prompts(task, want, seed, split) if get_task(task).detect(p.params) is not None]
    return out[:n]


def loop_rule_params(spec: str) -> dict[str, int]:
    """A `--loop-rules` item, "N" or "N:K", as lowercase's params (`loop_ngram` N, `loop_occurrence` K),
    validated by the task itself; a one-line ValueError otherwise."""
    n, _, k = spec.strip().partition(":")
    try:
        params = {"loop_ngram": int(n), **({"loop_occurrence": int(k)} if k else {})}
    except ValueError:
        raise ValueError(f"loop rule {spec!r}: expected N or N:K (n-gram size, occurrence vetoed)") from None
    get_task(LOOP_TASK).validate(params)
    return params


def choose(rules: Mapping[str, dict]) -> str:
    """The rule `LOOP_CRITERION` picks: most compliant responses, then the lower perplexity ratio."""
    return min(rules, key=lambda r: (-rules[r]["compliance"]["satisfied"], rules[r]["perplexity_ratio"] or math.inf))


def written_terms(text: str, k: int = WRITTEN_TERMS) -> list[str]:
    """The `k` most frequent content words of `text` (not an English function word, 3+ letters; ties: first
    written first); function words only when the text has no content word."""
    words = [w for w in WORD_RE.findall(text.lower()) if w.isalpha()]
    content = [w for w in words if len(w) >= 3 and w not in FUNCTION_WORDS] or words
    return [w for w, _ in Counter(content).most_common(k)]


def written_prompts(prompts: Sequence[HeldOutPrompt], off: Sequence[Result]) -> list[HeldOutPrompt]:
    """Each prompt again, forbidding the words its unguarded response wrote (its own terms if it wrote none)."""
    out = []
    for p, r in zip(prompts, off, strict=True):
        params = {"terms": written_terms(r.text) or list(p.params["terms"])}
        messages = prompt_messages(p.task, get_base_request(p.base_id), params, aid=None)
        out.append(replace(p, id=f"{p.id}:written", params=params, messages=messages))
    return out


def run_arm(steerer: Steerer, prompts: Sequence, policy: SteeringPolicy, tokens: int, batch: int,
            tag: str, extra: Mapping | None = None) -> tuple[list[Result], list[int], float, int]:
    """Results in prompt order, vetoes per response, seconds and tokens generated. `extra`: params added to
    each prompt's constraint (a loop rule); the checker still judges by the prompt's own params."""
    requests = [Request(p.messages, (Constraint(p.task, {**p.params, **(extra or {})}),), policy,
                        sampling=SamplingParams(max_new_tokens=tokens), id=f"{tag}|{i}") for i, p in enumerate(prompts)]
    results: dict[str, Result] = {}
    vetoes = dict.fromkeys((r.id for r in requests), 0)
    start = time.perf_counter()
    for item in steerer.generate(requests, batch):
        if isinstance(item, TokenEvent):
            vetoes[item.request_id] += sum(item.redrawn.values())
        else:
            results[item.request_id] = item
    seconds = time.perf_counter() - start
    ordered = [results[r.id] for r in requests]
    return ordered, [vetoes[r.id] for r in requests], seconds, sum(len(r.tokens) for r in ordered)


def compliance(task: str, prompts: Sequence, results: Sequence[Result]) -> dict:
    """The checker's verdict on the final text, and the share no prefix broke (what the guard enforces: the
    detector never fired; lowercase's checker also wants English words, an end-only part)."""
    ok = sum(get_task(task).check(r.text, p.params) for p, r in zip(prompts, results, strict=True))
    clean = sum(all(v.detected_at is None for v in r.verdicts) for r in results)
    ci, clean_ci = wilson(ok, len(results)), wilson(clean, len(results))
    return {"rate": round(ok / len(results), 4), "ci": [round(x, 4) for x in ci] if ci else None,
            "satisfied": ok, "n": len(results), "no_prefix_violation": round(clean / len(results), 4),
            "no_prefix_violation_ci": [round(x, 4) for x in clean_ci] if clean_ci else None}


def mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.fmean(kept), 4) if kept else None


def bench_task(steerer: Steerer, bank: ProbeBank, task: str, prompts: Sequence[HeldOutPrompt], tokens: int,
               batch: int, steering: bool = True, loop_rules: Sequence[str] = ()
               ) -> tuple[dict, dict[str, list[tuple[Result, int]]]]:
    """The task's figures on `prompts`, and each arm's (result, vetoes) in prompt order. With `loop_rules`
    (`loop_rule_params` specs) one guard arm per rule, named "guard loop=SPEC", replaces the guard arm, and
    its figures go under the entry's "loop_rules" (with the `chosen` one); without, the entry is as before."""
    lm = steerer.lm
    guard = SteeringPolicy.parse("guard")
    plans: dict[str, tuple[SteeringPolicy, dict | None]] = {"off": (SteeringPolicy(), None)}
    if loop_rules:
        plans.update({f"guard loop={r}": (guard, loop_rule_params(r)) for r in loop_rules})
    else:
        plans["guard"] = (guard, None)
    names = list(plans)
    arms: dict[str, list] = {name: [] for name in names}
    timing = {name: [0.0, 0, 0] for name in names}  # seconds, tokens, decoding steps
    for c, start in enumerate(range(0, len(prompts), batch)):  # interleaved, rotating which goes first
        chunk = prompts[start:start + batch]
        for arm in names[c % len(names):] + names[:c % len(names)]:
            policy, extra = plans[arm]
            results, vetoes, seconds, generated = run_arm(steerer, chunk, policy, tokens, batch, f"{arm}|{c}", extra)
            arms[arm] += list(zip(results, vetoes, strict=True))
            timing[arm][0] += seconds
            timing[arm][1] += generated
            timing[arm][2] += max((len(r.tokens) for r in results), default=0)  # one chunk = one batch
    entry: dict = {"n": len(prompts), "max_new_tokens": tokens}
    prompt_ids = [chat_prompt(lm.tokenizer, p.messages) for p in prompts]
    nll = {}
    figures: dict[str, dict] = {}
    for arm, pairs in arms.items():
        results = [r for r, _ in pairs]
        nll[arm] = response_nll(lm, prompt_ids, [scored_tokens(lm, r.tokens) for r in results])
        per_token = timing[arm][0] / max(timing[arm][1], 1)
        per_step = timing[arm][0] / max(timing[arm][2], 1)
        figures[arm] = {"compliance": compliance(task, prompts, results),
                        "rep3": mean([repetition(r.tokens) for r in results]),
                        "vetoes_per_response": mean([v for _, v in pairs]),
                        "seconds_per_token": round(per_token, 5), "seconds_per_step": round(per_step, 5),
                        "mean_tokens": mean([len(r.tokens) for r in results])}
        if arm != "off":
            deltas = [g - o for g, o in zip(nll[arm], nll["off"], strict=True) if g is not None and o is not None]
            ci = ratio_of_means_ci(deltas)
            figures[arm]["perplexity_ratio"] = round(math.exp(statistics.fmean(deltas)), 4) if deltas else None
            figures[arm]["perplexity_ratio_ci"] = [round(x, 4) for x in ci] if ci else None
            figures[arm]["latency_ratio"] = round(per_token / figures["off"]["seconds_per_token"], 4)
            figures[arm]["step_latency_ratio"] = round(per_step / figures["off"]["seconds_per_step"], 4)
    entry["off"] = figures.pop("off")
    if loop_rules:
        entry["loop_rules"] = {arm.removeprefix("guard loop="): {"params": plans[arm][1], **f}
                               for arm, f in figures.items()}
        entry["loop_criterion"] = LOOP_CRITERION
        entry["chosen"] = choose(entry["loop_rules"])
    else:
        g = figures["guard"]
        moved = ("perplexity_ratio", "perplexity_ratio_ci", "latency_ratio", "step_latency_ratio")
        entry["guard"] = {k: v for k, v in g.items() if k not in moved}
        entry.update({k: g[k] for k in moved})
    entry["load_average"] = [round(x, 2) for x in os.getloadavg()]  # 1/5/15 min after the arms: a loaded machine's latency
    record = (bank.extra.get("steering") or {}).get(task)
    if steering and not loop_rules and isinstance(record, dict) and isinstance(record.get("alpha"), int | float):
        alpha = min(float(record["alpha"]), strength_bounds(bank).get(task, float(record["alpha"])))
        policy = SteeringPolicy("conditional", round(alpha, 1), guard=True)
        results, vetoes, _, _ = run_arm(steerer, prompts, policy, tokens, batch, "steer")
        entry["guard_steering"] = {"policy": policy.spec(), "compliance": compliance(task, prompts, results),
                                   "rep3": mean([repetition(r.tokens) for r in results]),
                                   "vetoes_per_response": mean(vetoes)}
        entry["vetoes_saved_per_response"] = round(entry["guard"]["vetoes_per_response"] - mean(vetoes), 4)
    return entry, arms


def response_rows(name: str, task: str, prompts: Sequence[HeldOutPrompt],
                  arms: Mapping[str, Sequence[tuple[Result, int]]]) -> list[dict]:
    """One row per prompt and arm: the text, its vetoes and the checker's verdict (to read the failures)."""
    return [{"task": name, "prompt": p.id, "arm": arm, "params": p.params, "vetoes": v,
             "satisfied": bool(get_task(task).check(r.text, p.params)), "text": r.text}
            for arm, pairs in arms.items() for p, (r, v) in zip(prompts, pairs, strict=True)]


def merged(previous: dict, out: dict) -> dict:
    """`out` over the previous results file: its tasks replace theirs, the other tasks' entries (and the file's
    note and commands) are kept; each entry records the command that made it (`run`)."""
    tasks = {**previous.get("tasks", {}), **out["tasks"]}
    commands = [*previous.get("commands", [previous["command"]] if "command" in previous else []), out["command"]]
    return {**previous, **{k: v for k, v in out.items() if k != "command"}, "tasks": tasks,
            "commands": list(dict.fromkeys(commands))}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="prompts per task")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="test: held-out prompts (guard.json); train: training-split prompts, to choose a rule")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/guard.json (test split), guard_train.json (train split)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other tasks' entries of an existing --out (rerun some tasks only)")
    parser.add_argument("--responses", type=Path, default=None,
                        help="also write every response (task, prompt, arm, vetoes, verdict, text) as JSON lines")
    parser.add_argument("--no-steering", action="store_true",
                        help="skip the guard+conditional arm (vetoes steering saves): off and guard only")
    parser.add_argument("--loop-rules", default="",
                        help=f"{LOOP_TASK} only: one guard arm per loop rule N or N:K (loop_ngram N, loop_occurrence "
                             "K; 0 = no loop veto), e.g. 0,3,4,3:3, and the rule chosen by " + LOOP_CRITERION)
    args = parser.parse_args(argv)
    held_out = RESULTS / "guard.json"
    args.out = args.out or (held_out if args.split == "test" else RESULTS / "guard_train.json")
    if args.split != "test" and args.out.resolve() == held_out.resolve():
        parser.error(f"{args.split}-split figures never go into {held_out.name}: pass another --out")
    loop_rules = [r.strip() for r in args.loop_rules.split(",") if r.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"not a detectable task: {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if loop_rules and tasks != [LOOP_TASK]:
        parser.error(f"--loop-rules is a {LOOP_TASK} param: pass --tasks {LOOP_TASK}")
    try:
        for rule in loop_rules:
            loop_rule_params(rule)
    except ValueError as exc:
        parser.error(str(exc))
    bank = ProbeBank.load(DEFAULT_BANK)
    split = ("held-out test prompts" if args.split == "test" else "training-split prompts") + " (probes.heldout)"
    out: dict = {"benchmark": "guard", "decoding": "greedy", "split": split,
                 "goal": {"compliance": COMPLIANCE_GOAL, "tasks": list(GOAL_TASKS), "latency_ratio": LATENCY_GOAL},
                 "n_requested": args.n, "tasks": {}}
    out["command"] = "python -m benchmarks.guard " + " ".join(argv if argv is not None else sys.argv[1:])
    previous = json.loads(args.out.read_text()) if args.merge and args.out.exists() else None
    if args.responses:
        args.responses.parent.mkdir(parents=True, exist_ok=True)
        args.responses.write_text("")

    def record(name: str, entry: dict, rows: list[dict]) -> None:
        out["tasks"][name] = {"run": out["command"], **entry}
        final = merged(previous, out) if previous is not None else out
        goal = [final["tasks"][t]["guard"]["compliance"]["rate"] for t in GOAL_TASKS
                if "guard" in final["tasks"].get(t, {})]  # a --loop-rules entry has no single guard arm
        final["compliance_goal_met_so_far"] = all(rate >= COMPLIANCE_GOAL for rate in goal)
        if len(goal) == len(GOAL_TASKS):
            final["compliance_goal_met"] = final["compliance_goal_met_so_far"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(final, indent=1) + "\n")
        if args.responses:
            with args.responses.open("a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        arms = entry.get("loop_rules") or {"guard": entry}
        for arm, f in arms.items():
            guarded = f if "loop_rules" in entry else f["guard"]
            print(name, arm, json.dumps({k: f[k] for k in ("perplexity_ratio", "latency_ratio", "step_latency_ratio")}), "n", entry["n"],
                  "off", entry["off"]["compliance"]["rate"], "guard", guarded["compliance"]["rate"], flush=True)
        if "chosen" in entry:
            print(name, "chosen", entry["chosen"], f"({LOOP_CRITERION})", flush=True)

    with Steerer(load_model(), bank) as steerer:
        for task in tasks:
            prompts = detectable_prompts(task, args.n, split=args.split)
            entry, arms = bench_task(steerer, bank, task, prompts, args.max_new_tokens, args.batch,
                                     not args.no_steering, loop_rules)
            record(task, {"terms": "the prompt's own", **entry} if task == "term_exclusion" else entry,
                   response_rows(task, task, prompts, arms))
            if task == "term_exclusion":
                written = written_prompts(prompts, [r for r, _ in arms["off"]])
                entry, arms = bench_task(steerer, bank, task, written, args.max_new_tokens, args.batch,
                                         not args.no_steering)
                record(WRITTEN, {"terms": f"the {WRITTEN_TERMS} most frequent content words of the off response "
                                          "to the prompt's own terms", **entry},
                       response_rows(WRITTEN, task, written, arms))


if __name__ == "__main__":
    main()
