"""The violating-token rules of the early-warning benchmark (pure, no model)."""

from __future__ import annotations

import itertools
import json

import pytest

from probes import checkers
from probes.violations import end_index, json_prefix_ok, token_prefixes, violating_token


def prefixes(*pieces: str) -> list[str]:
    """Decoded prefixes of a response whose tokens decode to `pieces`."""
    return list(itertools.accumulate(pieces))


def test_end_index_is_the_eos_or_the_last_token():
    assert end_index(5, ended_by_eos=True) == 5
    assert end_index(5, ended_by_eos=False) == 4


def test_term_exclusion_points_at_the_token_completing_the_word():
    p = prefixes("The", " deep", " oce", "an", " is", " blue")
    assert violating_token("term_exclusion", {"terms": ["ocean"]}, p, True) == 3
    # "ocean" at the end of a prefix is not yet a violation when the next token makes it "oceans"
    p = prefixes("Many", " ocean", "s", " are", " deep", ".", " An", " ocean", " is", " big")
    assert violating_token("term_exclusion", {"terms": ["ocean"]}, p, True) == 7
    p = prefixes("I", " like", " Castles", " and", " DRAGON", "s", " and", " the", " Dragon")
    assert violating_token("term_exclusion", {"terms": ["castle", "dragon"]}, p, False) == 8


def test_upper_bounds_break_at_the_first_token_over_the_limit():
    p = prefixes("one", " two", " three", " four")
    assert violating_token("word_count", {"relation": "at most", "limit": 2}, p, True) == 2
    assert violating_token("word_count", {"relation": "less than", "limit": 2}, p, True) == 1
    assert violating_token("char_count", {"relation": "at most", "limit": 7}, p, True) == 2  # "one two" fits
    assert violating_token("char_count", {"relation": "less than", "limit": 7}, p, True) == 1
    assert violating_token("char_count", {"relation": "less than", "limit": 8}, p, True) == 2


def test_lower_bounds_and_keywords_fail_at_the_end():
    p = prefixes("Too", " short", ".")
    assert violating_token("word_count", {"relation": "at least", "limit": 50}, p, True) == 3
    assert violating_token("char_count", {"relation": "at least", "limit": 500}, p, False) == 2
    assert violating_token("keyword_inclusion", {"terms": ["walrus"]}, p, True) == 3
    for task, params in (("sentiment", {"polarity": "negative"}), ("topic", {"topic": "chess"}),
                         ("register", {"register": "informal"})):
        assert violating_token(task, params, p, True) == 3
        assert violating_token(task, params, p, False) == 2


def test_lowercase_breaks_at_the_first_capital():
    assert violating_token("lowercase", {}, prefixes("sure", ",", " here", " Is", " it"), True) == 3
    assert violating_token("lowercase", {}, prefixes("Sure"), True) == 0
    # no capital at all (e.g. not English): only the end can be blamed
    assert violating_token("lowercase", {}, prefixes("123", " 456"), True) == 2


@pytest.mark.parametrize("pieces, expected", [
    (("Sure", "!", " {"), 0),
    (("```", "json", "\n", "{", '"a"', ":", " 1", "}", "\n", "```"), None),  # valid: nothing breaks
    (("{", '"a"', ":", " 1", "}", "\n\n", "This", " is"), 6),  # text after the value
    (("[", "1", ",", " 2", "]", " ", "```"), None),  # stray closing fence is accepted by the checker
    (("{", '"a"', " 1"), 2),  # missing colon
    (("{", "a", ":"), 1),  # unquoted key
    (('{"', "text", '": "line', "\n", 'two"}'), 3),  # raw newline inside a string
    (("[", "tr", "ue", ",", " nul", "x"), 5),
    (("{", '"n"', ":", " 0", "1"), 4),  # leading zero
    (("```js", "\n{"), 1),  # "```js" could still become "```json"
])
def test_json_breaks_at_the_first_token_that_no_json_can_follow(pieces, expected):
    p = prefixes(*pieces)
    found = violating_token("json_format", {}, p, True)
    assert found == (end_index(len(p), True) if expected is None else expected)


def test_json_cut_off_inside_the_value_falls_back_to_the_end():
    p = prefixes("{", '"a"', ":", ' "unfinished')
    assert violating_token("json_format", {}, p, False) == 3


def test_json_prefix_check_agrees_with_the_checker():
    """Every prefix of an accepted response passes; a rejected prefix is rejected whatever follows."""
    accepted = ['{"a": [1, -2.5e+3, true, null, {"b": "x\\"y\\u00e9"}], "c": {}}', '```json\n[\n  {"k": false}\n]\n```',
                ' [ ]', '{"nested": [[[]]], "s": "\\n\\t"}']
    for text in accepted:
        assert checkers.json_format(text, {})
        assert all(json_prefix_ok(text[:i]) for i in range(len(text) + 1)), text
    endings = ["", "}", "]", '"}', "0}", "]}", '": 1}', "\n```", 'e"}', "0]}"]
    candidates = ['{"a": 1} and more', '{"a": 01}', '["x" "y"]', "Here is JSON: {}", '{"a": tru}', "[1,]", '{"a":1,}']
    for text in candidates:
        for i in range(len(text) + 1):
            prefix = text[:i]
            if not json_prefix_ok(prefix):
                assert not any(checkers.json_format(prefix + tail, {}) for tail in endings), prefix
    assert not json_prefix_ok('{"a": 1} and more')
    assert json.loads('{"a": 1}') == {"a": 1}


def test_token_prefixes_decodes_growing_slices():
    vocab = {1: "Hel", 2: "lo", 3: " you"}
    assert token_prefixes(lambda ids: "".join(vocab[i] for i in ids), [1, 2, 3]) == ["Hel", "Hello", "Hello you"]
