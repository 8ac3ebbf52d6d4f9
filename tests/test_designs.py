"""Probe inputs for the weak tasks (#22 item 1): the running maximum of the lens of a required word is served by
the monitor exactly as `probes.designs` computes it offline, and the offline summaries mean what they say."""

from __future__ import annotations

import numpy as np
import pytest

from probes.designs import (
    LENS_MAX,
    extract,
    keyword_probe_bank,
    paired_delta,
    word_ids,
)
from probes.summaries import lens_summary, running_summaries
from steerer.constraints import Constraint
from steerer.core import Request, Steerer
from steerer.generation import SamplingParams
from steerer.monitor import MonitorConfig
from steerer.service.testing import placeholder_bank

PROMPT = "Describe a river in two sentences."
TERMS = {"terms": ["river", "water"]}
LAYER = 21
CONFIG = MonitorConfig(smoothing=0.0, warmup_tokens=0)


@pytest.mark.parametrize("kind", ["runmax", "idmax"])
def test_the_served_running_maximum_is_the_offline_one(lm, kind):
    """Live risks (smoothing off) equal the offline running summary of teacher-forced lens logits at every
    reading, from the prompt's last token on, and the end verdict reads the whole row's summary."""
    coefs, bias = np.array([0.3, 0.2]), -4.0
    bank = keyword_probe_bank(placeholder_bank(lm.fingerprint, lm.hidden_size, "kw"), LENS_MAX[kind], LAYER, coefs,
                              bias)
    assert bank.probes[bank.index("keyword_inclusion")].conditioning["lens_max"] == LENS_MAX[kind]
    request = Request(PROMPT, (Constraint("keyword_inclusion", TERMS),), sampling=SamplingParams(max_new_tokens=16),
                      id="k")
    with Steerer(lm, bank, monitor_config=CONFIG) as steerer:
        out = list(steerer.generate([request]))
    events = [e for e in out if not hasattr(e, "verdicts")]
    verdict = next(e for e in out if hasattr(e, "verdicts")).verdicts[0]
    tokens = [e.token_id for e in events]
    row = {"params": TERMS, "messages": [{"role": "user", "content": PROMPT}], "token_ids": tokens,
           "finish_reason": "length", "n_tokens": len(tokens)}
    logits = extract(lm, [row], (LAYER,), "terms")["lens"][0][:, 0]  # [R, M]: readings -1 .. the last one taken
    assert logits.shape[1] == len(word_ids(lm.tokenizer, TERMS, "terms")[0]) > 2
    offline = 1 / (1 + np.exp(-(running_summaries(logits, kind) @ coefs + bias)))
    risks = [e.risks["keyword_inclusion"] for e in events]
    assert risks[: len(offline)] == pytest.approx((1 - offline).tolist(), abs=1e-4)
    assert max(risks) - min(risks) > 0.01  # the readings moved
    end = 1 / (1 + np.exp(-(lens_summary(logits, [], kind) @ coefs + bias)))
    assert verdict.p_satisfied_end == pytest.approx(float(end), abs=1e-4)


def test_the_running_summaries_keep_maxima_and_pool_where_they_say():
    logits = np.array([[1.0, 0.0], [0.0, 3.0], [2.0, 1.0]])  # readings x ids
    assert lens_summary(logits, [], "runmax").tolist() == [3.0, 1.5]  # pooled per reading: (1, .5) (3, 1.5) (2, 1.5)
    assert lens_summary(logits, [], "idmax").tolist() == [3.0, 2.5]  # per id: 2 and 3
    assert lens_summary(logits, [[0], [1]], "wordmin").tolist() == [3.0, 2.0]  # the lower word's maximum
    assert lens_summary(logits, [], "eos_lens").tolist() == [2.0, 1.5]
    assert running_summaries(logits, "idmax")[:, 1].tolist() == [0.5, 2.0, 2.5]


def test_a_paired_difference_is_zero_for_the_same_scores_and_signed_for_better_ones():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    noisy = y + rng.normal(0, 1.5, len(y))
    same = paired_delta(y, noisy, noisy)
    assert same["delta"] == 0 and same["delta_ci"] == [0.0, 0.0]
    better = paired_delta(y, y + rng.normal(0, 0.3, len(y)), noisy)
    assert better["delta"] > 0 and better["delta_ci"][0] > 0


@pytest.mark.parametrize("declared, message", [({"lens_max": "pooled"}, "with lens"),
                                               ({"lens": "terms", "lens_max": "sum"}, "one of"),
                                               ({"lens": "terms", "lens_max": "ids", "forecast": True}, "without")])
def test_a_malformed_running_maximum_is_refused(declared, message):
    from steerer.conditioning import ConditioningError, check

    with pytest.raises(ConditioningError, match=message):
        check(declared, 0)
