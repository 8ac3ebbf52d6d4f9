"""The vLLM backend end to end (skipped unless vLLM is installed: `scripts/setup-vllm`, then run pytest with
that venv's python; with STEERER_REQUIRE_VLLM=1, as `scripts/test` sets it, a missing vLLM or a missing main
venv for the transformers reference fails instead of skipping). One compiled fp32 engine serves most tests; a
small token budget per step forces chunked prefill and passes that mix prefill chunks with decoding rows. The
preemption test (a KV cache of eight blocks) and the tensor-parallel test start their own engines in subprocesses.

References: the transformers backend (run in the main venv, whose transformers vLLM cannot share) and
plain vLLM (its own Llama, no plugin, in a subprocess with the same engine settings).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REQUIRED = os.environ.get("STEERER_REQUIRE_VLLM") == "1"  # CI: a missing vLLM is a failure, not a skip
try:
    import vllm
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("vLLM is not installed here (scripts/setup-vllm)", allow_module_level=True)

from steerer import Constraint, ProbeBank, Request, SamplingParams, SteeringPolicy  # noqa: E402
from steerer.engine.vllm import ARCHITECTURE, VLLM_VERSION  # noqa: E402
from steerer.model import chat_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "benchmarks" / "vllm_parity.py"  # the comparison tool (above both backends, so not in steerer/)


def _load_parity():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("vllm_parity", PARITY)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_parity = _load_parity()
PROMPTS, parity_requests, result_record = _parity.PROMPTS, _parity.parity_requests, _parity.result_record
HF_PYTHON = Path(os.environ.get("STEERER_HF_PYTHON", ROOT / ".venv" / "bin" / "python"))
# 48 tokens per step chunks every prompt; 32-token KV blocks (CPU default: 128) let a 30-token answer fill
# cached blocks, which the prefix-cache test needs.
ENGINE = {"max_num_seqs": 8, "max_model_len": 1024, "max_num_batched_tokens": 48, "block_size": 32}
RISK_TOLERANCE = 2e-3  # |P_vllm - P_hf| per token, fp32 (measured: under 1e-5)


# -- the integration points, asserted so an upgrade that moves them fails here first ---------------------------
def test_pinned_vllm_version_and_internals():
    assert vllm.__version__ == VLLM_VERSION
    from vllm import ModelRegistry
    from vllm.forward_context import ForwardContext, get_forward_context, is_forward_context_available  # noqa: F401
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
    from vllm.utils.torch_utils import direct_register_custom_op
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    assert "layer_type" in inspect.signature(LlamaForCausalLM.__init__).parameters
    assert list(inspect.signature(LlamaDecoderLayer.forward).parameters) == ["self", "positions", "hidden_states",
                                                                               "residual"]
    # Only the backbone is compiled, so SteererLlamaForCausalLM.forward (which maps the pass) runs as Python.
    assert "support_torch_compile" in LlamaModel.__init__.__qualname__
    assert "support_torch_compile" not in LlamaForCausalLM.__init__.__qualname__
    assert LlamaForCausalLM.forward.__qualname__ == "LlamaForCausalLM.forward"
    assert {"query_start_loc", "seq_lens"} <= set(CPUAttentionMetadata.__dataclass_fields__)
    assert "attn_metadata" in ForwardContext.__dataclass_fields__
    assert {"batch_size", "removed", "added", "moved"} <= set(BatchUpdate.__dataclass_fields__)
    assert {m.name for m in MoveDirectionality} == {"UNIDIRECTIONAL", "SWAP"}
    assert {"update_state", "apply", "is_argmax_invariant"} <= LogitsProcessor.__abstractmethods__
    assert {"op_name", "op_func", "mutates_args", "fake_impl", "target_lib"} <= set(
        inspect.signature(direct_register_custom_op).parameters)
    assert "cache_salt" in TokensPrompt.__annotations__
    assert "extra_args" in inspect.signature(vllm.SamplingParams).parameters
    assert {"add_request", "step", "abort_request"} <= set(vars(LLMEngine))
    assert callable(ModelRegistry.register_model)
    from vllm import envs

    assert "VLLM_USE_V2_MODEL_RUNNER" in envs.environment_variables
    # The op's layer list rides in hf_overrides onto the HF config, which the compile-cache key hashes: a graph
    # compiled for other layers is never served from the cache.
    from vllm.config import ModelConfig

    from steerer.engine.vllm import LAYERS_KEY
    from steerer.engine.vllm.plugin import register
    from steerer.model import resolve_model_path

    register()
    path = resolve_model_path(None)
    configs = [ModelConfig(model=path, hf_overrides={"architectures": [ARCHITECTURE], LAYERS_KEY: layers})
               for layers in ([1, 2], [1, 3])]
    assert configs[0].hf_config.steerer_layers == [1, 2]
    assert configs[0].compute_hash() != configs[1].compute_hash()


# -- one engine for the rest ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def steerer():
    from steerer.engine.vllm.driver import VLLMSteerer

    engine = VLLMSteerer(ProbeBank.load(), record=True, max_num_seqs=ENGINE["max_num_seqs"], threads=1,
                         max_model_len=ENGINE["max_model_len"],
                         llm_kwargs={k: ENGINE[k] for k in ("max_num_batched_tokens", "block_size")})
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def plain_tokens(steerer, tmp_path_factory):
    """Plain vLLM's greedy tokens, each prompt alone: {tuple(prompt ids): tokens}, computed on first use."""
    cache: dict[tuple[int, ...], list[int]] = {}

    def get(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        missing = [p for p in prompts if tuple(p) not in cache]
        if missing:
            folder = tmp_path_factory.mktemp("plain")
            spec = {"prompts": missing, "llm_kwargs": {"model": steerer.path, "dtype": "float32",
                    "gpu_memory_utilization": 0.3, "enable_prefix_caching": True, "async_scheduling": False,
                    "seed": 0, **ENGINE}}
            (folder / "spec.json").write_text(json.dumps(spec))
            subprocess.run([sys.executable, str(PARITY), "--plain-vllm",
                            str(folder / "spec.json"), "--out", str(folder / "out.json"), "--max-new-tokens",
                            str(max_new_tokens)], check=True, cwd=ROOT, timeout=900)
            for p, tokens in zip(missing, json.loads((folder / "out.json").read_text()), strict=True):
                cache[tuple(p)] = tokens
        return [cache[tuple(p)] for p in prompts]

    return get


def test_v1_runner_pin_holds_and_the_op_fires_compiled_at_the_banks_layers(steerer):
    from vllm.config import CompilationMode

    from steerer.engine.vllm.state import STATE

    runner = steerer.llm.collective_rpc(lambda worker: type(worker.model_runner).__module__ + "."
                                        + type(worker.model_runner).__name__)
    assert runner == ["vllm.v1.worker.cpu_model_runner.CPUModelRunner"]
    config = steerer.engine.vllm_config
    assert not config.use_v2_model_runner
    assert config.compilation_config.mode != CompilationMode.NONE  # compiled, not eager
    assert steerer.engine.model_config.architectures == [ARCHITECTURE]
    # The op sits only at the bank's layers (taps and steering), named in the HF config vLLM hashes.
    assert steerer.engine.model_config.hf_config.steerer_layers == list(steerer.bank.layers)
    assert steerer.layers == set(steerer.bank.layers)
    before = (STATE.passes, STATE.op_calls, STATE.row_updates)
    steerer.run([Request(PROMPTS[0], sampling=SamplingParams(max_new_tokens=4), id="fires")])
    passes = STATE.passes - before[0]
    assert passes >= 4 and STATE.op_calls - before[1] == passes * len(steerer.bank.layers)  # per layer per pass
    assert STATE.row_updates > before[2]


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    if not HF_PYTHON.exists():
        if REQUIRED:
            pytest.fail(f"no transformers-backend venv at {HF_PYTHON} (set STEERER_HF_PYTHON)")
        pytest.skip(f"no transformers-backend venv at {HF_PYTHON} (set STEERER_HF_PYTHON)")
    out = tmp_path_factory.mktemp("hf") / "ref.json"
    subprocess.run([str(HF_PYTHON), str(PARITY), "--out", str(out)], check=True, cwd=ROOT,
                   timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {r["id"]: r for r in json.loads(out.read_text())}


def test_parity_with_the_transformers_backend(steerer, hf_reference):
    """Greedy fp32: unsteered tokens equal, per-token risks within RISK_TOLERANCE; steered tokens equal
    (at least the first 8 of each request), rows joining a running batch (max_batch=3) under chunked prefill."""
    steerer.llm.reset_prefix_cache()  # earlier tests cached these prompts: a cache hit needs no chunked prefill
    before = dict(steerer.stats)
    results = {r.request_id: result_record(r) for r in steerer.run(parity_requests(), max_batch=3)}
    assert steerer.stats["chunk_rows"] > before["chunk_rows"]  # prefill was chunked
    assert steerer.stats["mixed_passes"] > before["mixed_passes"]  # chunks shared passes with decoding rows
    worst = 0.0
    for rid, ref in hf_reference.items():
        got = results[rid]
        assert got["prompt_tokens"] == ref["prompt_tokens"], rid
        if rid.endswith("-u"):
            assert got["tokens"] == ref["tokens"], rid
            assert got["finish"] == ref["finish"] and got["steered"] == ref["steered"], rid
        else:
            assert got["tokens"][:8] == ref["tokens"][:8], rid
        n = next((i for i, (a, b) in enumerate(zip(got["tokens"], ref["tokens"], strict=False)) if a != b),
                 min(len(got["tokens"]), len(ref["tokens"])))
        for task, trace in ref["traces"].items():
            for a, b in zip(got["traces"][task][: n + 1], trace[: n + 1], strict=False):
                worst = max(worst, abs(a - b))
        if got["tokens"] == ref["tokens"]:
            for task, p in ref["p_end"].items():
                assert abs(got["p_end"][task] - p) < RISK_TOLERANCE, (rid, task)
    assert worst < RISK_TOLERANCE
    steered_equal = sum(results[r]["tokens"] == hf_reference[r]["tokens"] for r in results if r.endswith("-s"))
    print(f"max |P_vllm - P_hf| = {worst:.2e}; steered requests with identical tokens: {steered_equal}/4")


def test_strengths_per_request_in_one_batch(steerer, plain_tokens):
    """Same prompt, four strengths in one batch: the unsteered row and the alpha-0 row give plain vLLM's tokens
    alone (and the same probe readings), the steered rows do not."""
    prompt = PROMPTS[1]
    c = (Constraint("lowercase", {}), Constraint("json_format", {}))  # two probes, two layers
    sampling = SamplingParams(max_new_tokens=16)
    requests = [Request(prompt, c, SteeringPolicy("constant", a), sampling=sampling, id=f"a{i}")
                for i, a in enumerate((0.0, 24.0, -24.0))] + [Request(prompt, c, sampling=sampling, id="off")]
    results = {r.request_id: r for r in steerer.run(requests)}
    (plain,) = plain_tokens([chat_prompt(steerer.tokenizer, prompt)], 16)
    assert results["off"].tokens == plain
    assert results["a0"].tokens == plain
    # Same readings: the two rows are prefilled in different chunks (48 tokens per step), which alone moves
    # fp32 sums in the last bits; that steering adds exact zeros is checked bit for bit in test_vllm_state.py.
    gap = max(abs(a - b) for a, b in zip(results["a0"].traces["lowercase"], results["off"].traces["lowercase"],
                                         strict=True))
    assert gap < 1e-4
    assert results["a1"].tokens != plain and results["a2"].tokens != plain
    assert results["a1"].steered_tokens["lowercase"] == len(results["a1"].tokens) - 1 + (
        results["a1"].finish_reason == "eos")


def _continuation(steerer, prompt: str, answer: list[int]) -> list[dict]:
    text = steerer.tokenizer.decode(answer, skip_special_tokens=True)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": text},
            {"role": "user", "content": "Say it again, shorter."}]


def test_prefix_cache_never_serves_steered_kv_to_unsteered_requests(steerer, plain_tokens, monkeypatch):
    """A steered turn, then an unsteered follow-up whose prompt starts with the steered turn (prompt + answer):
    with the salt it gives plain vLLM's tokens; without the salt (control) its probe readings change, so
    the steered KV really would leak."""
    c = (Constraint("lowercase", {}), Constraint("json_format", {}))
    sampling = SamplingParams(max_new_tokens=32)

    def two_turns(prompt: str) -> tuple[Request, object]:
        (first,) = steerer.run([Request(prompt, c, SteeringPolicy("constant", 24.0), sampling=sampling, id="t1")])
        follow = Request(_continuation(steerer, prompt, first.tokens), c, sampling=sampling, id="t2")
        (second,) = steerer.run([follow])
        return follow, second

    follow, second = two_turns(PROMPTS[2])
    (plain,) = plain_tokens([chat_prompt(steerer.tokenizer, follow.prompt)], 32)
    assert second.tokens == plain

    # Control, on a prompt no earlier test used: without the salt the follow-up reads the steered turn's KV,
    # and its probe readings move far beyond float noise (different chunking alone moves them ~1e-6).
    monkeypatch.setattr(type(steerer), "salt", lambda self, request: None)
    follow_leak, leaked = two_turns(PROMPTS[3])
    monkeypatch.setattr(type(steerer), "salt", lambda self, request: "isolated")  # a cache key of its own
    (isolated,) = steerer.run([follow_leak])
    monkeypatch.undo()
    moved = max(abs(a - b) for a, b in zip(leaked.traces["lowercase"], isolated.traces["lowercase"], strict=False))
    assert moved > 1e-3


# -- the command line: `steerer generate|serve --engine vllm`, real processes ---------------------------------------
CLI_CONSTRAINTS = (Constraint("lowercase", {}), Constraint("json_format", {}))


def _reference(steerer, max_new_tokens: int = 8):
    request = Request(PROMPTS[0], CLI_CONSTRAINTS, SteeringPolicy("constant", 24.0),
                      sampling=SamplingParams(max_new_tokens=max_new_tokens), id="cli")
    (result,) = steerer.run([request])
    return result


def test_cli_generate_with_engine_vllm(steerer):
    """`steerer generate --engine vllm --json`: stdout is the result alone (vLLM's logs go to stderr), with the
    tokens this engine gives the same steered request."""
    ref = _reference(steerer)
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", "generate", "--engine", "vllm", "--prompt", PROMPTS[0],
                           "--constraint", "lowercase", "--constraint", "json_format", "--policy", "constant",
                           "--alpha", "24", "--max-new-tokens", "8", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["tokens"] == ref.tokens
    assert out["steered_tokens"] == ref.steered_tokens
    assert [v["task"] for v in out["verdicts"]] == ["lowercase", "json_format"]


def test_serve_with_engine_vllm(steerer, tmp_path):
    """`steerer serve --engine vllm`: ready line on stdout, model info from the vLLM engine, a steered request's
    tokens as this engine gives them, streamed tokens, a chat completion with verdicts on `--http-port`; then a bank at
    other layers swapped in on the same engine (ReloadProbeBank) serves the next request."""
    import openai

    from steerer.service.client import SteererClient
    from steerer.service.testing import ServerProcess, free_port, placeholder_bank

    ref = _reference(steerer)
    other = placeholder_bank(steerer.fingerprint(), steerer.hidden_size, "vllm-swap")
    assert set(other.layers) != set(steerer.bank.layers)
    other_path = other.save(tmp_path / "swap")
    http_port = free_port()
    with ServerProcess("--engine", "vllm", "--metrics-port", "-1", "--max-batch", "4", "--max-prompt-tokens", "512",
                       "--max-new-tokens", "64", "--threads", "1", "--admin-token", "admin-secret",
                       "--http-port", str(http_port), "--stop-steering-on-detection", startup_s=900) as server, \
            SteererClient(server.target) as client, SteererClient(server.target, token="admin-secret") as admin:
        info = client.model_info()
        assert info.fingerprint == steerer.fingerprint() and info.num_layers == 30
        kwargs = dict(constraints=["lowercase", "json_format"], policy="constant:24", max_new_tokens=8)
        reply = client.generate(PROMPTS[0], timeout=300, **kwargs)
        assert list(reply.token_ids) == ref.tokens
        assert dict(reply.usage.steered_tokens) == ref.steered_tokens
        assert {v.task for v in reply.verdicts} == {"lowercase", "json_format"}
        streamed = list(client.stream(PROMPTS[0], timeout=300, **kwargs))
        events = [m.WhichOneof("event") for m in streamed]
        assert events[-1] == "final" and events[:-1] and set(events[:-1]) == {"token"}
        assert list(streamed[-1].final.token_ids) == ref.tokens
        # The HTTP front on the same engine (the openai client, no token: only admin RPCs need one here).
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="-", max_retries=0, timeout=300)
        chat = http.chat.completions.create(
            model=http.models.list().data[0].id, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8,
            temperature=0, extra_body={"steerer": {"constraints": [{"task": "lowercase"}],
                                                   "policy": {"kind": "constant", "alpha": 24}}})
        assert chat.choices[0].message.content and 1 <= chat.usage.completion_tokens <= 8
        assert [v["task"] for v in chat.model_extra["steerer"]["verdicts"]] == ["lowercase"]
        assert chat.model_extra["steerer"]["usage"]["steeredTokens"]["lowercase"] >= 1
        swapped = admin.reload_bank(str(other_path), timeout=300)  # an admin RPC: the admin token
        assert swapped.bank_version == "vllm-swap" and swapped.previous_version == steerer.bank.version
        after = client.generate(PROMPTS[0], timeout=300, **kwargs)
        assert after.bank_version == "vllm-swap" and 1 <= len(after.token_ids) <= 8


