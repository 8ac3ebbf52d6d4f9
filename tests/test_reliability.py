"""Reliability on every held-out column (issue #18, section 3): the pure rule, scoped reliability and its
per-request muting with the real model, what `probes list`, `ListProbes` and the verdicts say, and the IFEval
column read through the shipped bank's own probe."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from steerer import reliability
from steerer.bank import DEFAULT_BANK, BankError, Probe, ProbeBank, muted_notice
from steerer.constraints import Constraint
from steerer.core import Request, Steerer
from steerer.generation import SamplingParams
from steerer.monitor import MonitorConfig
from steerer.policy import SteeringPolicy
from steerer.service.testing import placeholder_bank, split_stream

PASS, CHANCE = [0.7, 0.9], [0.45, 0.8]
RANGE = {"limit": [8, 120]}


def metrics(test=PASS, heldout=PASS, ifeval=None, ifeval_in_range=None, n_ifeval=40) -> dict:
    out = {"test_auroc": 0.8, "test_auroc_ci": test, "n_test": 100, "heldout_phrasing_auroc": 0.8,
           "heldout_phrasing_auroc_ci": heldout, "n_heldout_phrasing": 100}
    if n_ifeval is not None:
        out |= {"ifeval_auroc": 0.6, "ifeval_auroc_ci": ifeval, "n_ifeval": n_ifeval}
    if ifeval_in_range is not None:
        out |= {"ifeval_in_range_auroc": 0.8, "ifeval_in_range_auroc_ci": ifeval_in_range, "n_ifeval_in_range": 11}
    return out


def scoped_probe(task: str = "word_count", **fields) -> Probe:
    m = metrics(ifeval=[0.2, 0.52], ifeval_in_range=[0.57, 1.0])
    record = reliability.assess(m, RANGE)
    return replace(Probe(task, 1), metrics=m, reliable=record["reliable"], reliability=record, **fields)


# -- the rule ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "reliable", "failed"), [
    (metrics(ifeval=PASS), True, []),
    (metrics(ifeval=CHANCE), False, ["ifeval"]),
    (metrics(heldout=CHANCE, ifeval=CHANCE), False, ["heldout_phrasing", "ifeval"]),
    (metrics(ifeval=None), True, []),  # IFEval rows of one class only: no evidence either way
    (metrics(ifeval=None, n_ifeval=None), True, []),  # no IFEval rows for the task
    (metrics(test=None, heldout=None, n_ifeval=None), False, []),  # nothing passed: not reliable
])
def test_reliable_needs_every_measured_column_above_chance(m, reliable, failed):
    record = reliability.assess(m)
    assert (record["reliable"], record["failed"]) == (reliable, failed)
    assert record == reliability.assess(json.loads(json.dumps(m)))  # recomputable from stored metrics


def test_column_statuses_say_why_a_column_does_not_count():
    record = reliability.assess(metrics(ifeval=None))
    assert record["columns"]["ifeval"]["status"] == reliability.ONE_CLASS
    assert reliability.assess(metrics(n_ifeval=None))["columns"]["ifeval"]["status"] == reliability.NOT_MEASURED
    assert record["columns"]["test"] == {"auroc": 0.8, "ci": PASS, "n": 100, "status": reliability.PASSED}


def test_a_probe_failing_outside_its_range_is_scoped_not_reliable():
    probe = scoped_probe()
    assert probe.reliable is False and probe.failed_columns == ["ifeval"] and probe.reliable_range == RANGE
    assert probe.reliable_for({"relation": "at most", "limit": 50}) == (True, "")
    ok, why = probe.reliable_for({"relation": "at least", "limit": 500})
    assert not ok and why == "limit 500 outside the range it was measured reliable on [8, 120] (failed on ifeval)"
    # failing inside the range too: no scope, muted for every request
    inside = reliability.assess(metrics(ifeval=[0.2, 0.52], ifeval_in_range=[0.3, 0.9]), RANGE)
    assert inside["scope"]["reliable"] is False and reliability.scoped(inside) is None


def test_describe_names_the_failed_column_and_the_range():
    assert reliability.describe(scoped_probe().reliability) == \
        "failed on ifeval [0.20, 0.52] (95% AUROC interval reaches chance); reliable within limit 8-120"


# -- the bank ---------------------------------------------------------------------------------------------------
def bank_of(*probes: Probe, biases=None) -> ProbeBank:
    d = 8
    return ProbeBank("synthetic", "f" * 16, d, list(probes), torch.zeros(len(probes), d),
                     torch.tensor(biases or [0.0] * len(probes)), torch.eye(d)[:len(probes)], version="s")


def test_the_bank_mutes_scoped_probes_per_request_only():
    bank = bank_of(scoped_probe(), Probe("lowercase", 1, metrics=metrics(ifeval=CHANCE), reliable=False,
                                         reliability=reliability.assess(metrics(ifeval=CHANCE))))
    assert bank.muted().tolist() == [False, True] and bank.muted(use_unreliable=True).tolist() == [False, False]
    assert bank.reliable_for("word_count", {"limit": 20})[0] and not bank.reliable_for("lowercase", {})[0]
    assert set(bank.out_of_range({"word_count": {"limit": 400}, "lowercase": {}})) == {"word_count"}
    assert bank.out_of_range({"word_count": {"limit": 400}}, use_unreliable=True) == {}
    notice = muted_notice(bank)
    assert "word_count (failed on ifeval [0.20, 0.52]" in notice and "muted only for requests outside" in notice
    assert "lowercase (failed on ifeval [0.45, 0.80]" in notice


def test_a_saved_reliability_record_loads_back(tmp_path):
    bank = bank_of(scoped_probe())
    loaded = ProbeBank.load(bank.save(tmp_path / "b"))
    assert loaded.probes[0].reliability == json.loads(json.dumps(bank.probes[0].reliability))
    assert loaded.probes[0].reliable_range == RANGE


@pytest.mark.parametrize(("fields", "message"), [
    ({"reliable": True, "reliability": None, "metrics": metrics(ifeval=CHANCE)},
     "is marked reliable but its ifeval AUROC interval [0.45, 0.8] reaches chance"),
    ({"reliable": True, "reliability": None, "metrics": metrics(heldout=CHANCE)},
     "is marked reliable but its heldout_phrasing AUROC interval"),
    ({"reliability": {"reliable": False, "failed": [], "columns": {}}, "reliable": False,
      "metrics": metrics(ifeval=CHANCE)}, "disagrees with its metrics"),
    ({"reliability": {"reliable": True}}, "reliability must be an object with reliable"),
    ({"metrics": metrics(ifeval=[0.2, "x"])}, "metrics.ifeval_auroc_ci must be [low, high]"),
])
def test_validation_stays_strict_on_every_column(fields, message):
    with pytest.raises(BankError, match=message.replace("[", r"\[").replace("]", r"\]")):
        bank_of(replace(scoped_probe(), **fields))


def test_with_reliability_recomputes_every_probe_from_its_metrics():
    from probes.reliability import with_reliability

    bank = bank_of(Probe("word_count", 1, metrics=metrics(n_ifeval=None), reliable=True),
                   Probe("lowercase", 1, metrics=metrics(n_ifeval=None), reliable=True))
    measured = {"word_count": {"metrics": {"ifeval_auroc": 0.36, "ifeval_auroc_ci": [0.2, 0.52], "n_ifeval": 52,
                                           "ifeval_in_range_auroc": 0.83, "ifeval_in_range_auroc_ci": [0.57, 1.0],
                                           "n_ifeval_in_range": 11}}}
    rated = with_reliability(bank, measured, {"word_count": RANGE}, "steerer probes reliability")
    word, lower = rated.probes
    assert not word.reliable and word.reliable_range == RANGE and word.metrics["measured_range"] == RANGE
    assert lower.reliable and lower.reliability["columns"]["ifeval"]["status"] == reliability.NOT_MEASURED
    assert rated.extra["reliability"]["command"] == "steerer probes reliability" and rated.version != bank.version


def test_range_of_keeps_numeric_params_only():
    from probes.reliability import range_of

    rows = [{"relation": "at most", "limit": 8}, {"relation": "at least", "limit": 120}, {"terms": ["a"]}]
    assert range_of(rows) == {"limit": [8, 120]}


# -- the shipped bank, `probes list` ----------------------------------------------------------------------------
def test_probes_list_says_which_column_failed(capsys):
    from steerer.cli import main

    assert main(["probes", "list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line[:1].islower()}
    assert lines["term_exclusion"].endswith("UNRELIABLE (failed: ifeval)") and "IFEval 0.553" in lines["term_exclusion"]
    assert lines["word_count"].endswith("reliable within limit 8-120 (failed: ifeval)")
    assert lines["json_format"].endswith("reliable")
    assert "keyword_inclusion: failed on ifeval" in out


def test_the_stored_ifeval_column_is_the_bank_probe_read_teacher_forced(lm):
    """`steerer probes reliability`'s measurement, redone for one lens task: the bank's probe (lens inputs
    included) reads the IFEval responses at its layer and end position and gives the stored AUROC."""
    from probes import ifeval
    from probes.reliability import column_metrics, end_readings
    from steerer.lens import lens_for

    bank = ProbeBank.load(DEFAULT_BANK)
    corpus = DEFAULT_BANK.parents[2] / bank.extra["corpus"]
    rows = [r for r in ifeval.load(corpus) if r["task"] == "keyword_inclusion"]
    p = end_readings(lm, bank, "keyword_inclusion", rows, lens_for(bank, lm.model))
    y = np.array([bool(r["satisfied"]) for r in rows], dtype=int)
    stored = bank.probes[bank.index("keyword_inclusion")].metrics
    assert column_metrics("ifeval", y, p) == {k: stored[k] for k in ("ifeval_auroc", "ifeval_auroc_ci", "n_ifeval")}


# -- per request, with the real model -----------------------------------------------------------------------------
def scoped_bank(lm) -> ProbeBank:
    """Placeholder probes (P(satisfied) = sigmoid(bias)); word_count at bias -4 (risk ~0.98) and scoped."""
    bank = placeholder_bank(lm.fingerprint, lm.hidden_size, "scoped", {"word_count": -4.0})
    bank.probes = [scoped_probe(layer=p.layer) if p.task == "word_count" else p for p in bank.probes]
    return bank


def generate(lm, bank, limit: int, **options):
    request = Request("Name three colors.", (Constraint("word_count", {"relation": "at most", "limit": limit}),),
                      SteeringPolicy("constant", 50.0), sampling=SamplingParams(5, ignore_eos=True), id="r")
    with Steerer(lm, bank, monitor_config=MonitorConfig(warmup_tokens=0), **options) as steerer:
        results, events = split_stream(steerer.generate([request]))
    return results["r"], events["r"]


def test_a_scoped_probe_flags_and_steers_inside_its_range_and_is_muted_outside(lm):
    bank = scoped_bank(lm)
    inside, _ = generate(lm, bank, 50)
    (verdict,) = inside.verdicts
    assert not verdict.probe_muted and verdict.flagged and verdict.predicted_violation
    assert inside.steered_tokens["word_count"] > 0 and "reliable within limit 8-120" in verdict.probe_note
    outside, events = generate(lm, bank, 500)
    (verdict,) = outside.verdicts
    assert verdict.probe_muted and not verdict.flagged and not verdict.predicted_violation
    assert verdict.probe_note.startswith("limit 500 outside the range it was measured reliable on [8, 120]")
    assert outside.steered_tokens["word_count"] == 0 and not any(e.flags for e in events)
    assert all(e.risks["word_count"] > 0.9 for e in events[1:])  # the risk is still read and streamed
    override, _ = generate(lm, bank, 500, use_unreliable_probes=True)
    assert not override.verdicts[0].probe_muted and override.steered_tokens["word_count"] > 0


def test_list_probes_and_verdicts_over_grpc_say_which_column_failed(lm):
    from steerer.service.client import SteererClient
    from steerer.service.server import ServerConfig, SteererServer

    server = SteererServer(lm, scoped_bank(lm), ServerConfig(host="127.0.0.1", port=0, metrics_port=None)).start()
    try:
        with SteererClient(f"127.0.0.1:{server.port}") as client:
            probes = {p.task: p for p in client.list_probes().probes}
            word = probes["word_count"]
            assert list(word.failed_columns) == ["ifeval"] and not word.reliable and not word.muted
            assert dict(word.reliable_range)["limit"] == [8, 120]
            assert word.reliability["columns"]["ifeval"]["status"] == "failed"
            assert word.unreliable_reason.startswith("failed on ifeval [0.20, 0.52]")
            assert probes["lowercase"].reliable and not probes["lowercase"].failed_columns
            reply = client.generate("Name three colors.", max_new_tokens=3, ignore_eos=True, timeout=120,
                                    constraints=[("word_count", {"relation": "at least", "limit": 500})])
            (verdict,) = reply.verdicts
            assert verdict.probe_muted and verdict.probe_note.startswith("limit 500 outside the range")
    finally:
        server.stop(0)


def test_training_banks_a_probe_with_every_column_and_its_scope():
    """`bank_entry` (what `steerer probes train` writes) runs the same rule: an IFEval column at chance makes the
    probe unreliable and names the column; its in-range part passing scopes it to the corpus's limits."""
    from probes import evaluation
    from probes.dataset import POSITIONS, TaskData
    from steerer.monitor import MonitorConfig

    rng, n, d = np.random.default_rng(0), 160, 4
    rows, x = [], np.zeros((n, len(POSITIONS), 2, d), dtype=np.float32)
    for i in range(n):
        limit, length = int(rng.integers(10, 100)), float(rng.uniform(5, 150))
        rows.append({"id": f"r{i}", "params": {"relation": "at most", "limit": limit}, "satisfied": length <= limit,
                     "family": f"f{i % 6}", "base_id": f"b{i % 20}", "family_split": "heldout" if i % 6 == 5 else
                     "train", "base_split": "test" if i % 20 >= 15 else "train"})
        x[i, :, :, 0] = np.log(length) - np.log(limit)
    rows = [r | {"split": evaluation.split_of(r)} for r in rows]
    data = TaskData(rows, torch.from_numpy(x), torch.from_numpy(x[:, -1]).half(), torch.arange(n + 1))
    probe, _ = evaluation.choose(data, [0, 1])
    measured = {s: evaluation.measure(probe, data, data.split == s) for s in ("test", "heldout_phrasing")}
    measured["ifeval"] = {"auroc": 0.4, "auroc_ci": [0.2, 0.55], "n": 50}
    measured["ifeval_in_range"] = {"auroc": 0.8, "auroc_ci": [0.6, 0.95], "n": 12}
    entry = evaluation.bank_entry("word_count", probe, data, d, [0, 1], measured, MonitorConfig())
    record = entry.record
    assert record["reliable"] is False and record["reliability"]["failed"] == ["ifeval"]
    limits = [r["params"]["limit"] for r in rows]
    assert record["metrics"]["measured_range"] == {"limit": [min(limits), max(limits)]}
    assert record["reliability"]["scope"]["reliable"] is True
    assert record["reliability"] == reliability.assess(record["metrics"], record["metrics"]["measured_range"])
