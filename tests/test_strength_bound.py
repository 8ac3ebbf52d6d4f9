"""The steering-strength bound: a bank accepts |alpha| up to a multiple of the residual norm at each task's steering
layer (`steerer.policy.strength_bounds`), refused above it with one line by the one request validation."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from steerer import Constraint, ProbeBank, Request, SteeringPolicy
from steerer.controller import Controller
from steerer.model import resolve_model_path
from steerer.policy import MAX_ALPHA, STRENGTH_BOUND_NORMS, residual_norms, strength_bounds

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bank() -> ProbeBank:
    return ProbeBank.load()


@pytest.fixture(scope="module")
def controller(bank) -> Controller:
    bank = bank.subset(["lowercase", "sentiment"])  # probes that need no lens weights (no model loaded here)
    return Controller(bank, AutoTokenizer.from_pretrained(resolve_model_path(None)), capacity=2, check=False)


def _request(policy: SteeringPolicy, task: str = "lowercase", **policies: SteeringPolicy) -> Request:
    params = {"polarity": "positive"} if task == "sentiment" else {}
    return Request("Describe the ocean.", (Constraint(task, params),), policy, policies=policies)


def test_the_shipped_bank_bounds_each_task_by_its_steering_layers_residual_norm(bank):
    bounds = strength_bounds(bank)
    assert set(bounds) == set(bank.tasks)
    record = bank.extra["steering"]["lowercase"]  # the sweep chose alpha = fraction x norm at layer 21
    assert record["layer"] == bank.probes[bank.index("lowercase")].steering_layer
    assert bounds["lowercase"] == pytest.approx(STRENGTH_BOUND_NORMS * record["alpha"] / record["fraction"], abs=0.05)
    for task, chosen in bank.extra["steering"].items():  # every strength the sweep chose is accepted
        assert chosen["alpha"] <= bounds[task] < MAX_ALPHA, task
    norms = residual_norms(bank)  # a task the sweep did not record takes the nearest measured layer's norm
    assert bounds["keyword_inclusion"] == pytest.approx(STRENGTH_BOUND_NORMS * norms[6], abs=0.05)


def test_a_strength_above_the_bound_is_refused_with_one_line_naming_it(bank, controller):
    bound = strength_bounds(bank)["lowercase"]
    with pytest.raises(ValueError, match=rf"^steering strength 1000 for lowercase is above this bank's bound "
                                         rf"{bound:g}; use at most {bound:g}$"):
        controller.validate(_request(SteeringPolicy("constant", 1000.0)))
    for kind in ("conditional", "proportional"):
        with pytest.raises(ValueError, match="above this bank's bound"):
            controller.validate(_request(SteeringPolicy(kind, -(bound + 1))))  # |alpha| is bounded
    with pytest.raises(ValueError, match="for lowercase is above"):  # a per-task policy is bounded as well
        controller.validate(_request(SteeringPolicy("off"), lowercase=SteeringPolicy("constant", bound + 1)))
    controller.validate(_request(SteeringPolicy("constant", bound)))  # the bound itself is accepted
    controller.validate(_request(SteeringPolicy("constant", 500.0), task="sentiment"))  # bounds are per task


def test_explicit_bounds_and_banks_without_a_sweep(bank):
    explicit = dataclasses.replace(bank, extra=bank.extra | {"strength_bounds": {"lowercase": 12}})
    assert strength_bounds(explicit)["lowercase"] == 12
    bare = dataclasses.replace(bank, extra={})
    assert set(strength_bounds(bare).values()) == {MAX_ALPHA}  # no measurement: only the absolute limit


def test_the_cli_refuses_it_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", "generate", "--prompt", "Describe the ocean.",
                           "--constraint", "lowercase", "--policy", "constant", "--alpha", "1000",
                           "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "steering strength 1000 for lowercase is above this bank's bound" in lines[0], lines
