"""IFEval's number_words answers regenerated with a token budget that can reach the limit (#22 item 2).

The committed IFEval responses (`probes.ifeval`) were generated with word_count's budget (160 tokens), so 35 of
52 labels were fixed by the cut, not the model: an "at least 300 words" answer cannot reach 300 words in 160
tokens. Here the same rows are answered again, the same way (greedy, `probes.corpus.generate_rows`, the HF
engine), with `budget(limit)` tokens, and the shipped probe is read on them by the shipped reliability path
(teacher-forced end reading, `probes.reliability.ifeval_metrics`), beside the committed responses' column.

Evaluation only: nothing is trained, chosen or tuned on these rows. Responses are written without prompts (as
`probes.ifeval` does) to their own file, never over the committed corpus; generation appends each row as it
finishes (smallest budget first), so a rerun resumes where it stopped.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m probes.ifeval_budget --out reports/ifeval_budget --threads 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from probes import ifeval, reliability
from probes.corpus import censored

TASK = "word_count"
FACTOR = 2  # tokens per word of the limit: SmolLM2's English runs about 1.3 tokens per \w+ word
CAP = 2048  # IFEval's largest limit (1200 words) needs about 1,600 tokens
RESPONSES = "responses.jsonl.gz"
RECORDED = "reports/ifeval_ranges/ifeval_ranges.json"
KEEP = ("id", "task", "params", "instruction", "key", "max_new_tokens", "response", "token_ids", "n_tokens",
        "finish_reason", "satisfied", "onset")


def budget(limit: int, floor: int) -> int:
    """Tokens for a word limit: room to pass it (FACTOR per word), never below the task's own budget, capped."""
    return min(max(FACTOR * limit, floor), CAP)


