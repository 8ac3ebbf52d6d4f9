"""Throughput cost of monitoring (9 taps + 9 probe scores per token) and steering on the HF backend.

Two paths, each against the plain loop (`generate(HFEngine(lm), ...)`, no hooks):
- `"path": "hooks"`: taps and probe scores (`BankScorer`) or one steered layer (`FixedSteering`) as step
  hooks on the bare loop: the cost of the mechanism.
- `"path": "steerer"`: the full `Steerer` users run (`Steerer.generate`): nine monitored constraints,
  token events with text, flags, verdicts and the checkers at the end; policy `off` for `monitor`,
  `constant` on all nine for `steer`.

The steerer path runs with `check=False` and checks every result after the run on the same thread, in one
batched call (`check_results`), which is the work `check=True` does for a static batch (`finish_all` checks
the rows a pass ends together; here every row ends in the last pass). Each case reports `ratio` (clock
stopped when the verdicts are checked: what `Steerer.run` costs) and `ratio_model_thread` (clock stopped
when the model's thread has the last result: what the model's thread pays when the checks run off it, as
the server's checker thread does); `check_s` is the checks' median time.

Modes run interleaved, repetition by repetition (order reversed every other one), so the machine's drift
hits every mode alike; each figure is the median over repetitions, and each ratio the median of paired
ratios. Every run generates exactly N new tokens per row (EOS ignored) so all modes do the same work; each
token count in --new-tokens is its own case. `load_avg` is the machine's 1-minute load average before and
after each case (others' work on a shared machine shows there). `--clock thread --threads 1` times the CPU
time of the one thread that runs everything (torch included), which others' load barely moves; one thread
makes the forward pass slower, so the same host work is a smaller share of it than with two. `hf_generate` is transformers' own
`generate` on the same prompts, for checking that the plain loop is not slower than it.

    .venv/bin/python benchmarks/overhead_hf.py            # writes benchmarks/results/overhead_hf.json

`--random-config llama-3.1-8b` times a random-weight model of that shape built in memory on the device (no
weights on disk, a word-level tokenizer built from the prompts): what `scripts/gpu-check` runs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from probes.heldout import GENERIC_PROMPTS as PROMPTS
from steerer.bank import Probe, ProbeBank
from steerer.constraints import Constraint
from steerer.controller import check_results
from steerer.core import Request, Result, Steerer
from steerer.engine.hf import HFEngine
from steerer.generation import SamplingParams, generate
from steerer.model import (
    DEFAULT_MODEL,
    DTYPES,
    LoadedModel,
    chat_prompt,
    load_model,
    model_fingerprint,
    resolve_device,
)
from steerer.monitor import BankScorer
from steerer.policy import SteeringPolicy
from steerer.taps import FixedSteering, LayerHooks, LayerSteering, Where, unit_directions

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26)


def nine_constraints() -> tuple[Constraint, ...]:
    """One constraint per task, parameters from each task's own sampler (fixed seed)."""
    import random

    from steerer.tasks import TASKS

    rng = random.Random(0)
    return tuple(Constraint(t, dict(TASKS[t].sample_params(rng, 0.5))) for t in list(TASKS)[:len(PROBE_LAYERS)])


def random_bank(lm, tasks: list[str]) -> ProbeBank:
    """Nine reliable probes on nine layers with random weights: the cost does not depend on the values."""
    g = torch.Generator().manual_seed(0)
    k, d = len(PROBE_LAYERS), lm.hidden_size
    probes = [Probe(task=t, layer=layer, reliable=True) for t, layer in zip(tasks, PROBE_LAYERS, strict=True)]
    return ProbeBank("bench", lm.fingerprint, d, probes, torch.randn(k, d, generator=g) / d**0.5,
                     torch.zeros(k), unit_directions(torch.randn(k, d, generator=g)))


# Shapes for --random-config (transformers' LlamaConfig fields); "tiny" has the probe layers too (CPU dry runs).
RANDOM_CONFIGS = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False),
}


