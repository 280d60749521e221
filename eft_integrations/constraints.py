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

_MINIMUM_LIMIT = 4096
"""How far `minimum_budget` counts before it says only that the answer needs more."""

_CHECKED_ONE_BY_ONE = 16
"""Up to this many allowed tokens of a plain group are checked one by one in closing mode;
more are the content of a free string, where the shortest stands for all."""


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
        plain_groups: Sequence[torch.Tensor] = (),
        arm_after: bytes | None = None,
        token_bytes: Any = None,
    ) -> None:
        if matcher.is_error():
            raise ValueError(f"invalid grammar: {matcher.get_error()}")
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos = [t for t in eos_token_ids if 0 <= t < vocab_size]
        self._eos_ids = torch.tensor(self._eos, dtype=torch.long)
        words = (vocab_size + 31) // 32
        self._bitmask = torch.zeros(words, dtype=torch.int32)  # [W] filled by llguidance
        self._shifts = torch.arange(32, dtype=torch.int32)  # [32]
        # closing mode: once the tokens left in `budget` are only what the shortest closing of
        # the current state needs (plus `margin`), prefer tokens that end things
        self._budget = budget
        self._margin = margin
        self._closing = list(closing_tokens)
        self._groups = list(plain_groups)
        self._closing_now = False
        self._next_check = 0  # step at which the closing length is simulated again
        self._arm_after = arm_after
        self._armed = arm_after is None
        self._token_bytes = token_bytes
        self._seen = b""
        self._steps = 0
        self._known_minimums: tuple[dict[Any, int], Any] = ({}, None)

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
        its own words), and in closing mode it may still go on with its digits and words (and
        pick among the closing tokens) wherever a way to finish still fits: a value it is
        writing is not cut while there is room. `arm_after` delays closing mode until that
        text has been generated (e.g. `<tool_call>` when free text comes first).
        `minimum_budget()` says how many tokens the shortest complete answer takes.
        """
        import llguidance

        vocab_size = vocab_size or len(tokenizer)
        ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size, tuple(sorted(eos_token_ids)))
        matcher = llguidance.LLMatcher(
            ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
        )
        closing = _closing_tokens(tokenizer, vocab_size) if budget is not None else ()
        groups = _plain_groups(tokenizer, vocab_size) if budget is not None else ()
        constraint = cls(
            matcher,
            vocab_size,
            eos_token_ids,
            budget=budget,
            margin=margin,
            closing_tokens=closing,
            plain_groups=groups,
            token_bytes=ll_tokenizer,
            arm_after=arm_after.encode() if arm_after else None,
        )
        with _LL_LOCK:
            known = _MINIMUMS.setdefault(tokenizer, {})
        constraint._known_minimums = (known, (grammar, vocab_size, tuple(constraint._eos)))
        return constraint

    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        allowed = self._mask(self._matcher, vocab_size)
        if not self._in_closing_mode(vocab_size):
            return allowed
        closing = self._closing_mask(allowed, self._matcher)
        left = self._budget - self._steps if self._budget is not None else 0
        fitting = self._fitting(closing, left) | self._continuing(allowed)
        return fitting if bool(fitting.any()) else closing

    def _fitting(self, candidates: torch.Tensor, left: int) -> torch.Tensor:
        """The `candidates` after which closing still fits in the `left` tokens, checked one by
        one when they are few (a choice of closing tokens); many are kept as they are."""
        tokens = candidates.nonzero().flatten().tolist()
        if len(tokens) > _CHECKED_ONE_BY_ONE:
            return candidates
        fitting = torch.zeros_like(candidates)
        for token in tokens:
            fitting[token] = token in self._eos or self._fits_after(
                token, candidates.shape[0], left
            )
        return fitting

    def _continuing(self, allowed: torch.Tensor) -> torch.Tensor:
        """In closing mode, the model's own digits and words where they still fit: a group of
        allowed plain tokens (digits only; ASCII letters and spaces only) is kept when, after
        its shortest member, closing still fits in the tokens left. So a number or a string
        the model is writing is not cut while there is room to finish it and the answer."""
        keep = torch.zeros_like(allowed)
        if self._budget is None or not self._groups:
            return keep
        left = self._budget - self._steps
        lengths = self._closing[-1]
        allowed_ids = allowed.nonzero().flatten()  # [n]
        for group in self._groups:
            members = allowed_ids[group[allowed_ids]]  # [m]
            if members.numel() == 0:
                continue
            if members.numel() <= _CHECKED_ONE_BY_ONE:  # a choice (a key, a literal, a digit)
                for token in members.tolist():
                    keep[token] = self._fits_after(token, allowed.shape[0], left)
            else:  # the content of a free string: its shortest member speaks for all
                shortest = int(members[lengths[members].argmin()])
                if self._fits_after(shortest, allowed.shape[0], left):
                    keep[members] = True
        return keep

    def _fits_after(self, token: int, vocab_size: int, left: int) -> bool:
        """Whether `token` and then closing fit in the `left` tokens."""
        return 1 + self._need_after(self._matcher, token, vocab_size, left) <= left

    def _need_after(self, matcher: Any, token: int, vocab_size: int, limit: int) -> int:
        """The shortest closing path known after `token` in `matcher`'s state (its copy)."""
        after = matcher.deep_copy()
        after.consume_token(token)
        return self._need(after, vocab_size, limit)

    def _need(self, matcher: Any, vocab_size: int, limit: int) -> int:
        """Tokens of the shorter of closing mode's two paths from `matcher`'s state (the
        shortest or the longest token of each tier): a way to finish, within `limit`."""
        return min(
            self._closing_length(matcher, vocab_size, limit),
            self._closing_length(matcher, vocab_size, limit, fewest=True),
        )

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
        allowed_ids = allowed.nonzero().flatten()  # [n]
        tokens, dictated = self._preferred(allowed_ids)
        if dictated and lookahead is not None:
            few = allowed_ids.numel() <= _CHECKED_ONE_BY_ONE
            candidates = (allowed_ids if few else tokens).tolist()
            if len(candidates) >= 2:
                limit = self._budget - self._steps if self._budget is not None else _MINIMUM_LIMIT
                needs = {
                    t: self._need_after(lookahead, t, allowed.shape[0], limit) for t in candidates
                }
                tokens = torch.tensor([t for t in candidates if needs[t] == min(needs.values())])
        mask = torch.zeros_like(allowed)
        mask[tokens] = True
        return mask

    def _preferred(self, allowed_ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Among the allowed token ids [n]: end-of-sequence, else the first closing tier with a
        token, else the longest (then True: text the grammar dictates)."""
        eos = allowed_ids[torch.isin(allowed_ids, self._eos_ids)]
        if eos.numel():
            return eos, False
        *tiers, lengths = self._closing
        for tier in tiers:
            chosen = allowed_ids[tier[allowed_ids]]
            if chosen.numel():
                return chosen, False
        allowed_lengths = lengths[allowed_ids]
        return allowed_ids[allowed_lengths == allowed_lengths.max()], True

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
        self,
        matcher: Any,
        vocab_size: int,
        limit: int,
        *,
        ending: bool = True,
        fewest: bool = False,
    ) -> int:
        """Tokens closing mode takes to finish from `matcher`'s state (end-of-sequence
        included), counted on a copy of it; more than `limit` when it does not fit. Within a
        tier the shortest token is taken (the model may pick it), so this errs long;
        fewest=True takes the longest instead (usually the fewest steps).
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
            candidates, _ = self._preferred(allowed.nonzero().flatten())  # [n]
            pick = lengths[candidates].argmax() if fewest else lengths[candidates].argmin()
            token = int(candidates[pick])
            if token in self._eos:
                return steps + 1
            matcher.consume_token(token)
        return limit + 1

    def minimum_budget(self, limit: int = _MINIMUM_LIMIT) -> int:
        """Tokens closing mode needs to finish from the current state (before the first token:
        the shortest complete answer it knows, end-of-sequence included); a smaller budget
        cannot promise a complete answer. More than `limit` when it takes more. Needs a
        constraint built with a budget (closing mode's token tiers)."""
        if not self._closing:
            raise ValueError("minimum_budget needs a constraint built with budget=...")
        known, key = self._known_minimums if self._steps == 0 else ({}, None)
        if key in known:  # the same grammar from the start: the same answer
            return known[key] if known[key] <= limit else limit + 1
        minimum = self._minimum(limit)
        if key is not None and minimum <= limit:
            with _LL_LOCK:
                if len(known) >= _KNOWN_MINIMUMS:
                    known.pop(next(iter(known)))
                known[key] = minimum
        return minimum

    def _minimum(self, limit: int) -> int:
        """`minimum_budget`, counted."""
        allowed = self._mask(self._matcher, self._vocab_size)
        first = self._closing_mask(allowed, self._matcher).nonzero().flatten().tolist()
        if any(t in self._eos for t in first) or self._matcher.is_stopped():
            return 1
        if len(first) > _CHECKED_ONE_BY_ONE:
            return self._need(self._matcher, self._vocab_size, limit)
        return 1 + min(self._need_after(self._matcher, t, self._vocab_size, limit) for t in first)

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
_GROUPS: weakref.WeakKeyDictionary[Any, dict[int, tuple[torch.Tensor, ...]]] = (
    weakref.WeakKeyDictionary()
)
_MINIMUMS: weakref.WeakKeyDictionary[Any, dict[Any, int]] = weakref.WeakKeyDictionary()
_KNOWN_MINIMUMS = 256  # per tokenizer: the minimum budgets of this many recent grammars
_TEXTS: weakref.WeakKeyDictionary[Any, dict[int, list[str]]] = weakref.WeakKeyDictionary()


