"""Incremental detokenization: turn a growing list of token ids into text deltas.

The scheme TGI and vLLM use: decode a short window before and after the new token and emit the
difference, holding text back while it ends in an incomplete UTF-8 sequence (U+FFFD), so that byte
tokens and multi-token characters stream correctly and the deltas always join to the full text.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], *, window: int = 6) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-window:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a request, release whatever is held back (replacement characters included)."""
        rest = self._decode(self.ids[self.read_offset :]) if self.read_offset < len(self.ids) else ""
        full = self._decode(self.ids[self.prefix_offset :])
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        delta = full[len(prefix) :] if len(full) > len(prefix) else rest
        self.read_offset = self.prefix_offset = len(self.ids)
        self.text += delta
        return delta
