"""A real Prometheus scrapes a live server under traffic; every dashboard panel's query returns data.

Needs the `prometheus` binary (Debian: `apt-get install prometheus`; only the binary is run, on a
loopback port with a temporary TSDB, never the system service). Skips with that advice when absent.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from steerer.service.client import SteererClient
from steerer.service.testing import ServerProcess, free_port, placeholder_bank

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "steerer.json"
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary: apt-get install prometheus")
# Grafana's built-in interval variables, as Grafana would substitute them for a 1 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m"}


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append((f"{panel['title']} [{target['refId']}]", expr))
    return queries


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


@pytest.fixture(scope="module")
def server(lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bank")
    # lowercase and term_exclusion read risk ~0.98 (flags, steering, predicted violations); the others ~0.02.
    placeholder_bank(lm.fingerprint, lm.hidden_size, "p1", {"lowercase": -4.0, "term_exclusion": -4.0}).save(folder)
    # An A/B experiment on lowercase, so the per-arm panels have data (traffic carries experiment keys).
    experiments = folder / "experiments.json"
    experiments.write_text(json.dumps({"experiments": [{"name": "lc", "arms": [
        {"name": "control", "weight": 1, "policies": {"lowercase": "off"}},
        {"name": "steered", "weight": 1, "policies": {"lowercase": "constant:4"}}]}]}))
    with ServerProcess("--bank", str(folder), "--max-batch", "4", "--max-queue", "1", "--experiments",
                       str(experiments), "--outcome-log", str(folder / "outcomes.sqlite")) as proc:
        yield proc


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus")
    metrics = urllib.parse.urlsplit(server.metrics_url)
    config = folder / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "steerer", "metrics_path": metrics.path,
                            "static_configs": [{"targets": [metrics.netloc]}]}]}))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start:\n{(folder / 'prometheus.log').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def gauge(server: ServerProcess, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def traffic(server: ServerProcess) -> None:
    """Streams and unary calls with constraints and steering, a few bad requests, one RESOURCE_EXHAUSTED."""
    words = ("word_count", {"relation": "at most", "limit": 40})
    with SteererClient(server.target) as client:
        def one(i: int) -> None:
            stream = i % 2 == 0
            # "The capital of France is Paris": term_exclusion is flagged from the warm-up on and detected at
            # "Paris", a forecast with a lead; lowercase is detected at "The", which settles it unflagged
            kwargs = dict(constraints=[("lowercase", {}), words, ("json_format", {}),
                                       ("term_exclusion", {"terms": ["Paris"]})], policy="conditional:4",
                          max_new_tokens=8, ignore_eos=True, experiment_key=f"user-{i}")
            if stream:
                list(client.stream("Name three colors.", **kwargs))
            else:
                client.generate("What is the capital of France?", **kwargs)

        # Keys 0-3 land in both arms of the experiment "lc" (steered, steered, steered, control).
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for bad in (dict(max_new_tokens=0), dict(policy="constant:nan")):
            with pytest.raises(grpc.RpcError):
                client.generate("Hi", **bad)
        # Fill the batch (4) and the queue (1), then one more is refused.
        held = [client.stream("Count to a hundred.", max_new_tokens=500, ignore_eos=True) for _ in range(5)]
        try:
            deadline = time.monotonic() + 60
            while (gauge(server, "steerer_batch_size"), gauge(server, "steerer_queue_depth")) != (4, 1):
                assert time.monotonic() < deadline, "the batch and queue did not fill"
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as err:
                client.generate("Hi", max_new_tokens=1)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for stream in held:
                stream.cancel()


def query(prometheus: str, expr: str) -> list[float]:
    reply = get_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert reply["status"] == "success", (expr, reply)
    return [float(r["value"][1]) for r in reply["data"]["result"]]


def served_requests(server: ServerProcess) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "steerer_requests_total")


def wait_until(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.25)


def scraped_up_to_now(server: ServerProcess, prometheus: str) -> None:
    """Wait until Prometheus holds a sample of the server's request counter at least as high as it is now."""
    now = served_requests(server)
    wait_until(lambda: (v := query(prometheus, "sum(steerer_requests_total)")) and v[0] >= now,
               f"prometheus scraped steerer_requests_total >= {now}")


def test_every_dashboard_query_returns_data(server, prometheus):
    queries = panel_queries()
    assert len(queries) >= 15
    # Every step waits for a condition, never a fixed time: Prometheus's first scrape comes some seconds
    # after /-/ready, and a wave that ends before it leaves no increase inside any rate window.
    wait_until(lambda: query(prometheus, 'up{job="steerer"}') == [1.0], "prometheus scraped the target")
    scraped_up_to_now(server, prometheus)
    traffic(server)
    scraped_up_to_now(server, prometheus)
    traffic(server)
    scraped_up_to_now(server, prometheus)
    targets = get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets

    def empty() -> list:
        answers = [(title, expr, query(prometheus, expr)) for title, expr in queries]
        return [a for a in answers if not any(math.isfinite(v) for v in a[2])]

    # The traffic's responses write capitals under a lowercase constraint and "Paris" under a term_exclusion one
    # the stand-in probe always flags: detections and flag leads were counted, apart from flags (zero-valued
    # series alone would pass below).
    for expr in ('sum(steerer_violations_detected_total{task="lowercase"})',
                 'sum(steerer_flag_lead_tokens_count{task="term_exclusion"})'):
        wait_until(lambda expr=expr: (v := query(prometheus, expr)) and v[0] > 0, f"{expr} > 0", timeout=30)
    # Recording happens at scrape time; rule-free queries see it at once, but allow a few evaluations.
    deadline = time.monotonic() + 30
    while (missing := empty()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not missing, "panels without data:\n" + "\n".join(map(str, missing))


def test_shipped_prometheus_config_is_valid():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool binary")
    proc = subprocess.run([promtool, "check", "config", str(REPO / "deploy" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
