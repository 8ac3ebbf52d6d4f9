"""Incremental detokenization: each token's text delta in constant work per token.

Re-decoding a whole response at every token is quadratic in its length. `IncrementalDetokenizer` decodes
a short window instead: the tokens from the start of the previously emitted group (context, so tokenizers
that treat a leading space or byte specially see it) to the end. What the window adds past that group's
text is the new token's delta. A window whose text ends in U+FFFD holds an incomplete UTF-8 sequence
(a multibyte character split over tokens): nothing is emitted until a later token completes it.

Exact: the concatenated deltas (with `flush()` at the end) equal
`tokenizer.decode(tokens, skip_special_tokens=True)`; should a tokenizer's window text ever not extend
its context text, the delta is taken from a full decode instead, so the guarantee holds regardless.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self._prefix = 0  # window start: the first token of the last emitted group
        self._read = 0  # tokens before this are emitted
        self._prefix_text = ""  # decode(tokens[_prefix:_read])
        self._emitted = 0  # characters emitted so far

    @property
    def text_length(self) -> int:
        return self._emitted

    def text(self) -> str:
        """The whole text of the tokens so far (one full decode: for a rare whole-text check, not per token)."""
        return self._decode(self.tokens)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def add(self, token: int) -> str:
        """Append a token; return the text it completes ("" while a character is still incomplete)."""
        self.tokens.append(int(token))
        text = self._decode(self.tokens[self._prefix:])
        if text.endswith(REPLACEMENT):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end decodes to U+FFFD)."""
        if self._read == len(self.tokens):
            return ""
        return self._advance(self._decode(self.tokens[self._prefix:]))

    def _advance(self, text: str) -> str:
        if text.startswith(self._prefix_text):
            delta = text[len(self._prefix_text):]
        else:  # never seen with byte-level BPE; keeps the deltas exact for any tokenizer
            delta = self._decode(self.tokens)[self._emitted:]
        self._prefix, self._read, self._prefix_text = self._read, len(self.tokens), delta
        self._emitted += len(delta)
        return delta
