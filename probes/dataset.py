"""On-policy probe dataset: the model's own responses to constrained prompts, labelled by the checkers,
with the residual stream of every layer at fixed positions of each response.

Labels come from sampling the model (several samples per prompt at temperature > 0) on prompts whose
parameters run from easy to hard, half of them with a compliance aid (system rule, repeated
instruction or a one-shot demonstration) so a weak model complies on some and fails on others.

Layout of an output folder (resumable: finished chunks are skipped on a rerun):
    manifest.json                      model, fingerprint, layers, positions, per-task counts
    chunks/{task}/{NNNN}.safetensors   positions [N, P, L, d] fp16; tokens [sum T, Lt, d] fp16; offsets [N+1]
    chunks/{task}/{NNNN}.jsonl         one row per response: params, split, response, label, indices
"""

from __future__ import annotations

import json
import random
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from probes.templates import AIDS, BASE_REQUESTS, prompt_messages, split_base_requests
from steerer.engine.hf import HFEngine
from steerer.generation import RunningBatch, SamplingParams, StepView
from steerer.model import LoadedModel, chat_prompt
from steerer.taps import LayerHooks
from steerer.tasks import LONG_TOKEN_BUDGET, TASKS, TOKEN_BUDGET

POSITIONS = ("last_prompt", "first", *(f"body{i}" for i in range(10)), "eos")
SPLIT_SEED = 13


@dataclass(frozen=True)
class BuildConfig:
    tasks: tuple[str, ...] = tuple(TASKS)
    prompts_per_task: int = 120  # base requests per task (all of them at most)
    samples_per_prompt: int | None = None  # None: 2 for structural tasks, 1 for lexical and semantic ones
    max_new_tokens: int = LONG_TOKEN_BUDGET  # for tasks whose labels need the whole response (length)
    max_new_tokens_other: int | None = TOKEN_BUDGET  # enough to judge format, words and tone; None = max_new_tokens
    temperature: float = 0.7
    aid_fraction: float = 0.5
    layers: tuple[int, ...] | None = None  # None = every layer
    token_layers: tuple[int, ...] | None = None  # every-token residuals at these layers; None = every 3rd
    batch_size: int = 48
    seed: int = 0


def plan_rows(config: BuildConfig) -> dict[str, list[dict]]:
    """Deterministic prompt plan per task: base request, params (easy..hard), aid, sample seed, split."""
    train_ids, test_ids = split_base_requests(SPLIT_SEED)
    split_of = {**dict.fromkeys(train_ids, "train"), **dict.fromkeys(test_ids, "test")}
    plan: dict[str, list[dict]] = {}
    for t, task_id in enumerate(config.tasks):
        task = TASKS[task_id]
        rng = random.Random(config.seed * 1000 + t)
        bases = list(BASE_REQUESTS)
        rng.shuffle(bases)
        rows = []
        for p, base in enumerate(bases[: config.prompts_per_task]):
            difficulty = (p + rng.random()) / config.prompts_per_task
            params = task.sample_params(rng, difficulty)
            aid = rng.choice(sorted(AIDS)) if rng.random() < config.aid_fraction else None
            for s in range(samples_for(config, task_id)):
                rows.append({"id": f"{task_id}:{base.id}:{s}", "task": task_id, "base_id": base.id,
                             "split": split_of[base.id], "params": params, "aid": aid, "sample": s,
                             "seed": rng.randrange(2**31), "difficulty": round(difficulty, 3),
                             "messages": prompt_messages(task_id, base, params, aid)})
        plan[task_id] = rows
    return plan


# Tasks whose labels need the whole response (their `Task.token_budget` is the long one): the length tasks.
LENGTH_TASKS = tuple(t for t, task in TASKS.items() if task.token_budget > TOKEN_BUDGET)


