"""Probe banks as untrusted data: validation on every load, row isolation against bad directions, and
probe reliability (bootstrap AUROC intervals, muting). No model here: synthetic tensors only."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from probes.train import auroc_ci, is_reliable
from steerer import reliability
from steerer.bank import (
    DEFAULT_BANK,
    FORMAT_VERSION,
    MANIFEST,
    TENSORS,
    BankError,
    Probe,
    ProbeBank,
    muted_notice,
)
from steerer.generation import StepView
from steerer.monitor import Monitor, MonitorConfig
from steerer.policy import PolicyTable, SteeringPolicy
from steerer.service.testing import broken_bank, placeholder_bank
from steerer.taps import LayerSteering

D = 16
FINGERPRINT = "f" * 16


def small_bank(**probe_fields) -> ProbeBank:
    """Two reliable probes on coordinates 0 and 1 (layers 1 and 2); `probe_fields` override the first."""
    weights = torch.zeros(2, D)
    weights[0, 0] = weights[1, 1] = 1.0
    probes = [replace(Probe("word_count", 1, reliable=True), **probe_fields), Probe("lowercase", 2, reliable=True)]
    return ProbeBank("synthetic", FINGERPRINT, D, probes, weights, torch.zeros(2), torch.eye(D)[:2], version="s")


@pytest.fixture
def saved(tmp_path):
    return small_bank().save(tmp_path / "good")


def edit_manifest(folder, edit) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(edit(manifest)))


# -- loading --------------------------------------------------------------------------------------------------
def test_a_saved_bank_loads_back_with_its_reliability(saved):
    bank = ProbeBank.load(saved)
    assert [p.reliable for p in bank.probes] == [True, True] and bank.version == "s"
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["probes"][0]["reliable"] is True


def test_an_old_manifest_without_reliability_loads_as_unknown(saved):
    def strip(m):
        for p in m["probes"]:
            del p["reliable"]
        return m

    edit_manifest(saved, strip)
    bank = ProbeBank.load(saved)
    assert [p.reliable for p in bank.probes] == [None, None] and bank.unreliable == ["word_count", "lowercase"]


def test_the_shipped_bank_loads_and_never_marks_a_chance_probe_reliable():
    """Issue #18's bar: every reliable probe has a held-out phrasing interval, and an IFEval interval where one
    was measured, whose low end is above 0.5; the stored verdict is the rule's on the stored metrics."""
    bank = ProbeBank.load(DEFAULT_BANK)
    assert len(bank.probes) == 9 and DEFAULT_BANK.parent.name == "banks" and DEFAULT_BANK.parents[1].name == "steerer"
    for probe in bank.probes:
        record = reliability.assess(probe.metrics, probe.metrics.get("measured_range"))
        assert probe.reliable is record["reliable"] and probe.reliability["failed"] == record["failed"], probe.task
        if probe.reliable:
            assert probe.metrics["heldout_phrasing_auroc_ci"][0] > 0.5, probe.task
            assert probe.metrics["test_auroc_ci"][0] > 0.5, probe.task
            ifeval = probe.metrics.get("ifeval_auroc_ci")
            assert ifeval is None or ifeval[0] > 0.5, probe.task
        else:
            assert probe.failed_columns, probe.task


@pytest.mark.parametrize(("how", "message"), [
    ("manifest-list", "expected a JSON object, got list"),
    ("truncated", "probes.safetensors: not a readable safetensors file"),
    ("nan-directions", "bank directions has non-finite values (NaN or inf) for probe(s) word_count"),
    ("nan-weights", "bank weights has non-finite values (NaN or inf) for probe(s) word_count"),
    ("not-unit", "bank directions must be unit vectors; word_count has norm 2"),
])
def test_damaged_banks_are_refused_with_the_reason(saved, tmp_path, how, message):
    with pytest.raises(BankError) as err:
        ProbeBank.load(broken_bank(saved, tmp_path / how, how))
    assert message in str(err.value) and "\n" not in str(err.value)


