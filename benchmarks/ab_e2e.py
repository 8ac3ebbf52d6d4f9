"""An A/B experiment on steering strength, end to end through the real server, and its committed report.

A live `steerer serve --experiments ... --outcome-log ...` on loopback (the default model and shipped bank)
gets one request per key from --keys distinct keys, --clients at a time. Each asks for a numbered list of
tips in lowercase with a `lowercase` constraint; sampling is seeded per key (temperature 0.7), so arms see
varied responses. The experiment (written by this script) has three arms on the lowercase probe's
direction: control (off, half the traffic), constant 40 and constant 100 (a quarter each). Then
`steerer ab report --model default` scores every response's perplexity under the unsteered model (cached in
the log) and writes the report: benchmarks/results/ab/report.md, report.json, compliance.png, plus run.json
(this script's settings, duration, and that the log holds exactly one record per answered request).

    .venv/bin/python benchmarks/ab_e2e.py                      # the committed run: 1000 keys
    .venv/bin/python benchmarks/ab_e2e.py --keys 120 --out /tmp/ab   # a smoke run

The outcome log itself (prompts and responses, ~1 MB) goes to runs/ab_e2e/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from steerer.service.client import SteererClient
from steerer.service.testing import ServerProcess, lowercase_tips_prompt

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = (
    "List three tips for {}.",
    "Give me a numbered list of tips for {}.",
    "What are four steps to {}? Number them.",
    "Write a short numbered checklist for {}.",
)
EXPERIMENT = {
    "name": "lowercase-strength",
    "salt": "bench-1",
    "description": "Constant steering on the lowercase probe direction (layer 21) at two strengths vs none, "
    "on list-of-tips prompts that ask for lowercase.",
    "arms": [
        {"name": "control", "control": True, "weight": 2, "policies": {"lowercase": "off"}},
        {"name": "constant-40", "weight": 1, "policies": {"lowercase": "constant:40"}},
        {"name": "constant-100", "weight": 1, "policies": {"lowercase": "constant:100"}},
    ],
}


def prompt(i: int) -> str:
    return lowercase_tips_prompt(i, TEMPLATES)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ab"))
    parser.add_argument("--log-dir", default=str(REPO / "runs" / "ab_e2e"))
    args = parser.parse_args()

    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    experiments, log = log_dir / "experiments.json", log_dir / "outcomes.sqlite"
    for path in (log, Path(f"{log}-wal"), Path(f"{log}-shm")):
        path.unlink(missing_ok=True)
    experiments.write_text(json.dumps({"experiments": [EXPERIMENT]}, indent=1))
    server_args = [
        "--experiments",
        str(experiments),
        "--outcome-log",
        str(log),
        "--threads",
        str(args.threads),
        "--max-batch",
        str(args.clients),
    ]
    answered: list[str] = []
    failed = 0
    with ServerProcess(*server_args) as server:

        def one(i: int) -> str | None:
            with SteererClient(server.target) as client:
                reply = client.generate(
                    prompt(i),
                    constraints=["lowercase"],
                    max_new_tokens=args.max_new_tokens,
                    temperature=0.7,
                    seed=i,
                    request_id=f"bench-{i}",
                    experiment_key=f"user-{i:05d}",
                    timeout=600,
                )
            return reply.request_id

        start = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(one, i) for i in range(args.keys)]
            for future in futures:
                try:
                    answered.append(future.result())
                except Exception as exc:  # counted and reported, never silently dropped
                    failed += 1
                    print(f"request failed: {exc}", file=sys.stderr)
                done = len(answered) + failed
                if done % 100 == 0:
                    print(f"{done}/{args.keys} requests, {time.monotonic() - start:.0f} s", file=sys.stderr)
        traffic_s = time.monotonic() - start
    db = sqlite3.connect(log)
    logged = [r[0] for r in db.execute("SELECT request_id FROM outcomes")]
    db.close()
    one_each = sorted(logged) == sorted(answered)
    start = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "steerer.cli",
            "ab",
            "report",
            "--log",
            str(log),
            "--out",
            args.out,
            "--model",
            "default",
            "--threads",
            str(args.threads),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    report_s = time.monotonic() - start
    run = {
        "keys": args.keys,
        "clients": args.clients,
        "max_new_tokens": args.max_new_tokens,
        "temperature": 0.7,
        "server_args": server_args[4:],
        "experiment": EXPERIMENT,
        "answered": len(answered),
        "failed": failed,
        "logged": len(logged),
        "one_record_per_answered_request": one_each,
        "traffic_s": round(traffic_s, 1),
        "report_with_perplexity_s": round(report_s, 1),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    Path(args.out, "run.json").write_text(json.dumps(run, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: run[k]
                for k in ("answered", "failed", "logged", "one_record_per_answered_request", "traffic_s")
            }
        )
    )
    return 0 if one_each and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
