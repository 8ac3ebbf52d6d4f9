"""`steerer probes score`: generate greedily for a user's own prompts and score them with the bank.

This is how a user evaluates a bank on their data: per row the response, the checker's verdict, the
probe's P(satisfied) at EOS, the per-token P(satisfied) and the first token where a flag was raised.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def parse_row(line: str):
    """(id, Request) or raise ValueError with the reason."""
    from steerer.constraints import Constraint

    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError("row is not a JSON object")
    missing = [k for k in ("id", "prompt", "task") if k not in row]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise ValueError("prompt must be a non-empty string")
    constraint = Constraint(str(row["task"]), row.get("params") or {})
    constraint.validate()
    return row["id"], constraint, row["prompt"]


def score_file(input_path: str, output_path: str, bank_path: str | None = None, model: str | None = None,
               max_new_tokens: int = 128, batch_size: int = 16) -> tuple[int, int]:
    from steerer.bank import ProbeBank
    from steerer.core import Request, Steerer
    from steerer.generation import SamplingParams
    from steerer.model import load_model

    outputs: list[dict | None] = []
    requests, where = [], []
    for n, line in enumerate(Path(input_path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rid, constraint, prompt = parse_row(line)
            requests.append(Request(prompt, (constraint,), sampling=SamplingParams(max_new_tokens), id=f"row{n}"))
            where.append((len(outputs), rid))
            outputs.append(None)
        except (ValueError, KeyError, TypeError) as exc:
            rid = None
            with contextlib.suppress(ValueError, AttributeError):
                rid = json.loads(line).get("id")
            outputs.append({"id": rid, "error": str(exc).strip("'\"")})
    if requests:
        lm = load_model(model)
        bank = ProbeBank.load(bank_path)
        with Steerer(lm, bank, record=True, capacity=max(batch_size, 1)) as steerer:
            results = steerer.run(requests, max_batch=batch_size)
        for (slot, rid), result in zip(where, results, strict=True):
            verdict = result.verdicts[0]
            outputs[slot] = {"id": rid, "response": result.text, "satisfied": verdict.satisfied,
                             "score_eos": round(verdict.p_satisfied_end, 6),
                             "scores": [round(p, 6) for p in result.traces[verdict.task]],
                             "first_flag_token": verdict.first_flag_token}
    Path(output_path).write_text("".join(json.dumps(o) + "\n" for o in outputs))
    errors = sum("error" in o for o in outputs)
    return len(outputs) - errors, errors