def samples_for(config: BuildConfig, task_id: str) -> int:
    """Resampling is where the small model's rare structural compliance (lowercase, JSON) comes from;
    lexical and semantic labels already vary across prompts, so one sample each buys more prompts."""
    if config.samples_per_prompt is not None:
        return config.samples_per_prompt
    return 2 if TASKS[task_id].kind == "structural" else 1


def token_budget(config: BuildConfig, task_id: str) -> int:
    """New tokens for a task's responses: `Task.token_budget` says whether its label needs the whole response
    (`config.max_new_tokens`) or not (`config.max_new_tokens_other`); the config sets the two numbers."""
    if TASKS[task_id].token_budget > TOKEN_BUDGET or config.max_new_tokens_other is None:
        return config.max_new_tokens
    return config.max_new_tokens_other


class ResidualRecorder:
    """Step hooks that keep, per row, the residual at every tapped layer for every pass (fp16)."""

    def __init__(self, layers: tuple[int, ...]):
        self.layers = layers
        self.traces: dict[Hashable, list[tuple[int, torch.Tensor]]] = {}

    def before_forward(self, rows, index) -> None:
        pass

    def after_forward(self, view: StepView) -> None:
        stacked = torch.stack([view.residuals[layer] for layer in self.layers], dim=1).half().cpu()  # [B, L, d]
        for i, row in enumerate(view.rows):
            self.traces.setdefault(row, []).append((int(view.index[i]), stacked[i]))


def position_indices(n_tokens: int, ended_by_eos: bool) -> list[int]:
    """Residual indices for POSITIONS: -1 = last prompt token; i = generated token i; EOS = n_tokens."""
    last = n_tokens if ended_by_eos else max(n_tokens - 2, 0)
    body_end = max(last - 1, 1) if ended_by_eos else max(last, 1)
    body = np.linspace(min(1, body_end), body_end, 10).round().astype(int).tolist()
    return [-1, min(0, last), *(min(b, last) for b in body), last]


def build(lm: LoadedModel, out: Path, config: BuildConfig, progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    layers = config.layers or tuple(range(lm.num_layers))
    token_layers = config.token_layers or tuple(range(0, lm.num_layers, 3))
    plan = plan_rows(config)
    total = sum(len(rows) for rows in plan.values())
    bar = tqdm(total=total, desc="probe dataset", unit="resp", disable=not progress)
    for task_id, rows in plan.items():
        for start in range(0, len(rows), config.batch_size):
            chunk = out / "chunks" / task_id / f"{start // config.batch_size:04d}"
            batch_rows = rows[start: start + config.batch_size]
            if chunk.with_suffix(".jsonl").exists():
                bar.update(len(batch_rows))
                continue
            _build_chunk(lm, chunk, batch_rows, layers, token_layers, config)
            bar.update(len(batch_rows))
    bar.close()
    manifest = summarise(out, lm, layers, token_layers, config)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _build_chunk(lm: LoadedModel, chunk: Path, rows: list[dict], layers: tuple[int, ...],
                 token_layers: tuple[int, ...], config: BuildConfig) -> None:
    tap = sorted(set(layers) | set(token_layers))
    recorder = ResidualRecorder(tuple(tap))
    with LayerHooks(lm.model, tap_layers=tap) as hooks:
        batch = RunningBatch(HFEngine(lm, hooks), recorder, tap_eos=True)
        prompts = [chat_prompt(lm.tokenizer, r["messages"]) for r in rows]
        params = [SamplingParams(token_budget(config, r["task"]), config.temperature, 1.0, r["seed"]) for r in rows]
        done = batch.add(list(range(len(rows))), prompts, params)
        while len(batch):
            done += batch.step()
    layer_pos = [tap.index(layer) for layer in layers]
    token_pos = [tap.index(layer) for layer in token_layers]
    positions, tokens, offsets, meta = [], [], [0], []
    for generation in sorted(done, key=lambda g: g.row):
        row = rows[generation.row]
        trace = dict(recorder.traces[generation.row])
        ended_by_eos = generation.finish_reason == "eos"
        indices = position_indices(len(generation.tokens), ended_by_eos)
        positions.append(torch.stack([trace[i][layer_pos] for i in indices]))  # [P, L, d]
        generated = [trace[i][token_pos] for i in sorted(trace) if i >= 0]
        tokens.append(torch.stack(generated) if generated else torch.zeros(0, len(token_pos), lm.hidden_size).half())
        offsets.append(offsets[-1] + len(generated))
        response = lm.tokenizer.decode(generation.tokens, skip_special_tokens=True)
        meta.append({k: v for k, v in row.items() if k != "messages"} | {
            "prompt": row["messages"][-1]["content"], "response": response,
            "satisfied": bool(TASKS[row["task"]].check(response, row["params"])),
            "n_tokens": len(generation.tokens), "finish_reason": generation.finish_reason,
            "position_indices": indices, "token_ids": generation.tokens})
    chunk.parent.mkdir(parents=True, exist_ok=True)
    save_file({"positions": torch.stack(positions).contiguous(), "tokens": torch.cat(tokens).contiguous(),
               "offsets": torch.tensor(offsets, dtype=torch.long)}, str(chunk.with_suffix(".safetensors")))
    tmp = chunk.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in meta))
    tmp.rename(chunk.with_suffix(".jsonl"))  # the .jsonl marks the chunk complete


