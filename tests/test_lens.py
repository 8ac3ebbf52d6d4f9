"""The logit lens of a request's words: equal to the model's own final norm + unembedding logits, fed to
probes that declare it, per row, and required (not silently skipped) when a bank needs it."""

from __future__ import annotations

import pytest
import torch

from steerer import lens
from steerer.bank import Probe, ProbeBank
from steerer.controller import Controller
from steerer.monitor import Monitor


def test_lens_features_are_the_models_own_logits_for_the_words(lm):
    weights = lens.LensWeights.of(lm.model)
    ids = lens.token_ids(lm.tokenizer, ["ocean", "violin"])
    assert len(ids) >= 2 and ids == sorted(set(ids))
    x = torch.randn(3, lm.hidden_size) * 40
    table, mask = lens.id_table(ids)
    got = weights.features(x, table.expand(3, -1), mask.expand(3, -1))
    with torch.no_grad():
        logits = lm.model.lm_head(lm.model.get_decoder().norm(x))[:, ids]  # [3, M]
    torch.testing.assert_close(got[:, 0], logits.max(-1).values, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got[:, 1], logits.mean(-1), rtol=1e-4, atol=1e-3)
    empty = weights.features(x, torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(3, 2))


def test_words_of_reads_terms_and_topics():
    assert lens.words_of({"terms": ["a", "bb"]}, "terms") == ["a", "bb"]
    assert lens.words_of({"topic": "ancient Egypt"}, "topic") == ["ancient", "Egypt"]


def lens_bank(lm) -> ProbeBank:
    d = lm.hidden_size
    probes = [Probe("term_exclusion", 3, reliable=True, conditioning={"lens": "terms"}),
              Probe("lowercase", 3, reliable=True)]
    return ProbeBank("dev", lm.fingerprint, d, probes, torch.zeros(2, d), torch.tensor([0.5, 0.0]),
                     torch.nn.functional.normalize(torch.ones(2, d), dim=1),
                     lens_weights=torch.tensor([[-0.2, 0.1], [0.0, 0.0]]))


def test_a_lens_probe_reads_each_rows_own_words(lm):
    bank = lens_bank(lm)
    weights = lens.LensWeights.of(lm.model)
    monitor = Monitor(bank, capacity=2, lens=weights)
    ids = {0: lens.token_ids(lm.tokenizer, ["ocean"]), 1: lens.token_ids(lm.tokenizer, ["the", "and"])}
    for row in (0, 1):
        monitor.register(row, ["term_exclusion"], {"term_exclusion": {"terms": ["x"]}}, {"term_exclusion": ids[row]})
    x = torch.randn(2, lm.hidden_size) * 40
    p = monitor.score(torch.arange(2), {3: x})
    for row in (0, 1):
        table, mask = lens.id_table(ids[row])
        f = weights.features(x[row: row + 1], table[None], mask[None])[0]
        torch.testing.assert_close(p[row, 0], torch.sigmoid(0.5 - 0.2 * f[0] + 0.1 * f[1]))
    assert p[0, 0] != p[1, 0]


def test_a_bank_with_lens_probes_needs_the_lens_weights(lm):
    with pytest.raises(ValueError, match="term_exclusion read the logit lens"):
        Controller(lens_bank(lm), lm.tokenizer, capacity=2)
    Controller(lens_bank(lm), lm.tokenizer, capacity=2, lens=lens.LensWeights.of(lm.model))
