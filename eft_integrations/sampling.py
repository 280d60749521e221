"""Sampling options as batch tensors, and the batched transforms of the composed scores.

`SamplingMetadata` holds every row's options as tensors [B], built once per batch
composition (vLLM v1's SamplingMetadata). Two transforms act on the EFT-composed log-probs,
all rows in one pass:

    score_processors     every row, greedy ones included, before anything else (vLLM's and
                         transformers' order): logit_bias, then the repetition, presence and
                         frequency penalties, which read the row's tokens so far
    sampling_transform   sampled rows only: temperature, top-k, top-p (on the renormalised
                         top-k set), min-p, in transformers' order and semantics

The sampler and the speculative rounds share both; a new option is a field of
`GenerationOptions` plus its tensor and its line here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = ["SamplingMetadata", "sampling_transform", "score_processors"]


@dataclass(frozen=True)
class SamplingMetadata:
    """The batch's sampling options as tensors [B] (built once per batch composition)."""

    temperature: torch.Tensor  # [B] float; 1 for greedy rows (never divided by 0)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] long; the vocabulary size where top-k is off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    repetition_penalty: torch.Tensor  # [B] float
    presence_penalty: torch.Tensor  # [B] float
    frequency_penalty: torch.Tensor  # [B] float
    bias: torch.Tensor | None  # [B, V] float, or None when no row has a logit_bias
    uses_top_k: bool  # any row: only then is the vocabulary sorted
    uses_top_p: bool
    uses_min_p: bool
    uses_penalties: bool
    all_greedy: bool
    seeded: list[int]  # rows that draw from their own generator
    shared: torch.Tensor  # [B'] long: sampled rows that draw from the sampler's generator
    generators: list[torch.Generator | None]

    @classmethod
    def of(cls, rows: Sequence[Any], vocab_size: int, device: torch.device) -> SamplingMetadata:
        """From rows that carry `options` (GenerationOptions) and `generator`."""
        options = [r.options for r in rows]
        greedy = [o.temperature == 0.0 for o in options]
        top_k = [o.top_k if 0 < o.top_k < vocab_size else vocab_size for o in options]

        def column(name: str) -> torch.Tensor:
            return torch.tensor([float(getattr(o, name)) for o in options], device=device)

        bias = None
        if any(o.logit_bias for o in options):
            bias = torch.zeros(len(rows), vocab_size)
            for b, o in enumerate(options):
                for token, value in (o.logit_bias or {}).items():
                    bias[b, token] = value
            bias = bias.to(device)
        return cls(
            temperature=torch.tensor(
                [1.0 if g else o.temperature for g, o in zip(greedy, options, strict=True)],
                device=device,
            ),
            greedy=torch.tensor(greedy, device=device),
            top_k=torch.tensor(top_k, device=device),
            top_p=column("top_p"),
            min_p=column("min_p"),
            repetition_penalty=column("repetition_penalty"),
            presence_penalty=column("presence_penalty"),
            frequency_penalty=column("frequency_penalty"),
            bias=bias,
            uses_top_k=any(k < vocab_size for k in top_k),
            uses_top_p=any(o.top_p < 1.0 for o in options),
            uses_min_p=any(o.min_p > 0.0 for o in options),
            uses_penalties=any(o.uses_history for o in options),
            all_greedy=all(greedy),
            seeded=[b for b, r in enumerate(rows) if r.generator is not None and not greedy[b]],
            shared=torch.tensor(
                [b for b, r in enumerate(rows) if r.generator is None and not greedy[b]],
                dtype=torch.long,
                device=device,
            ),
            generators=[r.generator for r in rows],
        )

    def repeat(self, n: int) -> SamplingMetadata:
        """Each row's options repeated for n positions (rows [B * n], row-major); for the
        transforms only (not for drawing)."""
        return replace(
            self,
            temperature=self.temperature.repeat_interleave(n),
            greedy=self.greedy.repeat_interleave(n),
            top_k=self.top_k.repeat_interleave(n),
            top_p=self.top_p.repeat_interleave(n),
            min_p=self.min_p.repeat_interleave(n),
            repetition_penalty=self.repetition_penalty.repeat_interleave(n),
            presence_penalty=self.presence_penalty.repeat_interleave(n),
            frequency_penalty=self.frequency_penalty.repeat_interleave(n),
            bias=None if self.bias is None else self.bias.repeat_interleave(n, dim=0),
            seeded=[],
            generators=[],
        )


def score_processors(
    scores: torch.Tensor,
    meta: SamplingMetadata,
    history: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """logit_bias, then the penalties, on composed scores [B, V] (never in place).

    `history` is (seen [B, V] bool: the token is in the prompt or the completion; counts
    [B, V]: its count in the completion), needed when `meta.uses_penalties`. As vLLM and
    transformers: a seen token's score s becomes s * r if s < 0 else s / r (r the repetition
    penalty); then s -= frequency * count + presence * (count > 0) (OpenAI's formula)."""
    if meta.bias is not None:
        scores = scores + meta.bias
    if meta.uses_penalties:
        assert history is not None, "penalties need the rows' tokens so far"
        seen, counts = history
        r = meta.repetition_penalty[:, None]
        penalised = torch.where(scores < 0, scores * r, scores / r)
        scores = torch.where(seen, penalised, scores)
        scores = scores - meta.frequency_penalty[:, None] * counts
        scores = scores - meta.presence_penalty[:, None] * (counts > 0)
    return scores


def sampling_transform(logprobs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, then top-k, then top-p on the renormalised top-k distribution, then
    min-p, every row with its own values, in one pass: [B, V] -> renormalised log-probs
    [B, V]. Greedy rows keep their distribution (temperature 1, no truncation). Equal to
    `composition.sampling_logprobs` (and transformers' MinPLogitsWarper) row by row."""
    scaled = torch.log_softmax(logprobs / meta.temperature[:, None], dim=-1)
    if not (meta.uses_top_k or meta.uses_top_p or meta.uses_min_p):
        return scaled
    vocab = scaled.shape[-1]
    sorted_lp, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    keep = torch.arange(vocab, device=scaled.device) < meta.top_k[:, None]  # [B, V] sorted
    # greedy rows are left whole: their argmax is taken before any of this matters
    keep |= meta.greedy[:, None]
    if meta.uses_top_p:
        # mass before each token of the renormalised top-k set, relative to the largest
        dtype = torch.float32 if scaled.device.type == "mps" else torch.float64
        relative = (sorted_lp.to(dtype) - sorted_lp[:, :1].to(dtype)).exp() * keep
        cumulative = relative.cumsum(dim=-1)
        before = cumulative - relative
        in_top_p = before < meta.top_p[:, None].to(dtype) * cumulative[:, -1:]
        in_top_p[:, 0] = True
        keep &= in_top_p | meta.greedy[:, None]
    if meta.uses_min_p:
        # p < min_p * p_max, measured on the kept set (the most likely token always stays)
        floor = sorted_lp[:, :1] + torch.log(meta.min_p[:, None])
        keep &= (sorted_lp >= floor) | meta.greedy[:, None]
    kept = torch.zeros_like(keep).scatter(-1, order, keep)
    return torch.log_softmax(scaled.masked_fill(~kept, float("-inf")), dim=-1)
