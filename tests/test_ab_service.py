"""A/B experiments through the real server (`steerer serve` child process, real port, the default model and
shipped bank): a two-arm lowercase experiment end to end, forced arms, SIGHUP reloads, and the outcome
log's durability promise under SIGTERM and SIGKILL (see steerer/ab/outcomes.py).

The experiment: prompts ask for a numbered list in lowercase. Unsteered, SmolLM2 capitalises the first
word of each item (compliance ~0); constant steering on the lowercase probe's direction (alpha 100 at
layer 21) keeps the items lowercase (~0.9 on 12 tokens, measured with the library before writing this).
Token counts stay small: the machine is a shared 2-core CPU.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from steerer.ab.analysis import analyse
from steerer.ab.render import write_report
from steerer.service.client import SteererClient
from steerer.service.testing import ServerProcess, lowercase_tips_prompt, metric_value

EXPERIMENTS = {
    "experiments": [
        {
            "name": "lc-e2e",
            "salt": "ci",
            "arms": [
                {"name": "control", "weight": 1, "policies": {"lowercase": "off"}},
                {"name": "steered", "weight": 1, "policies": {"lowercase": "constant:100"}},
            ],
        }
    ]
}
N_KEYS = 64


def prompt(i: int) -> str:
    return lowercase_tips_prompt(i)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    return metric_value(server, name, **labels)


def wait_until(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def logged(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT request_id FROM outcomes ORDER BY id")]
    finally:
        db.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ab")
    experiments = folder / "experiments.json"
    experiments.write_text(json.dumps(EXPERIMENTS))
    return {"folder": folder, "experiments": experiments, "log": folder / "outcomes.sqlite"}


@pytest.fixture(scope="module")
def server(files):
    with ServerProcess(
        "--experiments",
        str(files["experiments"]),
        "--outcome-log",
        str(files["log"]),
        "--threads",
        "1",
        "--max-batch",
        "16",
        "--grace",
        "120",
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def answered() -> dict[str, object]:
    """Every final response the module's clients received, by request id."""
    return {}


def test_experiment_end_to_end(server, files, answered, tmp_path):
    def one(i: int):
        with SteererClient(server.target) as client:
            return client.generate(
                prompt(i),
                constraints=["lowercase"],
                max_new_tokens=12,
                request_id=f"e2e-{i}",
                experiment_key=f"user-{i}",
                timeout=300,
            )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(N_KEYS)))
    answered.update({r.request_id: r for r in replies})

    # Responses name their arm, and it is the one `steerer ab assign` gives for the key.
    keys = files["folder"] / "keys.txt"
    keys.write_text("".join(f"user-{i}\n" for i in range(N_KEYS)))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "steerer.cli",
            "ab",
            "assign",
            "--experiments",
            str(files["experiments"]),
            "--experiment",
            "lc-e2e",
            "--keys",
            str(keys),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert [(a.experiment, a.arm, a.forced) for r in replies for a in r.arms] == [
        ("lc-e2e", arm, False) for arm in cli.stdout.split()
    ]
    for r in replies:  # the arm's policy replaced the request's (none): steering only in the steered arm
        assert (r.usage.steered_tokens["lowercase"] > 0) == (r.arms[0].arm == "steered")

    # Exactly one record per finished request.
    ids = logged(files["log"])
    assert sorted(ids) == sorted(answered) and len(ids) == len(set(ids)) == N_KEYS

    report = analyse(files["log"], "lc-e2e")
    (diff,) = [d for d in report.differences if d.task == "lowercase"]
    assert diff.arm == "steered" and diff.n_arm + diff.n_control == N_KEYS
    assert diff.low > 0, (diff, [c for c in report.compliance])  # the fixed-horizon interval excludes zero
    assert not report.sample_ratio.mismatch
    assert (
        metric(server, "steerer_experiment_requests_total", experiment="lc-e2e", arm="steered") == diff.n_arm
    )
    paths = write_report(report, tmp_path / "report")
    assert "steered" in paths["markdown"].read_text() and paths["plot"].stat().st_size > 0


