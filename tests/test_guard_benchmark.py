"""`benchmarks.guard`'s pure parts: rerunning some tasks into an existing results file (`--merge`) and the terms
the written variant forbids. No model is run."""

from __future__ import annotations

import pytest

from benchmarks.guard import choose, detectable_prompts, loop_rule_params, merged, written_terms


def test_merge_replaces_the_rerun_tasks_and_keeps_the_rest():
    previous = {"benchmark": "guard", "note": "kept", "commands": ["python -m benchmarks.guard"],
                "tasks": {"lowercase": {"n": 60, "old": True}, "word_count": {"n": 60}}}
    out = {"benchmark": "guard", "n_requested": 60, "command": "python -m benchmarks.guard --tasks lowercase",
           "tasks": {"lowercase": {"n": 60, "run": "python -m benchmarks.guard --tasks lowercase"}}}
    final = merged(previous, out)
    assert final["tasks"] == {"lowercase": out["tasks"]["lowercase"], "word_count": {"n": 60}}
    assert final["note"] == "kept" and final["n_requested"] == 60 and "command" not in final
    assert final["commands"] == ["python -m benchmarks.guard", "python -m benchmarks.guard --tasks lowercase"]
    assert merged(final, out)["commands"] == final["commands"]  # the same command twice is listed once
    assert merged({"command": "a", "tasks": {}}, out)["commands"] == ["a", out["command"]]  # a single-run file


def test_written_terms_are_the_most_frequent_content_words():
    text = "the soup needs soup stock and the stock needs water; water, soup."
    assert written_terms(text) == ["soup", "needs", "stock"]  # ties: first written first; never "the"/"and"
    assert written_terms("the and of the") == ["the", "and", "of"]  # no content word: function words


def test_loop_rules_parse_as_lowercase_params_and_the_criterion_picks_compliance_then_perplexity():
    assert loop_rule_params("0") == {"loop_ngram": 0} and loop_rule_params(" 3:3") == {"loop_ngram": 3,
                                                                                       "loop_occurrence": 3}
    for bad, message in [("x", "expected N or N:K"), ("3:1", "loop_occurrence must be"), ("-2", "loop_ngram must")]:
        with pytest.raises(ValueError, match=message):
            loop_rule_params(bad)
    rule = lambda ok, ppl: {"compliance": {"satisfied": ok}, "perplexity_ratio": ppl}  # noqa: E731
    assert choose({"0": rule(37, 1.11), "3": rule(38, 1.39), "4": rule(37, 1.30)}) == "3"
    assert choose({"0": rule(37, 1.11), "3": rule(37, 1.39)}) == "0"  # a tie: the lower perplexity ratio


def test_training_prompts_share_no_base_request_with_the_held_out_ones():
    train, test = detectable_prompts("lowercase", 40, split="train"), detectable_prompts("lowercase", 60)
    assert len(train) == 40 and not {p.base_id for p in train} & {p.base_id for p in test}

