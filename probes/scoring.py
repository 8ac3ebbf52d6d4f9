"""`steerer probes score`: generate greedily for a user's own prompts and score them with the bank.

This is how a user evaluates a bank on their data: per row its id, task and params, the response, the
checker's verdict, the probe's P(satisfied) at EOS (null where there was no reading), the per-token
P(satisfied) and the first token where a flag was raised. A progress bar on stderr counts rows done.
"""

from __future__ import annotations

import contextlib
import json
import math
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


def score_row(rid, constraint, result) -> dict:
    """One output row: the input's id, task and params beside the response and its readings, so a user
    can rate the bank without joining back to the input."""
    verdict = result.verdicts[0]
    p_end = verdict.p_satisfied_end
    return {"id": rid, "task": constraint.task, "params": dict(constraint.params), "response": result.text,
            "satisfied": verdict.satisfied, "score_eos": round(p_end, 6) if p_end is not None and math.isfinite(p_end) else None,
            "scores": [round(p, 6) for p in result.traces[verdict.task]],
            "first_flag_token": verdict.first_flag_token}


def score_file(input_path: str, output_path: str, bank_path: str | None = None, model: str | None = None,
               max_new_tokens: int = 128, batch_size: int = 16, progress: bool = True,
               device: str = "cpu") -> tuple[int, int]:
    from tqdm import tqdm

    from steerer.bank import ProbeBank
    from steerer.core import Request, Result, Steerer
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
        lm = load_model(model, device=device)
        bank = ProbeBank.load(bank_path)
        results: dict[str, Result] = {}
        # Evaluating a bank means reading every probe, reliable or not: nothing is muted here.
        with Steerer(lm, bank, record=True, capacity=max(batch_size, 1), use_unreliable_probes=True) as steerer, \
                tqdm(total=len(requests), desc="score", unit="row", disable=not progress) as bar:
            for item in steerer.generate(requests, max_batch=batch_size):
                if isinstance(item, Result):
                    results[item.request_id] = item
                    bar.update()
        for request, (slot, rid) in zip(requests, where, strict=True):
            outputs[slot] = score_row(rid, request.constraints[0], results[request.id])
    Path(output_path).write_text("".join(json.dumps(o) + "\n" for o in outputs))
    errors = sum("error" in o for o in outputs)
    return len(outputs) - errors, errors