def _set(path: str, value):
    def edit(m):
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value is KeyError:
            del node[key]
        else:
            node[key] = value
        return m

    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_set("format_version", 3), "bank format 3, this steerer reads 1 and 2"),
    (_set("model", KeyError), "missing key 'model'"),
    (_set("hidden_size", "16"), "hidden_size must be an integer"),
    (_set("hidden_size", True), "hidden_size must be an integer"),
    (_set("hidden_size", 8), "bank weights has shape (2, 16), expected (2, 8)"),
    (_set("probes", {}), "probes must be a list"),
    (_set("probes", []), "bank has no probes"),
    (_set("version", [1]), "version must be a string"),
    (_set("probes.0", "word_count"), "probes[0] must be an object"),
    (_set("probes.0.colour", "red"), "probes[0] has unknown field(s) colour"),
    (_set("probes.0.layer", KeyError), "probes[0] is missing layer"),
    (_set("probes.0.layer", "1"), "probes[0].layer must be an integer"),
    (_set("probes.0.layer", -1), "probes[0].layer must be >= 0"),
    (_set("probes.0.threshold", 1.5), "probes[0].threshold must be a probability in [0, 1]"),
    (_set("probes.0.threshold", None), "probes[0].threshold must be a finite number"),
    (_set("probes.0.flag_threshold", "high"), "probes[0].flag_threshold must be a finite number or null"),
    (_set("probes.0.reliable", "yes"), "probes[0].reliable must be true or false or null"),
    (_set("probes.0.metrics", None), "probes[0].metrics must be an object"),
    (_set("probes.0.polarity", "violated"), "probes[0].polarity must be 'satisfied'"),
    (_set("probes.1.task", "word_count"), "several probes for one task: word_count"),
    (_set("probes.0.metrics", {"test_auroc_ci": [0.2]}), "test_auroc_ci must be [low, high]"),
    (_set("probes.0.metrics", {"test_auroc_ci": [0.45, 0.8]}), "is marked reliable but its AUROC interval"),
])
def test_malformed_manifests_are_refused_with_the_reason(saved, edit, message):
    edit_manifest(saved, edit)
    with pytest.raises(BankError) as err:
        ProbeBank.load(saved)
    assert message in str(err.value)


def test_unreadable_manifest_and_missing_tensors(saved, tmp_path):
    from safetensors.torch import save_file

    other = small_bank().save(tmp_path / "other")
    (saved / MANIFEST).write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(BankError, match="not valid JSON"):
        ProbeBank.load(saved)
    save_file({"weights": torch.zeros(2, D)}, str(other / TENSORS))
    with pytest.raises(BankError, match=r"missing tensor\(s\) biases, directions"):
        ProbeBank.load(other)


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: {"weights": b.weights.long()}, "bank weights has dtype torch.int64, expected a floating-point"),
    (lambda b: {"biases": torch.tensor([0.0, math.inf])}, "bank biases has non-finite values (NaN or inf) for probe(s) lowercase"),
    (lambda b: {"directions": b.directions[:1]}, "bank directions has shape (1, 16), expected (2, 16)"),
    (lambda b: {"directions": b.directions.tolist()}, "bank directions is a list, expected a tensor"),
    (lambda b: {"directions": torch.full((2, D), 1e300, dtype=torch.float64)}, "non-finite values"),  # inf as fp32
    (lambda b: {"probes": []}, "bank has no probes"),
])
def test_the_constructor_validates_too(change, message):
    bank = small_bank()
    with pytest.raises(BankError) as err:
        replace(bank, **change(bank))
    assert message in str(err.value)


def test_bfloat16_tensors_are_accepted_as_float32():
    bank = small_bank()
    again = replace(bank, weights=bank.weights.bfloat16(), directions=bank.directions.bfloat16())
    assert again.weights.dtype == again.directions.dtype == torch.float32