def summarise(out: Path, lm: LoadedModel, layers, token_layers, config: BuildConfig) -> dict:
    tasks = {}
    for task_id in config.tasks:
        rows = [r for r in iter_rows(out, task_id)]
        n = len(rows)
        tasks[task_id] = {
            "n": n, "compliance_rate": round(sum(r["satisfied"] for r in rows) / max(n, 1), 4),
            "n_train": sum(r["split"] == "train" for r in rows), "n_test": sum(r["split"] == "test" for r in rows),
            "compliance_by_aid": {str(a): round(float(np.mean([r["satisfied"] for r in rows if r["aid"] == a])), 4)
                                  for a in sorted({r["aid"] for r in rows}, key=str)},
            "ended_by_eos": round(sum(r["finish_reason"] == "eos" for r in rows) / max(n, 1), 4),
        }
    return {"model": lm.name, "fingerprint": lm.fingerprint, "hidden_size": lm.hidden_size,
            "layers": list(layers), "token_layers": list(token_layers), "positions": list(POSITIONS),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
            "split_seed": SPLIT_SEED, "tasks": tasks}


def iter_rows(out: Path, task_id: str):
    for meta in sorted((out / "chunks" / task_id).glob("*.jsonl")):
        for line in meta.read_text().splitlines():
            yield json.loads(line)


@dataclass
class TaskData:
    """Everything stored for one task, loaded into memory (fp32 positions)."""

    rows: list[dict]
    positions: torch.Tensor  # [N, P, L, d]
    tokens: torch.Tensor  # [sum T, Lt, d]
    offsets: torch.Tensor  # [N+1]

    @property
    def labels(self) -> np.ndarray:
        return np.array([r["satisfied"] for r in self.rows], dtype=int)

    @property
    def split(self) -> np.ndarray:
        return np.array([r["split"] for r in self.rows])

    @property
    def groups(self) -> np.ndarray:
        return np.array([r["base_id"] for r in self.rows])


def load_task(out: Path, task_id: str) -> TaskData:
    rows, positions, tokens, offsets = [], [], [], [0]
    for meta in sorted((out / "chunks" / task_id).glob("*.jsonl")):
        tensors = load_file(str(meta.with_suffix(".safetensors")))
        rows += [json.loads(line) for line in meta.read_text().splitlines()]
        positions.append(tensors["positions"])
        tokens.append(tensors["tokens"])
        offsets += (tensors["offsets"][1:] + offsets[-1]).tolist()
    if not rows:
        raise FileNotFoundError(f"no dataset chunks for task {task_id!r} under {out}")
    return TaskData(rows, torch.cat(positions).float(), torch.cat(tokens), torch.tensor(offsets))
