"""Offline fluency: the unsteered model's perplexity of each logged response, cached in the outcome log.

Why offline: scoring a response under the unsteered model is one more forward pass over prompt + response,
which the server would otherwise run on its model thread for every steered response. `steerer ab report
--model M` runs it for the records that lack it, in batches (teacher-forced, no hooks, EOS not scored), and
stores the mean NLL per response token with M's weight fingerprint, so later reports reuse it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

import torch

from steerer.ab.outcomes import _transaction
from steerer.model import LoadedModel, chat_prompt


@torch.inference_mode()
def response_nll(
    lm: LoadedModel, prompts: Sequence[list[int]], responses: Sequence[list[int]], batch_size: int = 16,
    on_batch=None,
) -> list[float | None]:
    """Mean NLL per response token under the model as loaded; None for an empty response. `on_batch(n)` is
    called after each batch of n responses (a progress bar)."""
    out: list[float | None] = [None] * len(prompts)
    order = sorted(
        (i for i in range(len(prompts)) if responses[i]), key=lambda i: len(prompts[i]) + len(responses[i])
    )
    pad = int(lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0)
    device = next(lm.model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        seqs = [prompts[i] + responses[i] for i in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)  # positions whose *next* token is scored
        for row, i in enumerate(chunk):  # right padding: real tokens keep positions 0..n-1
            n = len(seqs[row])
            ids[row, :n] = torch.tensor(seqs[row])
            mask[row, :n] = 1
            scored[row, len(prompts[i]) - 1 : n - 1] = True
        logits = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        per_row = (nll * scored[:, :-1]).sum(1) / scored[:, :-1].sum(1)
        for row, i in enumerate(chunk):
            out[i] = float(per_row[row])
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def scored_tokens(lm: LoadedModel, token_ids: Sequence[int]) -> list[int]:
    """The response tokens to score: all but a closing EOS (the end marker is not prose)."""
    eos = lm.tokenizer.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list | tuple) else {eos}
    return list(token_ids[:-1]) if token_ids and token_ids[-1] in eos_ids else list(token_ids)


def fill_perplexity(
    db: sqlite3.Connection, lm: LoadedModel, outcome_ids: Sequence[int] | None = None, batch_size: int = 16
) -> int:
    """Score every record (or those in `outcome_ids`) not yet scored by this model; returns how many."""
    rows = db.execute(
        "SELECT o.id, o.prompt, o.system, o.token_ids FROM outcomes o WHERE NOT EXISTS "
        "(SELECT 1 FROM perplexity p WHERE p.outcome_id = o.id AND p.model = ?) ORDER BY o.id",
        (lm.fingerprint,),
    ).fetchall()
    if outcome_ids is not None:
        wanted = set(outcome_ids)
        rows = [r for r in rows if r["id"] in wanted]
    if not rows:
        return 0
    prompts = [chat_prompt(lm.tokenizer, json.loads(r["prompt"]), r["system"]) for r in rows]
    responses = [scored_tokens(lm, json.loads(r["token_ids"])) for r in rows]
    nll = response_nll(lm, prompts, responses, batch_size)
    with _transaction(db):
        db.executemany(
            "INSERT OR REPLACE INTO perplexity VALUES (?, ?, ?, ?)",
            [
                (r["id"], lm.fingerprint, v, len(resp))
                for r, v, resp in zip(rows, nll, responses, strict=True)
            ],
        )
    return len(rows)