def test_stop_steering_on_detection_and_the_backend_interface_on_vllm(steerer):
    """The driver's options are the same on vLLM: a detected task's conditional steering stops from the next pass
    with `stop_steering_on_detection=True` and goes on without it; `VLLMSteerer` is a `steerer.backend.Backend`."""
    from dataclasses import replace

    from steerer.backend import Backend
    from steerer.engine.vllm.driver import VLLMSteerer
    from steerer.engine.vllm.state import STATE
    from steerer.request import TokenEvent
    from steerer.service.testing import placeholder_bank

    assert isinstance(steerer, Backend)
    layers = steerer.bank.layers  # the engine's op layers: a bank on this engine must read and steer there
    bank = placeholder_bank(steerer.fingerprint(), steerer.hidden_size, "vllm-stop", {"lowercase": -4.0})
    bank.probes = [replace(p, layer=layers[i % len(layers)]) for i, p in enumerate(bank.probes)]
    request = Request(PROMPTS[0], (Constraint("lowercase", {}),), SteeringPolicy("conditional", 4.0),
                      sampling=SamplingParams(max_new_tokens=10), id="stop")
    after = {}
    steerer.close()  # one driver holds the plugin state at a time
    try:
        for stop in (False, True):
            with VLLMSteerer(bank, llm=steerer.llm, threads=1, stop_steering_on_detection=stop) as other:
                assert isinstance(other, Backend)
                events = [e for e in other.generate([request]) if isinstance(e, TokenEvent)]
            (at,) = [e.index for e in events for _ in e.detections]  # the first capital: a certain violation
            after[stop] = [e.steering["lowercase"] for e in events if e.index > at]
    finally:
        STATE.install(steerer.capacity, steerer.controller.tap_layers, steerer.controller.steering)
    assert after[True] and all(alpha == 0 for alpha in after[True])
    assert any(alpha != 0 for alpha in after[False])


