"""Token-level warning predictors (#12): progress towards a limit reaches the live monitor at the right token on
both transformers paths, and what `probes.warning` fits is exactly what the runtime's scorer reads."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from probes.dataset import TaskData
from probes.evaluation import Design, fit_design
from probes.warning import Trace, bank_traces, build_warning_bank, progress_fractions, traces
from steerer.bank import ProbeBank
from steerer.conditioning import progress_features
from steerer.constraints import Constraint
from steerer.controller import RowSpec
from steerer.core import Request, Steerer
from steerer.generation import SamplingParams
from steerer.hf_processor import attach_steerer
from steerer.model import chat_prompt
from steerer.monitor import MonitorConfig
from steerer.service.testing import placeholder_bank

LIMIT = {"relation": "at most", "limit": 12}
PROMPT = "Describe a river in two sentences."
BIAS, SLOPE = 3.0, -6.0  # P(satisfied) = sigmoid(3 - 6 * words so far / 12): falls as the text grows
CONFIG = MonitorConfig(smoothing=0.0, warmup_tokens=0)


def progress_bank(lm) -> ProbeBank:
    """The placeholder bank with a warning predictor for word_count that reads progress only."""
    bank = placeholder_bank(lm.fingerprint, lm.hidden_size, "warn")
    k = bank.index("word_count")
    weights = torch.zeros_like(bank.weights)
    probes = [replace(p, conditioning={"progress": True}, flag_threshold=0.5) if p.task == "word_count" else p
              for p in bank.probes]
    progress = torch.zeros(len(probes), 3)
    progress[k, 0] = SLOPE
    biases = bank.biases.clone()
    biases[k] = BIAS
    warning = replace(bank, probes=probes, weights=weights, biases=biases, progress_weights=progress)
    return replace(bank, warning=warning)


def expected_risks(lm, tokens: list[int]) -> list[float]:
    """Risk after reading index i = 1 - sigmoid(bias + w . progress_features(words through token i / limit, i))."""
    fractions = progress_fractions("word_count", LIMIT, tokens, lm.tokenizer)
    index = np.arange(-1, len(tokens))
    f = np.concatenate([[0.0], fractions[: len(tokens)]])
    z = BIAS + SLOPE * progress_features(f, index.astype(float))[:, 0]
    return (1 - 1 / (1 + np.exp(-z))).tolist()


def test_progress_reaches_the_monitor_at_the_token_that_wrote_it_in_both_loops(lm):
    bank = progress_bank(lm)
    request = Request(PROMPT, (Constraint("word_count", LIMIT),), sampling=SamplingParams(max_new_tokens=24), id="r")
    with Steerer(lm, bank, monitor_config=CONFIG) as steerer:
        events = [e for e in steerer.generate([request]) if not hasattr(e, "verdicts")]
    risks = [e.risks["word_count"] for e in events]
    expected = expected_risks(lm, [e.token_id for e in events])
    assert len(events) >= 20 and max(expected) - min(expected) > 0.3  # the text moved the forecast
    # the event of token t carries the reading of the pass that chose it: index t - 1
    assert risks == pytest.approx(expected[: len(risks)], abs=1e-5)

    encoded = lm.tokenizer.pad([{"input_ids": chat_prompt(lm.tokenizer, PROMPT)}], return_tensors="pt")
    rows = [RowSpec((Constraint("word_count", LIMIT),), id="r")]
    with attach_steerer(lm.model, lm.tokenizer, bank, rows=rows, monitor_config=CONFIG) as proc, \
            torch.inference_mode():
        out = lm.model.generate(**encoded, max_new_tokens=24, do_sample=False, return_dict_in_generate=True,
                                logits_processor=LogitsProcessorList([proc]))
        proc.finish(out)
        theirs = proc.events()
    assert [e.token_id for e in theirs] == [e.token_id for e in events]
    assert [e.risks["word_count"] for e in theirs] == pytest.approx(risks, abs=1e-5)


def synthetic_task(tokenizer, n_rows: int = 40, d: int = 8, seed: int = 0) -> TaskData:
    """word_count rows with random per-token residuals whose first coordinate drifts down for violations."""
    rng = np.random.default_rng(seed)
    rows, tokens, offsets = [], [], [0]
    texts = ["one two three four", "alpha beta gamma delta epsilon zeta eta theta", "a b c", "x y z w v u t s r q"]
    for i in range(n_rows):
        ids = tokenizer.encode(texts[i % len(texts)], add_special_tokens=False)
        limit = 3 + i % 7
        satisfied = len(texts[i % len(texts)].split()) <= limit
        n = len(ids)
        x = rng.normal(size=(n + 1, 2, d)).astype(np.float32)
        x[:, :, 0] += (0.0 if satisfied else -1.0) * np.arange(n + 1)[:, None] / n
        rows.append({"id": f"r{i}", "task": "word_count", "params": {"relation": "at most", "limit": limit},
                     "token_ids": ids, "n_tokens": n, "finish_reason": "eos", "satisfied": satisfied,
                     "onset": None, "base_id": f"b{i % 8}", "split": "train"})
        tokens.append(torch.from_numpy(x).half())
        offsets.append(offsets[-1] + n + 1)
    return TaskData(rows, torch.zeros(n_rows, 1, 1, d), torch.cat(tokens), torch.tensor(offsets))


def test_what_is_fitted_is_what_the_runtime_reads(lm):
    data = synthetic_task(lm.tokenizer)
    design = Design("warning", {"variant": "bound", "inputs": [{"param": "limit", "transform": "log"}],
                                "progress": True})
    from probes.warning import training_tokens

    x, y, params = training_tokens(data, np.arange(len(data.rows)), 1, design, lm.tokenizer)
    fitted = fit_design(x, y, params, design, 0.1, 3)
    offline = traces(fitted, data, np.arange(len(data.rows)), 1, lm.tokenizer)
    d = data.tokens.shape[-1]
    base = placeholder_bank("f" * 16, d, "syn")
    base = replace(base, variant_weights=torch.zeros(2, d), variant_biases=torch.zeros(2),
                   input_weights=torch.zeros(len(base.probes) + 2, 1),
                   probes=[replace(p, layer=3, conditioning={"variant": "bound", "rows": {"lower": 0, "upper": 1},
                                                             "inputs": [{"param": "limit", "transform": "log"}]})
                           if p.task == "word_count" else replace(p, layer=0) for p in base.probes])
    choice = {"task": "word_count", "design": design, "fitted": fitted,
              "chosen": {"kind": "warning", "layer": 3, "threshold": 0.4}}
    warning = build_warning_bank([choice], base)
    assert warning.probes[warning.index("word_count")].layer == 3
    runtime = bank_traces(warning, "word_count", data, np.arange(len(data.rows)), [0, 3], None, lm.tokenizer)
    for a, b in zip(offline, runtime, strict=True):
        assert isinstance(a, Trace) and a.index == b.index
        assert a.p == pytest.approx(b.p, abs=1e-5)


# -- the forecast warning (term_exclusion, #22 item 4) ------------------------------------------------------------
TERMS = {"terms": ["the", "river"]}
FORECAST_LAYER = 21


def forecast_bank(lm, weight: tuple[float, float], bias: float, threshold: float = 0.5) -> ProbeBank:
    from probes.forecast import with_forecast

    base = placeholder_bank(lm.fingerprint, lm.hidden_size, "forecast")
    choice = {"chosen": {"kind": "forecast", "layer": FORECAST_LAYER, "threshold": threshold},
              "weight": np.array(weight), "bias": bias}
    return with_forecast(base, choice)


def test_the_forecast_the_runtime_reads_is_the_one_fitted_offline(lm):
    """Live risks (smoothing off) equal the offline forecast replayed on the same tokens by teacher forcing:
    the running mean of the lens inputs, read from the prompt's last token (index -1) on."""
    from probes.forecast import lens_readings, trace

    weight, bias = (-0.4, -0.2), 6.0
    bank = forecast_bank(lm, weight, bias)
    assert bank.alerting.probes[bank.index("term_exclusion")].conditioning["forecast"] is True
    request = Request(PROMPT, (Constraint("term_exclusion", TERMS),), sampling=SamplingParams(max_new_tokens=16),
                      id="f")
    with Steerer(lm, bank, monitor_config=CONFIG) as steerer:
        events = [e for e in steerer.generate([request]) if not hasattr(e, "verdicts")]
    tokens = [e.token_id for e in events]
    row = {"params": TERMS, "messages": [{"role": "user", "content": PROMPT}], "token_ids": tokens,
           "finish_reason": "length", "satisfied": True, "onset": None, "n_tokens": len(tokens)}
    reading = lens_readings(lm, [row], [FORECAST_LAYER], progress=False)[0]
    offline = trace(row, reading, 0, np.array(weight), bias)
    assert offline.index[0] == -1
    risks = [e.risks["term_exclusion"] for e in events]
    assert risks == pytest.approx([1 - p for p in offline.p[: len(risks)]], abs=1e-4)
    assert max(risks) - min(risks) > 0.01  # the readings moved


