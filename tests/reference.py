"""Brute-force EFT references, written out plainly in float64, for the optimised code to match.

`eft_reference` is the composition formula (plain and conservative) token by token on one row;
`BruteForceEFT` recomputes every full sequence with every model each step, no cache, no padding.
Models are loaded here independently of the decoder, so a loading or caching bug in the
decoder cannot hide in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM


def log_softmax64(values: Sequence[float]) -> list[float]:
    """log p_i = x_i - log sum_j exp(x_j), in float64 (-inf entries stay -inf)."""
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def top_p_set(logprobs: Sequence[float], top_p: float) -> set[int]:
    """The smallest set of most likely tokens (ties by index) whose mass reaches top_p."""
    order = sorted(range(len(logprobs)), key=lambda i: (-logprobs[i], i))
    total = sum(math.exp(v) for v in logprobs)
    kept: set[int] = set()
    mass = 0.0
    for i in order:
        if kept and top_p < 1.0 and mass >= top_p * total:
            break  # top_p >= 1 keeps every token, zero-probability ones included
        kept.add(i)
        mass += math.exp(logprobs[i])
    return kept


def eft_reference(
    base: Sequence[float],
    finetuned: Sequence[Sequence[float]],
    references: Sequence[Sequence[float]],
    weights: Sequence[float],
    conservative_top_p: float | None = None,
) -> list[float]:
    """EFT log-probs of one row from the models' logits (or log-probs), per DESIGN.md.

    plain:         log_softmax(log p_base + sum_b w_b (log p_ft_b - log p_ref_b))
    conservative:  p_ref* = mean of the distinct references of behaviors with w_b != 0
                   log p_fts = log_softmax(log p_ref* + sum_b w_b (log p_ft_b - log p_ref_b))
                   log_softmax(log p_fts + 1[y in top_p(p_fts)] (log p_base - log p_ref*))
                   and the base alone when no behavior is active.
    Distinct references are told apart by value.
    """
    base_lp = log_softmax64(base)
    fts = [log_softmax64(f) for f in finetuned]
    refs = [log_softmax64(r) for r in references]
    vocab = range(len(base_lp))
    deltas = [
        sum(w * (ft[y] - ref[y]) for w, ft, ref in zip(weights, fts, refs, strict=True) if w != 0)
        for y in vocab
    ]
    if conservative_top_p is None:
        return log_softmax64([base_lp[y] + deltas[y] for y in vocab])
    distinct: list[list[float]] = []
    for w, ref in zip(weights, refs, strict=True):
        if w != 0 and ref not in distinct:
            distinct.append(ref)
    if not distinct:
        return base_lp
    ref_star = [sum(r[y] for r in distinct) / len(distinct) for y in vocab]
    small = log_softmax64([ref_star[y] + deltas[y] for y in vocab])
    inside = top_p_set(small, conservative_top_p)
    return log_softmax64(
        [small[y] + (base_lp[y] - ref_star[y] if y in inside else 0.0) for y in vocab]
    )


class BruteForceEFT:
    def __init__(self, base: str, behaviors: Mapping[str, tuple[str, str]], vocab_size: int):
        load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
        self.base = load(base)
        self.behaviors = {n: (load(ft), load(ref)) for n, (ft, ref) in behaviors.items()}
        self.vocab_size = vocab_size

    @torch.no_grad()
    def _logprobs(self, model, ids: Sequence[int]) -> torch.Tensor:
        logits = model(input_ids=torch.tensor([list(ids)])).logits[0, -1, : self.vocab_size]
        return torch.log_softmax(logits.double(), dim=-1)

    def next_logprobs(
        self,
        chat_ids: Sequence[int],
        weights: Mapping[str, float],
        base_ids: Sequence[int] | None = None,
        conservative_top_p: float | None = None,
    ) -> torch.Tensor:
        """Composed log-probs [V] (float64); weights left out are 1.0."""
        base_ids = chat_ids if base_ids is None else base_ids
        names = list(self.behaviors)
        return torch.tensor(
            eft_reference(
                self._logprobs(self.base, base_ids).tolist(),
                [self._logprobs(self.behaviors[n][0], chat_ids).tolist() for n in names],
                [self._logprobs(self.behaviors[n][1], base_ids).tolist() for n in names],
                [weights.get(n, 1.0) for n in names],
                conservative_top_p,
            ),
            dtype=torch.float64,
        )

    def greedy(
        self,
        chat_ids: Sequence[int],
        weights: Mapping[str, float],
        steps: int,
        base_ids: Sequence[int] | None = None,
        eos: frozenset[int] = frozenset(),
    ):
        chat, base = list(chat_ids), list(base_ids if base_ids is not None else chat_ids)
        out = []
        for _ in range(steps):
            token = int(self.next_logprobs(chat, weights, base).argmax())
            out.append(token)
            if token in eos:
                break
            chat.append(token)
            base.append(token)
        return out


def tiny_family_reference(paths: Mapping[str, Any], vocab_size: int) -> BruteForceEFT:
    """The reference of `conftest.tiny_family`: base + chat and safe over one reference."""
    return BruteForceEFT(
        paths["base"],
        {"chat": (paths["chat"], paths["ref"]), "safe": (paths["safe"], paths["ref"])},
        vocab_size,
    )
