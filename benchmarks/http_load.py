"""Throughput of the OpenAI-compatible HTTP front against the gRPC front of the same server.

One `steerer serve --http-port` process; for each concurrency N, N streaming clients send requests back to
back for --seconds over gRPC (grpc.aio), then the same N clients with the same prompts over HTTP (SSE,
asyncio streams with keep-alive: a light client, so the figure measures the server, not a heavy client
library sharing the cores), alternating --rounds times so the machine's drift hits both alike. Every
request has the same constraints, conditional steering and max_new_tokens, EOS ignored, so every request
does the same work. Reported per N: tokens/s of each front, their ratio (HTTP / gRPC), TTFT and
inter-token latency p50/p99, failures.

    .venv/bin/python benchmarks/http_load.py --threads 1                    # 1, 8, 32 clients, 2 x 20 s each
    .venv/bin/python benchmarks/http_load.py --clients 1 --seconds 5 --rounds 1   # smoke run

Writes benchmarks/results/http_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import time
from pathlib import Path

import grpc
import numpy as np

from probes.heldout import GENERIC_PROMPTS as PROMPTS
from steerer.service.client import build_request
from steerer.service.proto import pb2_grpc
from steerer.service.testing import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONSTRAINTS = [("word_count", {"relation": "at most", "limit": 60}), ("lowercase", {}), ("json_format", {})]
POLICY = ("conditional", 4.0)
MODEL = "smollm2-135m-instruct"


def grpc_request(prompt: int, new_tokens: int):
    return build_request(PROMPTS[prompt % len(PROMPTS)], constraints=CONSTRAINTS, policy=f"{POLICY[0]}:{POLICY[1]}",
                         max_new_tokens=new_tokens, ignore_eos=True)


def http_body(prompt: int, new_tokens: int) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[prompt % len(PROMPTS)]}],
                       "max_tokens": new_tokens, "stream": True,
                       "steerer": {"constraints": [{"task": t, "params": p} for t, p in CONSTRAINTS],
                                   "policy": {"kind": POLICY[0], "alpha": POLICY[1]}, "ignore_eos": True}}).encode()


class Tally:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.ok = self.failed = self.tokens = 0
        self.errors: dict[str, int] = {}

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


async def grpc_clients(target: str, clients: int, seconds: float, new_tokens: int) -> tuple[Tally, float]:
    tally = Tally()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb2_grpc.SteererStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()
        deadline = start + seconds

        async def client(index: int) -> None:
            prompt = index
            while time.perf_counter() < deadline:
                sent, last = time.perf_counter(), None
                try:
                    async for message in stub.GenerateStream(grpc_request(prompt, new_tokens)):
                        now = time.perf_counter()
                        if message.HasField("token"):
                            (tally.ttft if last is None else tally.itl).append(now - (sent if last is None else last))
                            last = now
                        else:
                            tally.tokens += message.final.usage.completion_tokens
                    tally.ok += 1
                except grpc.aio.AioRpcError as exc:
                    tally.fail(exc.code().name)
                prompt += clients

        await asyncio.gather(*(client(i) for i in range(clients)))
        return tally, time.perf_counter() - start


async def http_clients(host: str, port: int, clients: int, seconds: float, new_tokens: int) -> tuple[Tally, float]:
    """N keep-alive connections, each streaming requests back to back (chunked SSE, one event per chunk)."""
    tally = Tally()
    start = time.perf_counter()
    deadline = start + seconds

    async def client(index: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        prompt = index
        try:
            while time.perf_counter() < deadline:
                body = http_body(prompt, new_tokens)
                prompt += clients
                sent, last = time.perf_counter(), None
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
                             b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                if status != 200:
                    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length")))
                    await reader.readexactly(length)
                    tally.fail(str(status))
                    continue
                finished = False
                while True:
                    size = int((await reader.readline()).strip(), 16)
                    data = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    event = data[6:-4]  # b"data: " ... b"\n\n\r\n"
                    if event == b"[DONE]":
                        continue
                    chunk = json.loads(event)
                    if "error" in chunk:
                        tally.fail(chunk["error"]["code"])
                        continue
                    now = time.perf_counter()
                    steerer = chunk["steerer"]
                    if "tokenId" in steerer:
                        (tally.ttft if last is None else tally.itl).append(now - (sent if last is None else last))
                        last = now
                    if "verdicts" in steerer:
                        tally.tokens += steerer["usage"]["completionTokens"]
                        finished = True
                if finished:
                    tally.ok += 1
        finally:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return tally, time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(run, pid: int) -> tuple[Tally, float, float, float]:
    """Run one cell: (tally, seconds, server CPU seconds, client CPU seconds)."""
    server, client = cpu_seconds(pid), time.process_time()
    tally, seconds = asyncio.run(run)
    return tally, seconds, cpu_seconds(pid) - server, time.process_time() - client


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def summary(cells: list[tuple[Tally, float, float, float]]) -> dict:
    tallies = [(t, s) for t, s, _, _ in cells]
    seconds = sum(s for _, s in tallies)
    ttft = [x for t, _ in tallies for x in t.ttft]
    itl = [x for t, _ in tallies for x in t.itl]
    errors: dict[str, int] = {}
    for t, _ in tallies:
        for k, v in t.errors.items():
            errors[k] = errors.get(k, 0) + v
    tokens = sum(t.tokens for t, _ in tallies)
    return {"seconds": round(seconds, 2), "requests_ok": sum(t.ok for t, _ in tallies),
            "requests_failed": sum(t.failed for t, _ in tallies), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2), "per_round_tokens_per_s": [round(t.tokens / s, 2)
                                                                                  for t, s in tallies],
            "ttft_p50_ms": percentile_ms(ttft, 50), "ttft_p99_ms": percentile_ms(ttft, 99),
            "itl_p50_ms": percentile_ms(itl, 50), "itl_p99_ms": percentile_ms(itl, 99), "errors": errors,
            # CPU per 1000 tokens: what each front costs beyond the model (the model's share is the same work)
            "server_cpu_s_per_1k_tokens": round(1000 * sum(c[2] for c in cells) / max(tokens, 1), 3),
            "client_cpu_s_per_1k_tokens": round(1000 * sum(c[3] for c in cells) / max(tokens, 1), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=20, help="per front, per round")
    parser.add_argument("--rounds", type=int, default=2, help="gRPC/HTTP alternations per concurrency")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per request (EOS ignored)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--server-args", default="", help="extra `steerer serve` options")
    parser.add_argument("--output", default=str(RESULTS / "http_load.json"))
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    http_port = free_port()
    server_args = ["--http-port", str(http_port), "--max-batch", str(args.max_batch), "--max-queue",
                   str(args.max_queue), *(["--threads", str(args.threads)] if args.threads else []),
                   *shlex.split(args.server_args)]
    runs = []
    print(f"{'clients':>7} {'gRPC tok/s':>10} {'HTTP tok/s':>10} {'ratio':>6} {'fail g/h':>8} "
          f"{'TTFT p50 g/h ms':>16} {'ITL p50 g/h ms':>15}", flush=True)
    with ServerProcess(*server_args) as server:
        asyncio.run(grpc_clients(server.target, 1, 2, 4))  # warm-up: first-pass costs, connections
        asyncio.run(http_clients("127.0.0.1", http_port, 1, 2, 4))
        for n in levels:
            cells: dict[str, list] = {"grpc": [], "http": []}
            for r in range(args.rounds):  # alternate which front goes first, so neither always runs warmer
                order = ("grpc", "http") if r % 2 == 0 else ("http", "grpc")
                for front in order:
                    run = grpc_clients(server.target, n, args.seconds, args.new_tokens) if front == "grpc" \
                        else http_clients("127.0.0.1", http_port, n, args.seconds, args.new_tokens)
                    cells[front].append(measured(run, server.proc.pid))
            g, h = summary(cells["grpc"]), summary(cells["http"])
            ratio = round(h["tokens_per_s"] / g["tokens_per_s"], 4) if g["tokens_per_s"] else None
            runs.append({"clients": n, "ratio": ratio, "grpc": g, "http": h})
            print(f"{n:7d} {g['tokens_per_s']:10.1f} {h['tokens_per_s']:10.1f} {ratio or float('nan'):6.3f} "
                  f"{g['requests_failed']:>3}/{h['requests_failed']:<4} {g['ttft_p50_ms']:>7}/{h['ttft_p50_ms']:<8} "
                  f"{g['itl_p50_ms']:>6}/{h['itl_p50_ms']:<8} server CPU s/1k tok {g['server_cpu_s_per_1k_tokens']}/"
                  f"{h['server_cpu_s_per_1k_tokens']}, client {g['client_cpu_s_per_1k_tokens']}/"
                  f"{h['client_cpu_s_per_1k_tokens']}", flush=True)
    out = {"runs": runs, "model": MODEL, "new_tokens": args.new_tokens, "max_batch": args.max_batch,
           "constraints": [t for t, _ in CONSTRAINTS], "policy": f"{POLICY[0]}:{POLICY[1]}",
           "seconds_per_cell": args.seconds, "rounds": args.rounds, "server_args": server_args,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average at the end "
                      f"{os.getloadavg()[0]:.1f}"}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
