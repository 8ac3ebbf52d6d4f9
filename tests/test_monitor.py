"""Monitor and policy arithmetic on synthetic residuals (no model): flags, hysteresis, alphas."""

from __future__ import annotations

import math

import pytest
import torch

from steerer.bank import Probe, ProbeBank
from steerer.generation import StepView
from steerer.monitor import FlagEvent, Monitor, MonitorConfig, first_flag
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
    config = MonitorConfig(smoothing=0.0, hysteresis=0.05, warmup_tokens=0)
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
    assert monitor.first_flag[0, 0] == 1 and monitor.first_flag[0, 1] == -1


def test_first_flag_replay_matches_the_monitor():
    config = MonitorConfig(smoothing=0.6, hysteresis=0.05, warmup_tokens=2)
    readings = [0.9, 0.8, 0.55, 0.35, 0.3, 0.2, 0.6, 0.1]
    monitor = Monitor(bank(0.5), config, capacity=1)
    monitor.register(0, ["word_count"])
    for index, p in enumerate(readings, start=-1):
        monitor.after_forward(view([0], index, [(logit(p), 0.0)]))
    expected = int(monitor.first_flag[0, 0])
    assert expected >= 2
    assert first_flag(readings, list(range(-1, len(readings) - 1)), 0.5, config) == expected


def test_flag_threshold_overrides_the_eos_threshold_for_flags():
    config = MonitorConfig(smoothing=0.0, hysteresis=0.0, warmup_tokens=0)
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
