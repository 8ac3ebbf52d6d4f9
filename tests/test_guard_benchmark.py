"""`benchmarks.guard`'s pure parts: rerunning some tasks into an existing results file (`--merge`) and the terms
the written variant forbids. No model is run."""

from __future__ import annotations

from benchmarks.guard import merged, written_terms


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
