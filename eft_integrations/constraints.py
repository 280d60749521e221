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

__all__ = ["CLOSING_MARGIN", "GrammarConstraint", "TokenConstraint"]

CLOSING_MARGIN = 4
"""Spare tokens closing mode keeps beyond the shortest closing of the current state: the model
may take a longer closing token path than the shortest, or open something in its last free
step."""


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
        margin: int = CLOSING_MARGIN,
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
        # closing mode: once the tokens left in `budget` are only what the shortest closing of
        # the current state needs (plus `margin`), prefer tokens that end things
        self._budget = budget
        self._margin = margin
        self._closing = list(closing_tokens)
        self._closing_now = False
        self._next_check = 0  # step at which the closing length is simulated again
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
        margin: int = CLOSING_MARGIN,
        arm_after: str | None = None,
    ) -> GrammarConstraint:
        """Compile a llguidance Lark grammar (it may embed `%json {schema}`) for `tokenizer`.

        With `budget` (the most tokens the decoder will sample), decoding switches to closing
        mode once the tokens left are what closing mode needs to finish from the current state,
        plus `margin`: among the tokens the grammar allows, end-of-sequence is preferred, then
        tokens that close a string, then brackets, then separators, then digits, so a weak model
        still closes its JSON in time; text the grammar dictates (keys, tags) is then spelled
        with the longest allowed tokens. Until then the model writes freely (its own digits,
        its own words). `arm_after` delays closing mode until that text has been generated
        (e.g. `<tool_call>` when free text comes first).
        """
        import llguidance

        vocab_size = vocab_size or len(tokenizer)
        ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size, tuple(sorted(eos_token_ids)))
        matcher = llguidance.LLMatcher(
            ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
        )
        closing = _closing_tokens(tokenizer, vocab_size) if budget is not None else ()
        return cls(
            matcher, vocab_size, eos_token_ids, budget=budget, margin=margin,
            closing_tokens=closing, token_bytes=ll_tokenizer,
            arm_after=arm_after.encode() if arm_after else None,
        )

    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        allowed = self._mask(self._matcher, vocab_size)
        if self._in_closing_mode(vocab_size):
            return self._closing_mask(allowed, self._matcher)
        return allowed

    def _mask(self, matcher: Any, vocab_size: int) -> torch.Tensor:
        """The grammar's allowed tokens [vocab_size] in `matcher`'s state."""
        matcher.unsafe_compute_mask_ptr(
            self._bitmask.data_ptr(), self._bitmask.numel() * self._bitmask.element_size()
        )
        # bit j of word w allows token 32 w + j
        bits = (self._bitmask[:, None] >> self._shifts) & 1  # [W, 32]
        allowed = bits.reshape(-1)[: min(vocab_size, self._vocab_size)].bool()
        if allowed.shape[0] < vocab_size:  # rows past the grammar's vocabulary: never
            allowed = torch.cat([allowed, allowed.new_zeros(vocab_size - allowed.shape[0])])
        if not bool(allowed.any()):  # a broken state must not leave nothing to sample
            allowed[self._eos] = True
        return allowed

    def _closing_mask(self, allowed: torch.Tensor, lookahead: Any = None) -> torch.Tensor:
        """The tokens closing mode allows: the first tier with an allowed token, else the
        longest allowed tokens (text the grammar dictates, in the fewest steps). Where the
        grammar offers a choice there (an optional key, an enum value, a branch of anyOf),
        the `lookahead` parser keeps the choices that close soonest."""
        eos = torch.zeros_like(allowed)
        eos[self._eos] = True
        *tiers, lengths = self._closing
        for preferred in (eos, *tiers):
            narrowed = allowed & preferred[: allowed.shape[0]]
            if bool(narrowed.any()):
                return narrowed
        allowed_lengths = torch.where(allowed, lengths[: allowed.shape[0]], -1)
        longest = allowed_lengths == allowed_lengths.max()
        candidates = longest.nonzero().flatten().tolist()
        if lookahead is None or len(candidates) < 2:
            return longest
        limit = self._budget - self._steps if self._budget is not None else 0
        needs = {}
        for token in candidates:
            after = lookahead.deep_copy()
            after.consume_token(token)
            needs[token] = self._closing_length(after, allowed.shape[0], limit)
        shortest = torch.zeros_like(allowed)
        shortest[[t for t in candidates if needs[t] == min(needs.values())]] = True
        return shortest

    def _in_closing_mode(self, vocab_size: int) -> bool:
        """Whether the tokens left are down to the closing length plus the margin. Once on,
        it stays on. The closing length is simulated again when half the spare tokens (those
        beyond it and the margin) are spent, and at every step once none are left. Where the
        answer could end, going on (another parallel call) must fit too, or it ends."""
        if self._closing_now or not self._armed or self._budget is None:
            return self._closing_now
        left = self._budget - self._steps
        if self._matcher.is_accepting():
            going_on = self._closing_length(self._matcher, vocab_size, left, ending=False)
            self._closing_now = left - going_on - self._margin <= 0
            return self._closing_now
        if self._steps < self._next_check:
            return False
        spare = left - self._closing_length(self._matcher, vocab_size, left) - self._margin
        self._closing_now = spare <= 0
        self._next_check = self._steps + max(1, spare // 2)
        return self._closing_now

    def _closing_length(
        self, matcher: Any, vocab_size: int, limit: int, *, ending: bool = True
    ) -> int:
        """Tokens closing mode takes to finish from `matcher`'s state (end-of-sequence
        included), counted on a copy of it; more than `limit` when it does not fit. Within a
        tier the shortest token is taken (the model may pick it), so this errs long.
        ending=False: the first token is not end-of-sequence (the answer goes on)."""
        matcher = matcher.deep_copy()
        lengths = self._closing[-1]
        for steps in range(limit + 1):
            if matcher.is_stopped() or matcher.is_error():
                return steps  # the decoder ends the sequence without sampling
            allowed = self._mask(matcher, vocab_size)
            if not ending and steps == 0:
                allowed[self._eos] = False
                if not bool(allowed.any()):
                    return limit + 1
            candidates = self._closing_mask(allowed).nonzero().flatten()  # [n]
            token = int(candidates[lengths[candidates].argmin()])
            if token in self._eos:
                return steps + 1
            matcher.consume_token(token)
        return limit + 1

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
