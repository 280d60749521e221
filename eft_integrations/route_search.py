"""A way to finish from a parser state: closing mode's preference, else a bounded search.

Where closing mode's preference never finishes (inside `"pattern": "a*b"` it writes `a`s
forever), a breadth-first search over tokens finds the way out (the `b`). The search walks one
parser: it moves from state to state by rolling back to the common part of two paths and
consuming the rest, and tries each candidate token by consuming and rolling it back
(`grammar_masks.stepped`), so no parser state is copied; the parser is back where it was when
the search returns.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .closing import CHECKED_ONE_BY_ONE, ClosingPlanner
from .grammar_masks import stepped

__all__ = ["RouteSearch"]

_SEARCH_STATES = 2048
"""The most parser states the breadth-first search of a way to finish tries (each costs one
mask); past it the search says it found none."""

_SEARCH_WIDTH = 64
"""The most distinct parser states the search keeps at one depth."""

_SEARCH_PREFERRED = 8
"""How many of closing mode's preferred tokens the search tries at each state, before one
token per first byte."""


class _SearchNode(NamedTuple):
    """A parser state the search for a way to finish reached (`RouteSearch.search`)."""

    path: list[int]  # the tokens that reached it from where the search began
    allowed: torch.Tensor  # [V] bool: the tokens that may follow
    signature: bytes  # llguidance's bitmask of them, and whether the state accepts
    trace: int  # a hash of the signature changes along the path


class _Cursor:
    """Where the search's parser is: the tokens consumed since the search began."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.path: list[int] = []

    def go(self, path: list[int]) -> bool:
        """Move the parser to the state `path` reaches: roll back to the part it shares with
        where it is, consume the rest. False if the grammar refuses a token of it."""
        common = 0
        for here, there in zip(self.path, path, strict=False):
            if here != there:
                break
            common += 1
        if len(self.path) > common:
            self.matcher.rollback(len(self.path) - common)
        rest = path[common:]
        consumed = self.matcher.try_consume_tokens(rest) if rest else 0
        self.path = path[: common + consumed]
        return consumed == len(rest)

    def home(self) -> None:
        """Back to where the search began."""
        if self.path:
            self.matcher.rollback(len(self.path))
        self.path = []


class RouteSearch:
    """Ways to finish from a parser state, within a number of tokens (`route_from`)."""

    def __init__(self, planner: ClosingPlanner, first_bytes: torch.Tensor | None) -> None:
        self._planner = planner
        self._first = first_bytes  # [V] the first byte of every token (256: none)

    def route_from(
        self, matcher: Any, vocab_size: int, limit: int, *, ending: bool = True
    ) -> list[int] | None:
        """A way to finish from `matcher`'s state within `limit` tokens: closing mode's
        preference where it finishes (cheap, and what closing mode itself does), else the
        bounded search (`search`); None when neither finds one."""
        route = self._planner.preferred_route(matcher, vocab_size, limit, ending=ending)
        if route is not None:
            return route
        return self.search(matcher, vocab_size, limit, ending=ending)

    def shortest_route(
        self, matcher: Any, vocab_size: int, limit: int, lookahead_limit: int
    ) -> list[int] | None:
        """`GrammarConstraint.minimum_budget`'s way to finish from `matcher`'s state: the
        shortest of closing mode's first choices (among dictated tokens, those whose closing
        paths within `lookahead_limit` are shortest), each followed by its preference, and
        `route_from` the state itself."""
        if matcher.is_stopped():
            return []
        planner = self._planner
        allowed = planner.masks.allowed(matcher, vocab_size)
        closing = planner.closing_mask(allowed, matcher, lookahead_limit)
        first = closing.nonzero().flatten().tolist()
        eos = [t for t in first if t in planner.eos]
        if eos:
            return eos[:1]
        routes = [self.route_from(matcher, vocab_size, limit)]
        if len(first) <= CHECKED_ONE_BY_ONE:
            for token in first:
                with stepped(matcher, [token]) as consumed:
                    rest = (
                        planner.preferred_route(matcher, vocab_size, limit - 1)
                        if consumed
                        else None
                    )
                routes.append([token, *rest] if rest is not None else None)
        found = [r for r in routes if r is not None]
        return min(found, key=len) if found else None

    def search(
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
        """One pass of `search` (thorough: every first byte at every state)."""
        root = self._node(matcher, [], vocab_size, None)
        if root is None:
            return None  # dead: no token continues this answer
        cursor = _Cursor(matcher)
        try:
            return self._levels(cursor, root, vocab_size, limit, ending, thorough)
        finally:
            cursor.home()

    def _levels(
        self,
        cursor: _Cursor,
        root: _SearchNode,
        vocab_size: int,
        limit: int,
        ending: bool,
        thorough: bool,
    ) -> list[int] | None:
        """The search's levels from `root`, one depth each, on the `cursor`'s parser."""
        matcher, eos_ids = cursor.matcher, self._planner.eos
        level, tried = [root], 0
        for _depth in range(limit):
            found: dict[tuple[bytes, int], _SearchNode] = {}
            for node in level:
                eos = [t for t in eos_ids if bool(node.allowed[t])]
                if eos and (ending or node.path):
                    return [*node.path, eos[0]]
                preferred, by_byte = self._candidates(node.allowed)
                candidates = [*preferred, *(t for t in by_byte if t not in set(preferred))]
                if not cursor.go(node.path):
                    continue  # never: the path was consumed once from this same state
                moved = False
                for index, token in enumerate(candidates):
                    if index == len(preferred) and moved and not thorough:
                        break  # a preferred token moves on: no need to try every byte
                    with stepped(matcher, [token]) as consumed:
                        if not consumed or matcher.is_error():
                            continue
                        if matcher.is_stopped():
                            return [*node.path, token]  # the decoder ends without sampling
                        tried += 1
                        reached = self._node(matcher, [*node.path, token], vocab_size, node)
                    if reached is not None:
                        moved = moved or reached.signature != node.signature
                        found.setdefault((reached.signature, reached.trace), reached)
                    if tried >= _SEARCH_STATES:
                        return None
            if not found:
                return None  # every state tried is a dead end
            level = list(found.values())[:_SEARCH_WIDTH]
        return None

    def _node(
        self, matcher: Any, path: list[int], vocab_size: int, parent: _SearchNode | None
    ) -> _SearchNode | None:
        """The search's view of `matcher`'s state reached by `path`; None when it is dead."""
        allowed, mask = self._planner.masks.raw(matcher, vocab_size)
        if not bool(allowed.any()):
            return None
        signature = mask + bytes([matcher.is_accepting()])
        trace = 0 if parent is None else parent.trace
        if parent is not None and signature != parent.signature:
            trace = hash((trace, signature))  # a change: part of how this state was reached
        return _SearchNode(path, allowed, signature, trace)

    def _candidates(self, allowed: torch.Tensor) -> tuple[list[int], list[int]]:
        """The tokens `search` tries at a state with `allowed` [V] tokens: a few of closing
        mode's preferred ones (longest first), and the longest allowed token of each first
        byte. End-of-sequence is not among them (the search checks it on its own)."""
        planner = self._planner
        ids = allowed.nonzero().flatten()  # [n]
        ids = ids[~torch.isin(ids, planner.eos_ids)]
        if ids.numel() == 0:
            return [], []
        lengths = planner.lengths
        preferred, _ = planner.preferred(ids)
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