def word_tokenizer(texts: list[str], size: int):
    """A word-level tokenizer over the words of `texts` (at most `size` ids): prompts without a tokenizer
    on disk, for a random-weight model whose outputs nobody reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>"]
    words = sorted({w for t in texts for w in t.split()})[: size - len(specials)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")


def random_model(name: str, dtype: str, device: str) -> LoadedModel:
    """A Llama of shape `RANDOM_CONFIGS[name]` with random weights, initialised on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**RANDOM_CONFIGS[name])
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(default)
    tokenizer = word_tokenizer(list(PROMPTS), config.vocab_size)
    return LoadedModel(model, tokenizer, f"random:{name}", model_fingerprint(model))


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
clock = time.perf_counter  # --clock: wall time, or the CPU time of this thread (with --threads 1: all of torch's)


def run_mode(lm, mode: str, prompts: list[list[int]], texts: list[str], new_tokens: int, bank: ProbeBank,
             constraints: tuple[Constraint, ...]) -> tuple[float, float, float]:
    """(seconds until the model's thread is done, seconds until the verdicts are checked, tokens produced).
    Both times are the same except on the steerer path."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    n = len(prompts)
    start = clock()
    model_done = None
    if mode == "hf_generate":
        enc = lm.tokenizer.pad([{"input_ids": p} for p in prompts], return_tensors="pt", padding_side="left")
        enc = enc.to(lm.model.device)
        with torch.inference_mode():
            out = lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        produced = (out.shape[1] - enc.input_ids.shape[1]) * n
    elif mode == "plain":
        produced = sum(len(g.tokens) for g in generate(HFEngine(lm), prompts, params))
    elif mode == "monitor":
        with LayerHooks(lm.model, tap_layers=bank.layers) as hooks:
            scorer = BankScorer(bank.to(lm.model.device))
            produced = sum(len(g.tokens) for g in generate(HFEngine(lm, hooks), prompts, params, scorer))
    elif mode == "steer":
        steer = LayerSteering(bank.directions[4:5].to(lm.model.device), Where.GENERATED)
        fixed = FixedSteering({14: steer}, {14: torch.full((n, 1), 4.0)})
        with LayerHooks(lm.model, steering={14: steer}) as hooks:
            produced = sum(len(g.tokens) for g in generate(HFEngine(lm, hooks), prompts, params, fixed))
    elif mode in ("steerer_monitor", "steerer_steer"):
        policy = SteeringPolicy("constant", 4.0) if mode == "steerer_steer" else SteeringPolicy()
        requests = [Request(text, constraints, policy, sampling=params, id=f"b{i}") for i, text in enumerate(texts)]
        with Steerer(lm, bank, capacity=n, check=False) as steerer:
            results = [r for r in steerer.generate(requests) if isinstance(r, Result)]  # events are consumed too
        model_done = clock()
        check_results(results)  # what check=True does when a pass ends these rows: one batched call per task
        produced = sum(len(r.tokens) for r in results)
    else:
        raise ValueError(mode)
    if lm.model.device.type == "cuda":
        torch.cuda.synchronize()
    end = clock()
    return (model_done or end) - start, end - start, produced


def paired_ratio(plain: list[float], other: list[float]) -> float:
    """Median over repetitions of plain tokens/s over the mode's (same tokens: its time over plain's)."""
    return statistics.median(x / p for p, x in zip(plain, other, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--random-config", choices=tuple(RANDOM_CONFIGS), default=None,
                        help="a random-weight model of this shape built in memory instead of --model")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--new-tokens", default="32,128", help="comma-separated token counts, one case each")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall: elapsed time; thread: this thread's CPU time (needs --threads 1, so that torch "
                             "computes on this thread): steadier than wall time on a machine shared with other work")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--paths", default="hooks,steerer", help="which paths to time: hooks, steerer or both")
    parser.add_argument("--output", default=str(RESULTS / "overhead_hf.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.clock == "thread" and (args.threads != 1 or device != "cpu"):
        parser.error("--clock thread needs --threads 1 on the CPU (torch's other threads and a GPU go unseen)")
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - {"hooks", "steerer"}
    if unknown or not paths:
        parser.error(f"--paths takes hooks and/or steerer, got {args.paths!r}")
    try:
        token_counts = [int(t) for t in args.new_tokens.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--new-tokens takes comma-separated integers, got {args.new_tokens!r}")
    if not token_counts or min(token_counts) < 1:
        parser.error("--new-tokens needs at least one count, each >= 1")
    path_modes = {"hooks": {"monitor": "monitor", "steer": "steer"},
                  "steerer": {"monitor": "steerer_monitor", "steer": "steerer_steer"}}
    modes = ("plain", *(m for p in paths for m in path_modes[p].values()), "hf_generate")
    constraints = nine_constraints()
    cases = []
    load_start = os.getloadavg()[0]
    for dtype in args.dtypes.split(","):
        if args.random_config:
            lm = random_model(args.random_config, dtype, device)
        else:
            lm = load_model(args.model, dtype=dtype, device=device)
        bank = random_bank(lm, [c.task for c in constraints])
        for batch in (int(b) for b in args.batches.split(",")):
            texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            prompts = [chat_prompt(lm.tokenizer, t) for t in texts]
            for mode in modes:  # warm-up (the steerer modes load the checkers' models once)
                run_mode(lm, mode, prompts, texts, 2, bank, constraints)
            for new_tokens in token_counts:
                load = [os.getloadavg()[0]]
                model_s: dict[str, list[float]] = {m: [] for m in modes}
                total_s: dict[str, list[float]] = {m: [] for m in modes}
                produced = {}
                for rep in range(args.repeats):
                    order = modes if rep % 2 == 0 else tuple(reversed(modes))
                    for mode in order:
                        model, total, produced[mode] = run_mode(lm, mode, prompts, texts, new_tokens, bank,
                                                                constraints)
                        model_s[mode].append(model)
                        total_s[mode].append(total)
                load.append(os.getloadavg()[0])
                if len(set(produced.values())) != 1:
                    raise RuntimeError(f"modes produced different token counts: {produced}")
                speed = {m: produced[m] / statistics.median(v) for m, v in total_s.items()}
                plain = total_s["plain"]
                for path in paths:
                    for mode, key in path_modes[path].items():
                        # Ratios from paired repetitions (same moment, same drift), then the median of those.
                        case = {"path": path, "batch": batch, "dtype": dtype, "mode": mode, "new_tokens": new_tokens,
                                "tokens_per_s": round(speed[key], 2), "plain_tokens_per_s": round(speed["plain"], 2),
                                "ratio": round(paired_ratio(plain, total_s[key]), 4),
                                "ratio_model_thread": round(paired_ratio(plain, model_s[key]), 4),
                                "check_s": round(statistics.median(t - m for t, m in zip(total_s[key], model_s[key],
                                                                                          strict=True)), 4),
                                "hf_generate_tokens_per_s": round(speed["hf_generate"], 2),
                                "plain_vs_hf_generate": round(speed["plain"] / speed["hf_generate"], 4),
                                "repeats": args.repeats, "load_avg": [round(x, 2) for x in load]}
                        cases.append(case)
                        print(f"{path:7s} {dtype:9s} batch {batch:3d} tokens {new_tokens:4d} {mode:8s} "
                              f"{case['tokens_per_s']:8.1f} tok/s  plain {case['plain_tokens_per_s']:8.1f}  "
                              f"ratio {case['ratio']:.4f}  model thread {case['ratio_model_thread']:.4f}  "
                              f"plain/hf {case['plain_vs_hf_generate']:.3f}  load {load[0]:.2f}-{load[1]:.2f}",
                              flush=True)
    machine = (f"CUDA ({torch.cuda.get_device_name()})" if device.startswith("cuda")
               else f"CPU, {os.cpu_count()} cores, torch.set_num_threads({args.threads})")
    model_name = f"random:{args.random_config}" if args.random_config else args.model or DEFAULT_MODEL
    out = {"model": model_name, "machine": machine, "device": device,
           "probe_layers": list(PROBE_LAYERS), "steer_layer": 14,
           "steerer_constraints": [c.task for c in constraints],
           "checks": "steerer path: check=False, then one batched check_results on the same thread (= check=True "
                     "for a static batch); ratio includes it, ratio_model_thread stops before it",
           "clock": args.clock, "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)],
           "command": "benchmarks/overhead_hf.py " + " ".join(sys.argv[1:]), "cases": cases}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
