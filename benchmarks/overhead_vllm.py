"""Throughput cost of steerer on vLLM (CPU build, compiled, fp32): plain vLLM vs the plugin with steerer's loop.

Modes, each generating exactly --new-tokens tokens per row (EOS ignored), same prompts:
- `plain`: plain vLLM (its own model class), `LLM.generate` -- the baseline, in its fastest configuration here
  (compiled, OpenMP thread bound);
- `plugin_idle`: the steerer architecture (the op at the bank's layers), requests not managed by
  steerer (`LLM.generate`): the cost of the op calls when they do nothing;
- `monitor`: `VLLMSteerer` with nine constraints on nine probes at the bank's layers, policy off (taps, probe
  scores, flags, token events, detokenising, verdicts; checkers off, as the server runs them off-thread);
- `steer`: the same with constant steering on all nine.

Both engines live in this process (engine cores in-process), so the modes run interleaved, repetition by
repetition (order reversed every other one); figures are medians, `ratio` the median over repetitions of
time(mode) / time(plain) for the same tokens (1.0 = no overhead, higher = slower).

Models: by default the prepared SmolLM2-135M (Llama), probes at layers 2, 5, ..., 26. With `--families`, per
family a random-weight checkpoint from `steerer.testing.tiny` (`--hidden`, `--layers`, `--heads`,
`--kv-heads`; built once into `--checkpoints`), a bank of nine random unit directions at every other layer
(1, 3, 5, ...; several probes share a layer), and the same modes: the cost only, since random probes score
nothing in particular. Cases are merged into the output file, each naming its `family` and `model`: a run
replaces the cases of the models it measured and keeps the rest.

Threads: `--threads` (default 1) torch intra-op threads for the whole process, both engines alike. vLLM
itself reduces serving to one thread, but in-process start-up leaves torch at the core count; two
OpenMP threads spin-waiting on a 2-core machine shared with other jobs made every small op wait for a
descheduled thread (the first run's batch-1 figures: 1.5 tok/s).

    .venv-vllm/bin/python benchmarks/overhead_vllm.py    # writes benchmarks/results/overhead_vllm.json
    OMP_NUM_THREADS=1 nice -n 10 .venv-vllm/bin/python benchmarks/overhead_vllm.py --batches 16 \\
        --families qwen2,qwen3,mistral,gemma2,gemma3,phi3,llama --modes plain,monitor,steer
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26)  # SmolLM2-135M's (30 layers)
DEFAULT_MODEL = "smollm2-135m-instruct"
PROBES = 9
MODES = ("plain", "plugin_idle", "monitor", "steer")
PROMPTS = ("Name three colors.", "Describe the ocean in two sentences.", "Write a haiku about autumn leaves.",
           "Give me one tip for learning a new language.", "Explain what a probe is in one paragraph.",
           "List four fruits and their colors.", "Summarise the plot of a fairy tale.", "Describe a sunny day.")


@dataclass(frozen=True)
class Shape:
    """A random-weight checkpoint's size (`steerer.testing.tiny.build_tiny`'s arguments)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int

    def label(self, family: str) -> str:
        return (f"tiny-random-{family} (hidden {self.hidden}, {self.layers} layers, {self.heads} heads / "
                f"{self.kv_heads} KV, MLP {2 * self.hidden})")

    def probe_layers(self) -> tuple[int, ...]:
        """Nine probes over every other layer (1, 3, 5, ...), several per layer."""
        odd = tuple(range(1, self.layers, 2)) or (0,)
        return tuple(odd[i % len(odd)] for i in range(PROBES))


def random_bank(tasks: list[str], hidden: int, fingerprint: str, layers: tuple[int, ...] = PROBE_LAYERS):
    from steerer.bank import Probe, ProbeBank
    from steerer.taps import unit_directions

    g = torch.Generator().manual_seed(0)
    k = len(layers)
    probes = [Probe(task=t, layer=layer, reliable=True) for t, layer in zip(tasks, layers, strict=True)]
    return ProbeBank("bench", fingerprint, hidden, probes, torch.randn(k, hidden, generator=g) / hidden**0.5,
                     torch.zeros(k), unit_directions(torch.randn(k, hidden, generator=g)))


