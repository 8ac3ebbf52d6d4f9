"""Throughput cost of monitoring (9 taps + 9 probe scores per token) and steering on the HF backend.

Two paths, each against the plain loop (`generate(HFEngine(lm), ...)`, no hooks):
- `"path": "hooks"`: taps and probe scores (`BankScorer`) or one steered layer (`FixedSteering`) as step
  hooks on the bare loop: the cost of the mechanism.
- `"path": "steerer"`: the full `Steerer` users run (`Steerer.generate`): nine monitored constraints,
  token events with text, flags, verdicts and the checkers at the end; policy `off` for `monitor`,
  `constant` on all nine for `steer`.

Modes run interleaved, repetition by repetition, so the machine's drift hits every mode alike; each
figure is the median over repetitions, and each ratio the median of paired ratios. Every run generates
exactly --new-tokens tokens per row (EOS ignored) so all modes do the same work. `hf_generate` is
transformers' own `generate` on the same prompts, for checking that the plain loop is not slower than it.

    .venv/bin/python benchmarks/overhead_hf.py            # writes benchmarks/results/overhead_hf.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from heldout import GENERIC_PROMPTS as PROMPTS  # benchmarks/heldout.py, beside this script

from steerer.bank import Probe, ProbeBank
from steerer.constraints import Constraint
from steerer.core import Request, Steerer
from steerer.engine.hf import HFEngine
from steerer.generation import SamplingParams, generate
from steerer.model import DEFAULT_MODEL, chat_prompt, load_model, resolve_device
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


def run_mode(lm, mode: str, prompts: list[list[int]], texts: list[str], new_tokens: int, bank: ProbeBank,
             constraints: tuple[Constraint, ...]) -> float:
    """Tokens per second of one run."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    n = len(prompts)
    start = time.perf_counter()
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
        with Steerer(lm, bank, capacity=n) as steerer:
            produced = sum(len(r.tokens) for r in steerer.run(requests))
    else:
        raise ValueError(mode)
    if lm.model.device.type == "cuda":
        torch.cuda.synchronize()
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--paths", default="hooks,steerer", help="which paths to time: hooks, steerer or both")
    parser.add_argument("--output", default=str(RESULTS / "overhead_hf.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(2)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    path_modes = {"hooks": {"monitor": "monitor", "steer": "steer"},
                  "steerer": {"monitor": "steerer_monitor", "steer": "steerer_steer"}}
    modes = ("plain", *(m for p in paths for m in path_modes[p].values()), "hf_generate")
    constraints = nine_constraints()
    cases = []
    for dtype in args.dtypes.split(","):
        lm = load_model(args.model, dtype=dtype, device=device)
        bank = random_bank(lm, [c.task for c in constraints])
        for batch in (int(b) for b in args.batches.split(",")):
            texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            prompts = [chat_prompt(lm.tokenizer, t) for t in texts]
            for mode in modes:  # warm-up (the steerer modes load the checkers' models once)
                run_mode(lm, mode, prompts, texts, 2, bank, constraints)
            speeds: dict[str, list[float]] = {m: [] for m in modes}
            for rep in range(args.repeats):
                order = modes if rep % 2 == 0 else tuple(reversed(modes))
                for mode in order:
                    speeds[mode].append(run_mode(lm, mode, prompts, texts, args.new_tokens, bank, constraints))
            med = {m: statistics.median(v) for m, v in speeds.items()}
            for path in paths:
                for mode, key in path_modes[path].items():
                    # Ratio from paired repetitions (same moment, same drift), then the median of those.
                    ratio = statistics.median(p / x for p, x in zip(speeds["plain"], speeds[key], strict=True))
                    case = {"path": path, "batch": batch, "dtype": dtype, "mode": mode,
                            "tokens_per_s": round(med[key], 2), "plain_tokens_per_s": round(med["plain"], 2),
                            "ratio": round(ratio, 4), "hf_generate_tokens_per_s": round(med["hf_generate"], 2),
                            "plain_vs_hf_generate": round(med["plain"] / med["hf_generate"], 4),
                            "repeats": args.repeats, "new_tokens": args.new_tokens}
                    cases.append(case)
                    print(f"{path:7s} {dtype:9s} batch {batch:3d} {mode:8s} {case['tokens_per_s']:8.1f} tok/s  plain "
                          f"{case['plain_tokens_per_s']:8.1f}  ratio {case['ratio']:.4f}  hf.generate "
                          f"{case['hf_generate_tokens_per_s']:8.1f}  plain/hf {case['plain_vs_hf_generate']:.3f}",
                          flush=True)
    machine = (f"CUDA ({torch.cuda.get_device_name()})" if device.startswith("cuda")
               else "CPU, 2 cores (AVX2), torch.set_num_threads(2)")
    out = {"model": args.model or DEFAULT_MODEL, "machine": machine, "device": device,
           "probe_layers": list(PROBE_LAYERS), "steer_layer": 14,
           "steerer_constraints": [c.task for c in constraints],
           "command": "benchmarks/overhead_hf.py " + " ".join(sys.argv[1:]), "cases": cases}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
