"""An llguidance parser state as torch masks, and a look one step ahead without copying it.

llguidance computes the mask of allowed next tokens as a bitmask (one bit per token) into a
buffer this module owns; it is expanded to a bool tensor [V] once per call. Closing mode asks
what would follow a token many times per step; `stepped` answers on the parser itself: it
consumes the tokens, and rolls them back when the `with` block ends (llguidance keeps each
consumed token's state for rollback), so no copy of the parser is made.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["GrammarMasks", "stepped"]


@contextmanager
def stepped(matcher: Any, tokens: Sequence[int]) -> Iterator[bool]:
    """`matcher` moved on by `tokens` inside the `with` block, and back where it was after it
    (however the block ends). Yields whether all of them were consumed: a token the grammar
    refuses stops the consuming there and leaves no error state behind (`try_consume_tokens`
    checks each token first), so the parser is always restored."""
    consumed = matcher.try_consume_tokens(list(tokens))
    try:
        yield consumed == len(tokens)
    finally:
        if consumed:
            matcher.rollback(consumed)


class GrammarMasks:
    """Reads the allowed next tokens of a parser state over a vocabulary of `vocab_size`."""

    def __init__(self, vocab_size: int, eos: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self.eos = list(eos)
        words = (vocab_size + 31) // 32
        self._bitmask = torch.zeros(words, dtype=torch.int32)  # [W] filled by llguidance
        self._shifts = torch.arange(32, dtype=torch.int32)  # [32]

    def raw(self, matcher: Any, vocab_size: int) -> tuple[torch.Tensor, bytes]:
        """The grammar's allowed tokens [vocab_size] in `matcher`'s state, and llguidance's
        bitmask of them as bytes (a signature of the state: what may follow it)."""
        matcher.unsafe_compute_mask_ptr(
            self._bitmask.data_ptr(), self._bitmask.numel() * self._bitmask.element_size()
        )
        signature = self._bitmask.numpy().tobytes()
        # bit j of word w allows token 32 w + j
        bits = (self._bitmask[:, None] >> self._shifts) & 1  # [W, 32]
        allowed = bits.reshape(-1)[: min(vocab_size, self.vocab_size)].bool()
        if allowed.shape[0] < vocab_size:  # rows past the grammar's vocabulary: never
            allowed = torch.cat([allowed, allowed.new_zeros(vocab_size - allowed.shape[0])])
        return allowed, signature

    def allowed(self, matcher: Any, vocab_size: int) -> torch.Tensor:
        """The grammar's allowed tokens [vocab_size] in `matcher`'s state; end-of-sequence
        where nothing is (a broken state must not leave nothing to sample)."""
        allowed, _ = self.raw(matcher, vocab_size)
        if not bool(allowed.any()):
            allowed[self.eos] = True
        return allowed
