"""Bad and unreliable probes with the real model: a NaN direction that slipped past validation cannot
reach other rows, and unreliable probes are muted (no flags, no steering) unless overridden.

Placeholder banks (zero weights, P(satisfied) = sigmoid(bias)): bias -4 on `lowercase` means risk ~0.98
at every token, so a trusted probe flags and steers. Few tokens: the machine is a shared 2-core CPU.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from steerer.constraints import Constraint
from steerer.core import Request, Result, Steerer, TokenEvent
from steerer.generation import SamplingParams
from steerer.monitor import MonitorConfig
from steerer.policy import OFF, SteeringPolicy
from steerer.service.testing import placeholder_bank, split_stream

PROMPT = "Name three colors."
LOWER = Constraint("lowercase")
TOKENS = 6


def bank_for(lm, reliable: bool | None = True):
    bank = placeholder_bank(lm.fingerprint, lm.hidden_size, "t", {"lowercase": -4.0})
    metrics = {"test_auroc": 0.27, "test_auroc_ci": [0.1, 0.45], "n_test": 30}
    bank.probes = [replace(p, reliable=reliable, metrics=metrics) if p.task == "lowercase" else p
                   for p in bank.probes]
    return bank


EARLY_FLAGS = MonitorConfig(warmup_tokens=0)  # flags may rise before the capital at token 2 settles the task


def run(lm, bank, requests: list[Request], **options) -> tuple[dict[str, Result], dict[str, list[TokenEvent]]]:
    with Steerer(lm, bank, **options) as steerer:
        return split_stream(steerer.generate(requests))


def request(rid: str, constraints=(), policy: SteeringPolicy = OFF) -> Request:
    return Request(PROMPT, tuple(constraints), policy, sampling=SamplingParams(TOKENS, ignore_eos=True), id=rid)


def test_a_nan_direction_does_not_reach_an_unsteered_row_in_the_same_batch(lm):
    """The issue's case: a request steered along a NaN direction batched with one that has no constraints."""
    bank = bank_for(lm)
    alone, _ = run(lm, bank, [request("plain")])
    bank.directions[bank.index("lowercase"), :4] = float("nan")  # past validation, as a bug or bit flip might
    both, events = run(lm, bank, [request("steered", [LOWER], SteeringPolicy("constant", 8.0)), request("plain")])
    assert both["plain"].tokens == alone["plain"].tokens  # bit-identical: not token id 0 from then on
    assert both["steered"].steered_tokens["lowercase"] > 0  # the bad direction really was used next door


@pytest.fixture(scope="module")
def unreliable(lm):
    return bank_for(lm, reliable=False)


def test_an_unreliable_probe_is_muted_by_default(lm, unreliable):
    plain, _ = run(lm, unreliable, [request("plain")])
    results, events = run(lm, unreliable, [request("r", [LOWER], SteeringPolicy("constant", 50.0))])
    result = results["r"]
    (verdict,) = result.verdicts
    assert verdict.probe_muted and not verdict.probe_reliable
    assert not verdict.flagged and verdict.first_flag_token is None and not verdict.predicted_violation
    assert verdict.p_satisfied_end == pytest.approx(torch.sigmoid(torch.tensor(-4.0)).item(), rel=1e-3)
    assert result.steered_tokens == {"lowercase": 0} and result.tokens == plain["plain"].tokens
    assert not any(e.flags for e in events["r"])
    assert all(e.risks["lowercase"] > 0.9 for e in events["r"][1:])  # risk is still computed and streamed


def test_the_override_flags_and_steers_with_an_unreliable_probe(lm, unreliable):
    results, events = run(lm, unreliable, [request("r", [LOWER], SteeringPolicy("constant", 50.0))],
                          use_unreliable_probes=True, monitor_config=EARLY_FLAGS)
    (verdict,) = results["r"].verdicts
    assert not verdict.probe_muted and not verdict.probe_reliable
    assert verdict.flagged and verdict.predicted_violation
    assert results["r"].steered_tokens["lowercase"] == TOKENS - 1  # from the first generated token on


def test_a_reliable_probe_is_not_muted(lm):
    results, _ = run(lm, bank_for(lm, reliable=True), [request("r", [LOWER], SteeringPolicy("conditional", 4.0))],
                     monitor_config=EARLY_FLAGS)
    (verdict,) = results["r"].verdicts
    assert verdict.probe_reliable and not verdict.probe_muted and verdict.flagged


def test_the_server_option_reaches_the_steerer(lm, unreliable):
    from steerer.service.server import ServerConfig, SteererServer

    for use, muted in ((False, True), (True, False)):
        server = SteererServer(lm, unreliable, ServerConfig(port=0, metrics_port=None, use_unreliable_probes=use,
                                                            stop_steering_on_detection=use))
        try:
            assert bool(server.scheduler._steerer.muted[unreliable.index("lowercase")]) is muted
            assert server.scheduler._steerer.controller.stop_steering_on_detection is use
        finally:
            server.scheduler.stop(drain=False)


def test_generate_cli_warns_about_a_muted_constraint(lm, unreliable, tmp_path):
    folder = unreliable.save(tmp_path / "bank")
    proc = subprocess.run([sys.executable, "-m", "steerer.cli", "generate", "--prompt", PROMPT, "--bank", str(folder),
                           "--constraint", "lowercase", "--policy", "constant", "--alpha", "50",
                           "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "warning: the lowercase probe is muted, no flags or steering (95% AUROC interval [0.10, 0.45] " \
           "reaches chance); --use-unreliable-probes to use it" in proc.stderr
    assert "[lowercase: probe unreliable (muted) (P(satisfied) at end 0.02)" in proc.stderr
    assert "steered 0 tokens" in proc.stderr


@pytest.mark.parametrize("use", [False, True])
def test_attach_steerer_mutes_the_same_way(lm, unreliable, use):
    from transformers import LogitsProcessorList

    from steerer.hf_processor import attach_steerer
    from steerer.model import chat_prompt

    ids = torch.tensor([chat_prompt(lm.tokenizer, PROMPT)])
    with attach_steerer(lm.model, lm.tokenizer, unreliable, constraints=(LOWER,),
                        policy=SteeringPolicy("constant", 50.0), use_unreliable_probes=use,
                        monitor_config=EARLY_FLAGS) as proc:
        out = lm.model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                logits_processor=LogitsProcessorList([proc]))
        (result,) = proc.finish(out)
    (verdict,) = result.verdicts
    assert verdict.probe_muted is not use and (result.steered_tokens["lowercase"] > 0) is use
    assert verdict.flagged is use
