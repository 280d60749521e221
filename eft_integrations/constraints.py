"""Token-level constraints that the decoder applies to the EFT-composed distribution.

A constraint is stateful per sequence: the decoder asks it which tokens are allowed next,
masks the composed log-probs with that, samples, and tells it the chosen token.

`GrammarConstraint` is the llguidance one; it decides, per step, what closing mode and the
guard zone allow. The pieces it stands on, one job each:

    token_tables.py   what it knows of a tokenizer's tokens (built once per tokenizer)
    grammar_masks.py  a parser state as a torch mask; a look ahead without copying the parser
    closing.py        closing mode's preference of tokens and the closing paths it takes
    route_search.py   a way to finish: the preference, else a bounded breadth-first search
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from . import token_tables
from .closing import CHECKED_ONE_BY_ONE, MINIMUM_LIMIT, ClosingPlanner
from .grammar_masks import GrammarMasks, stepped
from .route_search import RouteSearch
from .token_tables import known_routes, ll_tokenizer, remember_route

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
        plain_groups: Sequence[torch.Tensor] = (),
        arm_after: bytes | None = None,
        token_bytes: Any = None,
        first_bytes: torch.Tensor | None = None,
    ) -> None:
        if matcher.is_error():
            raise ValueError(f"invalid grammar: {matcher.get_error()}")
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos = [t for t in eos_token_ids if 0 <= t < vocab_size]
        self._masks = GrammarMasks(vocab_size, self._eos)
        # closing mode's preference and paths, and the search for a way to finish
        self._planner = ClosingPlanner(self._masks, closing_tokens)
        self._routes = RouteSearch(self._planner, first_bytes)
        # closing mode: once the tokens left in `budget` are only what the shortest closing of
        # the current state needs (plus `margin`), prefer tokens that end things
        self._budget = budget
        self._margin = margin
        self._plans = bool(closing_tokens)  # closing mode's token tiers are known
        self._groups = list(plain_groups)
        self._closing_now = False
        self._next_check = 0  # step at which the closing length is simulated again
        self._arm_after = arm_after
        self._armed = arm_after is None
        self._token_bytes = token_bytes
        self._seen = b""
        self._steps = 0
        self._known_minimums: tuple[dict[Any, tuple[int, ...]], Any] = ({}, None)
        # the first byte of every token [V] (256: none): `_fitting` checks one token per byte
        self._first = first_bytes
        # a way to finish from the current state (tokens; valid at step `_route_at`): closing
        # mode always offers its next token, so a row that entered closing mode with it in
        # its budget finishes, whatever else closing mode offers
        self._route: list[int] | None = None
        self._route_at = -1
        # the guard zone (see `_in_guard_zone`): the spare tokens found at step `_spare_at`,
        # the need found then, and the most one token may add to it (at least the margin;
        # `minimum_budget` raises it to the shortest answer: a tree node, an array item)
        self._spare, self._spare_at = budget if budget is not None else 0, 0
        self._need_seen = 0
        self._reach = margin

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

        The length that closing mode plans with is that of a route: a way to finish it knows
        from the current state, the path that preference takes where it finishes, else what a
        bounded breadth-first search over tokens finds (inside `"pattern": "a*b"` the
        preference writes `a`s forever; the search finds the `b`). Closing mode always offers
        the route's next token, so a row that enters it with the route in its budget finishes.
        Shortly before (the guard zone), a token that would open more than the tokens left can
        finish (another array item, an optional key) is not offered.
        `minimum_budget()` says how many tokens the shortest complete answer takes.
        """
        import llguidance

        vocab_size = vocab_size or len(tokenizer)
        ll_tok = ll_tokenizer(tokenizer, vocab_size, tuple(sorted(eos_token_ids)))
        matcher = llguidance.LLMatcher(
            ll_tok, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
        )
        closing = token_tables.closing_tokens(tokenizer, vocab_size) if budget is not None else ()
        groups = token_tables.plain_groups(tokenizer, vocab_size) if budget is not None else ()
        first = token_tables.first_bytes(tokenizer, vocab_size) if budget is not None else None
        constraint = cls(
            matcher,
            vocab_size,
            eos_token_ids,
            budget=budget,
            margin=margin,
            closing_tokens=closing,
            plain_groups=groups,
            token_bytes=ll_tok,
            arm_after=arm_after.encode() if arm_after else None,
            first_bytes=first,
        )
        known = known_routes(tokenizer)
        constraint._known_minimums = (known, (grammar, vocab_size, tuple(constraint._eos)))
        return constraint

    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        allowed = self._masks.allowed(self._matcher, vocab_size)
        if self._in_closing_mode(vocab_size):
            return self._closing_allowed(allowed, vocab_size)
        if self._in_guard_zone():
            return self._guarded(allowed, vocab_size)
        return allowed

    def _closing_allowed(self, allowed: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Closing mode's tokens among the `allowed` [V]: its preferred ones and the model's
        own digits and words, where a way to finish still fits after them, and the route's."""
        closing = self._planner.closing_mask(allowed, self._matcher, self._lookahead_limit())
        left = self._budget - self._steps if self._budget is not None else 0
        fitting = self._fitting(closing, left) | self._continuing(allowed)
        # the route's next token is always offered: where closing mode's preference never
        # ends (a pattern string whose way out is one character), it is what finishes
        route = self._route_now(vocab_size, left)
        if route and len(route) <= left and route[0] < fitting.shape[0]:
            fitting[route[0]] = True
        return fitting if bool(fitting.any()) else closing

    def _in_guard_zone(self) -> bool:
        """Whether the spare tokens (beyond a way to finish and the margin; as last found,
        less the steps since) are down to `_reach`, the most one token was seen to add to
        the shortest answer: from here a single token could leave no room to finish."""
        if self._budget is None or not self._armed:
            return False
        return self._spare - (self._steps - self._spare_at) <= self._reach

    def _guarded(self, allowed: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Free decoding in the guard zone: at a choice point, only the `allowed` [V] tokens
        after which a way to finish still fits (and the route's next token). A token that
        opens something (another array item, an optional key, a branch of anyOf, a nested
        tree node) can add more to the shortest answer than the margin holds. The model's
        digits and words open nothing and stay free, as does the content of a string (more
        than `CHECKED_ONE_BY_ONE` other tokens allowed)."""
        plain = torch.zeros_like(allowed)
        for group in self._groups:
            plain[: group.shape[0]] |= group[: allowed.shape[0]]
        opening = (allowed & ~plain).nonzero().flatten().tolist()
        if int(allowed.sum()) <= 1 or len(opening) > CHECKED_ONE_BY_ONE:
            return allowed
        left = self._budget - self._steps if self._budget is not None else 0
        kept = allowed.clone()
        for token in opening:
            if token not in self._eos:
                kept[token] = self._fits_after(token, vocab_size, left)
        route = self._route_now(vocab_size, left)
        if route and len(route) <= left and route[0] < kept.shape[0]:
            kept[route[0]] = True
        return kept if bool(kept.any()) else allowed

    def _fitting(self, candidates: torch.Tensor, left: int) -> torch.Tensor:
        """The `candidates` after which closing still fits in the `left` tokens, checked one by
        one when they are few (a choice of closing tokens); when many (the content of a
        string), the shortest of those with one first byte stands for them all."""
        tokens = candidates.nonzero().flatten()  # [n]
        fitting = torch.zeros_like(candidates)
        if tokens.numel() > CHECKED_ONE_BY_ONE and self._first is not None:
            first = self._first[tokens]  # [n]
            for byte in first.unique().tolist():
                members = tokens[first == byte]
                shortest = int(members[self._planner.lengths[members].argmin()])
                if shortest in self._eos or self._fits_after(shortest, candidates.shape[0], left):
                    fitting[members] = True
            return fitting
        for token in tokens.tolist():
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
        lengths = self._planner.lengths
        allowed_ids = allowed.nonzero().flatten()  # [n]
        for group in self._groups:
            members = allowed_ids[group[allowed_ids]]  # [m]
            if members.numel() == 0:
                continue
            if members.numel() <= CHECKED_ONE_BY_ONE:  # a choice (a key, a literal, a digit)
                for token in members.tolist():
                    keep[token] = self._fits_after(token, allowed.shape[0], left)
            else:  # the content of a free string: its shortest member speaks for all
                shortest = int(members[lengths[members].argmin()])
                if self._fits_after(shortest, allowed.shape[0], left):
                    keep[members] = True
        return keep

    def _fits_after(self, token: int, vocab_size: int, left: int) -> bool:
        """Whether `token` and then closing fit in the `left` tokens: the route's next token
        does; else one of closing mode's two paths after it must (the one with the longest
        tokens, usually the fewer steps, tried first)."""
        route = self._route if self._route_at == self._steps else None
        if route and route[0] == token and len(route) <= left:
            return True
        with stepped(self._matcher, [token]) as consumed:
            return consumed and any(
                self._planner.closing_path(self._matcher, vocab_size, left - 1, fewest=fewest)
                is not None
                for fewest in (True, False)
            )

    def _lookahead_limit(self) -> int:
        """How far closing mode's choice among dictated tokens counts their closing paths."""
        return self._budget - self._steps if self._budget is not None else MINIMUM_LIMIT

    def _in_closing_mode(self, vocab_size: int) -> bool:
        """Whether the tokens left are down to the length of a way to finish plus the margin.
        Once on, it stays on. That length is found again when half the spare tokens (those
        beyond it and the margin) are spent, and at every step once none are left. Where the
        answer could end, going on (another parallel call) must fit too, or it ends."""
        if self._closing_now or not self._armed or self._budget is None:
            return self._closing_now
        left = self._budget - self._steps
        if self._matcher.is_accepting():
            going_on = self._planner.closing_length(self._matcher, vocab_size, left, ending=False)
            self._closing_now = left - going_on - self._margin <= 0
            return self._closing_now
        if self._steps < self._next_check:
            return False
        route = self._route_now(vocab_size, left)
        need = len(route) if route is not None else left + 1
        spare = left - need - self._margin
        # how much the shortest answer grew since the last look: what a token may add
        self._reach = max(self._reach, need - self._need_seen)
        self._need_seen, self._spare, self._spare_at = need, spare, self._steps
        self._closing_now = spare <= 0
        self._next_check = self._steps + max(1, spare // 2)
        return self._closing_now

    def _route_now(self, vocab_size: int, limit: int) -> list[int] | None:
        """A way to finish from the current state within `limit` tokens
        (`RouteSearch.route_from`), found once per state and kept while decoding follows it
        (`advance`)."""
        if self._route_at != self._steps:
            self._route = self._routes.route_from(self._matcher, vocab_size, limit)
            self._route_at = self._steps
        return self._route

    def minimum_budget(self, limit: int = MINIMUM_LIMIT) -> int:
        """Tokens closing mode needs to finish from the current state (before the first token:
        the shortest complete answer it knows, end-of-sequence included); a smaller budget
        cannot promise a complete answer. More than `limit` when it takes more, or when no
        way to finish was found (the search is bounded; see `RouteSearch.search`). Needs a
        constraint built with a budget (closing mode's token tiers)."""
        if not self._plans:
            raise ValueError("minimum_budget needs a constraint built with budget=...")
        known, key = self._known_minimums if self._steps == 0 else ({}, None)
        if key in known:
            route: list[int] | None = list(known[key])
        else:
            route = self._routes.shortest_route(
                self._matcher, self._vocab_size, limit, self._lookahead_limit()
            )
        if route is None:
            return limit + 1
        if key is not None and key not in known:
            remember_route(known, key, route)
        if self._route_at != self._steps:  # decoding may follow it from here
            self._route, self._route_at = route, self._steps
        if self._steps == 0:  # a part of the answer may take as much again
            self._reach = max(self._reach, len(route))
        minimum = max(1, len(route))
        return minimum if minimum <= limit else limit + 1

    def advance(self, token_id: int) -> None:
        if self._route_at == self._steps and self._route and self._route[0] == token_id:
            self._route, self._route_at = self._route[1:], self._steps + 1
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