# -- preemption: recompute under KV-cache pressure -----------------------------------------------------------------
# Eight 32-token KV blocks (256 tokens) for eight requests of about 100 tokens each: running requests are
# preempted (their blocks freed) and later recomputed, prompt and generated tokens, in chunks of 48 tokens.
PREEMPTION = {"max_num_seqs": 8, "max_model_len": 224, "max_num_batched_tokens": 48, "block_size": 32,
              "num_gpu_blocks_override": 8}
PREEMPTION_TOKENS = 64


def preemption_requests() -> list[Request]:
    c = (Constraint("lowercase", {}), Constraint("json_format", {}))
    sampling = SamplingParams(max_new_tokens=PREEMPTION_TOKENS, ignore_eos=True)  # every request stays long
    return [Request(PROMPTS[i % len(PROMPTS)], c, SteeringPolicy("constant", 24.0) if i % 2 else SteeringPolicy(),
                    sampling=sampling, id=f"{'s' if i % 2 else 'u'}{i}") for i in range(8)]


def preemption_child(out: str) -> None:
    """In a process of its own (one VLLMSteerer per process): each request alone (no pressure), then all eight
    at once; writes tokens, steered counts, traces and the preemptions vLLM's scheduler made."""
    from steerer.engine.vllm.driver import VLLMSteerer
    from steerer.engine.vllm.state import STATE

    engine = VLLMSteerer(ProbeBank.load(), record=True, max_num_seqs=PREEMPTION["max_num_seqs"], threads=1,
                         max_model_len=PREEMPTION["max_model_len"],
                         llm_kwargs={k: v for k, v in PREEMPTION.items() if k not in ("max_num_seqs", "max_model_len")})
    scheduler = engine.engine.engine_core.engine_core.scheduler  # in-process engine core (the driver's setting)
    assert engine.engine.vllm_config.cache_config.num_gpu_blocks == PREEMPTION["num_gpu_blocks_override"]
    preempted: list[str] = []
    preempt = scheduler._preempt_request

    def counting(request, *args, **kwargs):  # vLLM's one preemption path (scheduler.py, `_preempt_request`)
        external = request.request_id.rsplit("-", 1)[0]  # vLLM appends a random suffix to the caller's id
        slot = engine._by_vllm.get(external)
        preempted.append(engine._live[slot].request.id if slot is not None else external)
        return preempt(request, *args, **kwargs)

    scheduler._preempt_request = counting
    partial = [0]  # recompute chunks that stop among a row's generated tokens (vLLM samples nothing from them)
    read = engine._read

    def reading(outputs):
        info = STATE.last_pass()
        if info is not None and info.number != engine._seen_pass:
            for row, slot in enumerate(info.slots):
                live = engine._live.get(slot)
                if live is not None and (info.prompt_lengths[row] <= info.last_positions[row]
                                         < info.prompt_lengths[row] + live.outputs - 1):
                    partial[0] += 1
        return read(outputs)

    engine._read = reading

    def record(results) -> dict:
        return {r.request_id: {"tokens": r.tokens, "steered": r.steered_tokens, "traces": r.traces} for r in results}

    requests = preemption_requests()
    alone = {}
    for request in requests:
        alone.update(record(engine.run([request])))
    preempted_alone = list(preempted)
    engine.llm.reset_prefix_cache()  # the pressured run recomputes rather than reading the unpressured run's KV
    together = record(engine.run(requests))
    engine.close()
    Path(out).write_text(json.dumps({"alone": alone, "together": together, "preempted_alone": preempted_alone,
                                     "preempted": preempted[len(preempted_alone):], "partial_chunks": partial[0]}))