# -- row isolation in the steering path -------------------------------------------------------------------
def test_a_nan_direction_cannot_reach_rows_that_are_not_steered():
    directions = torch.eye(2, D)
    directions[1, 3] = float("nan")
    steer = LayerSteering(directions)
    steer.set_coeffs(torch.tensor([[0.0, 0.0], [0.0, 5.0], [2.0, 0.0]]))
    delta = steer.delta(torch.float32)[:, 0]
    assert torch.equal(delta[0], torch.zeros(D))  # unsteered: an exact zero, not 0 * NaN
    assert torch.isnan(delta[1]).any()  # the row steered along the bad direction is its own problem
    assert torch.isnan(delta[2]).any()  # (0 * NaN in its own sum; nothing crosses rows)
    steer.set_coeffs(torch.zeros(3, 2))
    assert not steer.active
    steer.active = True  # the forced add of a mixed batch still adds exact zeros
    assert torch.equal(steer.delta(torch.bfloat16), torch.zeros(3, 1, D, dtype=torch.bfloat16))


# -- reliability ---------------------------------------------------------------------------------------------
def test_auroc_ci_of_perfect_separation_is_one():
    y = np.array([0] * 20 + [1] * 20)
    assert auroc_ci(y, y + 0.1 * np.arange(40) / 40) == (1.0, 1.0)
    assert auroc_ci(y, -y.astype(float)) == (0.0, 0.0)


def test_auroc_ci_of_random_scores_contains_chance_and_is_not_reliable():
    rng = np.random.default_rng(1)
    y, score = rng.integers(0, 2, 60), rng.random(60)
    low, high = auroc_ci(y, score)
    assert low < 0.5 < high and high - low > 0.15
    assert not is_reliable((low, high))


def test_auroc_ci_contains_the_point_estimate_is_seeded_and_rounded():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 50)
    score = y + rng.normal(0, 0.8, 50)
    low, high = auroc_ci(y, score)
    assert low < roc_auc_score(y, score) < high and low > 0.5
    assert is_reliable((low, high))
    assert auroc_ci(y, score) == (low, high)  # fixed seed: the same bank gets the same figures
    assert auroc_ci(y, score, seed=7) != (low, high)
    assert round(low, 4) == low and round(high, 4) == high


def test_auroc_ci_resamples_are_exact_aurocs_with_ties_counting_half():
    y = np.array([0, 0, 1, 1, 1])
    score = np.array([0.2, 0.5, 0.5, 0.9, 0.1])
    # every resample of a 1-row class is that row: with one row per class the interval is one value
    assert auroc_ci(np.array([0, 1]), np.array([0.5, 0.5])) == (0.5, 0.5)
    low, high = auroc_ci(y, score, resamples=5000)
    assert 0 <= low <= roc_auc_score(y, score) <= high <= 1


def test_auroc_ci_without_both_labels_is_nan_and_unreliable():
    ci = auroc_ci(np.ones(10), np.arange(10.0))
    assert all(math.isnan(x) for x in ci) and not is_reliable(ci)


def test_muting_follows_reliability_unless_overridden():
    bank = small_bank(reliable=False, metrics={"test_auroc": 0.4, "test_auroc_ci": [0.21, 0.52]})
    assert bank.muted().tolist() == [True, False] and bank.muted(use_unreliable=True).tolist() == [False, False]
    notice = muted_notice(bank)
    assert notice == ("steerer: muted probes, no flags or steering: word_count (95% AUROC interval [0.21, 0.52] "
                      "reaches chance); --use-unreliable-probes to use them")
    unknown = small_bank(reliable=None)
    assert "word_count (no measured reliability)" in muted_notice(unknown)
    assert muted_notice(small_bank()) is None


def view(rows: list[int], index: int, x: torch.Tensor) -> StepView:
    n = len(rows)
    return StepView(rows, torch.full((n,), index), torch.zeros(n, dtype=torch.long), {1: x, 2: x},
                    torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))


