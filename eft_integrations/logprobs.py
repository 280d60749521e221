"""Reading log-probs out of composed distributions: the chosen tokens and their alternatives.

Every function takes composed EFT log-probs [N, V] (one row per position) and the tokens at
those positions, and makes one host transfer for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .options import ContinuationScore, TokenLogprob

MIN_REPORTED_LOGPROB = -9999.0
"""The log-prob reported for a token of probability 0 (JSON has no -inf; vLLM's value)."""

__all__ = ["continuation_score", "openai_logprobs", "token_logprobs", "top_alternatives"]


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


def openai_logprobs(entries: Sequence[TokenLogprob], tokenizer: Any) -> list[dict[str, Any]]:
    """Entries in OpenAI's chat shape (`choices[].logprobs.content`): per token its text,
    UTF-8 bytes and log-prob, and its `top_logprobs` alike. A token that is part of a
    multi-byte character decodes to U+FFFD, as vLLM reports it."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        # JSON has no -inf: a token the distribution excludes is reported as vLLM does
        logprob = max(logprob, MIN_REPORTED_LOGPROB)
        return {"token": text, "bytes": list(text.encode("utf-8")), "logprob": logprob}

    return [
        {
            **one(entry.token_id, entry.logprob),
            "top_logprobs": [one(t, lp) for t, lp in entry.top_logprobs.items()],
        }
        for entry in entries
    ]