def nine_constraints():
    import random

    from steerer.constraints import Constraint
    from steerer.tasks import TASKS

    rng = random.Random(0)
    return tuple(Constraint(t, dict(TASKS[t].sample_params(rng, 0.5))) for t in list(TASKS)[:PROBES])


def ratio_cases(speeds: dict[str, list[float]], batch: int, repeats: int, new_tokens: int) -> list[dict]:
    """One case per non-plain mode: medians of tok/s and of the paired ratios plain/mode (= time(mode)/time(plain))."""
    cases = []
    for mode in [m for m in speeds if m != "plain"]:
        ratio = statistics.median(p / x for p, x in zip(speeds["plain"], speeds[mode], strict=True))
        cases.append({"path": "vllm", "batch": batch, "dtype": "float32", "mode": mode,
                      "tokens_per_s": round(statistics.median(speeds[mode]), 2),
                      "plain_tokens_per_s": round(statistics.median(speeds["plain"]), 2), "ratio": round(ratio, 4),
                      "repeats": repeats, "new_tokens": new_tokens})
    return cases


def merge(existing: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` written over `existing`: cases of the models `new` measured are replaced, the others kept (old cases
    without a family are the SmolLM2 run's: Llama); top-level keys of `new` win."""
    default = existing.get("model", DEFAULT_MODEL)
    kept = [{"family": "llama", "model": default, **case} for case in existing.get("cases", [])]
    measured = {case["model"] for case in new["cases"]}
    return {**existing, **new, "cases": [c for c in kept if c["model"] not in measured] + new["cases"]}


def free(llm) -> None:
    """Shut an in-process engine down so the next family's fits in memory."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def measure(path: str, layers: tuple[int, ...], args, modes: tuple[str, ...], batches: list[int]) -> list[dict]:
    """Start plain vLLM and a `VLLMSteerer` on `path` (bank at `layers`), run the modes interleaved, free both."""
    from vllm import LLM
    from vllm import SamplingParams as VLLMSampling

    from steerer.core import Request
    from steerer.engine.vllm.driver import VLLMSteerer, use_threads
    from steerer.generation import SamplingParams
    from steerer.model import chat_prompt
    from steerer.policy import SteeringPolicy

    common = engine_options(args, batches)
    plain_llm = LLM(model=path, enable_prefix_caching=True, async_scheduling=False, **common)
    constraints = nine_constraints()
    config = plain_llm.llm_engine.model_config.hf_config
    bank = random_bank([c.task for c in constraints], config.hidden_size, "bench", layers)
    op_layers = tuple(sorted(set(layers))) if args.op_layers == "bank" else tuple(range(config.num_hidden_layers))
    steerer = VLLMSteerer(bank, path, check_bank=False, check=False, capacity=max(batches),
                          max_num_seqs=max(batches), max_model_len=common["max_model_len"], enforce_eager=args.eager,
                          threads=args.threads, layers=op_layers)
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

    cases = []
    try:
        for batch in batches:
            texts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})") for i in range(batch)]
            for mode in modes:
                run(mode, texts, 2)  # warm-up
            load = os.getloadavg()[0]
            speeds: dict[str, list[float]] = {m: [] for m in modes}
            for rep in range(args.repeats):
                for mode in (modes if rep % 2 == 0 else tuple(reversed(modes))):
                    speeds[mode].append(run(mode, texts, args.new_tokens))
            for case in ratio_cases(speeds, batch, args.repeats, args.new_tokens):
                case["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                cases.append(case)
                print(f"batch {batch:3d} {case['mode']:12s} {case['tokens_per_s']:8.1f} tok/s  plain "
                      f"{case['plain_tokens_per_s']:8.1f}  ratio {case['ratio']:.4f}  load {case['load_average']}",
                      flush=True)
    finally:
        steerer.close()
        free(steerer.llm)
        free(plain_llm)
    return cases


def engine_options(args, batches: list[int]) -> dict[str, Any]:
    return {"dtype": "float32", "enforce_eager": args.eager, "max_model_len": 1024, "max_num_seqs": max(batches),
            "gpu_memory_utilization": 0.3, "seed": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from steerer.testing.tiny import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both engines)")
    parser.add_argument("--op-layers", default="bank", choices=["bank", "all"],
                        help="decoder layers that call steerer's op: the bank's (default) or all")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (plain first)")
    parser.add_argument("--families", default="", help=f"comma list of {', '.join(FAMILIES)}: random-weight "
                                                       "checkpoints instead of SmolLM2")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--checkpoints", default=str(Path(tempfile.gettempdir()) / "steerer-overhead-families"),
                        help="folder for the random checkpoints (reused: vLLM's compile cache keys on the path)")
    parser.add_argument("--output", default=str(RESULTS / "overhead_vllm.json"))
    args = parser.parse_args(argv)
    modes = tuple(args.modes.split(","))
    if modes[0] != "plain" or not set(modes) <= set(MODES) or len(modes) < 2:
        parser.error(f"--modes must start with plain and name others of {', '.join(MODES)}; got {args.modes!r}")
    args.modes = modes
    args.families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from steerer.engine.vllm.driver import ENVIRONMENT, configure_environment

    torch.set_num_threads(args.threads)
    configure_environment()
    load_before = os.getloadavg()
    import vllm

    from steerer.engine.vllm.plugin import register
    from steerer.model import resolve_model_path

    register()
    batches = [int(b) for b in args.batches.split(",")]
    configuration = {"vllm": vllm.__version__, "torch": torch.__version__, "compiled": not args.eager,
                     "threads": args.threads, "environment": {k: os.environ.get(k) for k in ENVIRONMENT},
                     **engine_options(args, batches)}
    command = "benchmarks/overhead_vllm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    target = Path(args.output)
    existing = json.loads(target.read_text()) if target.exists() else {}
    common = {"device": "cpu", "ratio": "median over repetitions of time(mode) / time(plain vLLM) for the same "
                                        "tokens; 1.0 = no overhead"}
    if not args.families:
        cases = [{"family": "llama", "model": DEFAULT_MODEL, **case}
                 for case in measure(resolve_model_path(None), PROBE_LAYERS, args, args.modes, batches)]
        write(target, merge(existing, {
            "model": DEFAULT_MODEL, "probe_layers": list(PROBE_LAYERS),
            "machine": f"CPU, {os.cpu_count()} cores (AVX2), shared with other jobs: load average "
                       f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after", **common,
            "steerer_constraints": [c.task for c in nine_constraints()],
            "configuration": {**configuration, "op_layers": list(PROBE_LAYERS) if args.op_layers == "bank"
                              else "all"}, "command": command, "cases": cases}))
        return
    from steerer.testing.tiny import build_tiny

    shape = Shape(args.hidden, args.layers, args.heads, args.kv_heads)
    cases: list[dict] = []
    for family in args.families:  # written after each family: a run cut short keeps what it measured
        folder = Path(args.checkpoints) / f"{family}-{shape.hidden}x{shape.layers}"
        path = str(build_tiny(family, folder, layers=shape.layers, hidden=shape.hidden, heads=shape.heads,
                              kv_heads=shape.kv_heads))
        print(f"{family}: {shape.label(family)} at {path}", flush=True)
        started = time.perf_counter()
        measured = measure(path, shape.probe_layers(), args, args.modes, batches)
        cases += [{"family": family, "model": shape.label(family), **case} for case in measured]
        gc.collect()
        print(f"{family}: {time.perf_counter() - started:.0f} s", flush=True)
        write(target, merge(existing, {**common, "cases": cases, "families_run": {
            "shape": vars(shape) | {"intermediate": 2 * shape.hidden, "vocab": "SmolLM2's tokenizer (49152)"},
            "probe_layers": list(shape.probe_layers()),
            "bank": "nine random unit directions (random weights: the cost, not the scores)",
            "configuration": {**configuration, "op_layers": "bank" if args.op_layers == "bank" else "all"},
            "command": command, "machine_load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}}))


def write(target: Path, data: dict[str, Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=1))
    print(f"wrote {target}", flush=True)

if __name__ == "__main__":
    main()
