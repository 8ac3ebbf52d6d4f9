"""Throughput cost of steerer on vLLM (CPU build, compiled, fp32): plain vLLM vs the plugin with steerer's loop.

Modes, each generating exactly --new-tokens tokens per row (EOS ignored), same prompts:
- `plain`: plain vLLM (its own Llama), `LLM.generate` -- the baseline, in its fastest configuration here
  (compiled, OpenMP thread bound);
- `plugin_idle`: the steerer architecture (the op at the bank's nine layers), requests not managed by
  steerer (`LLM.generate`): the cost of the op calls when they do nothing;
- `monitor`: `VLLMSteerer` with nine constraints on nine probes at nine layers, policy off (taps, probe
  scores, flags, token events, detokenising, verdicts; checkers off, as the server runs them off-thread);
- `steer`: the same with constant steering on all nine.

Both engines live in this process (engine cores in-process), so the modes run interleaved, repetition by
repetition (order reversed every other one); figures are medians, `ratio` the median over repetitions of
time(mode) / time(plain) for the same tokens (1.0 = no overhead, higher = slower).

Threads: `--threads` (default 1) torch intra-op threads for the whole process, both engines alike. vLLM
itself reduces serving to one thread, but in-process start-up leaves torch at the core count; two
OpenMP threads spin-waiting on a 2-core machine shared with other jobs made every small op wait for a
descheduled thread (the first run's batch-1 figures: 1.5 tok/s).

    /work/vllm-venv/bin/python benchmarks/overhead_vllm.py    # writes benchmarks/results/overhead_vllm.json
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

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26)
PROMPTS = ("Name three colors.", "Describe the ocean in two sentences.", "Write a haiku about autumn leaves.",
           "Give me one tip for learning a new language.", "Explain what a probe is in one paragraph.",
           "List four fruits and their colors.", "Summarise the plot of a fairy tale.", "Describe a sunny day.")


def random_bank(tasks: list[str], hidden: int, fingerprint: str):
    from steerer.bank import Probe, ProbeBank
    from steerer.taps import unit_directions

    g = torch.Generator().manual_seed(0)
    k = len(PROBE_LAYERS)
    probes = [Probe(task=t, layer=layer, reliable=True) for t, layer in zip(tasks, PROBE_LAYERS, strict=True)]
    return ProbeBank("bench", fingerprint, hidden, probes, torch.randn(k, hidden, generator=g) / hidden**0.5,
                     torch.zeros(k), unit_directions(torch.randn(k, hidden, generator=g)))


def nine_constraints():
    import random

    from steerer.constraints import Constraint
    from steerer.tasks import TASKS

    rng = random.Random(0)
    return tuple(Constraint(t, dict(TASKS[t].sample_params(rng, 0.5))) for t in list(TASKS)[:len(PROBE_LAYERS)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both engines)")
    parser.add_argument("--op-layers", default="bank", choices=["bank", "all"],
                        help="decoder layers that call steerer's op: the bank's nine (default) or all 30")
    parser.add_argument("--output", default=str(RESULTS / "overhead_vllm.json"))
    args = parser.parse_args()

    from steerer.engine.vllm.driver import ENVIRONMENT, VLLMSteerer, configure_environment, use_threads

    torch.set_num_threads(args.threads)
    configure_environment()
    load_before = os.getloadavg()
    from vllm import LLM
    from vllm import SamplingParams as VLLMSampling

    from steerer.core import Request
    from steerer.engine.vllm.plugin import register
    from steerer.generation import SamplingParams
    from steerer.model import chat_prompt, resolve_model_path
    from steerer.policy import SteeringPolicy

    batches = [int(b) for b in args.batches.split(",")]
    common = {"dtype": "float32", "enforce_eager": args.eager, "max_model_len": 1024,
              "max_num_seqs": max(batches), "gpu_memory_utilization": 0.3, "seed": 0}
    path = resolve_model_path(None)
    register()
    plain_llm = LLM(model=path, enable_prefix_caching=True, async_scheduling=False, **common)
    constraints = nine_constraints()
    hidden = plain_llm.llm_engine.model_config.hf_config.hidden_size
    bank = random_bank([c.task for c in constraints], hidden, "bench")
    layers_total = plain_llm.llm_engine.model_config.hf_config.num_hidden_layers
    op_layers = PROBE_LAYERS if args.op_layers == "bank" else tuple(range(layers_total))
    steerer = VLLMSteerer(bank, check_bank=False, check=False, capacity=max(batches), max_num_seqs=max(batches),
                          max_model_len=1024, enforce_eager=args.eager, threads=args.threads, layers=op_layers)
    use_threads(args.threads)
    tokenizer = steerer.tokenizer
    params = VLLMSampling(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.0, detokenize=False)

    def run(mode: str, texts: list[str], new_tokens: int) -> float:
        start = time.perf_counter()
        if mode in ("plain", "plugin_idle"):
            llm = plain_llm if mode == "plain" else steerer.llm
            prompts = [{"prompt_token_ids": chat_prompt(tokenizer, t)} for t in texts]
            p = params.clone()
            p.max_tokens = new_tokens
            outs = llm.generate(prompts, p, use_tqdm=False)
            produced = sum(len(o.outputs[0].token_ids) for o in outs)
        else:
            policy = SteeringPolicy("constant", 4.0) if mode == "steer" else SteeringPolicy()
            sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            requests = [Request(t, constraints, policy, sampling=sampling, id=f"b{i}") for i, t in enumerate(texts)]
            produced = sum(len(r.tokens) for r in steerer.run(requests))
        return produced / (time.perf_counter() - start)

    modes = ("plain", "plugin_idle", "monitor", "steer")
    cases = []
    for batch in batches:
        texts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})") for i in range(batch)]
        for mode in modes:
            run(mode, texts, 2)  # warm-up
        speeds: dict[str, list[float]] = {m: [] for m in modes}
        for rep in range(args.repeats):
            for mode in (modes if rep % 2 == 0 else tuple(reversed(modes))):
                speeds[mode].append(run(mode, texts, args.new_tokens))
        for mode in modes[1:]:
            ratio = statistics.median(p / x for p, x in zip(speeds["plain"], speeds[mode], strict=True))
            case = {"path": "vllm", "batch": batch, "dtype": "float32", "mode": mode,
                    "tokens_per_s": round(statistics.median(speeds[mode]), 2),
                    "plain_tokens_per_s": round(statistics.median(speeds["plain"]), 2), "ratio": round(ratio, 4),
                    "repeats": args.repeats, "new_tokens": args.new_tokens}
            cases.append(case)
            print(f"batch {batch:3d} {mode:12s} {case['tokens_per_s']:8.1f} tok/s  plain "
                  f"{case['plain_tokens_per_s']:8.1f}  ratio {case['ratio']:.4f}", flush=True)
    import vllm

    out = {"model": "smollm2-135m-instruct",
           "machine": f"CPU, {os.cpu_count()} cores (AVX2), shared with other jobs: load average "
                      f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after",
           "device": "cpu", "probe_layers": list(PROBE_LAYERS), "steerer_constraints": [c.task for c in constraints],
           "ratio": "median over repetitions of time(mode) / time(plain vLLM) for the same tokens; 1.0 = no overhead",
           "configuration": {"vllm": vllm.__version__, "torch": torch.__version__, "compiled": not args.eager,
                             "threads": args.threads, "op_layers": list(op_layers),
                             "environment": {k: os.environ.get(k) for k in ENVIRONMENT}, **common},
           "command": "benchmarks/overhead_vllm.py " + " ".join(sys.argv[1:]), "cases": cases}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