def test_preemption_recompute_keeps_every_requests_tokens(tmp_path):
    """Eight requests (four steered at constant +24, four unsteered) on an engine whose KV cache holds eight
    blocks: vLLM preempts running requests of both kinds and recomputes them (in chunks, some stopping among
    the generated tokens); every request's tokens, steered-token counts and probe readings equal its run alone."""
    out = tmp_path / "preemption.json"
    proc = subprocess.run([sys.executable, __file__, "--preemption", str(out)], cwd=ROOT, timeout=900,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["preempted_alone"] == []  # the reference ran without pressure
    preempted = set(data["preempted"])
    print(f"preemptions: {len(data['preempted'])} ({sorted(preempted)}); recompute chunks stopping among generated "
          f"tokens: {data['partial_chunks']}")
    assert any(r.startswith("s") for r in preempted) and any(r.startswith("u") for r in preempted)
    assert data["partial_chunks"] > 0
    for request in preemption_requests():
        alone, together = data["alone"][request.id], data["together"][request.id]
        assert len(together["tokens"]) == PREEMPTION_TOKENS, request.id
        assert together["tokens"] == alone["tokens"], request.id
        assert together["steered"] == alone["steered"], request.id
        for task, trace in alone["traces"].items():
            assert len(together["traces"][task]) == len(trace), (request.id, task)
            assert max(abs(a - b) for a, b in zip(together["traces"][task], trace, strict=True)) < RISK_TOLERANCE
    assert all(data["together"][r]["steered"]["lowercase"] > 0 for r in data["together"] if r.startswith("s"))


# -- tensor parallel: the op on every rank ---------------------------------------------------------------------------
# SmolLM2-135M has 9 attention heads and 3 KV heads: vLLM refuses tensor_parallel_size=2 ("Total number of attention
# heads (9) must be divisible by tensor parallel size (2)"); 3 divides both. On the CPU backend each rank is a worker
# process (multiproc executor; the engine core stays in this process), and thread binding needs one NUMA node
# per rank unless VLLM_CPU_OMP_THREADS_BIND=nobind.
TP_ALPHAS = (0.0, 64.0, -64.0)  # per slot; the slot rides in SamplingParams.extra_args as the driver sends it


def _install_steering(worker, alphas: list[float]) -> int:
    """On one rank: steer the lowercase probe's direction at its steering layer with these per-slot alphas, tap there."""
    import torch as _torch

    from steerer.engine.vllm.state import STATE
    from steerer.taps import LayerSteering, Where

    bank = ProbeBank.load()
    k = bank.index("lowercase")
    layer = bank.probes[k].steering_layer
    steer = LayerSteering(bank.directions[k : k + 1].clone(), Where.GENERATED)
    steer.set_coeffs(_torch.tensor(alphas, dtype=_torch.float32)[:, None])
    STATE.install(len(alphas), [layer], {layer: steer})
    return layer


def _read_state(worker) -> dict:
    import torch.distributed as dist

    from steerer.engine.vllm.state import STATE

    return {"rank": dist.get_rank() if dist.is_initialized() else 0, "op_calls": STATE.op_calls,
            "passes": STATE.passes, "taps": {str(k): v.tolist() for k, v in STATE.captured.items()}}


def tensor_parallel_child(tp: int, out: str) -> None:
    """Steering and taps with no controller: the same per-slot table installed on every rank (collective_rpc),
    one prompt at three strengths; writes tokens and each rank's op calls and last-pass taps."""
    from vllm import LLM
    from vllm import SamplingParams as VLLMSampling

    from steerer.engine.vllm import LAYERS_KEY
    from steerer.engine.vllm.driver import configure_environment
    from steerer.engine.vllm.plugin import register
    from steerer.engine.vllm.rows import SLOT_KEY, SteererRows
    from steerer.model import resolve_model_path

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # one NUMA node here: vLLM's auto binding refuses 3 ranks
    configure_environment()
    register()
    bank = ProbeBank.load()
    layer = bank.probes[bank.index("lowercase")].steering_layer
    llm = LLM(model=resolve_model_path(None), dtype="float32", tensor_parallel_size=tp, enforce_eager=True,
              max_model_len=512, gpu_memory_utilization=0.3, seed=0, enable_prefix_caching=False,
              distributed_executor_backend="mp" if tp > 1 else None, logits_processors=[SteererRows],
              hf_overrides={"architectures": [ARCHITECTURE], LAYERS_KEY: [layer]})
    assert llm.collective_rpc(_install_steering, args=(list(TP_ALPHAS),)) == [layer] * tp
    ids = chat_prompt(llm.get_tokenizer(), PROMPTS[1])
    outputs = llm.generate([{"prompt_token_ids": ids}] * len(TP_ALPHAS),
                           [VLLMSampling(max_tokens=16, temperature=0.0, ignore_eos=True, extra_args={SLOT_KEY: slot})
                            for slot in range(len(TP_ALPHAS))], use_tqdm=False)
    Path(out).write_text(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                                     "ranks": llm.collective_rpc(_read_state)}))


