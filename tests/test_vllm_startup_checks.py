"""The `vllm serve` plugin's start-up checks and process lifetime (`steerer.engine.vllm.startup`) without vLLM: the
pure checks on configs, the exit/off decision, and a child that dies with its parent. Main suite (needs no vLLM;
with vLLM, end to end: tests/test_vllm_serve_startup.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from steerer import ProbeBank
from steerer.engine.vllm import startup
from steerer.model import resolve_model_path

SERVE = [startup.SERVE_PROCESSOR]


def _engine(hf_config, model: str, processors=SERVE) -> SimpleNamespace:
    """The parts of vLLM's ModelConfig the check reads."""
    return SimpleNamespace(hf_config=hf_config, model=model, logits_processors=processors)


def test_only_llama_checkpoints_load_into_the_override():
    assert startup.architecture_problem(LlamaConfig()) is None
    problem = startup.architecture_problem(Qwen2Config())
    assert problem.startswith("SteererLlamaForCausalLM implements LlamaForCausalLM only; this checkpoint is "
                              "Qwen2ForCausalLM (model_type 'qwen2')")


def test_the_bank_check_names_each_problem():
    bank = ProbeBank.load()
    config = AutoConfig.from_pretrained(resolve_model_path(None))
    assert startup.bank_problem(bank, config, bank.fingerprint) is None
    assert startup.bank_problem(bank, config, None) is None  # fingerprint unreadable: checked at the first request
    small = LlamaConfig(hidden_size=32, num_hidden_layers=2)
    assert startup.bank_problem(bank, small, None) == \
        f"bank {bank.version} ({bank.model}) is for hidden size {bank.hidden_size}; the model has 32"
    config.steerer_layers = [0, 1]  # the op at two layers only: the bank's others are out of reach
    assert "uses decoder layers" in startup.bank_problem(bank, config, bank.fingerprint)
    assert startup.bank_problem(None, small, None, "no probe bank at /x") == "no probe bank at /x"


def test_exit_by_default_or_steerer_off(tmp_path, monkeypatch):
    engine = _engine(LlamaConfig(hidden_size=32, num_hidden_layers=2), str(tmp_path))
    monkeypatch.delenv(startup.ON_MISMATCH_ENV, raising=False)
    monkeypatch.delenv(startup.OFF_REASON, raising=False)
    monkeypatch.setattr(os, "register_at_fork", lambda **_: None)  # not in the test process
    with pytest.raises(SystemExit, match=r"^steerer: bank .* is for hidden size 576; the model has 32 "
                                         r"\(STEERER_ON_BANK_MISMATCH=off serves plain traffic with steerer off\)$"):
        startup.check_engine(engine)
    monkeypatch.setenv(startup.ON_MISMATCH_ENV, "off")
    startup.check_engine(engine)
    assert startup.off_reason().endswith("is for hidden size 576; the model has 32")
    monkeypatch.setenv(startup.ON_MISMATCH_ENV, "maybe")
    with pytest.raises(SystemExit, match="STEERER_ON_BANK_MISMATCH='maybe'; choose exit or off"):
        startup.check_engine(engine)
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):  # a library engine: an exception, not an exit
        startup.check_engine(_engine(Qwen2Config(), str(tmp_path), processors=None))
    startup.check_engine(_engine(LlamaConfig(hidden_size=32), str(tmp_path), processors=None))  # no bank check


def test_a_child_dies_with_its_parent(tmp_path):
    """A parent starts a child (multiprocessing spawn, as vLLM does) that calls `die_with_parent`, then is killed
    with SIGKILL: the child goes too. Without the call, it would be left running (checked: `protect=False`)."""
    script = tmp_path / "parent.py"  # a file: spawn re-imports the parent's main module in the child
    script.write_text(PARENT)
    for protect, dies in ((True, True), (False, False)):
        parent = subprocess.Popen([sys.executable, str(script), str(protect)], stdout=subprocess.PIPE, text=True)
        child = int(parent.stdout.readline() or 0)
        assert child, "the child did not start"
        try:
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait(30)
            deadline = time.monotonic() + 30
            while _alive(child) and time.monotonic() < deadline and dies:
                time.sleep(0.05)  # polling interval
            assert _alive(child) != dies
        finally:
            if _alive(child):
                os.kill(child, signal.SIGKILL)


PARENT = """
import multiprocessing, os, sys, time
from steerer.engine.vllm.startup import die_with_parent

def child(protect):
    if protect:
        die_with_parent()
    print(os.getpid(), flush=True)  # the parent's stdout, inherited
    time.sleep(600)

if __name__ == "__main__":
    multiprocessing.get_context("spawn").Process(target=child, args=(sys.argv[1] == "True",)).start()
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
