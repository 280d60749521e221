"""Incremental detokenization: stop strings across token boundaries and safe stream deltas."""

from __future__ import annotations

from collections.abc import Sequence

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

__all__ = ["CompletionText"]

# What a byte-level tokenizer decodes an incomplete UTF-8 sequence to.
_REPLACEMENT = "\ufffd"


class CompletionText:
    """The text of one completion as tokens arrive.

    It finds stop strings even when they span several tokens, trims them, and yields stream
    deltas that never end inside a multi-byte character or inside a possible stop string, so
    the concatenated deltas equal the final text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.token_ids: list[int] = []
        self._text = ""
        self._decoded = 0  # how many of the text tokens `_text` reflects
        self._text_tokens = 0  # tokens that belong to the text (not a trailing end token)
        self.emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The completion so far, decoded on demand (without special tokens)."""
        if self._decoded != self._text_tokens and not self.stopped:
            self._text = self._tokenizer.decode(
                self.token_ids[: self._text_tokens], skip_special_tokens=True
            )
            self._decoded = self._text_tokens
        return self._text

    def append_end_token(self, token_id: int) -> None:
        """Record an end-of-turn token: part of the completion, not of its text."""
        self.token_ids.append(token_id)

    def append(self, token_id: int) -> None:
        """Add one token; sets `stopped` and trims `text` when a stop string completes."""
        self.token_ids.append(token_id)
        self._text_tokens = len(self.token_ids)
        if not self._stop:
            return  # nothing to look for: decode lazily, when the text is asked for
        previous_length = len(self._text)
        # a new match must end in the new text, so it starts at most len(stop) before it
        search_from = max(0, min(previous_length, len(self.text)) - self._longest_stop)
        text = self.text
        hits = [i for s in self._stop if (i := text.find(s, search_from)) >= 0]
        if hits:
            self._text = text[: min(hits)]
            self.stopped = True

    def _safe_end(self) -> int:
        """End of the prefix that later tokens cannot change."""
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == _REPLACEMENT:
            end -= 1
        # hold back a tail that could still grow into a stop string
        for n in range(min(self._longest_stop - 1, end - self.emitted), 0, -1):
            tail = self.text[end - n : end]
            if any(s.startswith(tail) for s in self._stop):
                end -= n
                break
        return end

    def delta(self, final: bool = False) -> str:
        """Text not yet emitted that is safe to emit (everything, once `final`)."""
        end = len(self.text) if final or self.stopped else self._safe_end()
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece
