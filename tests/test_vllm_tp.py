"""Tensor parallel 2 under plain `vllm serve` with steerer's plugin, against tensor parallel 1 (vLLM venv).

A tiny random-weight Llama (`steerer.testing.tiny`: 4 query / 2 KV heads, so tensor parallel 2 splits it) and a
stand-in bank for it (random probes at its two layers, saved to a folder: STEERER_BANK). One `vllm serve` per
tensor-parallel size, started together (eager: no compile) and shared by the module. The same requests, one at a
time, to each: plain, monitored, and conditionally steered (the controller's decision depends on the taps, so
the ranks must score the same ones: `steerer.engine.vllm.ranks.agree`). Greedy tokens, verdicts and flag events
must equal tensor parallel 1's, and rank 0 alone publishes (one results-log line and one counted request each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("STEERER_REQUIRE_VLLM") == "1":  # CI: a missing vLLM is a failure, not a skip
        raise
    pytest.skip("vLLM is not installed here (scripts/setup-vllm)", allow_module_level=True)

import torch  # noqa: E402
from vllm_serve import VLLMServe  # noqa: E402
from vllm_serve import get as _get  # noqa: E402

from steerer.bank import Probe, ProbeBank  # noqa: E402
from steerer.taps import unit_directions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 900
TASKS = ("lowercase", "word_count")  # word_count (at most 50) is never decided by a 12-token prefix: it can flag
CONSTRAINTS = ["lowercase", 'word_count:{"relation": "at most", "limit": 50}']
PROMPTS = ("Write a short poem about the sea.", "List three fruits.")
MONITOR = {"steerer_constraints": CONSTRAINTS}
STEER = {"steerer_constraints": CONSTRAINTS, "steerer_policy": "conditional:6"}
MAX_TOKENS = 12
FLOAT_TOL = 1e-3  # ranks' all-reduce sums differ in the last bits; rank 0's readings vs tensor parallel 1's


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _requests_ok(metrics_url: str) -> float:
    """steerer_requests{method="vllm",code="OK"} from the Prometheus text."""
    for line in _get(metrics_url).splitlines():
        if line.startswith("steerer_requests") and 'method="vllm"' in line and 'code="OK"' in line:
            return float(line.rpartition(" ")[2])
    return 0.0


def stand_in_bank(folder: Path, checkpoint: Path) -> Path:
    """Random probes for `TASKS` at layers 0 and 1 of the tiny model, fingerprinted to its checkpoint; word_count's
    bias makes it predict a violation from the first token (a flag event that must show on both sizes)."""
    from transformers import AutoConfig

    from steerer.engine.vllm.weights import checkpoint_fingerprint

    config = AutoConfig.from_pretrained(checkpoint)
    d = int(config.hidden_size)
    g = torch.Generator().manual_seed(0)
    probes = [Probe(task=t, layer=layer, threshold=0.5, reliable=True) for layer, t in enumerate(TASKS)]
    bank = ProbeBank("tiny-llama", checkpoint_fingerprint(checkpoint, config), d, probes,
                     0.05 * torch.randn(len(TASKS), d, generator=g), torch.tensor([0.0, -6.0]),
                     unit_directions(torch.randn(len(TASKS), d, generator=g)), version="tiny")
    bank.save(folder)
    return folder


class Server(VLLMServe):
    """`vllm serve` (as `python -m vllm.entrypoints.openai.api_server`) with the plugin at one TP size."""

    startup_s = STARTUP_S

    def __init__(self, tmp: Path, model: Path, bank: Path, tp: int):
        self.tp, self.name = tp, f"vllm serve (TP {tp})"
        self.results = tmp / "results.jsonl"
        super().__init__(model, tmp / "server.log", [
            "--seed", "0", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4",
            "--gpu-memory-utilization", "0.3", "--tensor-parallel-size", str(tp),
            *(["--distributed-executor-backend", "mp"] if tp > 1 else [])],
            {"STEERER_BANK": str(bank), "STEERER_RESULTS_LOG": str(self.results)})

    def complete(self, prompt: str, xargs: dict | None) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                "return_token_ids": True, **({"vllm_xargs": xargs} if xargs is not None else {})}
        return _post(self.url + "/v1/completions", body)

    def record(self, response_id: str) -> dict:
        """The results route's record of a monitored request (verdicts, flag events, steering)."""
        return json.loads(_get(f"{self.url}/steerer/v1/results/{response_id}?wait=60"))

    def run(self) -> dict:
        """Every prompt plain, monitored and steered, one request at a time: tokens, and records where monitored."""
        out = {}
        for i, prompt in enumerate(PROMPTS):
            for name, xargs in (("plain", None), ("monitor", MONITOR), ("steer", STEER)):
                response = self.complete(prompt, xargs)
                entry = {"tokens": list(response["choices"][0]["token_ids"])}
                if xargs is not None:
                    entry["record"] = self.record(f"{response['id']}-0")  # a completion's one prompt: `<id>-0`
                out[f"{name}{i}"] = entry
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both servers started together (their start-ups overlap), each run through the same requests; what rank 0
    published (counted requests, results-log lines) is read before the servers close (memory for the driver's)."""
    from steerer.testing.tiny import build_tiny

    tmp = tmp_path_factory.mktemp("vllm-tp")
    model = build_tiny("llama", tmp / "tiny-llama", hidden=128)  # head size 32: the smallest vLLM's CPU attention runs
    bank = stand_in_bank(tmp / "bank", model)
    servers = {tp: Server(tmp_path_factory.mktemp(f"tp{tp}"), model, bank, tp) for tp in (2, 1)}
    try:
        out = {}
        for tp, server in servers.items():
            server.wait_ready()
            out[tp] = server.run()
            monitored = sum(1 for entry in out[tp].values() if "record" in entry)
            deadline = time.monotonic() + 60  # the results thread counts after the response
            while _requests_ok(server.metrics_url) < monitored and time.monotonic() < deadline:
                time.sleep(0.2)
            out[tp]["_published"] = {"monitored": monitored, "counted": _requests_ok(server.metrics_url),
                                     "log_lines": len(server.results.read_text().splitlines())}
    finally:
        for server in servers.values():
            server.close()
    return out


def _same(a, b, path: str = "") -> None:
    """Equal JSON, floats within FLOAT_TOL."""
    if isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and abs(a - b) <= FLOAT_TOL, f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_tp2_tokens_equal_tp1_with_and_without_steering(runs):
    for name in (k for k in runs[1] if not k.startswith("_")):
        assert runs[2][name]["tokens"] == runs[1][name]["tokens"], name
    for i in range(len(PROMPTS)):
        assert runs[1][f"monitor{i}"]["tokens"] == runs[1][f"plain{i}"]["tokens"]  # monitoring changes nothing
    assert any(runs[1][f"steer{i}"]["tokens"] != runs[1][f"plain{i}"]["tokens"] for i in range(len(PROMPTS)))


def test_tp2_verdicts_and_flag_events_equal_tp1(runs):
    for name in (k for k in runs[1] if "record" in runs[1].get(k, {})):
        one, two = runs[1][name]["record"], runs[2][name]["record"]
        assert one["status"] == "finished", one
        for key in ("verdicts", "flags", "detections", "steering"):
            _same(two[key], one[key], f"{name}.{key}")
    flags = [f for name in runs[1] if "record" in runs[1].get(name, {}) for f in runs[1][name]["record"]["flags"]]
    assert any(f["task"] == "word_count" and f["raised"] for f in flags)  # the stand-in bank's forced flag
    steered = [s for i in range(len(PROMPTS)) for s in runs[1][f"steer{i}"]["record"]["steering"]["changes"]]
    assert any(s["alpha"] != 0 for s in steered)  # conditional steering acted


def test_tp2_rank_0_alone_publishes(runs):
    """Every rank finishes each request; only rank 0 counts it and writes its results-log line."""
    for tp in (1, 2):
        published = runs[tp]["_published"]
        assert published["counted"] == published["monitored"] == published["log_lines"], (tp, published)


# -- the offline driver (`VLLMSteerer`, so `steerer serve --engine vllm`): both engine cores, TP 1 and 2 ------------
def driver_child(model: str, bank: str, tp: int, core: str, out: str) -> None:
    """Every prompt plain, monitored and steered through `VLLMSteerer` at `tp` with vLLM's engine core `core`
    ("inproc": in this process; "process": vLLM's default multiprocess core, the driver inside it), one request
    at a time: tokens, verdicts and each token's risks, steering and flags."""
    from dataclasses import asdict

    from steerer.constraints import Constraint
    from steerer.engine.vllm.driver import VLLMSteerer
    from steerer.policy import SteeringPolicy
    from steerer.request import Request, Result, SamplingParams, TokenEvent

    constraints = tuple(Constraint.parse(text) for text in CONSTRAINTS)
    policies = {"plain": None, "monitor": SteeringPolicy(), "steer": SteeringPolicy.parse(STEER["steerer_policy"])}
    engine = VLLMSteerer(ProbeBank.load(bank), model, threads=1, enforce_eager=True, max_num_seqs=4,
                         max_model_len=256, tensor_parallel_size=tp, engine_core=core)
    runs = {"remote": engine.remote, "class": type(engine).__name__,
            "executor": engine.engine.vllm_config.parallel_config.distributed_executor_backend}
    try:  # the guard needs the driver in the sampling process
        engine.validate(Request(PROMPTS[0], (Constraint.parse("lowercase"),), SteeringPolicy.parse("guard")))
        runs["guard"] = None
    except ValueError as exc:
        runs["guard"] = str(exc)
    start = time.perf_counter()
    try:
        for i, prompt in enumerate(PROMPTS):
            for name, policy in policies.items():
                request = Request(prompt, () if policy is None else constraints, policy or SteeringPolicy(),
                                  sampling=SamplingParams(max_new_tokens=MAX_TOKENS), id=f"{name}{i}")
                items = list(engine.generate([request]))
                (result,) = [x for x in items if isinstance(x, Result)]
                events = [asdict(x) for x in items if isinstance(x, TokenEvent)]
                runs[request.id] = {"tokens": result.tokens, "verdicts": [asdict(v) for v in result.verdicts],
                                    "steered": result.steered_tokens,
                                    "events": [{k: e[k] for k in ("index", "token_id", "risks", "steering", "flags")}
                                               for e in events]}
        runs["seconds"] = time.perf_counter() - start  # the requests, after start-up (printed, not asserted)
    finally:
        engine.close()
    Path(out).write_text(json.dumps(runs))


# (tensor parallel size, vLLM engine core): the in-process core (TP 1 the reference) and vLLM's default multiprocess
# core, where the driver runs inside the engine-core process (`steerer.engine.vllm.core_side`)
DRIVER_RUNS = ((2, "process"), (1, "inproc"), (2, "inproc"), (1, "process"))
META = ("remote", "class", "executor", "guard", "seconds")


def _driver_run(tmp: Path, model: Path, bank: Path, tp: int, core: str) -> dict:
    out = tmp / f"tp{tp}-{core}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    proc = subprocess.run([sys.executable, __file__, "--driver", str(model), str(bank), str(tp), core, str(out)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=STARTUP_S)
    assert proc.returncode == 0, f"TP {tp}, {core} engine core:\n{proc.stdout[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def driver_runs(tmp_path_factory):
    """Each of `DRIVER_RUNS` in its own process (vLLM's engine-core and worker processes end with it), two at a
    time (memory: each engine holds its own KV cache)."""
    from concurrent.futures import ThreadPoolExecutor

    from steerer.testing.tiny import build_tiny

    tmp = tmp_path_factory.mktemp("vllm-tp-driver")
    model = build_tiny("llama", tmp / "tiny-llama", hidden=128)  # head size 32: the smallest vLLM's CPU attention runs
    bank = stand_in_bank(tmp / "bank", model)
    with ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(_driver_run, tmp, model, bank, *key) for key in DRIVER_RUNS}
        return {key: future.result() for key, future in futures.items()}


def _equal_runs(run: dict, reference: dict) -> None:
    for name in (k for k in reference if k not in META):
        assert run[name]["tokens"] == reference[name]["tokens"], name
        _same(run[name], reference[name], name)


def test_driver_tp2_reaches_its_workers_and_equals_tp1(driver_runs):
    """`VLLMSteerer` at TP 2 (multiprocess executor, engine core in-process): coefficients go to both ranks and
    rank 0's taps come back by collective_rpc; tokens, verdicts, risks, steering and flags equal TP 1's."""
    one, two = driver_runs[1, "inproc"], driver_runs[2, "inproc"]
    assert two["remote"] and not one["remote"]
    print(f"driver: {len(PROMPTS) * 3} requests in {one['seconds']:.1f} s at TP 1, {two['seconds']:.1f} s at TP 2")
    _equal_runs(two, one)
    for i in range(len(PROMPTS)):
        assert one[f"monitor{i}"]["tokens"] == one[f"plain{i}"]["tokens"]
    assert any(one[f"steer{i}"]["tokens"] != one[f"plain{i}"]["tokens"] for i in range(len(PROMPTS)))
    assert any(f["raised"] for e in one["monitor0"]["events"] for f in e["flags"])


def test_driver_in_vllms_multiprocess_engine_core_equals_in_process(driver_runs):
    """`VLLMSteerer(engine_core="process")` (what `steerer serve --engine vllm` uses): the driver steps inside vLLM's
    engine-core process and its events and results come back with vLLM's outputs. At TP 1 (worker in the core
    process) and TP 2 (worker processes): tokens, verdicts, risks, steering and flags equal the in-process TP 1's,
    plain, monitored and steered."""
    reference = driver_runs[1, "inproc"]
    assert reference["class"] == "VLLMSteerer" and reference["guard"] is None
    for tp in (1, 2):
        run = driver_runs[tp, "process"]
        assert run["class"] == "CoreSteerer"
        # vLLM's multiprocess executor puts the workers in processes of their own (at TP 1 too on the CPU platform,
        # which overrides "uni" under the multiprocess core): the driver reaches them by collective_rpc and the
        # guard, which needs the driver where tokens are sampled, is refused in one line naming the way out
        assert run["remote"] == (run["executor"] != "uni"), (run["remote"], run["executor"])
        assert (run["guard"] is None) == (not run["remote"]), run["guard"]
        assert run["guard"] is None or "--engine-core inproc" in run["guard"]
        print(f"driver, multiprocess engine core: {len(PROMPTS) * 3} requests in {run['seconds']:.1f} s at TP {tp}")
        _equal_runs(run, reference)


if __name__ == "__main__" and sys.argv[1:2] == ["--driver"]:  # the driver test's subprocesses
    driver_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