def test_a_muted_probe_reports_risk_but_never_flags_or_steers():
    bank = small_bank(reliable=False)
    muted = bank.muted()
    monitor = Monitor(bank, MonitorConfig(warmup_tokens=0), capacity=2, muted=muted)
    monitor.register(0, ["word_count", "lowercase"])
    x = torch.full((1, D), -5.0)  # P(satisfied) ~ 0.007 for both probes
    for index in range(3):
        monitor.after_forward(view([0], index, x))
    assert monitor.smoothed[0].tolist() == pytest.approx([0.993, 0.993], abs=1e-3)  # risk is still computed
    assert monitor.flags[0].tolist() == [False, True]
    assert {e.task for e in monitor.drain_events()} == {"lowercase"}
    table = PolicyTable(bank, capacity=2, muted=muted)
    table.set(0, {"word_count": SteeringPolicy("constant", 9.0), "lowercase": SteeringPolicy("constant", 3.0)})
    coeffs = table.coefficients(torch.tensor([0]), monitor.flags[:1], monitor.smoothed[:1])
    assert coeffs.tolist() == [[0.0, 3.0]]


def test_the_placeholder_bank_is_reliable_and_valid():
    bank = placeholder_bank(FINGERPRINT, D, "p")
    assert all(p.reliable for p in bank.probes) and not bool(bank.muted().any())


def test_the_client_summary_says_when_a_probe_is_muted_or_has_no_reading(capsys):
    from steerer.service.cli import _summary
    from steerer.service.proto import pb2

    reply = pb2.GenerateResponse(finish_reason="eos", bank_version="b")
    reply.verdicts.add(task="topic", probe_muted=True, satisfied=True)
    reply.verdicts.add(task="lowercase", predicted_violation=True, flagged=True, probe_reliable=True,
                       p_satisfied_end=0.1)
    reply.verdicts.add(task="sentiment", flagged=False)
    reply.usage.steered_tokens["lowercase"] = 3
    _summary(reply)
    err = capsys.readouterr().err
    assert "topic: probe unreliable (muted, no reading), satisfied;" in err
    assert "lowercase: predicted violation (p=0.10), unchecked, flagged, steered 3" in err
    assert "sentiment: predicted ok (no reading) [probe unreliable], unchecked, not flagged, steered 0" in err


# -- parameter conditioning ------------------------------------------------------------------------------------
def conditioned_bank() -> ProbeBank:
    """word_count reads coordinate 0 with its own row, coordinate 2 for an upper bound, 3 for a lower bound,
    each shifted by a coefficient times log(limit); lowercase is not conditioned."""
    plain = small_bank()
    word_count = replace(plain.probes[0], conditioning={"variant": "bound", "rows": {"upper": 0, "lower": 1},
                                                         "inputs": [{"param": "limit", "transform": "log"}]})
    variant_weights = torch.zeros(2, D)
    variant_weights[0, 2] = variant_weights[1, 3] = 1.0
    input_weights = torch.tensor([[0.0], [0.0], [-1.0], [0.5]])  # rows: word_count, lowercase, upper, lower
    return replace(plain, probes=[word_count, plain.probes[1]], variant_weights=variant_weights,
                   variant_biases=torch.tensor([0.25, -0.25]), input_weights=input_weights)


def test_params_select_a_variant_row_and_shift_the_logit():
    bank = conditioned_bank()
    x = torch.arange(1.0, D + 1.0)  # coordinate i holds i + 1
    monitor = Monitor(bank, capacity=4)
    monitor.register(0, ["word_count", "lowercase"], {"word_count": {"relation": "at most", "limit": 100}})
    monitor.register(1, ["word_count"], {"word_count": {"relation": "at least", "limit": 100}})
    monitor.register(2, ["word_count"])  # no params: the probe's own row
    monitor.register(3, ["word_count"], {"word_count": {"relation": "less than", "limit": 1}})
    captured = {1: x.repeat(4, 1), 2: x.repeat(4, 1)}
    p = monitor.score(torch.arange(4), captured)
    log100 = math.log(100)
    expected = torch.tensor([[3 + 0.25 - log100, 2.0], [4 - 0.25 + 0.5 * log100, 2.0], [1.0, 2.0],
                             [3 + 0.25 - 0.0, 2.0]])
    torch.testing.assert_close(p, torch.sigmoid(expected))


