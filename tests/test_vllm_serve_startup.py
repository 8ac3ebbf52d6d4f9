"""Start-up and lifetime of plain `vllm serve` with the plugin (`steerer.engine.vllm.startup`): a checkpoint of an
architecture the override does not implement, or a bank that does not fit the model, is refused before the engine
starts with one line, or (STEERER_ON_BANK_MISMATCH=off) the server serves plain traffic with steerer off; `kill -9`
of the API server takes its engine core and worker with it, and a restarted server serves metrics again.

Skipped unless vLLM is installed (STEERER_REQUIRE_VLLM=1: a failure). The checkpoints are tiny random-weight
models built here (transformers configs + the default model's tokenizer, about 6 MB each); servers run eager.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("STEERER_REQUIRE_VLLM") == "1":
        raise
    pytest.skip("vLLM is not installed here (scripts/setup-vllm)", allow_module_level=True)

import psutil  # noqa: E402 (a vLLM dependency)
from vllm_serve import VLLMServe  # noqa: E402
from vllm_serve import get as _get  # noqa: E402

from steerer import ProbeBank  # noqa: E402
from steerer.engine.vllm import ARCHITECTURE  # noqa: E402
from steerer.engine.vllm.startup import ON_MISMATCH_ENV, bank_problem  # noqa: E402
from steerer.engine.vllm.weights import checkpoint_fingerprint  # noqa: E402
from steerer.model import resolve_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START_S = 600
EXIT_S = 300


def _tiny_checkpoint(folder: Path, kind: str) -> Path:
    """A random-weight model of hidden size 32 with the default model's tokenizer, saved as safetensors (one head of
    64 dimensions: vLLM's CPU attention has no kernel for smaller heads)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None))
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=512, tie_word_embeddings=True,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


class Serve(VLLMServe):
    """`python -m vllm.entrypoints.openai.api_server` (= `vllm serve`) with the plugin, eager, in a subprocess."""

    startup_s = START_S

    def __init__(self, model: Path, log: Path, port: int | None = None, metrics_port: int | None = None,
                 **env: str):
        super().__init__(model, log, ["--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "2",
                                      "--gpu-memory-utilization", "0.3"], env, port, metrics_port)

    def exit_line(self) -> str:
        """The last line of a server that exited at start (it must exit, non-zero)."""
        try:
            code = self.proc.wait(EXIT_S)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"the server did not exit at start:\n{self.output()[-3000:]}")
        assert code != 0
        return self.output().strip().splitlines()[-1]

    def complete(self, xargs: dict | None = None) -> tuple[int, dict]:
        body = {"model": self.model, "prompt": "The ocean is", "max_tokens": 4, "temperature": 0}
        if xargs is not None:
            body["vllm_xargs"] = xargs
        request = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def test_an_architecture_the_override_does_not_implement_is_refused_by_name(tiny_qwen2, tmp_path):
    line = Serve(tiny_qwen2, tmp_path / "log").exit_line()
    assert line == (f"steerer: {ARCHITECTURE} implements LlamaForCausalLM only; this checkpoint is Qwen2ForCausalLM "
                    "(model_type 'qwen2'), which it would run with wrong outputs: load it as SteererQwen2ForCausalLM "
                    "(--hf-overrides '{\"architectures\": [\"SteererQwen2ForCausalLM\"]}')")


def test_a_bank_for_another_hidden_size_stops_the_server_at_start_with_one_line(tiny_llama, tmp_path):
    server = Serve(tiny_llama, tmp_path / "log")
    line = server.exit_line()
    bank = ProbeBank.load()
    assert line == (f"steerer: bank {bank.version} ({bank.model}) is for hidden size {bank.hidden_size}; the model "
                    f"has 32 ({ON_MISMATCH_ENV}=off serves plain traffic with steerer off)")
    assert "Traceback" not in server.output()


def test_a_bank_of_the_same_shape_and_another_fingerprint_is_found_before_loading():
    """The fingerprint is read from the checkpoint's safetensors before vLLM loads it (the same function the
    start-up check runs), and equals the one the bank was trained on for the default model."""
    from transformers import AutoConfig

    model = resolve_model_path(None)
    config = AutoConfig.from_pretrained(model)
    bank = ProbeBank.load()
    assert checkpoint_fingerprint(model, config) == bank.fingerprint
    assert bank_problem(bank, config, bank.fingerprint) is None
    other = dataclasses.replace(bank, fingerprint="0" * 16, warning=None)
    assert bank_problem(other, config, checkpoint_fingerprint(model, config)) == (
        f"bank {bank.version} ({bank.model}) was trained on another model (fingerprint {'0' * 16}); this model's "
        f"fingerprint is {bank.fingerprint}")


def test_steerer_off_serves_plain_traffic_and_its_processes_die_with_the_server(tiny_llama, tmp_path):
    server = Serve(tiny_llama, tmp_path / "first.log", **{ON_MISMATCH_ENV: "off"})
    try:
        server.wait_ready()
        assert "steerer: off, serving plain traffic only: bank" in server.output()
        status, reply = server.complete()
        assert status == 200 and reply["choices"][0]["text"], reply
        status, reply = server.complete({"steerer_constraints": "lowercase"})
        assert status == 400 and "steerer is off on this server (bank" in json.dumps(reply), reply
        metrics = _get(server.metrics_url)
        assert 'steerer_bank_info{model="steerer off: the bank does not fit this model",version="off"} 1.0' in metrics
        assert 'method="Generate"' not in metrics and 'method="vllm"' in metrics  # no gRPC labels in the plugin
        assert "steerer_time_to_first_token_seconds" not in metrics  # vLLM's own (vllm:...) is the one exported

        children = psutil.Process(server.proc.pid).children(recursive=True)
        assert len(children) >= 2, children  # the engine core and its worker
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
        _gone, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
    finally:
        server.close()

    again = Serve(tiny_llama, tmp_path / "second.log", server.port, server.metrics_port, **{ON_MISMATCH_ENV: "off"})
    try:
        again.wait_ready()  # its worker bound the same metrics port
        assert 'version="off"' in _get(again.metrics_url)
        assert again.complete()[0] == 200
    finally:
        again.close()
