"""The Grafana dashboard under plain `vllm serve` (the mirror of tests/test_prometheus.py, which runs the gRPC service):
a real Prometheus scrapes vLLM's own metrics and the plugin's, and every panel's query returns data except the
gRPC service's own (`GRPC_ONLY`: experiments, the outcome log, rows per forward pass).

Needs vLLM (skipped without; STEERER_REQUIRE_VLLM=1: a failure) and the `prometheus` binary (skipped without:
`apt-get install prometheus`). The bank is a stand-in with known readings (lowercase and term_exclusion always at
risk 0.98), so flags, detections and leads occur; the server runs eager.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("STEERER_REQUIRE_VLLM") == "1":
        raise
    pytest.skip("vLLM is not installed here (scripts/setup-vllm)", allow_module_level=True)

from test_vllm_serve_startup import Serve  # noqa: E402

from steerer import ProbeBank  # noqa: E402
from steerer.model import resolve_model_path  # noqa: E402
from steerer.service.testing import free_port, placeholder_bank  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "steerer.json"
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary: apt-get install prometheus")
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m"}
# Panels of the gRPC service only (no experiments, outcome log or steerer scheduler under vllm serve).
GRPC_ONLY = ("Compliance by experiment arm and task", "Request latency by experiment arm",
             "Responses per second by experiment arm", "Traffic share by arm: configured vs observed",
             "Experiments-file loads (last hour)", "Outcome log: records and write errors (last hour)",
             "Batch size and queue depth [C]")
XARGS = {"steerer_constraints": ["lowercase", 'word_count:{"relation": "at most", "limit": 40}', "json_format",
                                 'term_exclusion:{"terms": ["Paris"]}'], "steerer_policy": "conditional:4"}


def panel_queries() -> list[tuple[str, str]]:
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            title = f"{panel['title']} [{target['refId']}]"
            if panel["title"] not in GRPC_ONLY and title not in GRPC_ONLY:
                queries.append((title, expr))
    return queries


def query(prometheus: str, expr: str) -> list[float]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        reply = json.loads(response.read())
    assert reply["status"] == "success", (expr, reply)
    return [float(r["value"][1]) for r in reply["data"]["result"]]


def wait_until(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-prometheus")
    default = ProbeBank.load()
    placeholder_bank(default.fingerprint, default.hidden_size, "p1",
                     {"lowercase": -4.0, "term_exclusion": -4.0}).save(folder / "bank")
    srv = Serve(Path(resolve_model_path(None)), folder / "server.log", STEERER_BANK=str(folder / "bank"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [
        {"job_name": "steerer", "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]},
        {"job_name": "vllm", "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}]}))
    port = free_port()
    with open(folder / "prometheus.log", "w") as log:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: sorted(query(url, "up")) == [1.0, 1.0] if _ready(url) else False,
                   "prometheus scraped both targets", timeout=90)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _chat(server: Serve, prompt: str, xargs: dict | None) -> None:
    body = {"model": server.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}
    request = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200


def traffic(server: Serve) -> None:
    """Monitored and steered requests ("Paris" under term_exclusion: a detection the stand-in probe flagged
    first), concurrently, and a plain one."""
    prompts = ["What is the capital of France?", "Name three colors."] * 2
    threads = [threading.Thread(target=_chat, args=(server, p, XARGS)) for p in prompts]
    for t in threads:
        t.start()
    _chat(server, "Say hello.", None)
    for t in threads:
        t.join()


def scraped_up_to_now(server: Serve, prometheus: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    now = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "steerer_requests_total")
    wait_until(lambda: (v := query(prometheus, "sum(steerer_requests_total)")) and v[0] >= now,
               f"prometheus scraped steerer_requests_total >= {now}")


def test_every_dashboard_query_returns_data_under_vllm_serve(server, prometheus):
    queries = panel_queries()
    assert len(queries) >= 15
    for _ in range(2):  # two waves, so rates have two points inside their window
        traffic(server)
        scraped_up_to_now(server, prometheus)
    for expr in ('sum(steerer_violations_detected_total{task="term_exclusion"})',
                 'sum(steerer_flag_lead_tokens_count{task="term_exclusion"})',
                 "sum(vllm:time_to_first_token_seconds_count)"):
        wait_until(lambda expr=expr: (v := query(prometheus, expr)) and v[0] > 0, f"{expr} > 0", timeout=30)

    def empty() -> list:
        answers = [(title, expr, query(prometheus, expr)) for title, expr in queries]
        return [a for a in answers if not any(math.isfinite(v) for v in a[2])]

    deadline = time.monotonic() + 30
    while (missing := empty()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not missing, "panels without data:\n" + "\n".join(map(str, missing))
    assert not query(prometheus, 'steerer_requests_total{method!="vllm"}')  # no gRPC method labels exported
