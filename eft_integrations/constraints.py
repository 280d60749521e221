"""Token-level constraints that the decoder applies to the EFT-composed distribution.

A constraint is stateful per sequence: the decoder asks it which tokens are allowed next,
masks the composed log-probs with that, samples, and tells it the chosen token.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

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

_LOOP_REPEATS = 256
"""The fixed closing preference gives up once it meets one parser signature (allowed tokens,
accepting) this many times: it is going round (`a`s inside `"pattern": "a*b"`), and the
search takes over. Legitimate repeats are long strings with a minLength, a few per token."""

_SEARCH_STATES = 2048
"""The most parser states the breadth-first search of a way to finish tries (each costs one
mask); past it the search says it found none."""

_SEARCH_WIDTH = 64
"""The most distinct parser states the search keeps at one depth."""

_SEARCH_PREFERRED = 8
"""How many of closing mode's preferred tokens the search tries at each state, before one
token per first byte."""


class _SearchNode(NamedTuple):
    """A parser state the search for a way to finish reached (`GrammarConstraint._search`)."""

    matcher: Any
    path: list[int]  # the tokens that reached it
    allowed: torch.Tensor  # [V] bool: the tokens that may follow
    signature: bytes  # llguidance's bitmask of them, and whether the state accepts
    trace: int  # a hash of the signature changes along the path


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
        self._known_minimums: tuple[dict[Any, tuple[int, ...]], Any] = ({}, None)
        # the first byte of every token [V] (256: none); the search tries one token per byte
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
        ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size, tuple(sorted(eos_token_ids)))
        matcher = llguidance.LLMatcher(
            ll_tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
        )
        closing = _closing_tokens(tokenizer, vocab_size) if budget is not None else ()
        groups = _plain_groups(tokenizer, vocab_size) if budget is not None else ()
        first = _first_bytes(tokenizer, vocab_size) if budget is not None else None
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
            first_bytes=first,
        )
        with _LL_LOCK:
            known = _MINIMUMS.setdefault(tokenizer, {})
        constraint._known_minimums = (known, (grammar, vocab_size, tuple(constraint._eos)))
        return constraint

    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        allowed = self._mask(self._matcher, vocab_size)
        if self._in_closing_mode(vocab_size):
            return self._closing_allowed(allowed, vocab_size)
        if self._in_guard_zone():
            return self._guarded(allowed, vocab_size)
        return allowed

    def _closing_allowed(self, allowed: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Closing mode's tokens among the `allowed` [V]: its preferred ones and the model's
        own digits and words, where a way to finish still fits after them, and the route's."""
        closing = self._closing_mask(allowed, self._matcher)
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
        than `_CHECKED_ONE_BY_ONE` other tokens allowed)."""
        plain = torch.zeros_like(allowed)
        for group in self._groups:
            plain[: group.shape[0]] |= group[: allowed.shape[0]]
        opening = (allowed & ~plain).nonzero().flatten().tolist()
        if int(allowed.sum()) <= 1 or len(opening) > _CHECKED_ONE_BY_ONE:
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
        if tokens.numel() > _CHECKED_ONE_BY_ONE and self._first is not None:
            first = self._first[tokens]  # [n]
            for byte in first.unique().tolist():
                members = tokens[first == byte]
                shortest = int(members[self._closing[-1][members].argmin()])
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
        """Whether `token` and then closing fit in the `left` tokens: the route's next token
        does; else one of closing mode's two paths after it must (the one with the longest
        tokens, usually the fewer steps, tried first)."""
        route = self._route if self._route_at == self._steps else None
        if route and route[0] == token and len(route) <= left:
            return True
        after = self._matcher.deep_copy()
        after.consume_token(token)
        return any(
            self._closing_path(after, vocab_size, left - 1, fewest=fewest) is not None
            for fewest in (True, False)
        )

    def _need_after(self, matcher: Any, token: int, vocab_size: int, limit: int) -> int:
        """The shortest closing path known after `token` in `matcher`'s state (its copy)."""
        after = matcher.deep_copy()
        after.consume_token(token)
        return self._need(after, vocab_size, limit)

    def _need(self, matcher: Any, vocab_size: int, limit: int) -> int:
        """Tokens of the shorter of closing mode's two paths from `matcher`'s state (the
        shortest or the longest token of each tier): a way to finish, within `limit`; more
        than `limit` when neither finishes there."""
        path = self._preferred_route(matcher, vocab_size, limit)
        return len(path) if path is not None else limit + 1

    def _raw_mask(self, matcher: Any, vocab_size: int) -> tuple[torch.Tensor, bytes]:
        """The grammar's allowed tokens [vocab_size] in `matcher`'s state, and llguidance's
        bitmask of them as bytes (a signature of the state: what may follow it)."""
        matcher.unsafe_compute_mask_ptr(
            self._bitmask.data_ptr(), self._bitmask.numel() * self._bitmask.element_size()
        )
        signature = self._bitmask.numpy().tobytes()
        # bit j of word w allows token 32 w + j
        bits = (self._bitmask[:, None] >> self._shifts) & 1  # [W, 32]
        allowed = bits.reshape(-1)[: min(vocab_size, self._vocab_size)].bool()
        if allowed.shape[0] < vocab_size:  # rows past the grammar's vocabulary: never
            allowed = torch.cat([allowed, allowed.new_zeros(vocab_size - allowed.shape[0])])
        return allowed, signature

    def _mask(self, matcher: Any, vocab_size: int) -> torch.Tensor:
        """The grammar's allowed tokens [vocab_size] in `matcher`'s state."""
        allowed, _ = self._raw_mask(matcher, vocab_size)
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
        """Whether the tokens left are down to the length of a way to finish plus the margin.
        Once on, it stays on. That length is found again when half the spare tokens (those
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
        route = self._route_now(vocab_size, left)
        need = len(route) if route is not None else left + 1
        spare = left - need - self._margin
        # how much the shortest answer grew since the last look: what a token may add
        self._reach = max(self._reach, need - self._need_seen)
        self._need_seen, self._spare, self._spare_at = need, spare, self._steps
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
        """Tokens of `_closing_path`; more than `limit` when it does not finish there."""
        path = self._closing_path(matcher, vocab_size, limit, ending=ending, fewest=fewest)
        return len(path) if path is not None else limit + 1

    def _closing_path(
        self,
        matcher: Any,
        vocab_size: int,
        limit: int,
        *,
        ending: bool = True,
        fewest: bool = False,
    ) -> list[int] | None:
        """The tokens closing mode's preference (`_preferred`) takes to finish from
        `matcher`'s state (end-of-sequence included, none where the grammar stops), followed
        on a copy of it. Within a tier the shortest token is taken (the model may pick it), so
        this errs long; fewest=True takes the longest instead (usually the fewest steps).
        ending=False: the first token is not end-of-sequence (the answer goes on).
        None when it takes more than `limit` tokens, reaches a dead state, or goes round
        (one state met `_LOOP_REPEATS` times: `a`s forever inside `"pattern": "a*b"`)."""
        matcher = matcher.deep_copy()
        lengths = self._closing[-1]
        path: list[int] = []
        seen: dict[bytes, int] = {}
        while len(path) <= limit:
            if matcher.is_error():
                return None
            if matcher.is_stopped():
                return path  # the decoder ends the sequence without sampling
            allowed, signature = self._raw_mask(matcher, vocab_size)
            key = signature + bytes([matcher.is_accepting()])
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > _LOOP_REPEATS:
                return None
            if not ending and not path:
                allowed[self._eos] = False
            candidates = allowed.nonzero().flatten()  # [n]
            if candidates.numel() == 0:
                return None  # dead: no token continues this answer
            candidates, _ = self._preferred(candidates)
            pick = lengths[candidates].argmax() if fewest else lengths[candidates].argmin()
            token = int(candidates[pick])
            path.append(token)
            if token in self._eos:
                break
            matcher.consume_token(token)
        return path if len(path) <= limit else None

    def _preferred_route(
        self, matcher: Any, vocab_size: int, limit: int, *, ending: bool = True
    ) -> list[int] | None:
        """The shorter of closing mode's two paths (`_closing_path` with the shortest or the
        longest token of each tier) from `matcher`'s state, or None."""
        paths = [
            self._closing_path(matcher, vocab_size, limit, ending=ending, fewest=fewest)
            for fewest in (False, True)
        ]
        found = [p for p in paths if p is not None]
        return min(found, key=len) if found else None

    def _route_from(
        self, matcher: Any, vocab_size: int, limit: int, *, ending: bool = True
    ) -> list[int] | None:
        """A way to finish from `matcher`'s state within `limit` tokens: closing mode's
        preference where it finishes (cheap, and what closing mode itself does), else the
        bounded search (`_search`); None when neither finds one."""
        route = self._preferred_route(matcher, vocab_size, limit, ending=ending)
        if route is not None:
            return route
        return self._search(matcher, vocab_size, limit, ending=ending)

    def _route_now(self, vocab_size: int, limit: int) -> list[int] | None:
        """A way to finish from the current state within `limit` tokens (`_route_from`),
        found once per state and kept while decoding follows it (`advance`)."""
        if self._route_at != self._steps:
            self._route = self._route_from(self._matcher, vocab_size, limit)
            self._route_at = self._steps
        return self._route

    def _search(
        self, matcher: Any, vocab_size: int, limit: int, *, ending: bool = True
    ) -> list[int] | None:
        """The shortest way to finish from `matcher`'s state that a breadth-first search over
        tokens finds, for where closing mode's preference never ends.

        At each state the search tries a few of closing mode's preferred tokens; where none of
        them moves the parser on (each leaves what may follow as it was: more `a`s inside
        `"pattern": "a*b"`), it also tries the longest allowed token of each first byte, as
        the way out may be one particular character. A second pass tries those everywhere.
        States are taken as one when they allow the same tokens and were reached through the
        same sequence of such changes (the letters of a free string lead to one state), so a
        level holds few states.

        Bounded: each pass tries at most `_SEARCH_STATES` parser states and keeps at most
        `_SEARCH_WIDTH` at one depth. The merging is a heuristic too: a way it returns is real
        (llguidance allowed each token) but may not be the shortest, and None means that none
        was found within these bounds, not that there is none."""
        if matcher.is_stopped():
            return []
        for thorough in (False, True):
            route = self._breadth_first(matcher, vocab_size, limit, ending, thorough)
            if route is not None:
                return route
        return None

    def _breadth_first(
        self, matcher: Any, vocab_size: int, limit: int, ending: bool, thorough: bool
    ) -> list[int] | None:
        """One pass of `_search` (thorough: every first byte at every state)."""
        root = self._search_node(matcher, [], vocab_size, None)
        if root is None:
            return None  # dead: no token continues this answer
        level, tried = [root], 0
        for _depth in range(limit):
            found: dict[tuple[bytes, int], _SearchNode] = {}
            for node in level:
                eos = [t for t in self._eos if bool(node.allowed[t])]
                if eos and (ending or node.path):
                    return [*node.path, eos[0]]
                preferred, by_byte = self._search_candidates(node.allowed)
                candidates = [*preferred, *(t for t in by_byte if t not in set(preferred))]
                moved = False
                for index, token in enumerate(candidates):
                    if index == len(preferred) and moved and not thorough:
                        break  # a preferred token moves on: no need to try every byte
                    child = node.matcher.deep_copy()
                    if not child.consume_token(token) or child.is_error():
                        continue
                    if child.is_stopped():
                        return [*node.path, token]  # the decoder ends without sampling
                    tried += 1
                    reached = self._search_node(child, [*node.path, token], vocab_size, node)
                    if reached is not None:
                        moved = moved or reached.signature != node.signature
                        found.setdefault((reached.signature, reached.trace), reached)
                    if tried >= _SEARCH_STATES:
                        return None
            if not found:
                return None  # every state tried is a dead end
            level = list(found.values())[:_SEARCH_WIDTH]
        return None

    def _search_node(
        self, matcher: Any, path: list[int], vocab_size: int, parent: _SearchNode | None
    ) -> _SearchNode | None:
        """The search's view of `matcher`'s state reached by `path`; None when it is dead."""
        allowed, mask = self._raw_mask(matcher, vocab_size)
        if not bool(allowed.any()):
            return None
        signature = mask + bytes([matcher.is_accepting()])
        trace = 0 if parent is None else parent.trace
        if parent is not None and signature != parent.signature:
            trace = hash((trace, signature))  # a change: part of how this state was reached
        return _SearchNode(matcher, path, allowed, signature, trace)

    def _search_candidates(self, allowed: torch.Tensor) -> tuple[list[int], list[int]]:
        """The tokens `_search` tries at a state with `allowed` [V] tokens: a few of closing
        mode's preferred ones (longest first), and the longest allowed token of each first
        byte. End-of-sequence is not among them (the search checks it on its own)."""
        ids = allowed.nonzero().flatten()  # [n]
        ids = ids[~torch.isin(ids, self._eos_ids)]
        if ids.numel() == 0:
            return [], []
        lengths = self._closing[-1]
        preferred, _ = self._preferred(ids)
        preferred = preferred[lengths[preferred].argsort(descending=True, stable=True)]
        by_byte: list[int] = []
        if self._first is not None:
            first = self._first[ids]  # [n]
            # by first byte, longest first; the head of each byte's run is its longest token
            order = torch.argsort(first * 65536 - lengths[ids].clamp(max=65535), stable=True)
            first, ordered = first[order], ids[order]
            heads = torch.ones_like(first, dtype=torch.bool)
            heads[1:] = first[1:] != first[:-1]
            by_byte = ordered[heads].tolist()
        return preferred[:_SEARCH_PREFERRED].tolist(), by_byte

    def minimum_budget(self, limit: int = _MINIMUM_LIMIT) -> int:
        """Tokens closing mode needs to finish from the current state (before the first token:
        the shortest complete answer it knows, end-of-sequence included); a smaller budget
        cannot promise a complete answer. More than `limit` when it takes more, or when no
        way to finish was found (the search is bounded; see `_search`). Needs a constraint
        built with a budget (closing mode's token tiers)."""
        if not self._closing:
            raise ValueError("minimum_budget needs a constraint built with budget=...")
        known, key = self._known_minimums if self._steps == 0 else ({}, None)
        route = list(known[key]) if key in known else self._shortest_route(limit)
        if route is None:
            return limit + 1
        if key is not None and key not in known:
            with _LL_LOCK:
                if len(known) >= _KNOWN_MINIMUMS:
                    known.pop(next(iter(known)))
                known[key] = tuple(route)
        if self._route_at != self._steps:  # decoding may follow it from here
            self._route, self._route_at = route, self._steps
        if self._steps == 0:  # a part of the answer may take as much again
            self._reach = max(self._reach, len(route))
        minimum = max(1, len(route))
        return minimum if minimum <= limit else limit + 1

    def _shortest_route(self, limit: int) -> list[int] | None:
        """`minimum_budget`'s way to finish: the shortest of closing mode's first choices,
        each followed by its preference, and `_route_from` the current state."""
        matcher, vocab_size = self._matcher, self._vocab_size
        if matcher.is_stopped():
            return []
        allowed = self._mask(matcher, vocab_size)
        first = self._closing_mask(allowed, matcher).nonzero().flatten().tolist()
        eos = [t for t in first if t in self._eos]
        if eos:
            return eos[:1]
        routes = [self._route_from(matcher, vocab_size, limit)]
        if len(first) <= _CHECKED_ONE_BY_ONE:
            for token in first:
                after = matcher.deep_copy()
                after.consume_token(token)
                rest = self._preferred_route(after, vocab_size, limit - 1)
                routes.append([token, *rest] if rest is not None else None)
        found = [r for r in routes if r is not None]
        return min(found, key=len) if found else None

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
_MINIMUMS: weakref.WeakKeyDictionary[Any, dict[Any, tuple[int, ...]]] = weakref.WeakKeyDictionary()
_KNOWN_MINIMUMS = 256  # per tokenizer: the shortest routes of this many recent grammars
_FIRST: weakref.WeakKeyDictionary[Any, dict[int, torch.Tensor]] = weakref.WeakKeyDictionary()
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


def _first_bytes(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """The first byte of every token's text [V] (256 for none). Computed once per tokenizer."""
    with _LL_LOCK:
        per_tokenizer = _FIRST.setdefault(tokenizer, {})
        if vocab_size not in per_tokenizer:
            texts = _token_texts(tokenizer, vocab_size)
            per_tokenizer[vocab_size] = torch.tensor([t.encode()[0] if t else 256 for t in texts])
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
