"""Corpus generation speed: the vLLM generator (`probes.corpus_vllm`) against the transformers loop
(`probes.corpus.generate_rows`), on the same rows (prompts, seeds, temperatures, budgets).

Each engine runs in a worker process of its own venv (transformers in `.venv`, vLLM in `.venv-vllm`, whose
transformers differs), loaded once; the driver sends both workers the same round of corpus rows, one worker
at a time, repetition by repetition, with the order reversed every other repetition, so the machine's drift
hits both alike. A worker times `generate` only (prompt rendering, sampling, detokenising and labelling;
not the model load): wall seconds and its process's CPU seconds (every thread: vLLM's engine core and worker
run in-process). Figures: rows/s and generated tokens/s per repetition, medians, and the median of the paired
ratios vllm / hf. `load_avg` is the 1-minute load average before and after the run (a shared machine shows
there). The rows are planned as the corpus plans a first round (`plan_round`: ~10% greedy, the rest at
temperature 0.7, the corpus's budgets unless --max-new-tokens).

    nice -n 10 .venv-vllm/bin/python benchmarks/corpus_engines.py   # -> benchmarks/results/corpus_engines.json

`--worker hf|vllm` is one worker (JSON lines on stdin: {"rows": [...]}, one JSON line out per request);
`tests/test_vllm_corpus.py` uses the hf worker as its transformers reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "corpus_engines.json"
PYTHONS = {"hf": ROOT / ".venv" / "bin" / "python", "vllm": ROOT / ".venv-vllm" / "bin" / "python"}


def plan_rows(tasks: list[str], per_task: int, seed: int = 0, max_new_tokens: int | None = None,
              greedy_fraction: float = 0.1) -> list[dict]:
    """A first corpus round for each task (what `build_corpus` would sample first)."""
    from probes.corpus import CorpusConfig, TaskState, plan_round

    budgets = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens,
                                                 "max_new_tokens_other": max_new_tokens}
    config = CorpusConfig(tasks=tuple(tasks), seed=seed, greedy_fraction=greedy_fraction, **budgets)
    return [row for t in tasks for row in plan_round(t, 0, TaskState(), config, per_task)]


# -- a worker: one engine, loaded once ---------------------------------------------------------------------


def serve_worker(engine: str, model: str | None, batch_size: int, threads: int | None) -> None:
    """Answer each {"rows": [...]} line on stdin with the labelled rows and the time `generate` took."""
    import torch

    from probes.corpus import HFGenerator
    from probes.corpus_vllm import VLLMCorpusGenerator

    if engine == "hf":
        from steerer.model import load_model

        lm = load_model(model, threads=threads, device="cpu")
        generator = HFGenerator(lm)
    else:
        generator = VLLMCorpusGenerator(model, batch_size=batch_size, threads=threads)
        lm = generator.model
    print(json.dumps({"ready": engine, "fingerprint": lm.fingerprint, "threads": torch.get_num_threads()}),
          flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        rows = json.loads(line)["rows"]
        wall, cpu = time.perf_counter(), time.process_time()
        labelled = generator.generate(lm, rows, batch_size)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"engine": engine, "seconds": wall, "cpu_seconds": cpu, "rows": labelled}), flush=True)


class Worker:
    """A worker process, driven over its stdin/stdout."""

    def __init__(self, engine: str, args: argparse.Namespace):
        cmd = [str(PYTHONS[engine]), str(Path(__file__).resolve()), "--worker", engine,
               "--batch-size", str(args.batch_size)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--model", args.model] if args.model else []
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or ""), TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker {self.proc.args[3]} ended (exit {self.proc.wait()})")

    def run(self, rows: list[dict]) -> dict:
        self.proc.stdin.write(json.dumps({"rows": rows}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


# -- the driver ------------------------------------------------------------------------------------------


def figures(result: dict) -> dict:
    rows = result["rows"]
    tokens = sum(r["n_tokens"] for r in rows)
    return {"seconds": round(result["seconds"], 2), "cpu_seconds": round(result["cpu_seconds"], 2),
            "rows": len(rows), "tokens": tokens, "rows_per_s": round(len(rows) / result["seconds"], 4),
            "tokens_per_s": round(tokens / result["seconds"], 2),
            "tokens_per_cpu_s": round(tokens / result["cpu_seconds"], 2),
            "satisfied": sum(r["satisfied"] for r in rows)}


def greedy_agreement(a: list[dict], b: list[dict]) -> dict:
    """Greedy rows of both engines: how many have the same tokens (the sampled ones differ by design)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x["temperature"] == 0]
    return {"greedy_rows": len(pairs), "same_tokens": sum(x["token_ids"] == y["token_ids"] for x, y in pairs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("hf", "vllm"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tasks", default="char_count,term_exclusion,word_count")
    parser.add_argument("--per-task", type=int, default=16, help="rows per task per repetition")
    parser.add_argument("--batch-size", type=int, default=48, help="rows decoding together (both engines)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="one budget for every row "
                                                                         "(default: the corpus's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each engine")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker, args.model, args.batch_size, args.threads)
        return 0
    if args.reps < 1 or args.per_task < 1:
        raise SystemExit("--reps and --per-task must be >= 1")
    rows = plan_rows(args.tasks.split(","), args.per_task, max_new_tokens=args.max_new_tokens)
    load_before = os.getloadavg()[0]
    workers = {e: Worker(e, args) for e in ("hf", "vllm")}
    if workers["hf"].ready["fingerprint"] != workers["vllm"].ready["fingerprint"]:
        raise SystemExit("the two engines loaded different weights")
    reps: list[dict] = []
    try:
        for rep in range(args.reps):
            order = ("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf")
            results = {e: workers[e].run(rows) for e in order}
            record = {"rep": rep, "order": list(order), "load_avg": round(os.getloadavg()[0], 2),
                      **{e: figures(results[e]) for e in ("hf", "vllm")},
                      "greedy": greedy_agreement(results["hf"]["rows"], results["vllm"]["rows"])}
            record["ratio_rows_per_s"] = round(record["vllm"]["rows_per_s"] / record["hf"]["rows_per_s"], 3)
            reps.append(record)
            print(json.dumps({k: record[k] for k in ("rep", "order", "load_avg", "ratio_rows_per_s")}
                             | {e: record[e]["rows_per_s"] for e in ("hf", "vllm")}), flush=True)
    finally:
        for w in workers.values():
            w.close()
    median = lambda engine, key: round(statistics.median(r[engine][key] for r in reps), 4)  # noqa: E731
    summary = {e: {k: median(e, k) for k in ("rows_per_s", "tokens_per_s", "tokens_per_cpu_s", "seconds")}
               for e in ("hf", "vllm")}
    summary["ratio_rows_per_s"] = round(statistics.median(r["ratio_rows_per_s"] for r in reps), 3)
    summary["ratio_tokens_per_s"] = round(statistics.median(
        r["vllm"]["tokens_per_s"] / r["hf"]["tokens_per_s"] for r in reps), 3)
    summary["ratio_tokens_per_cpu_s"] = round(statistics.median(
        r["vllm"]["tokens_per_cpu_s"] / r["hf"]["tokens_per_cpu_s"] for r in reps), 3)
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    command = [python, *sys.argv]
    out = {"command": shlex.join(["nice", "-n", str(os.nice(0)), *command] if os.nice(0) else command),
           "model": args.model or "default", "tasks": args.tasks.split(","), "rows_per_rep": len(rows),
           "batch_size": args.batch_size, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
           "budgets": sorted({r["max_new_tokens"] for r in rows}), "cpu_count": os.cpu_count(),
           "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
           "workers": {e: w.ready for e, w in workers.items()}, "summary": summary, "reps": reps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
