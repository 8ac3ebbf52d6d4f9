"""What `scripts/gpu-check` runs on a CUDA machine: the CUDA tests, then the overhead benchmark on an
8B-shape random-weight model, in under 8 minutes, writing `gpu_*.json`.

The GPU machine has torch and an older transformers and reaches no package registry: this imports only
those (pytest when present; without it the tests' `test_*` functions are called directly) and runs the
benchmark with the hooks path (`overhead_hf.py --paths hooks`: taps + probe scores, one steered layer), which
needs neither the checkers' models nor a model on disk. vLLM is benchmarked only where it can be imported
(it is not on that machine today: recorded as skipped).

    scripts/gpu-check              # on the GPU: results in benchmarks/results/ and $OUT (when set)
    scripts/gpu-check --dry-run    # here, on the CPU: tiny shape, output to $OUT or /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CUDA_TESTS = ["tests/test_cuda_graph.py"]
BUDGET_S = 480  # the whole check: 8 minutes
TESTS_TIMEOUT_S = 120


def run_tests_directly(path: Path) -> dict:
    """pytest's job without pytest: import the test module and call each `test_*` that takes no fixture."""
    import inspect

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    outcomes = {}
    for name, test in vars(module).items():
        if not name.startswith("test_") or not callable(test):
            continue
        if inspect.signature(test).parameters:
            outcomes[name] = "skipped: needs pytest fixtures"
        elif not torch.cuda.is_available():
            outcomes[name] = f"skipped: {getattr(module, 'REQUIRES_CUDA', 'no CUDA')}"
        else:
            try:
                test()
                outcomes[name] = "passed"
            except Exception:  # noqa: BLE001 - every failure is reported, none stops the check
                outcomes[name] = "failed: " + traceback.format_exc(limit=3)
    return outcomes


def run_tests(env: dict[str, str], use_pytest: bool) -> dict:
    """The CUDA tests: pytest in a subprocess when it is installed, else the functions in this process."""
    if use_pytest and importlib.util.find_spec("pytest") is not None:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
        return {"runner": "pytest", "rc": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:],
                "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    outcomes = {}
    for test in CUDA_TESTS:
        outcomes.update(run_tests_directly(ROOT / test))
    failed = [name for name, outcome in outcomes.items() if outcome.startswith("failed")]
    return {"runner": "direct", "rc": int(bool(failed)), "outcomes": outcomes}


def run_overhead(env: dict[str, str], out: Path, dry_run: bool, timeout_s: float) -> dict:
    """`overhead_hf.py` on the random 8B shape (tiny when dry-running) at batch 1, 16 and 64."""
    if dry_run:
        shape, device, batches, dtypes, tokens, repeats = "tiny", "cpu", "1,2", "float32", "4", "1"
    else:
        shape, device, batches, dtypes, tokens, repeats = "llama-3.1-8b", "cuda", "1,16,64", "bfloat16", "32", "3"
    target = out / "gpu_overhead_hf.json"
    command = [sys.executable, "benchmarks/overhead_hf.py", "--random-config", shape, "--device", device,
               "--batches", batches, "--dtypes", dtypes, "--new-tokens", tokens, "--repeats", repeats,
               "--paths", "hooks", "--threads", "1" if dry_run else str(os.cpu_count() or 1),
               "--output", str(target)]
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = 124, f"timed out after {timeout_s:.0f} s: {(exc.stdout or b'')[-2000:]!r}"
    return {"command": " ".join(command[1:]), "rc": rc, "seconds": round(time.monotonic() - start, 1),
            "output": str(target) if target.exists() else None, "output_tail": tail}


def environment() -> dict:
    import transformers

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "vllm": "importable" if importlib.util.find_spec("vllm") else "not importable: vLLM part skipped",
            "pytest": importlib.util.find_spec("pytest") is not None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, nothing written to the repo")
    parser.add_argument("--no-pytest", action="store_true", help="call the tests directly even where pytest is")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    start = time.monotonic()
    out = Path(os.environ.get("OUT") or ("/tmp/gpu-check" if args.dry_run else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    report: dict = {"dry_run": args.dry_run, "environment": environment()}
    print(f"gpu-check: {report['environment']}", flush=True)
    report["tests"] = run_tests(env, use_pytest=not args.no_pytest)
    print(f"gpu-check: tests rc {report['tests']['rc']} ({report['tests']['runner']})", flush=True)
    left = BUDGET_S - (time.monotonic() - start) - 15
    report["overhead_hf"] = run_overhead(env, out, args.dry_run, max(left, 30))
    print(f"gpu-check: overhead_hf rc {report['overhead_hf']['rc']} in {report['overhead_hf']['seconds']} s",
          flush=True)
    report["overhead_vllm"] = {"skipped": report["environment"]["vllm"]}
    report["seconds"] = round(time.monotonic() - start, 1)
    summary = out / "gpu_check.json"
    summary.write_text(json.dumps(report, indent=1))
    if not args.dry_run and out.resolve() != RESULTS.resolve():  # $OUT comes back; the repo keeps a copy too
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in ("gpu_check.json", "gpu_overhead_hf.json"):
            if (out / name).exists():
                shutil.copy(out / name, RESULTS / name)
    print(f"gpu-check: wrote {summary} in {report['seconds']} s", flush=True)
    return int(report["tests"]["rc"] != 0 or report["overhead_hf"]["rc"] != 0)


if __name__ == "__main__":
    sys.exit(main())