def test_forced_arm_is_marked_and_left_out_of_the_analysis(server, files, answered):
    with SteererClient(server.target) as client:
        reply = client.generate(
            prompt(0),
            constraints=["lowercase"],
            max_new_tokens=4,
            request_id="forced-1",
            experiment_key="user-0",
            force_arms={"lc-e2e": "steered"},
        )
        answered[reply.request_id] = reply
        assert [(a.arm, a.forced) for a in reply.arms] == [("steered", True)]
        assert reply.usage.steered_tokens["lowercase"] > 0
        with pytest.raises(grpc.RpcError) as err:
            client.generate(
                prompt(0), constraints=["lowercase"], max_new_tokens=4, force_arms={"lc-e2e": "nope"}
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no arm 'nope'" in err.value.details()
    report = analyse(files["log"], "lc-e2e")
    assert report.excluded_forced == 1 and report.records == N_KEYS


def test_sighup_reloads_the_experiments_and_a_bad_file_keeps_the_old(server, files, answered):
    def reloads(result: str) -> float:
        return metric(server, "steerer_experiment_reloads_total", result=result)

    ok = reloads("ok")
    stopped = json.loads(json.dumps(EXPERIMENTS))
    stopped["experiments"][0]["status"] = "stopped"
    files["experiments"].write_text(json.dumps(stopped))
    server.signal(signal.SIGHUP)
    wait_until(lambda: reloads("ok") == ok + 1, "the server reloaded the experiments")
    assert metric(server, "steerer_experiment_arm_share", experiment="lc-e2e", arm="steered") == 0
    with SteererClient(server.target) as client:
        reply = client.generate(
            prompt(1),
            constraints=["lowercase"],
            max_new_tokens=4,
            request_id="after-stop",
            experiment_key="user-1",
        )
        answered[reply.request_id] = reply
        assert list(reply.arms) == []  # stopped: nobody is assigned
        files["experiments"].write_text("{not json")
        server.signal(signal.SIGHUP)
        wait_until(lambda: reloads("error") == 1, "the server refused the broken file")
        reply = client.generate(
            prompt(1),
            constraints=["lowercase"],
            max_new_tokens=4,
            request_id="after-bad",
            experiment_key="user-1",
            force_arms={"lc-e2e": "control"},
        )
        answered[reply.request_id] = reply
        assert [(a.arm, a.forced) for a in reply.arms] == [
            ("control", True)
        ]  # the last good file is in force
    assert "experiments not reloaded" in server.stderr()


def test_sigterm_leaves_no_finished_response_without_its_record(server, files, answered):
    """Streams in flight when SIGTERM arrives finish within the grace period; each has its record, and the
    log is checkpointed and closed."""
    client = SteererClient(server.target)
    started = threading.Barrier(5)
    finals, errors = [], []

    def stream(i: int) -> None:
        try:
            seen = False
            for message in client.stream(
                prompt(i),
                constraints=["lowercase"],
                max_new_tokens=48,
                ignore_eos=True,
                request_id=f"term-{i}",
                experiment_key=f"user-{i}",
                timeout=300,
            ):
                if not seen:
                    seen = True
                    started.wait(120)
                if message.HasField("final"):
                    finals.append(message.final)
        except Exception as exc:  # recorded, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(120)  # every stream has its first token: all four are generating
    server.signal(signal.SIGTERM)
    for t in threads:
        t.join(300)
    assert server.proc.wait(300) == 0
    client.close()
    assert not errors and len(finals) == 4
    answered.update({f.request_id: f for f in finals})
    ids = logged(files["log"])
    assert sorted(ids) == sorted(answered) and len(ids) == len(set(ids))
    wal = Path(f"{files['log']}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # closed with a checkpoint


def test_sigkill_loses_no_answered_response(tmp_path):
    """Records commit before the response is sent, so after a SIGKILL every answered request is in the log;
    requests killed mid-generation are not (they never finished)."""
    experiments = tmp_path / "experiments.json"
    experiments.write_text(json.dumps(EXPERIMENTS))
    log = tmp_path / "outcomes.sqlite"
    done: list[str] = []
    sent = [f"kill-{i}" for i in range(12)]
    with ServerProcess(
        "--experiments",
        str(experiments),
        "--outcome-log",
        str(log),
        "--threads",
        "1",
        "--max-batch",
        "4",
        "--max-queue",
        "16",
    ) as proc:

        def one(i: int) -> None:
            try:
                with SteererClient(proc.target) as client:
                    reply = client.generate(
                        prompt(i),
                        constraints=["lowercase"],
                        max_new_tokens=8 + 4 * i,
                        ignore_eos=True,
                        request_id=sent[i],
                        experiment_key=f"user-{i}",
                        timeout=300,
                    )
                done.append(reply.request_id)
            except grpc.RpcError:
                pass  # killed in flight

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sent))]
        for t in threads:
            t.start()
        wait_until(lambda: len(done) >= 4, "four responses arrived", timeout=300)
        proc.signal(signal.SIGKILL)
        proc.proc.wait(60)
        for t in threads:
            t.join(120)
    answered_before_kill = set(done)
    ids = logged(log)
    assert answered_before_kill <= set(ids), "an answered request has no record"
    assert set(ids) <= set(sent) and len(ids) == len(set(ids))
    assert len(ids) < len(sent), "the kill came after every request had finished; the test proved nothing"
