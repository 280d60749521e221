"""Exact speculative decoding for EFT: the fine-tuning-scale models draft, the base verifies.

EFT paper, section 4.3: the cheap fine-tuning-scale distribution (the small chat model when
there is one behavior at weight 1) drafts k tokens; the base model scores all of them in one
forward. Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023) keeps the
output distribution exactly that of EFT: accept a drafted token x with probability
min(1, p(x) / q(x)), and at the first rejection sample from the residual norm(max(0, p - q)).
If every draft is accepted, one bonus token comes from p at the next position. Greedy decoding
accepts while the EFT argmax agrees with the draft. The paper's own scheme matches seeds
instead; this one is exact.
"""

from __future__ import annotations

import torch

__all__ = ["accept_draft", "crop_cache"]


def accept_draft(
    target: torch.Tensor,
    draft: torch.Tensor,
    draft_tokens: list[int],
    greedy: bool,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens one verification round emits: an accepted prefix of the draft plus one more.

    Args:
        target: [k + 1, V] log-probs of the EFT distribution (after temperature / top-k /
            top-p) at each drafted position and the one after the last draft.
        draft: [k, V] log-probs the drafts were sampled from (same transforms).
        draft_tokens: the k drafted tokens.
        greedy: accept while the target's argmax equals the draft; then emit that argmax.
        generator: random source for acceptance tests and resampling.
    """
    emitted: list[int] = []
    for i, token in enumerate(draft_tokens):
        if greedy:
            best = int(target[i].argmax())
            if best != token:
                return [*emitted, best]
            emitted.append(token)
            continue
        p, q = target[i].exp(), draft[i].exp()
        u = torch.rand((), generator=generator, device=generator.device if generator else None)
        # q >= p: accept with probability p/q; q < p: always accept
        if u.item() * q[token].item() < p[token].item():
            emitted.append(token)
            continue
        residual = (p - q).clamp(min=0)
        if residual.sum() <= 0:  # only by rounding: p == q everywhere
            residual = p
        return [*emitted, _sample(residual, generator)]
    bonus = int(target[-1].argmax()) if greedy else _sample(target[-1].exp(), generator)
    return [*emitted, bonus]


def _sample(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    if generator is not None and generator.device != weights.device:
        weights = weights.to(generator.device)
    return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))


def crop_cache(cache: object, tokens_to_remove: int) -> None:
    """Drop the last tokens of a transformers KV cache (rejected drafts).

    `crop(-n)` removes n tokens in transformers 4.x (max_length < 0) and 5.x alike.
    """
    if tokens_to_remove > 0:
        cache.crop(-tokens_to_remove)  # type: ignore[attr-defined]