def test_a_forecast_flags_from_the_prompt_while_others_wait_for_the_warm_up(lm):
    """Under the default monitor (warm-up 2) a forecast sure of a violation flags at the prompt's reading."""
    bank = forecast_bank(lm, (0.0, 0.0), -4.0)  # P(satisfied) = 0.02 from the first reading
    request = Request(PROMPT, (Constraint("term_exclusion", TERMS),), sampling=SamplingParams(max_new_tokens=4),
                      id="w")
    with Steerer(lm, bank) as steerer:
        result = next(e for e in steerer.generate([request]) if hasattr(e, "verdicts"))
    assert result.verdicts[0].first_flag_token == -1


@pytest.mark.parametrize("declared, message", [({"forecast": True}, "needs lens"),
                                               ({"lens": "terms", "forecast": 1}, "true or false")])
def test_a_malformed_forecast_declaration_is_refused(declared, message):
    from steerer.conditioning import ConditioningError, check

    with pytest.raises(ConditioningError, match=message):
        check(declared, 0)


def test_the_forecast_picks_the_layer_whose_lens_tells_the_outcome_within_the_budget():
    """Synthetic readings: at the second layer violations read high from the prompt on, at the first nothing
    differs. The chosen layer is the informative one, flags most violations early, spends <= the budget."""
    from probes.forecast import choose
    from probes.warning import BUDGET

    rng = np.random.default_rng(0)
    rows, readings = [], []
    for i in range(80):
        satisfied = i % 2 == 0
        n = 20
        x = rng.normal(size=(n + 1, 2, 2))
        x[:, 1] += 0.0 if satisfied else 3.0
        rows.append({"id": f"r{i}", "base_id": f"b{i % 10}", "satisfied": satisfied, "onset": None if satisfied else 12,
                     "n_tokens": n, "finish_reason": "eos"})
        readings.append(x)
    choice = choose(rows, readings, [4, 8])
    assert choice["chosen"]["layer"] == 8
    assert choice["chosen"]["flagged_at_least_3_early"] > 0.8 and choice["chosen"]["false_flag_rate"] <= BUDGET
    assert choice["weight"].shape == (2,) and (choice["weight"] < 0).all()  # high lens: lower P(satisfied)
