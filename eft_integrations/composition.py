"""The maths of emulated fine-tuning, in one small place.

Reference: Mitchell et al., "An Emulator for Fine-Tuning Large Language Models using Small
Language Models", ICLR 2024 (EFT). For every next token,

    log p_eft(y) = log p_base(y) + sum_b w_b * (log p_ft_b(y) - log p_ref_b(y)) + const

where every term is a log_softmax of the model's logits, and the constant renormalises over the
vocabulary. The same algebra is classifier-free guidance (`uncond + s * (cond - uncond)`).

Conservative decoding (EFT paper, section 4.4) keeps the fine-tuning-scale log-prob for tokens
outside the top-p set of the fine-tuning-scale distribution, and uses the full EFT log-prob
inside it.

Sampling transforms (temperature, top-k, top-p) act on the composed distribution, after
composition. Nothing here modifies its inputs in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "compose_logprobs",
    "finetuning_scale_logprobs",
    "sample_tokens",
    "sampling_logprobs",
    "top_k_mask",
    "top_p_mask",
]


def _weighted_deltas(
    finetuned_logprobs: Sequence[torch.Tensor],
    reference_logprobs: Sequence[torch.Tensor],
    weights: torch.Tensor,
) -> torch.Tensor:
    """sum_b w_b * (log p_ft_b - log p_ref_b), shape [B, V]. `weights` is [B, n_behaviors]."""
    total = torch.zeros_like(finetuned_logprobs[0])
    for b, (ft, ref) in enumerate(zip(finetuned_logprobs, reference_logprobs, strict=True)):
        total = total + weights[:, b : b + 1] * (ft - ref)
    return total


def finetuning_scale_logprobs(
    finetuned_logprobs: Sequence[torch.Tensor],
    reference_logprobs: Sequence[torch.Tensor],
    weights: torch.Tensor,
) -> torch.Tensor:
    """The fine-tuning-scale distribution used by conservative decoding, log-probs [B, V].

    It is EFT with the base replaced by the references: log p_ref + sum_b w_b (log p_ft_b -
    log p_ref_b), renormalised, where log p_ref is the mean of the distinct references' log-probs
    (when every behavior shares one reference, as in the usual setups, that reference exactly).
    With one behavior at weight 1 it is the fine-tuned (small chat) model itself.
    """
    unique_refs: list[torch.Tensor] = []
    for ref in reference_logprobs:
        if not any(ref is seen for seen in unique_refs):
            unique_refs.append(ref)
    ref_mean = torch.stack(unique_refs).mean(dim=0)
    deltas = _weighted_deltas(finetuned_logprobs, reference_logprobs, weights)
    return torch.log_softmax(ref_mean + deltas, dim=-1)


def top_p_mask(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask [B, V] of the smallest set of tokens whose probability reaches `top_p`.

    The most likely token is always kept, so the set is never empty.
    """
    sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True)
    cumulative = sorted_lp.exp().cumsum(dim=-1)
    # keep a token if the mass strictly before it is still below top_p
    keep_sorted = (cumulative - sorted_lp.exp()) < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def top_k_mask(logprobs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean mask [B, V] of the `top_k` most likely tokens (ties broken by index order)."""
    k = min(top_k, logprobs.shape[-1])
    indices = torch.topk(logprobs, k, dim=-1).indices
    return torch.zeros_like(logprobs, dtype=torch.bool).scatter(-1, indices, True)


def compose_logprobs(
    base_logits: torch.Tensor,
    finetuned_logits: Sequence[torch.Tensor],
    reference_logits: Sequence[torch.Tensor],
    weights: torch.Tensor,
    conservative_top_p: float | None = None,
) -> torch.Tensor:
    """Compose next-token log-probs with EFT. Returns normalised log-probs [B, V] (float32).

    Args:
        base_logits: [B, V] logits of the base (pre-training-scale) model.
        finetuned_logits: one [B, V] tensor per behavior, the fine-tuned models' logits.
        reference_logits: one [B, V] tensor per behavior, the fine-tuned models' reference bases.
            The same tensor object may appear for several behaviors (a shared reference).
        weights: [B, n_behaviors] behavior weights, one row per sequence.
        conservative_top_p: if set, tokens outside the top-p set of the fine-tuning-scale
            distribution keep its log-prob instead of the EFT log-prob (paper section 4.4).
    """
    base_lp = torch.log_softmax(base_logits.float(), dim=-1)
    if not finetuned_logits:
        return base_lp
    # log_softmax each distinct tensor once; a shared reference keeps its identity
    cache: dict[int, torch.Tensor] = {}

    def lp(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in cache:
            cache[id(t)] = torch.log_softmax(t.float(), dim=-1)
        return cache[id(t)]

    ft_lps = [lp(t) for t in finetuned_logits]
    ref_lps = [lp(t) for t in reference_logits]
    weights = weights.to(device=base_lp.device, dtype=base_lp.dtype)
    eft = torch.log_softmax(base_lp + _weighted_deltas(ft_lps, ref_lps, weights), dim=-1)
    if conservative_top_p is None:
        return eft
    small = finetuning_scale_logprobs(ft_lps, ref_lps, weights)
    inside = top_p_mask(small, conservative_top_p)
    return torch.log_softmax(torch.where(inside, eft, small), dim=-1)


def sampling_logprobs(
    logprobs: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p to composed log-probs; renormalised [B, V].

    Temperature must be > 0 here (greedy decoding takes the argmax and never calls this).
    """
    scaled = torch.log_softmax(logprobs / temperature, dim=-1)
    if top_k > 0:
        scaled = scaled.masked_fill(~top_k_mask(scaled, top_k), float("-inf"))
    if top_p < 1.0:
        scaled = scaled.masked_fill(~top_p_mask(scaled, top_p), float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def sample_tokens(
    logprobs: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row [B] from composed log-probs: argmax at temperature 0."""
    if temperature == 0.0:
        return logprobs.argmax(dim=-1)
    probs = sampling_logprobs(logprobs, temperature, top_k, top_p).exp()
    # torch.Generator lives on one device; sample there, then move back
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logprobs.device)
