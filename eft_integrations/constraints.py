"""Token-level constraints that the decoder applies to the EFT-composed distribution.

A constraint is stateful per sequence: the decoder asks it which tokens are allowed next,
masks the composed log-probs with that, samples, and tells it the chosen token.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["GrammarConstraint", "TokenConstraint"]


@runtime_checkable
class TokenConstraint(Protocol):
    """Restricts the next token of one sequence."""

    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        """Boolean mask [vocab_size] of allowed next tokens, or None when all are allowed."""
        ...

    def advance(self, token_id: int) -> None:
        """Consume the token the decoder chose."""
        ...

    def is_finished(self) -> bool:
        """True once nothing more may follow; the decoder then stops this sequence."""
        ...


# ---------------------------------------------------------------------------------------------
# Grammar constraints with llguidance.
#
# Why llguidance rather than xgrammar: it is one small self-contained wheel (Rust, no CUDA or
# triton dependency; xgrammar pulls triton, ~1 GB), it computes a mask over a 100k+ vocabulary
# in tens of microseconds on CPU, and its Lark dialect embeds JSON schemas (`%json {...}`) next
# to free text, which is what "write freely until `<tool_call>`, then a valid call" needs.


class GrammarConstraint:
    """A `TokenConstraint` driven by an llguidance grammar (Lark, JSON schema or regex).

    The grammar is compiled once per call; the mask is computed as llguidance's bitmask (one
    bit per token) and expanded to a bool tensor [V] once per step. Build one with
    `GrammarConstraint.from_lark(tokenizer, grammar, eos_token_ids=...)`; each sequence needs
    its own instance (it holds the parser state).
    """

    def __init__(
        self,
        matcher: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        *,
        budget: int | None = None,
        reserve: int = 0,
        closing_tokens: Sequence[torch.Tensor] = (),
        arm_after: bytes | None = None,
        token_bytes: Any = None,
    ) -> None:
        if matcher.is_error():
            raise ValueError(f"invalid grammar: {matcher.get_error()}")
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos = [t for t in eos_token_ids if 0 <= t < vocab_size]
        words = (vocab_size + 31) // 32
        self._bitmask = torch.zeros(words, dtype=torch.int32)  # [W] filled by llguidance
        self._shifts = torch.arange(32, dtype=torch.int32)  # [32]
        # closing mode: within `reserve` tokens of `budget`, prefer tokens that end things
        self._budget = budget
        self._reserve = reserve
        self._closing = list(closing_tokens)
        self._arm_after = arm_after
        self._armed = arm_after is None
        self._token_bytes = token_bytes
        self._seen = b""
        self._steps = 0

    @classmethod
    def from_lark(
        cls,
        tokenizer: Any,
        grammar: str,
        *,
        eos_token_ids: Sequence[int],
        vocab_size: int | None = None,
        budget: int | None = None,
        reserve: int = 0,
        arm_after: str | None = None,
    ) -> GrammarConstraint:
        """Compile a llguidance Lark grammar (it may embed `%json {schema}`) for `tokenizer`.

        With `budget` (the most tokens the decoder will sample), the last `reserve` tokens
        run in closing mode: among the tokens the grammar allows, end-of-sequence is preferred,
        then tokens that close a string, then brackets, then separators, then digits, so a
        weak model still closes its JSON in time; text the grammar dictates (keys, tags) is
        then spelled with the longest allowed tokens. `arm_after` delays closing mode until that
        text has been generated (e.g. `<tool_call>` when free text comes first).
        """
        import llguidance

        vocab_size = vocab_size or len(tokenizer)
        ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size, tuple(sorted(eos_token_ids)))
        matcher = llguidance.LLMatcher(
            ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
        )
        closing = _closing_tokens(tokenizer, vocab_size) if budget is not None else ()
        return cls(
            matcher, vocab_size, eos_token_ids, budget=budget, reserve=reserve,
            closing_tokens=closing, token_bytes=ll_tokenizer,
            arm_after=arm_after.encode() if arm_after else None,
        )

    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        self._matcher.unsafe_compute_mask_ptr(
            self._bitmask.data_ptr(), self._bitmask.numel() * self._bitmask.element_size()
        )
        # bit j of word w allows token 32 w + j
        bits = (self._bitmask[:, None] >> self._shifts) & 1  # [W, 32]
        allowed = bits.reshape(-1)[: min(vocab_size, self._vocab_size)].bool()
        if allowed.shape[0] < vocab_size:  # rows past the grammar's vocabulary: never
            allowed = torch.cat([allowed, allowed.new_zeros(vocab_size - allowed.shape[0])])
        if not bool(allowed.any()):  # a broken state must not leave nothing to sample
            allowed[self._eos] = True
        if self._armed and self._budget is not None and (
            self._budget - self._steps <= self._reserve
        ):
            eos = torch.zeros_like(allowed)
            eos[self._eos] = True
            *tiers, lengths = self._closing
            for preferred in (eos, *tiers):
                narrowed = allowed & preferred[: allowed.shape[0]]
                if bool(narrowed.any()):
                    return narrowed
            # text the grammar dictates: the longest tokens spell it in the fewest steps
            allowed_lengths = torch.where(allowed, lengths[: allowed.shape[0]], -1)
            return allowed_lengths == allowed_lengths.max()
        return allowed

    def advance(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)
        self._steps += 1
        if not self._armed and self._arm_after is not None:
            self._seen += self._token_bytes.decode_bytes([token_id])
            self._armed = self._arm_after in self._seen

    def is_finished(self) -> bool:
        # stopped: nothing but end-of-sequence may follow (also true in an error state)
        return bool(self._matcher.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """True when the text so far is a complete sentence of the grammar."""
        return bool(self._matcher.is_accepting())


_LL_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)
_LL_LOCK = threading.Lock()
_CLOSING: weakref.WeakKeyDictionary[Any, dict[int, tuple[torch.Tensor, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _closing_tokens(tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Masks [V] of tokens that close JSON: a string (`"`, `"}`...), brackets, separators,
    digits; then every token's byte length. Computed once per tokenizer."""
    with _LL_LOCK:
        per_tokenizer = _CLOSING.setdefault(tokenizer, {})
        if vocab_size not in per_tokenizer:
            texts = [tokenizer.decode([i]) if i < len(tokenizer) else "" for i in range(vocab_size)]
            # closing a string first, then brackets, then punctuation and digits
            tiers = [
                torch.tensor([t.startswith('"') and set(t) <= set('"}]') for t in texts]),
                torch.tensor([bool(t) and set(t) <= set("}]") for t in texts]),
                torch.tensor([bool(t) and set(t) <= set(",: ") for t in texts]),
                torch.tensor([bool(t) and set(t) <= set('"}],: 0123456789') for t in texts]),
                torch.tensor([len(t.encode()) for t in texts]),  # byte lengths
            ]
            per_tokenizer[vocab_size] = tuple(tiers)
        return per_tokenizer[vocab_size]


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos: tuple[int, ...]) -> Any:
    """llguidance's view of a fast HF tokenizer; built once per tokenizer (it costs ~1 s)."""
    import llguidance.hf

    with _LL_LOCK:
        per_tokenizer = _LL_TOKENIZERS.setdefault(tokenizer, {})
        key = (vocab_size, eos)
        if key not in per_tokenizer:
            per_tokenizer[key] = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=list(eos) or None
            )
        return per_tokenizer[key]