def read_done(path: Path) -> list[dict]:
    """Rows already written (each appended whole, as one gzip member)."""
    if not path.exists():
        return []
    with gzip.open(path, "rt") as f:
        try:
            return [json.loads(line) for line in f]
        except (EOFError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is damaged ({exc}): delete it to regenerate") from exc


def generate(lm, out: Path, capacity: int) -> list[dict]:
    """Answer every number_words row not yet in `out`/RESPONSES, smallest budget first, by continuous batching
    (`probes.corpus.generate_rows`, its loop and labels), appending each row as it finishes (one gzip member,
    one write): a rerun resumes after the last finished row, and a run stopped early leaves the smallest limits."""
    from probes.corpus import generate_rows
    from probes.tasks import TASKS
    from steerer.engine.hf import HFEngine

    path = out / RESPONSES
    done = read_done(path)
    have = {r["id"] for r in done}
    floor = TASKS[TASK].token_budget
    rows = sorted((r | {"max_new_tokens": budget(r["params"]["limit"], floor), "temperature": 0.0, "seed": 0}
                   for r in ifeval.mapped_rows() if r["task"] == TASK and r["id"] not in have),
                  key=lambda r: (r["max_new_tokens"], r["id"]))
    out.mkdir(parents=True, exist_ok=True)

    def write(row: dict) -> None:
        with path.open("ab") as f:
            f.write(gzip.compress((json.dumps({k: row[k] for k in KEEP}) + "\n").encode()))
        done.append(row)
        print(f"{len(done)} rows written ({row['id']}: {row['n_tokens']} of {row['max_new_tokens']} tokens, "
              f"{row['finish_reason']})", file=sys.stderr, flush=True)

    generate_rows(lm, HFEngine(lm), rows, capacity, in_given_order=True, on_labelled=write)
    return done


def column(name: str, y: np.ndarray, p: np.ndarray) -> dict:
    m = reliability.column_metrics(name, y, p)
    return {"auroc": m[f"{name}_auroc"], "ci": m[f"{name}_auroc_ci"], "n": int(len(y)), "n_satisfied": int(y.sum())}


def columns(rows: list[dict], readings: list[dict]) -> dict:
    """AUROC with 95% interval on all rows, on EOS-ended rows, and on rows the model decided (not `censored`)."""
    by_id = {r["id"]: r for r in rows}
    y = np.array([r["satisfied"] for r in readings], dtype=int)
    p = np.array([r["p_satisfied"] for r in readings])
    eos = np.array([by_id[r["id"]]["finish_reason"] == "eos" for r in readings])
    decided = np.array([not censored(TASK, r["params"], r["satisfied"], by_id[r["id"]]["finish_reason"])
                        for r in readings])
    return {"all": column("all", y, p), "eos_ended": column("eos", y[eos], p[eos]),
            "model_decided": column("decided", y[decided], p[decided])}


def describe(rows: list[dict]) -> dict:
    """How the rows ended: finish reasons by label, and tokens generated."""
    out: dict = {}
    for r in rows:
        key = f"{r['finish_reason']}_{'satisfied' if r['satisfied'] else 'violated'}"
        out[key] = out.get(key, 0) + 1
    n = [r["n_tokens"] for r in rows]
    return {"finish": dict(sorted(out.items())), "tokens_generated": int(sum(n)), "max_tokens": int(max(n)),
            "median_tokens": float(np.median(n))}


def score(lm, bank, rows: list[dict]) -> dict:
    """The shipped probe's end readings on `rows` (prompts joined from shared/), by the reliability path."""
    prompts = {r["id"]: r for r in ifeval.mapped_rows()}
    joined = [r | {"messages": prompts[r["id"]]["messages"]} for r in rows]
    return reliability.ifeval_metrics(lm, bank, joined, {})[TASK]


def recorded(path: Path) -> dict | None:
    """The shipped probe's recorded IFEval word_count columns (`steerer probes ranges`), for reference."""
    if not path.exists():
        return None
    columns = json.loads(path.read_text())["tasks"][TASK]["columns"]
    return {"source": str(path), **{name: columns[name]["old"] | {"n": columns[name]["n"]}
                                    for name in ("ifeval", "ifeval_model_decided") if name in columns}}


def main(argv: list[str] | None = None) -> int:
    from steerer.bank import ProbeBank
    from steerer.model import load_model

    ap = argparse.ArgumentParser(prog="python -m probes.ifeval_budget", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="reports/ifeval_budget", help="folder for the responses and the report")
    ap.add_argument("--corpus", default="probes/corpora/smollm2-135m-instruct",
                    help="corpus holding the committed IFEval responses (read only)")
    ap.add_argument("--bank", default=None, help="bank to score (default: the shipped bank)")
    ap.add_argument("--capacity", type=int, default=13, help="rows decoded together")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--score-only", action="store_true",
                    help="generate nothing: score the rows written so far (a subset, stated in the report)")
    args = ap.parse_args(argv)
    if args.capacity < 1:
        raise SystemExit("--capacity must be at least 1")
    out = Path(args.out)
    bank = ProbeBank.load(args.bank)
    lm = load_model(bank.model, threads=args.threads)
    new_rows = read_done(out / RESPONSES) if args.score_only else generate(lm, out, args.capacity)
    if not new_rows:
        raise SystemExit(f"no responses in {out / RESPONSES}: run without --score-only first")
    every = [r for r in ifeval.load(Path(args.corpus)) if r["task"] == TASK]
    done = {r["id"] for r in new_rows}
    old_rows = [r for r in every if r["id"] in done]  # the same prompts, answered with 160 tokens
    new, old = score(lm, bank, new_rows), score(lm, bank, old_rows)
    doc = {"command": shlex.join(["python", "-m", "probes.ifeval_budget", *(argv or sys.argv[1:])]),
           "bank": bank.version, "task": TASK, "instruction": "length_constraints:number_words",
           "checker": "steerer.tasks.word_count.check: IFEval's count (maximal \\w+ runs, nltk RegexpTokenizer(r'\\w+')) "
                      "and relations ('less than' n < limit, 'at least' n >= limit)",
           "reading": "shipped probe, teacher-forced end reading (EOS pass, else last generated token), as "
                      "`steerer probes reliability`",
           "budget": f"min(max({FACTOR} x word limit, {old_rows[0]['max_new_tokens']}), {CAP}) tokens",
           "rows": {"answered": len(new_rows), "of": len(every), "complete": len(new_rows) == len(every),
                    "limits": sorted(r["params"]["limit"] for r in new_rows),
                    "subset": None if len(new_rows) == len(every) else
                    f"the {len(new_rows)} rows with the smallest budgets (limits up to "
                    f"{max(r['params']['limit'] for r in new_rows)} words): generation did not reach the rest"},
           "old_recorded": recorded(Path(RECORDED)),
           "old": {"max_new_tokens": old_rows[0]["max_new_tokens"], "responses": str(Path(args.corpus) / ifeval.FILE),
                   "columns": columns(old_rows, old["readings"]), "rows": describe(old_rows)},
           "new": {"responses": str(out / RESPONSES), "columns": columns(new_rows, new["readings"]),
                   "rows": describe(new_rows)},
           "readings": {"old": old["readings"], "new": new["readings"]}}
    (out / "ifeval_budget.json").write_text(json.dumps(doc, indent=1))
    for which in ("old", "new"):
        print(which, "  ".join(f"{k} {c['auroc']} {c['ci']} n {c['n']}" for k, c in doc[which]["columns"].items()))
    print(f"wrote {out / 'ifeval_budget.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
