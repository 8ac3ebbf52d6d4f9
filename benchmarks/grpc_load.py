"""Load test of the gRPC server against the in-process library on the same work.

For each concurrency N: N streaming clients (grpc.aio, in this process) send requests back to back to a
live `steerer serve` on loopback for --seconds; then the same requests (same prompts, constraints,
steering, max_new_tokens, EOS ignored so every request does the same work) run through the in-process
library, `Steerer.generate(..., max_batch=N)`, in this process while the server sits idle. The phases
alternate per N so the machine's drift hits both alike. Reported per N: throughput, TTFT and
inter-token latency p50/p99 as the clients saw them, failures, deliberate RESOURCE_EXHAUSTED, the
server's mean rows per forward pass, and the ratio of server to in-process throughput.

    .venv/bin/python benchmarks/grpc_load.py                          # 1, 8, 32 clients, 120 s each
    .venv/bin/python benchmarks/grpc_load.py --clients 1,8 --seconds 10   # smoke run

Uses the shipped probe bank when it exists, else a placeholder bank (zero weights; the cost of scoring
does not depend on the values). Writes benchmarks/results/grpc_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from probes.heldout import GENERIC_PROMPTS as PROMPTS
from steerer.service.client import build_request
from steerer.service.proto import pb2_grpc
from steerer.service.testing import ServerProcess, placeholder_bank

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONSTRAINTS = [("word_count", {"relation": "at most", "limit": 60}), ("lowercase", {}), ("json_format", {})]
POLICY = "conditional:4"


def grpc_request(prompt: int, new_tokens: int):
    return build_request(PROMPTS[prompt % len(PROMPTS)], constraints=CONSTRAINTS, policy=POLICY,
                         max_new_tokens=new_tokens, ignore_eos=True)


def library_request(prompt: int, new_tokens: int):
    from steerer.constraints import Constraint
    from steerer.core import Request
    from steerer.generation import SamplingParams
    from steerer.policy import SteeringPolicy

    return Request(PROMPTS[prompt % len(PROMPTS)], tuple(Constraint(t, p) for t, p in CONSTRAINTS),
                   policy=SteeringPolicy.parse(POLICY),
                   sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))


def step_batch(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the server's rows-per-pass histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name in ("steerer_step_batch_size_sum", "steerer_step_batch_size_count")}
    return values.get("steerer_step_batch_size_sum", 0.0), values.get("steerer_step_batch_size_count", 0.0)


async def run_clients(target: str, clients: int, seconds: float, new_tokens: int) -> dict:
    """N clients streaming back to back until `seconds` pass; each finishes the request it has started."""
    ttft: list[float] = []
    itl: list[float] = []
    done: list[tuple[float, int]] = []  # (start time, prompt) of every completed request
    counts = {"ok": 0, "failed": 0, "exhausted": 0, "tokens": 0}
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb2_grpc.SteererStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()
        deadline = start + seconds

        async def client(index: int) -> None:
            prompt = index
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                last = None
                try:
                    async for message in stub.GenerateStream(grpc_request(prompt, new_tokens)):
                        now = time.perf_counter()
                        if message.HasField("token"):
                            (ttft if last is None else itl).append(now - (sent if last is None else last))
                            last = now
                        else:
                            counts["tokens"] += message.final.usage.completion_tokens
                    counts["ok"] += 1
                    done.append((sent, prompt))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        counts["exhausted"] += 1
                        await asyncio.sleep(0.05)
                        continue
                    counts["failed"] += 1
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                prompt += clients

        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "ttft": ttft, "itl": itl, "prompts": [p for _, p in sorted(done)],
            "errors": errors, **counts}


def run_inprocess(steerer, prompts: list[int], clients: int, new_tokens: int, threads: int) -> tuple[float, int]:
    """(seconds, tokens) for the same requests through the library with max_batch = clients.

    Runs on a fresh thread with `threads` torch threads, exactly as the server's scheduler thread runs the
    model: torch's thread settings are per OS thread, and on a busy machine the main thread and a fresh
    one can differ several-fold, which would compare threading, not serving.
    """
    import torch

    from steerer.core import Result

    requests = [library_request(p, new_tokens) for p in prompts]
    out: dict[str, float] = {}

    def work() -> None:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        results = steerer.generate(requests, max_batch=clients)
        out["tokens"] = sum(len(r.tokens) for r in results if isinstance(r, Result))
        out["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=work, name="inprocess")
    thread.start()
    thread.join()
    return out["seconds"], int(out["tokens"])


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per request (EOS ignored)")
    parser.add_argument("--max-batch", type=int, default=32, help="server --max-batch (in-process: min(N, this))")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--model", default=None)
    parser.add_argument("--bank", default=None, help="bank folder (default: shipped bank, else a placeholder)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, server and in-process alike")
    parser.add_argument("--server-args", default="", help="extra `steerer serve` options, e.g. '--prefill-chunk 16'")
    parser.add_argument("--output", default=str(RESULTS / "grpc_load.json"))
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]

    import torch

    from steerer.bank import DEFAULT_BANK, ProbeBank
    from steerer.core import Steerer
    from steerer.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device)
    threads = torch.get_num_threads()  # what the server's `load_model` sets too (same flags, same machine)
    tmp = tempfile.TemporaryDirectory(prefix="grpc-load-")
    if args.bank:
        bank_path, bank_kind = args.bank, "given"
    elif (DEFAULT_BANK / "manifest.json").is_file():
        bank_path, bank_kind = str(DEFAULT_BANK), "shipped"
    else:
        bank_path, bank_kind = str(Path(tmp.name) / "bank"), "placeholder"
        placeholder_bank(lm.fingerprint, lm.hidden_size, "placeholder").save(bank_path)
    bank = ProbeBank.load(bank_path)
    server_args = ["--bank", bank_path, "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    if args.model:
        server_args += ["--model", args.model]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    server_args += ["--device", args.device, *shlex.split(args.server_args)]
    steerer = Steerer(lm, bank, capacity=args.max_batch)
    runs = []
    print(f"{'clients':>7} {'ok':>5} {'fail':>4} {'exh':>4} {'server tok/s':>12} {'in-proc tok/s':>13} {'ratio':>6} "
          f"{'batch':>5} {'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>16}", flush=True)
    with ServerProcess(*server_args) as server:
        asyncio.run(run_clients(server.target, min(levels), 2, 4))  # warm-up: first-pass costs, connections
        run_inprocess(steerer, [0], 1, 4, threads)
        for n in levels:
            before = step_batch(server.metrics_url)
            load = asyncio.run(run_clients(server.target, n, args.seconds, args.new_tokens))
            after = step_batch(server.metrics_url)
            batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
            if load["prompts"]:
                seconds, tokens = run_inprocess(steerer, load["prompts"], min(n, args.max_batch), args.new_tokens,
                                                threads)
                inprocess = tokens / seconds
            else:
                inprocess = float("nan")
            server_tps = load["tokens"] / load["seconds"]
            run = {"clients": n, "seconds": round(load["seconds"], 2), "requests_ok": load["ok"],
                   "requests_failed": load["failed"], "resource_exhausted": load["exhausted"],
                   "tokens_per_s": round(server_tps, 2), "inprocess_tokens_per_s": round(inprocess, 2),
                   "ratio_vs_inprocess": round(server_tps / inprocess, 4) if inprocess == inprocess else None,
                   "ttft_p50_ms": percentile_ms(load["ttft"], 50), "ttft_p99_ms": percentile_ms(load["ttft"], 99),
                   "itl_p50_ms": percentile_ms(load["itl"], 50), "itl_p99_ms": percentile_ms(load["itl"], 99),
                   "server_mean_batch": round(batch, 2), "errors": load["errors"]}
            runs.append(run)
            print(f"{n:7d} {run['requests_ok']:5d} {run['requests_failed']:4d} {run['resource_exhausted']:4d} "
                  f"{run['tokens_per_s']:12.1f} {run['inprocess_tokens_per_s']:13.1f} "
                  f"{run['ratio_vs_inprocess'] or float('nan'):6.3f} {batch:5.1f} "
                  f"{run['ttft_p50_ms']:>8}/{run['ttft_p99_ms']:<8} {run['itl_p50_ms']:>7}/{run['itl_p99_ms']:<8}",
                  flush=True)
    steerer.close()
    out = {"runs": runs, "model": lm.name, "bank": bank_kind, "bank_version": bank.version,
           "new_tokens": args.new_tokens, "max_batch": args.max_batch, "constraints": [t for t, _ in CONSTRAINTS],
           "policy": POLICY, "requested_seconds": args.seconds, "server_args": server_args,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {threads} torch threads",
           "median_ratio": statistics.median([r["ratio_vs_inprocess"] for r in runs if r["ratio_vs_inprocess"]])
           if any(r["ratio_vs_inprocess"] for r in runs) else None}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
