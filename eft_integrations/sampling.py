"""Sampling options as batch tensors, and the batched sampling transforms.

`SamplingMetadata` holds every row's options as tensors [B], built once per batch
composition (vLLM v1's SamplingMetadata); `sampling_transform` applies temperature, top-k and
top-p to all rows in one pass. The sampler and speculative rounds share both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SamplingMetadata", "sampling_transform"]


@dataclass(frozen=True)
class SamplingMetadata:
    """The batch's sampling options as tensors [B] (built once per batch composition)."""

    temperature: torch.Tensor  # [B] float; 1 for greedy rows (never divided by 0)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] long; the vocabulary size where top-k is off
    top_p: torch.Tensor  # [B] float
    uses_top_k: bool  # any row: only then is the vocabulary sorted
    uses_top_p: bool
    all_greedy: bool
    seeded: list[int]  # rows that draw from their own generator
    shared: torch.Tensor  # [B'] long: sampled rows that draw from the sampler's generator
    generators: list[torch.Generator | None]

    @classmethod
    def of(cls, rows: Sequence[Any], vocab_size: int, device: torch.device) -> SamplingMetadata:
        options = [r.options for r in rows]
        greedy = [o.temperature == 0.0 for o in options]
        top_k = [o.top_k if 0 < o.top_k < vocab_size else vocab_size for o in options]
        return cls(
            temperature=torch.tensor(
                [1.0 if g else o.temperature for g, o in zip(greedy, options, strict=True)],
                device=device,
            ),
            greedy=torch.tensor(greedy, device=device),
            top_k=torch.tensor(top_k, device=device),
            top_p=torch.tensor([o.top_p for o in options], device=device),
            uses_top_k=any(k < vocab_size for k in top_k),
            uses_top_p=any(o.top_p < 1.0 for o in options),
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
        """Each row's options repeated for n positions (rows [B * n], row-major)."""
        return SamplingMetadata(
            temperature=self.temperature.repeat_interleave(n),
            greedy=self.greedy.repeat_interleave(n),
            top_k=self.top_k.repeat_interleave(n),
            top_p=self.top_p.repeat_interleave(n),
            uses_top_k=self.uses_top_k,
            uses_top_p=self.uses_top_p,
            all_greedy=self.all_greedy,
            seeded=[],
            shared=self.shared,
            generators=[],
        )


def sampling_transform(logprobs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, then top-k, then top-p on the renormalised top-k distribution, every row
    with its own values, in one pass: [B, V] -> renormalised log-probs [B, V]. Greedy rows
    keep their distribution (temperature 1, no truncation). Equal to
    `composition.sampling_logprobs` row by row (the per-row reference)."""
    scaled = torch.log_softmax(logprobs / meta.temperature[:, None], dim=-1)
    if not (meta.uses_top_k or meta.uses_top_p):
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
    kept = torch.zeros_like(keep).scatter(-1, order, keep)
    return torch.log_softmax(scaled.masked_fill(~kept, float("-inf")), dim=-1)