def test_a_conditioned_bank_saves_loads_and_subsets(tmp_path):
    bank = conditioned_bank()
    loaded = ProbeBank.load(bank.save(tmp_path / "cond"))
    params = {"word_count": {"relation": "at least", "limit": 20}}
    for got, want in zip(loaded.request_rows(params), bank.request_rows(params), strict=True):
        torch.testing.assert_close(got, want)
    only = loaded.subset(["word_count"])
    index, offset = only.request_rows(params)
    assert only.variant_weights.shape == (2, D) and only.input_weights.shape == (3, 1)
    torch.testing.assert_close(only.row_weights[index[0]], bank.variant_weights[1])
    torch.testing.assert_close(offset[0], torch.tensor(-0.25 + 0.5 * math.log(20)))
    assert ProbeBank.load(small_bank().save(tmp_path / "plain")).variant_weights.shape == (0, D)


@pytest.mark.parametrize(("conditioning", "message"), [
    ({"variant": "mood", "rows": {"a": 0}}, "unknown conditioning variant 'mood'"),
    ({"variant": "bound", "rows": {"upper": 5}}, "variant rows in \\[0, 2\\)"),
    ({"inputs": [{"param": "limit", "transform": "cube"}]}, "conditioning input must be"),
    ({"inputs": [{"param": "limit"}, {"param": "limit"}]}, "more conditioning inputs than input_weights"),
    ({"weights": []}, "conditioning must be an object"),
])
def test_malformed_conditioning_is_refused(conditioning, message):
    bank = conditioned_bank()
    with pytest.raises(BankError, match=message):
        replace(bank, probes=[replace(bank.probes[0], conditioning=conditioning), bank.probes[1]])


def test_steering_may_live_at_another_layer_than_the_reading(tmp_path):
    bank = small_bank(steer_layer=5)  # word_count reads at layer 1, steers at layer 5; lowercase both at 2
    loaded = ProbeBank.load(bank.save(tmp_path / "b"))
    assert loaded.probes[0].steering_layer == 5 and loaded.probes[1].steering_layer == 2
    assert loaded.layers == (1, 2, 5) and loaded.steering_layers == (2, 5)
    table = PolicyTable(loaded, capacity=2)
    assert sorted(table.steering) == [2, 5]
    with pytest.raises(BankError, match="steer_layer must be >= 0"):
        small_bank(steer_layer=-1)


# -- warning predictors (a sub-bank), gate thresholds, progress coefficients ---------------------------------
def warned_bank() -> ProbeBank:
    bank = small_bank(gate_threshold=0.3)
    warning = small_bank(conditioning={"progress": True}, layer=3, flag_threshold=0.2)
    warning.progress_weights = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    return replace(bank, warning=replace(warning))


def test_a_bank_with_warning_predictors_round_trips(tmp_path):
    bank = warned_bank()
    loaded = ProbeBank.load(bank.save(tmp_path / "warned"))
    assert (tmp_path / "warned" / "warning" / MANIFEST).is_file()
    assert loaded.warning is not None and loaded.warning.tasks == loaded.tasks
    assert torch.equal(loaded.warning.progress_weights, bank.warning.progress_weights)
    assert loaded.layers == (1, 2, 3)  # the warning predictor's layer is tapped too
    assert loaded.alerting is loaded.warning and loaded.gate_thresholds.tolist()[0] == pytest.approx(0.3)
    assert loaded.warning.flag_thresholds.tolist()[0] == pytest.approx(0.2)
    assert loaded.subset(["word_count"]).warning.tasks == ["word_count"]


