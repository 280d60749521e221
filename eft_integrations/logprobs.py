"""Reading log-probs out of composed distributions: the chosen tokens and their alternatives.

Every function takes composed EFT log-probs [N, V] (one row per position) and the tokens at
those positions, and makes one host transfer for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .options import ContinuationScore, TokenLogprob

__all__ = ["continuation_score", "token_logprobs", "top_alternatives"]


def top_alternatives(logprobs: torch.Tensor, tops: Sequence[int]) -> list[dict[int, float]]:
    """Per row, its `tops[n]` most likely tokens (id -> log-prob, most likely first; ties by
    token id)."""
    k = min(max(tops, default=0), logprobs.shape[-1])
    if k == 0:
        return [{} for _ in tops]
    values, indices = torch.topk(logprobs, k, dim=-1)  # sorted, most likely first
    values_, indices_ = values.tolist(), indices.tolist()
    return [
        dict(zip(indices_[n][:top], values_[n][:top], strict=True)) for n, top in enumerate(tops)
    ]


def token_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, tops: Sequence[int]
) -> list[TokenLogprob]:
    """One `TokenLogprob` per row of `logprobs` [N, V]: the log-prob of `tokens[n]` and the
    row's `tops[n]` most likely alternatives."""
    chosen = logprobs.gather(-1, tokens.to(logprobs.device)[:, None])[:, 0].tolist()
    alternatives = top_alternatives(logprobs, tops)
    return [
        TokenLogprob(token_id=int(token), logprob=lp, top_logprobs=top)
        for token, lp, top in zip(tokens.tolist(), chosen, alternatives, strict=True)
    ]


def continuation_score(logprobs: torch.Tensor, token_ids: list[int], top: int) -> ContinuationScore:
    """A continuation's score from the composed log-probs [n, V] at its n positions."""
    tokens = torch.tensor(token_ids, device=logprobs.device)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    greedy = logprobs.argmax(-1) == tokens
    alternatives = top_alternatives(logprobs, [top] * len(token_ids)) if top else None
    return ContinuationScore(
        token_ids=list(token_ids),
        logprobs=chosen.tolist(),
        is_greedy=greedy.tolist(),
        top_logprobs=alternatives,
    )
