"""Closing mode's preference among a grammar's tokens, and the paths it takes to finish.

Closing mode (`constraints.GrammarConstraint`) prefers, among the tokens the grammar allows,
end-of-sequence, then tokens that close a string, then brackets, then separators, then digits,
else the longest (text the grammar dictates: keys, tags). Following that preference from a
parser state gives a closing path: a way to finish, whose length closing mode plans with. A path
is walked on the parser itself and rolled back after (`grammar_masks.stepped`): no copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .grammar_masks import GrammarMasks, stepped

__all__ = ["CHECKED_ONE_BY_ONE", "MINIMUM_LIMIT", "ClosingPlanner"]

MINIMUM_LIMIT = 4096
"""How far `minimum_budget` counts before it says only that the answer needs more."""

CHECKED_ONE_BY_ONE = 16
"""Up to this many allowed tokens of a plain group are checked one by one in closing mode;
more are the content of a free string, where the shortest stands for all."""

_LOOP_REPEATS = 256
"""The fixed closing preference gives up once it meets one parser signature (allowed tokens,
accepting) this many times: it is going round (`a`s inside `"pattern": "a*b"`), and the
search takes over. Legitimate repeats are long strings with a minLength, a few per token."""


class ClosingPlanner:
    """Closing mode's preference over the tokens a parser state allows, and the closing paths
    it takes from a state. `closing_tokens` are the tiers of `token_tables.closing_tokens`
    (their last entry: every token's byte length); without them only masks are read."""

    def __init__(self, masks: GrammarMasks, closing_tokens: Sequence[torch.Tensor]) -> None:
        self.masks = masks
        self.eos = masks.eos
        self.eos_ids = torch.tensor(self.eos, dtype=torch.long)
        self.tiers = tuple(closing_tokens[:-1])
        # every token's byte length [V] (none without tiers: nothing plans then)
        self.lengths = closing_tokens[-1] if closing_tokens else torch.zeros(0, dtype=torch.long)

    def preferred(self, allowed_ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Among the allowed token ids [n]: end-of-sequence, else the first closing tier with a
        token, else the longest (then True: text the grammar dictates)."""
        eos = allowed_ids[torch.isin(allowed_ids, self.eos_ids)]
        if eos.numel():
            return eos, False
        for tier in self.tiers:
            chosen = allowed_ids[tier[allowed_ids]]
            if chosen.numel():
                return chosen, False
        allowed_lengths = self.lengths[allowed_ids]
        return allowed_ids[allowed_lengths == allowed_lengths.max()], True

    def closing_mask(
        self, allowed: torch.Tensor, lookahead: Any = None, limit: int = MINIMUM_LIMIT
    ) -> torch.Tensor:
        """The tokens closing mode allows among the `allowed` [V]: the first tier with an
        allowed token, else the longest allowed tokens (text the grammar dictates, in the
        fewest steps). Where the grammar offers a choice there (an optional key, an enum value,
        a branch of anyOf), the `lookahead` parser keeps the choices that close soonest (their
        paths counted within `limit`)."""
        allowed_ids = allowed.nonzero().flatten()  # [n]
        tokens, dictated = self.preferred(allowed_ids)
        if dictated and lookahead is not None:
            few = allowed_ids.numel() <= CHECKED_ONE_BY_ONE
            candidates = (allowed_ids if few else tokens).tolist()
            if len(candidates) >= 2:
                needs = {
                    t: self.need_after(lookahead, t, allowed.shape[0], limit) for t in candidates
                }
                tokens = torch.tensor([t for t in candidates if needs[t] == min(needs.values())])
        mask = torch.zeros_like(allowed)
        mask[tokens] = True
        return mask

    def need_after(self, matcher: Any, token: int, vocab_size: int, limit: int) -> int:
        """Tokens of the shorter of closing mode's two paths after `token` in `matcher`'s state
        (the shortest or the longest token of each tier): a way to finish, within `limit`;
        more than `limit` when neither finishes there."""
        with stepped(matcher, [token]) as consumed:
            path = self.preferred_route(matcher, vocab_size, limit) if consumed else None
        return len(path) if path is not None else limit + 1

    def closing_length(
        self,
        matcher: Any,
        vocab_size: int,
        limit: int,
        *,
        ending: bool = True,
        fewest: bool = False,
    ) -> int:
        """Tokens of `closing_path`; more than `limit` when it does not finish there."""
        path = self.closing_path(matcher, vocab_size, limit, ending=ending, fewest=fewest)
        return len(path) if path is not None else limit + 1

    def closing_path(
        self,
        matcher: Any,
        vocab_size: int,
        limit: int,
        *,
        ending: bool = True,
        fewest: bool = False,
    ) -> list[int] | None:
        """The tokens closing mode's preference (`preferred`) takes to finish from `matcher`'s
        state (end-of-sequence included, none where the grammar stops), followed on the parser
        and rolled back after. Within a tier the shortest token is taken (the model may pick
        it), so this errs long; fewest=True takes the longest instead (usually the fewest
        steps). ending=False: the first token is not end-of-sequence (the answer goes on).
        None when it takes more than `limit` tokens, reaches a dead state, or goes round
        (one state met `_LOOP_REPEATS` times: `a`s forever inside `"pattern": "a*b"`)."""
        path: list[int] = []
        seen: dict[bytes, int] = {}
        consumed = 0
        try:
            while len(path) <= limit:
                if matcher.is_error():
                    return None
                if matcher.is_stopped():
                    return path  # the decoder ends the sequence without sampling
                allowed, signature = self.masks.raw(matcher, vocab_size)
                key = signature + bytes([matcher.is_accepting()])
                seen[key] = seen.get(key, 0) + 1
                if seen[key] > _LOOP_REPEATS:
                    return None
                if not ending and not path:
                    allowed[self.eos] = False
                candidates = allowed.nonzero().flatten()  # [n]
                if candidates.numel() == 0:
                    return None  # dead: no token continues this answer
                candidates, _ = self.preferred(candidates)
                lengths = self.lengths[candidates]
                token = int(candidates[lengths.argmax() if fewest else lengths.argmin()])
                path.append(token)
                if token in self.eos:
                    break
                if matcher.try_consume_tokens([token]) != 1:
                    return None  # the grammar refused what its mask allowed: no way on
                consumed += 1
            return path if len(path) <= limit else None
        finally:
            if consumed:
                matcher.rollback(consumed)

    def preferred_route(
        self, matcher: Any, vocab_size: int, limit: int, *, ending: bool = True
    ) -> list[int] | None:
        """The shorter of closing mode's two paths (`closing_path` with the shortest or the
        longest token of each tier) from `matcher`'s state, or None."""
        paths = [
            self.closing_path(matcher, vocab_size, limit, ending=ending, fewest=fewest)
            for fewest in (False, True)
        ]
        found = [p for p in paths if p is not None]
        return min(found, key=len) if found else None
