"""Throughput cost of monitoring (9 taps + 9 probe scores per token) and steering on the HF backend.

Modes run interleaved, repetition by repetition, so the machine's drift hits every mode alike; each
figure is the median over repetitions. Every run generates exactly --new-tokens tokens per row (EOS
ignored) so all modes do the same work. `hf_generate` is transformers' own `generate` on the same
prompts, for checking that the plain loop is not slower than it.

    .venv/bin/python benchmarks/overhead_hf.py            # writes benchmarks/results/overhead_hf.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from heldout import GENERIC_PROMPTS as PROMPTS  # benchmarks/heldout.py, beside this script

from steerer.bank import Probe, ProbeBank
from steerer.engine.hf import HFEngine
from steerer.generation import SamplingParams, generate
from steerer.model import DEFAULT_MODEL, chat_prompt, load_model
from steerer.monitor import BankScorer
from steerer.taps import FixedSteering, LayerHooks, LayerSteering, Where, unit_directions

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26)


def random_bank(lm) -> ProbeBank:
    """Nine probes on nine layers with random weights: the cost does not depend on the values."""
    g = torch.Generator().manual_seed(0)
    k, d = len(PROBE_LAYERS), lm.hidden_size
    probes = [Probe(task=f"task{i}", layer=layer) for i, layer in enumerate(PROBE_LAYERS)]
    return ProbeBank("bench", lm.fingerprint, d, probes, torch.randn(k, d, generator=g) / d**0.5,
                     torch.zeros(k), unit_directions(torch.randn(k, d, generator=g)))


def run_mode(lm, mode: str, prompts: list[list[int]], new_tokens: int, bank: ProbeBank) -> float:
    """Tokens per second of one run."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    n = len(prompts)
    start = time.perf_counter()
    if mode == "hf_generate":
        enc = lm.tokenizer.pad([{"input_ids": p} for p in prompts], return_tensors="pt", padding_side="left")
        with torch.inference_mode():
            out = lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        produced = (out.shape[1] - enc.input_ids.shape[1]) * n
    elif mode == "plain":
        produced = sum(len(g.tokens) for g in generate(HFEngine(lm), prompts, params))
    elif mode == "monitor":
        with LayerHooks(lm.model, tap_layers=bank.layers) as hooks:
            scorer = BankScorer(bank)
            produced = sum(len(g.tokens) for g in generate(HFEngine(lm, hooks), prompts, params, scorer))
    elif mode == "steer":
        steer = LayerSteering(bank.directions[4:5], Where.GENERATED)
        fixed = FixedSteering({14: steer}, {14: torch.full((n, 1), 4.0)})
        with LayerHooks(lm.model, steering={14: steer}) as hooks:
            produced = sum(len(g.tokens) for g in generate(HFEngine(lm, hooks), prompts, params, fixed))
    else:
        raise ValueError(mode)
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS / "overhead_hf.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    modes = ("plain", "monitor", "steer", "hf_generate")
    cases = []
    for dtype in args.dtypes.split(","):
        lm = load_model(args.model, dtype=dtype)
        bank = random_bank(lm)
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = [chat_prompt(lm.tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
            run_mode(lm, "plain", prompts, 4, bank)  # warm-up
            speeds: dict[str, list[float]] = {m: [] for m in modes}
            for rep in range(args.repeats):
                order = modes if rep % 2 == 0 else tuple(reversed(modes))
                for mode in order:
                    speeds[mode].append(run_mode(lm, mode, prompts, args.new_tokens, bank))
            med = {m: statistics.median(v) for m, v in speeds.items()}
            for mode in ("monitor", "steer"):
                # Ratio from paired repetitions (same moment, same drift), then the median of those.
                ratio = statistics.median(p / x for p, x in zip(speeds["plain"], speeds[mode], strict=True))
                case = {"batch": batch, "dtype": dtype, "mode": mode, "tokens_per_s": round(med[mode], 2),
                        "plain_tokens_per_s": round(med["plain"], 2), "ratio": round(ratio, 4),
                        "hf_generate_tokens_per_s": round(med["hf_generate"], 2),
                        "plain_vs_hf_generate": round(med["plain"] / med["hf_generate"], 4),
                        "repeats": args.repeats, "new_tokens": args.new_tokens}
                cases.append(case)
                print(f"{dtype:9s} batch {batch:3d} {mode:8s} {case['tokens_per_s']:8.1f} tok/s  plain "
                      f"{case['plain_tokens_per_s']:8.1f}  ratio {case['ratio']:.4f}  hf.generate "
                      f"{case['hf_generate_tokens_per_s']:8.1f}  plain/hf {case['plain_vs_hf_generate']:.3f}", flush=True)
    out = {"model": args.model or DEFAULT_MODEL,
           "machine": "CPU, 2 cores (AVX2), torch.set_num_threads(2)",
           "probe_layers": list(PROBE_LAYERS), "steer_layer": 14, "cases": cases}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