def _token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """Every token's text; computed once per tokenizer (called under `_LL_LOCK`)."""
    per_tokenizer = _TEXTS.setdefault(tokenizer, {})
    if vocab_size not in per_tokenizer:
        per_tokenizer[vocab_size] = [
            tokenizer.decode([i]) if i < len(tokenizer) else "" for i in range(vocab_size)
        ]
    return per_tokenizer[vocab_size]


def _closing_tokens(tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Masks [V] of tokens that close JSON: a string (`"`, `"}`...), brackets, separators,
    digits; then every token's byte length. Computed once per tokenizer."""
    with _LL_LOCK:
        per_tokenizer = _CLOSING.setdefault(tokenizer, {})
        if vocab_size not in per_tokenizer:
            texts = _token_texts(tokenizer, vocab_size)
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


_DIGITS = frozenset("0123456789")
_WORDS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")


def _plain_groups(tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Masks [V] of the plain tokens closing mode lets a model go on writing: digits only,
    and ASCII letters and spaces only (not blanks alone). Computed once per tokenizer."""
    with _LL_LOCK:
        per_tokenizer = _GROUPS.setdefault(tokenizer, {})
        if vocab_size not in per_tokenizer:
            texts = _token_texts(tokenizer, vocab_size)
            per_tokenizer[vocab_size] = (
                torch.tensor([bool(t) and set(t) <= _DIGITS for t in texts]),
                torch.tensor([bool(t.strip()) and set(t) <= _WORDS for t in texts]),
            )
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