def test_tensor_parallel_3_steers_and_taps_identically_on_every_rank(tmp_path):
    """tensor_parallel_size=3 (eager): every rank runs the op on the full, all-reduced residual, so the same
    slot table steers identically on each and any rank can tap; tokens per strength equal tensor_parallel_size=1's.
    (The driver itself still needs one worker in its process: coefficients and taps would have to cross to and
    from the ranks; see docs/VLLM.md.)"""
    runs = {}
    for tp in (3, 1):
        out = tmp_path / f"tp{tp}.json"
        proc = subprocess.run([sys.executable, __file__, "--tensor-parallel", str(tp), str(out)], cwd=ROOT,
                              timeout=900, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[tp] = json.loads(out.read_text())
    ranks = runs[3]["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2]
    assert len({(r["op_calls"], r["passes"]) for r in ranks}) == 1 and ranks[0]["passes"] >= 16
    taps = [torch.tensor(next(iter(r["taps"].values()))) for r in ranks]
    reference = torch.tensor(next(iter(runs[1]["ranks"][0]["taps"].values())))
    # After each all-reduce every rank holds the full residual, equal up to the last bits: the CPU backend's
    # all-reduce does not give every rank the same float sums (measured: 1.5e-5 on values up to 171).
    spread = max(float((t - taps[0]).abs().max()) for t in taps)
    gap = float((taps[0] - reference).abs().max()) if taps[0].shape == reference.shape else float("inf")
    print(f"taps: spread across ranks {spread:.2e}, rank 0 vs tensor_parallel_size=1 {gap:.2e}")
    assert spread < 1e-3 and gap < 1e-2
    assert runs[3]["tokens"] == runs[1]["tokens"]
    unsteered, plus, minus = runs[3]["tokens"]
    assert plus != unsteered and minus != unsteered


if __name__ == "__main__" and sys.argv[1:2] == ["--preemption"]:  # the preemption test's subprocess
    preemption_child(sys.argv[2])
if __name__ == "__main__" and sys.argv[1:2] == ["--tensor-parallel"]:  # the tensor-parallel test's subprocesses
    tensor_parallel_child(int(sys.argv[2]), sys.argv[3])


def test_a_pooled_probe_reads_the_running_mean_of_its_twin_on_vllm(steerer):
    """`pool: mean` on vLLM's driver (#22): a pooled probe's logit at each reading is the running mean of an
    unpooled twin's (same weights, layer) over the generated readings; the prompt's last reading as is."""
    import math
    from dataclasses import replace

    from steerer.engine.vllm.driver import VLLMSteerer
    from steerer.engine.vllm.state import STATE
    from steerer.monitor import MonitorConfig
    from steerer.request import TokenEvent
    from steerer.service.testing import placeholder_bank

    layers = steerer.bank.layers  # the engine's op layers: a bank on this engine must read and steer there
    bank = placeholder_bank(steerer.fingerprint(), steerer.hidden_size, "vllm-pool")
    bank.probes = [replace(p, layer=layers[i % len(layers)]) for i, p in enumerate(bank.probes)]
    weight = torch.randn(steerer.hidden_size, generator=torch.Generator().manual_seed(0)) / steerer.hidden_size ** 0.5
    for task, declared in (("sentiment", {"inputs": [], "pool": "mean"}), ("lowercase", None)):
        k = bank.index(task)
        bank.weights[k], bank.biases[k] = weight * 0.5, 0.0
        bank.probes[k] = replace(bank.probes[k], layer=layers[0], conditioning=declared)
    request = Request(PROMPTS[0], (Constraint("sentiment", {"polarity": "positive"}), Constraint("lowercase", {})),
                      sampling=SamplingParams(max_new_tokens=12), id="pool")
    steerer.close()  # one driver holds the plugin state at a time
    try:
        with VLLMSteerer(bank, llm=steerer.llm, threads=1,
                         monitor_config=MonitorConfig(smoothing=0.0, warmup_tokens=0)) as other:
            events = [e for e in other.generate([request]) if isinstance(e, TokenEvent)]
    finally:
        STATE.install(steerer.capacity, steerer.controller.tap_layers, steerer.controller.steering)
    logit = lambda risk: math.log((1 - risk) / risk)  # noqa: E731
    plain = [logit(e.risks["lowercase"]) for e in events]
    pooled = [logit(e.risks["sentiment"]) for e in events]
    expected = [plain[0]] + [sum(plain[1:j + 1]) / j for j in range(1, len(plain))]
    assert len(events) > 4 and pooled == pytest.approx(expected, abs=2e-3)
    assert max(abs(a - b) for a, b in zip(pooled, plain, strict=True)) > 0.01  # the mean is not the reading
