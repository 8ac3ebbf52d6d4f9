"""Run a real `steerer serve` in a child process, and make placeholder probe banks (tests, benchmarks).

A placeholder bank has the real task names and layers but zero probe weights, so every probe's
P(satisfied) is exactly sigmoid(bias): a test can make a task's risk high or low on purpose and know which
bank produced a token. Directions are random unit vectors, enough to exercise steering.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

READY = re.compile(r"^steerer: serving \S+ on (?P<target>\S+) \((?P<scheme>\w+)\), metrics (?P<metrics>\S+)")
DEFAULT_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26)


def placeholder_bank(fingerprint: str, hidden_size: int, version: str, biases: dict[str, float] | None = None,
                     model: str = "smollm2-135m-instruct", seed: int = 0):
    """A bank over all nine tasks whose P(satisfied) is sigmoid(bias) per task (default bias 4: low risk)."""
    import torch

    from steerer.bank import Probe, ProbeBank
    from steerer.taps import unit_directions
    from steerer.tasks import TASKS

    tasks = list(TASKS)
    biases = biases or {}
    g = torch.Generator().manual_seed(seed)
    # Fixtures with known behaviour, so marked reliable: the server flags and steers with them by default.
    probes = [Probe(task=t, layer=DEFAULT_LAYERS[i % len(DEFAULT_LAYERS)], reliable=True) for i, t in enumerate(tasks)]
    return ProbeBank(model, fingerprint, hidden_size, probes, torch.zeros(len(tasks), hidden_size),
                     torch.tensor([float(biases.get(t, 4.0)) for t in tasks]),
                     unit_directions(torch.randn(len(tasks), hidden_size, generator=g)), version=version)


BROKEN = ("manifest-list", "truncated", "nan-directions", "nan-weights", "not-unit")


def broken_bank(source: str | Path, dest: str | Path, how: str) -> Path:
    """A copy of the bank at `source` damaged one way (see BROKEN), written without validation: what a
    bad deploy or a partial copy leaves behind, for tests that the loader refuses it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from steerer.bank import MANIFEST, TENSORS

    source, dest = Path(source), Path(dest)
    shutil.copytree(source, dest)
    if how == "manifest-list":
        (dest / MANIFEST).write_text("[]")
    elif how == "truncated":
        data = (source / TENSORS).read_bytes()
        (dest / TENSORS).write_bytes(data[: len(data) // 2])
    elif how in ("nan-directions", "nan-weights", "not-unit"):
        tensors = load_file(str(source / TENSORS))
        name = "weights" if how == "nan-weights" else "directions"
        if how == "not-unit":
            tensors[name][0] *= 2
        else:
            tensors[name][0, 0] = float("nan")
        save_file(tensors, str(dest / TENSORS), metadata={"format_version": "1"})
    else:
        raise ValueError(f"unknown damage {how!r}; one of {', '.join(BROKEN)}")
    return dest


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may take it later; fine for tests)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`steerer serve --port 0 --metrics-port 0 ...` in a child process; waits for its ready line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, startup_s: float = 300,
                 host: str = "127.0.0.1"):
        fd, self.log_path = tempfile.mkstemp(prefix="steerer-serve-", suffix=".log")
        cmd = [sys.executable, "-m", "steerer.cli", "serve", "--host", host, "--port", "0", "--metrics-port", "0",
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=fd, text=True,
                                     env={**os.environ, **(env or {})})
        os.close(fd)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + startup_s
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"steerer serve did not start (exit {self.proc.returncode}):\n{self.stderr()}")
        match = READY.match(self.lines[0])
        self.target = match["target"]
        self.metrics_url = match["metrics"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if READY.match(line):
                self._ready.set()

    def stderr(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (graceful), then SIGKILL if it does not exit in time; returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        Path(self.log_path).unlink(missing_ok=True)


# Prompts for A/B runs on lowercase (the end-to-end test and benchmarks/ab_e2e.py): everyday list requests
# that ask for lowercase, so steering toward lowercase has something to move.
AB_TOPICS = [
    "staying healthy",
    "saving money",
    "learning to cook",
    "studying for exams",
    "travelling light",
    "growing tomatoes",
    "sleeping better",
    "writing emails",
    "keeping a cat",
    "running a meeting",
    "learning a language",
    "cleaning a kitchen",
    "planning a trip",
    "reading more books",
    "making friends",
    "starting to run",
    "painting a room",
    "caring for houseplants",
    "baking bread",
    "riding a bike in town",
    "staying focused",
    "moving house",
    "hosting a dinner",
    "fixing a flat tyre",
]
LOWERCASE_SUFFIX = " Write everything in lowercase letters; do not use any capital letters."


def lowercase_tips_prompt(i: int, templates: tuple[str, ...] = ("List three tips for {}.",)) -> str:
    """The i-th A/B prompt: topics cycle fastest, then templates."""
    template = templates[(i // len(AB_TOPICS)) % len(templates)]
    return template.format(AB_TOPICS[i % len(AB_TOPICS)]) + LOWERCASE_SUFFIX


def metric_value(server: ServerProcess, name: str, **labels: str) -> float:
    """The current value of one sample on a running server's /metrics (0 if absent)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def split_stream(items) -> tuple[dict, dict[str, list]]:
    """What `Steerer.generate` (or a driver's) yields, split: results by request id, token events by request id."""
    from steerer.controller import TokenEvent

    results, events = {}, {}
    for item in items:
        if isinstance(item, TokenEvent):
            events.setdefault(item.request_id, []).append(item)
        else:
            results[item.request_id] = item
    return results, events
