"""IFEval's own prompts as an out-of-distribution evaluation set (never for training, tuning or choosing).

The rows of ``../shared/ifeval/input_data.jsonl`` whose instructions map onto a task (number_words ->
word_count, forbidden_words -> term_exclusion, existence -> keyword_inclusion, json_format, english_lowercase
-> lowercase) are answered by the model once (greedy, the task's token budget, as the service would) and
labelled by the project's checkers, which reproduce IFEval's strict rules (tests/test_checkers.py checks them
against lm-eval's verdicts). Only the responses are committed (``{corpus}/eval/ifeval.jsonl.gz``: key,
instruction, params, token ids, response, label); the prompts are read from ``shared/`` at load time, so
IFEval's data is never copied into the repository.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from probes.tasks import TASKS

IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "ifeval"
MAPPED = {
    "length_constraints:number_words": "word_count",
    "keywords:forbidden_words": "term_exclusion",
    "keywords:existence": "keyword_inclusion",
    "detectable_format:json_format": "json_format",
    "change_case:english_lowercase": "lowercase",
}
FILE = Path("eval") / "ifeval.jsonl.gz"
TASK = "ifeval"  # its name in a features cache (rows of every task together)


def task_params(instruction: str, kwargs: dict) -> dict:
    """The task's params for one IFEval instruction's kwargs."""
    if instruction == "length_constraints:number_words":
        return {"relation": kwargs["relation"], "limit": int(kwargs["num_words"])}
    if instruction == "keywords:forbidden_words":
        return {"terms": list(kwargs["forbidden_words"])}
    if instruction == "keywords:existence":
        return {"terms": list(kwargs["keywords"])}
    return {}


def mapped_rows(folder: Path = IFEVAL) -> list[dict]:
    """One row per (IFEval prompt, mapped instruction): id, task, params, instruction, key, messages."""
    path = folder / "input_data.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"IFEval data not found at {path} (shared/ifeval beside the checkout)")
    rows = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        for instruction, kwargs in zip(item["instruction_id_list"], item["kwargs"], strict=True):
            if instruction in MAPPED:
                rows.append({"id": f"ifeval:{item['key']}:{instruction.split(':')[1]}", "task": MAPPED[instruction],
                             "params": task_params(instruction, kwargs), "instruction": instruction,
                             "key": item["key"], "messages": [{"role": "user", "content": item["prompt"]}]})
    return rows


def generate(lm, corpus: Path, batch_size: int = 32, tasks=None) -> Path:
    """Answer every mapped row (greedy; of `tasks` only, when given) and write the labelled responses (without
    prompts) under `corpus`."""
    from probes.corpus import generate_rows
    from steerer.engine.hf import HFEngine

    rows = [r | {"max_new_tokens": TASKS[r["task"]].token_budget, "temperature": 0.0, "seed": 0}
            for r in mapped_rows() if tasks is None or r["task"] in tasks]
    labelled = generate_rows(lm, HFEngine(lm), rows, batch_size)
    path = corpus / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = ("id", "task", "params", "instruction", "key", "max_new_tokens", "response", "token_ids", "n_tokens",
            "finish_reason", "satisfied", "onset")
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt") as f:
        for row in labelled:
            f.write(json.dumps({k: row[k] for k in keep}) + "\n")
    tmp.rename(path)
    return path


def load(corpus: Path, folder: Path = IFEVAL) -> list[dict]:
    """The committed responses joined with their prompts from shared/ (rows of both, same ids)."""
    path = corpus / FILE
    if not path.exists():
        raise FileNotFoundError(f"no IFEval responses at {path}: run `steerer probes ifeval`")
    prompts = {r["id"]: r for r in mapped_rows(folder)}
    with gzip.open(path, "rt") as f:
        return [json.loads(line) | {"messages": prompts[json.loads(line)["id"]]["messages"]} for line in f]
