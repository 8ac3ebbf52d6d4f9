"""Monitor and policy arithmetic on synthetic residuals (no model): flags, hysteresis, alphas."""

from __future__ import annotations

import math

import pytest
import torch

from steerer.bank import Probe, ProbeBank
from steerer.generation import StepView
from steerer.monitor import NO_FLAG, FlagEvent, Monitor, MonitorConfig, first_flag
from steerer.policy import PolicyTable, SteeringPolicy

D = 8


def bank(threshold: float = 0.5, flag_threshold: float | None = None) -> ProbeBank:
    """Two probes reading coordinate 0 (layer 1) and coordinate 1 (layer 2): logit = x[k]."""
    weights = torch.zeros(2, D)
    weights[0, 0] = weights[1, 1] = 1.0
    probes = [Probe("word_count", 1, threshold=threshold, flag_threshold=flag_threshold),
              Probe("lowercase", 2, threshold=threshold, flag_threshold=flag_threshold)]
    return ProbeBank("synthetic", "f" * 16, D, probes, weights, torch.zeros(2), torch.eye(D)[:2])


def view(rows: list[int], index: int, logits: list[tuple[float, float]]) -> StepView:
    x = torch.zeros(len(rows), D)
    for i, (a, b) in enumerate(logits):
        x[i, 0], x[i, 1] = a, b
    n = len(rows)
    return StepView(rows, torch.full((n,), index), torch.zeros(n, dtype=torch.long), {1: x, 2: x},
                    torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_flags_rise_and_clear_with_hysteresis_and_only_for_registered_tasks():
    config = MonitorConfig(smoothing=0.0, hysteresis=0.05, warmup_tokens=0, hold_tokens=0)
    monitor = Monitor(bank(0.5), config, capacity=4)
    monitor.register(0, ["word_count"])
    monitor.register(1, ["word_count", "lowercase"])
    # risks 0.52 (inside the band: nothing), 0.7 (raise), 0.47 (inside: stays up), 0.3 (clear), 0.7 (raise)
    for index, p in enumerate([0.48, 0.3, 0.53, 0.7, 0.3]):
        monitor.after_forward(view([0, 1], index, [(logit(p), logit(p))] * 2))
    events = monitor.drain_events()
    assert [(e.row, e.token_index, e.task, e.raised) for e in events] == [
        (0, 1, "word_count", True), (1, 1, "word_count", True), (1, 1, "lowercase", True),
        (0, 3, "word_count", False), (1, 3, "word_count", False), (1, 3, "lowercase", False),
        (0, 4, "word_count", True), (1, 4, "word_count", True), (1, 4, "lowercase", True)]
    assert all(isinstance(e, FlagEvent) and 0 <= e.risk <= 1 for e in events)
    assert monitor.first_flag[0, 0] == 1 and monitor.first_flag[0, 1] == NO_FLAG


def test_first_flag_replay_matches_the_monitor():
    config = MonitorConfig(smoothing=0.6, hysteresis=0.05, warmup_tokens=2, hold_tokens=0)
    readings = [0.9, 0.8, 0.55, 0.35, 0.3, 0.2, 0.6, 0.1]
    monitor = Monitor(bank(0.5), config, capacity=1)
    monitor.register(0, ["word_count"])
    for index, p in enumerate(readings, start=-1):
        monitor.after_forward(view([0], index, [(logit(p), 0.0)]))
    expected = int(monitor.first_flag[0, 0])
    assert expected >= 2
    assert first_flag(readings, list(range(-1, len(readings) - 1)), 0.5, config) == expected


def test_flag_threshold_overrides_the_eos_threshold_for_flags():
    config = MonitorConfig(smoothing=0.0, hysteresis=0.0, warmup_tokens=0, hold_tokens=0)
    strict = Monitor(bank(0.5, flag_threshold=0.2), config, capacity=1)
    strict.register(0, ["word_count"])
    strict.after_forward(view([0], 0, [(logit(0.4), 0.0)]))
    assert not strict.flags[0, 0]
    strict.after_forward(view([0], 1, [(logit(0.1), 0.0)]))
    assert strict.flags[0, 0]


def test_policy_table_alphas_follow_kind_flags_and_risk():
    table = PolicyTable(bank(), capacity=4)
    table.set(0, {"word_count": SteeringPolicy("constant", 3.0)})
    table.set(1, {"word_count": SteeringPolicy("conditional", 5.0), "lowercase": SteeringPolicy("proportional", 10.0)})
    table.set(2, {"word_count": SteeringPolicy("off", 9.0)})
    rows = torch.tensor([0, 1, 2])
    flags = torch.tensor([[False, False], [True, False], [True, True]])
    risk = torch.tensor([[0.9, 0.9], [0.9, 0.25], [0.9, 0.9]])
    coeffs = table.coefficients(rows, flags, risk)
    assert coeffs.tolist() == [[3.0, 0.0], [5.0, 2.5], [0.0, 0.0]]
    table.apply(coeffs)
    assert table.steering[1].coeffs.tolist() == [[3.0], [5.0], [0.0]]
    assert table.steering[2].coeffs.tolist() == [[0.0], [2.5], [0.0]]


@pytest.mark.parametrize("kind,alpha,message", [("constant", float("nan"), "finite"), ("constant", float("inf"), "finite"),
                                                ("constant", 1e6, "outside"), ("sideways", 1.0, "unknown")])
def test_bad_policies_are_rejected(kind, alpha, message):
    with pytest.raises(ValueError, match=message):
        SteeringPolicy(kind, alpha)


def test_policy_parse():
    assert SteeringPolicy.parse("conditional:12") == SteeringPolicy("conditional", 12.0)
    assert SteeringPolicy.parse("off") == SteeringPolicy()
    with pytest.raises(ValueError):
        SteeringPolicy.parse("constant:abc")


# -- #12: a monitor steering cannot blind; flags that hold; warning predictors with progress -------------------
def test_a_raised_flag_holds_for_hold_tokens_before_it_may_clear():
    config = MonitorConfig(smoothing=0.0, hysteresis=0.05, warmup_tokens=0, hold_tokens=3)
    monitor = Monitor(bank(0.5), config, capacity=1)
    monitor.register(0, ["word_count"])
    for index, p in enumerate([0.2, 0.9, 0.9, 0.9, 0.9, 0.2]):  # raised at 0; clearable from index 3 on
        monitor.after_forward(view([0], index, [(logit(p), 0.0)]))
    events = [(e.token_index, e.raised) for e in monitor.drain_events()]
    assert events == [(0, True), (3, False), (5, True)]


def test_detection_settles_a_task_flags_stop_and_the_steering_gate_stays_up():
    config = MonitorConfig(smoothing=0.0, hysteresis=0.0, warmup_tokens=0, hold_tokens=0)
    monitor = Monitor(bank(0.5), config, capacity=1)
    monitor.register(0, ["word_count"])
    monitor.after_forward(view([0], 0, [(logit(0.9), 0.0)]))
    monitor.settle(0, "word_count")
    for index, p in enumerate([0.1, 0.9, 0.1], start=1):  # would raise, clear, raise
        monitor.after_forward(view([0], index, [(logit(p), 0.0)]))
        assert bool(monitor.gate[0, 0])
    assert monitor.drain_events() == []


def test_the_gate_has_its_own_threshold_apart_from_the_flags():
    from dataclasses import replace

    b = bank(0.5, flag_threshold=0.2)
    b.probes = [replace(p, gate_threshold=0.6) for p in b.probes]
    monitor = Monitor(b, MonitorConfig(smoothing=0.0, hysteresis=0.0, warmup_tokens=0, hold_tokens=0), capacity=1)
    monitor.register(0, ["word_count"])
    monitor.after_forward(view([0], 0, [(logit(0.4), 0.0)]))  # risk 0.6: above the gate's 0.4, below the flag's 0.8
    assert bool(monitor.gate[0, 0]) and not bool(monitor.flags[0, 0])
    table = PolicyTable(b, capacity=1)
    table.set(0, {"word_count": SteeringPolicy("conditional", 5.0)})
    assert table.coefficients(torch.tensor([0]), monitor.gate[:1], monitor.smoothed[:1]).tolist() == [[5.0, 0.0]]


def test_readings_take_out_what_this_pass_steered_at_or_below_the_probe_layer():
    b = bank(0.5)  # word_count reads layer 1, lowercase layer 2; both steer at their own layer
    b.directions = torch.eye(D)[:2]  # word_count's direction is its own read axis, lowercase's too
    monitor = Monitor(b, MonitorConfig(warmup_tokens=0), capacity=2)
    monitor.register(0, ["word_count", "lowercase"])
    monitor.register(1, ["word_count", "lowercase"])
    x = torch.zeros(2, D)
    x[:, 0], x[:, 1] = 0.3, -0.2
    steered = x.clone()
    steered[0, :2] += torch.tensor([5.0, -7.0])  # row 0 was pushed by alphas (5, -7); row 1 not steered
    applied = torch.tensor([[5.0, -7.0], [0.0, 0.0]])
    rows, index, closing = torch.tensor([0, 1]), torch.tensor([0, 0]), torch.zeros(2, dtype=torch.bool)
    monitor.observe(rows, index, {1: steered, 2: steered}, closing, applied)
    assert torch.allclose(monitor.last_p[:2], torch.sigmoid(x[:, :2]), atol=1e-6)
    monitor.observe(rows, index, {1: steered, 2: steered}, closing)  # uncorrected: the steering shows
    assert not torch.allclose(monitor.last_p[0], torch.sigmoid(x[0, :2]), atol=1e-3)


def test_a_nan_direction_never_reaches_an_unsteered_rows_reading():
    b = bank(0.5)
    b.directions = torch.eye(D)[:2]
    monitor = Monitor(b, MonitorConfig(warmup_tokens=0), capacity=2)
    monitor.end.directions[0, 3] = float("nan")
    for row in (0, 1):
        monitor.register(row, ["word_count"])
    x = torch.zeros(2, D)
    monitor.observe(torch.tensor([0, 1]), torch.tensor([0, 0]), {1: x, 2: x}, torch.zeros(2, dtype=torch.bool),
                    torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    assert torch.isfinite(monitor.last_p[1]).all() and torch.isfinite(monitor.smoothed[1]).all()


def test_a_warning_predictor_reads_progress_and_the_end_probe_still_gives_the_verdict():
    from steerer.conditioning import progress_features

    end = bank(0.5)
    weights = torch.zeros(2, D)
    warning = ProbeBank("synthetic", "f" * 16, D, [Probe("word_count", 1, flag_threshold=0.5,
                                                         conditioning={"progress": True}),
                                                   Probe("lowercase", 2, flag_threshold=0.5)],
                        weights, torch.tensor([2.0, 4.0]), torch.eye(D)[:2],
                        progress_weights=torch.tensor([[-4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    end.warning = warning
    end.__post_init__()  # validated together
    monitor = Monitor(end, MonitorConfig(smoothing=0.0, hysteresis=0.0, warmup_tokens=0), capacity=1)
    monitor.register(0, ["word_count"])
    x = torch.zeros(1, D)
    x[0, 0] = 1.5  # the end probe reads sigmoid(1.5)
    for index, fraction in enumerate([0.0, 0.4, 0.9]):
        monitor.set_progress([0], [0], [fraction])
        monitor.observe(torch.tensor([0]), torch.tensor([index]), {1: x, 2: x}, torch.zeros(1, dtype=torch.bool))
        f = progress_features(torch.tensor([fraction]), torch.tensor([index]))[0]
        expected = torch.sigmoid(torch.tensor(2.0) - 4.0 * f[0])
        assert float(monitor.smoothed[0, 0]) == pytest.approx(1 - float(expected), abs=1e-6)
        assert float(monitor.last_p[0, 0]) == pytest.approx(float(torch.sigmoid(torch.tensor(1.5))), abs=1e-6)
    assert bool(monitor.flags[0, 0])  # at 0.9 of the limit the forecast crossed 0.5 (risk 0.83)
    # steering reads the end probe (what its gate threshold was calibrated on): risk 0.18, gate down
    assert float(monitor.steer_risk[0, 0]) == pytest.approx(1 - float(torch.sigmoid(torch.tensor(1.5))), abs=1e-6)
    assert not bool(monitor.gate[0, 0])


def test_steer_signs_flip_a_strength_per_variant():
    weights = torch.zeros(1, D)
    b = ProbeBank("synthetic", "f" * 16, D, [Probe("word_count", 1, conditioning={
        "variant": "bound", "rows": {"lower": 0, "upper": 1}, "inputs": [], "steer_signs": {"upper": -1}})],
        weights, torch.zeros(1), torch.eye(D)[:1], variant_weights=torch.zeros(2, D), variant_biases=torch.zeros(2))
    table = PolicyTable(b, capacity=2)
    table.set(0, {"word_count": SteeringPolicy("constant", 3.0)}, {"word_count": {"relation": "at most", "limit": 5}})
    table.set(1, {"word_count": SteeringPolicy("constant", 3.0)}, {"word_count": {"relation": "at least", "limit": 5}})
    assert table.alphas[:, 0].tolist() == [-3.0, 3.0]