def test_warning_predictors_must_cover_the_same_tasks_and_model():
    bank = small_bank()
    with pytest.raises(BankError, match="same tasks, same order"):
        replace(bank, warning=bank.subset(["lowercase"]))
    with pytest.raises(BankError, match="another model"):
        replace(bank, warning=replace(small_bank(), fingerprint="0" * 16))


@pytest.mark.parametrize(("fields", "message"), [
    ({"gate_threshold": 1.5}, "gate_threshold must be a probability"),
    ({"conditioning": {"progress": "yes"}}, "progress must be true or false"),
    ({"conditioning": {"variant": "bound", "rows": {"lower": 0}, "steer_signs": {"lower": 2}}},
     "steer_signs must map variant keys to -1 or 1"),
])
def test_bad_warning_and_steering_fields_are_refused(fields, message):
    with pytest.raises(BankError, match=message):
        small_bank(**fields)


def test_progress_coefficients_need_a_probe_that_reads_progress():
    with pytest.raises(BankError, match=r"progress_weights has shape \(2, 3\), expected \(2, 0\)"):
        replace(small_bank(), progress_weights=torch.zeros(2, 3))


def test_the_shipped_bank_advises_against_steering_only_its_looping_tasks():
    """`unsteerable` reads the sweep's verdict in the manifest: lowercase and topic gain only by looping."""
    bank = ProbeBank.load(DEFAULT_BANK)
    advised = {t: bank.unsteerable(t) for t in bank.tasks}
    assert {t for t, why in advised.items() if why} == {"lowercase", "topic"}
    assert "loop" in advised["lowercase"]


def test_keep_steering_carries_layer_direction_gate_and_the_sweeps_records():
    """New probes keep the source's measured steering whole: a gate threshold or `steerable: false` left behind
    would steer differently from what the efficacy benchmark measured."""
    from steerer.bank import keep_steering

    source = small_bank(steer_layer=3, gate_threshold=0.9)
    source.directions = -source.directions
    source.extra = {"steering": {"word_count": {"alpha": 4.0, "steerable": False, "steerable_reason": "loops"}},
                    "steering_sweep": {"command": "steerer probes steer"}}
    fresh = small_bank(threshold=0.3)
    kept = keep_steering(fresh, source)
    first = kept.probes[kept.index("word_count")]
    assert (first.steering_layer, first.gate_threshold, first.threshold) == (3, 0.9, 0.3)
    assert torch.equal(kept.directions, source.directions) and not torch.equal(kept.directions, fresh.directions)
    assert kept.unsteerable("word_count") == "loops" and kept.unsteerable("lowercase") is None
    assert kept.extra["steering_from"]["tasks"] == ["word_count", "lowercase"]
    assert kept.extra["steering_sweep"] == {"command": "steerer probes steer"}


def test_probes_keep_steering_writes_a_bank_with_the_sources_steering_and_refuses_overwriting(tmp_path, capsys):
    from steerer.cli import main

    source = small_bank(steer_layer=3)
    source.extra = {"steering": {"lowercase": {"alpha": 2.0}}}
    source.save(tmp_path / "old")
    small_bank(threshold=0.3).save(tmp_path / "new")
    args = ["probes", "keep-steering", "--bank", str(tmp_path / "new"), "--steering-from", str(tmp_path / "old")]
    assert main([*args, "--out", str(tmp_path / "new")]) == 2
    assert "--out must be a folder of its own" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "kept")]) == 0
    kept = ProbeBank.load(tmp_path / "kept")
    assert kept.probes[0].steering_layer == 3 and kept.probes[0].threshold == 0.3
    assert kept.extra["steering"] == {"lowercase": {"alpha": 2.0}} and kept.extra["assembled"].startswith("steerer")
