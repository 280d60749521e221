"""The maths of emulated fine-tuning, in one small place.

Reference: Mitchell et al., "An Emulator for Fine-Tuning Large Language Models using Small
Language Models", ICLR 2024 (EFT). For every next token,

    log p_eft(y) = log p_base(y) + sum_b w_b * (log p_ft_b(y) - log p_ref_b(y)) + const

where every term is a log_softmax of the model's logits, and the constant renormalises over the
vocabulary. The same algebra is classifier-free guidance (`uncond + s * (cond - uncond)`).

The fine-tuning-scale distribution (what the behaviors give without the large base) is

    log p_fts(y) = log p_ref*(y) + sum_b w_b * (log p_ft_b(y) - log p_ref_b(y)) + const

where p_ref* is the reference of the active behaviors (weight != 0): the mean of their distinct
references' log-probs. A behavior at weight 0 has no effect anywhere.

Conservative decoding (EFT paper, section 4.4) applies the scale ratio p_base / p_ref* only
inside the top-p set of p_fts, then renormalises once:

    score(y) = log p_fts(y) + 1[y in top_p(p_fts)] * (log p_base(y) - log p_ref*(y))

so p = 1 is plain EFT, and a row without active behaviors decodes the base alone.

Sampling transforms follow transformers' order and semantics: temperature, then top-k, then
top-p on the renormalised top-k distribution. Nothing here modifies its inputs in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "compose_logprobs",
    "draft_logprobs",
    "finetuning_scale_logprobs",
    "finite_rows",
    "sample_tokens",
    "sampling_logprobs",
    "top_k_mask",
    "top_p_mask",
    "where_finite",
]


def _weighted_deltas(
    finetuned_logprobs: Sequence[torch.Tensor],
    reference_logprobs: Sequence[torch.Tensor],
    weights: torch.Tensor,
) -> torch.Tensor:
    """sum_b w_b * (log p_ft_b - log p_ref_b), shape [B, V]. `weights` is [B, n_behaviors].

    A term with w_b = 0 is exactly 0, even where the delta is not finite (0 * inf is nan).
    """
    total = torch.zeros_like(finetuned_logprobs[0])
    for b, (ft, ref) in enumerate(zip(finetuned_logprobs, reference_logprobs, strict=True)):
        w = weights[:, b : b + 1]
        total = total + torch.where(w != 0, w * (ft - ref), 0.0)
    return total


def _distinct_references(
    reference_logprobs: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct reference tensors (by identity: a shared reference is one tensor) and, per
    behavior, the index of its reference among them."""
    distinct: list[torch.Tensor] = []
    group: list[int] = []
    for ref in reference_logprobs:
        index = next((g for g, seen in enumerate(distinct) if seen is ref), None)
        if index is None:
            index = len(distinct)
            distinct.append(ref)
        group.append(index)
    return distinct, group


def _active_reference(
    reference_logprobs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    fallback: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_ref* [B, V] and which rows have an active behavior [B, 1], per row.

    log p_ref*(row) = mean over the distinct references r of the behaviors with w_b(row) != 0
    of log p_r. A row with no active behavior takes `fallback` (the base, in composition), or
    the mean of all distinct references when no fallback is given.
    """
    distinct, group = _distinct_references(reference_logprobs)
    active = weights != 0  # [B, n_behaviors]
    total = torch.zeros_like(distinct[0])
    count = torch.zeros_like(weights[:, :1])
    for g, ref in enumerate(distinct):
        members = [b for b, owner in enumerate(group) if owner == g]
        on = active[:, members].any(dim=-1, keepdim=True)  # [B, 1]
        total = total + torch.where(on, ref, 0.0)
        count = count + on.to(count.dtype)
    any_active = count > 0
    ref_star = total / count.clamp(min=1)
    if fallback is None:
        fallback = torch.stack(distinct).mean(dim=0)
    return torch.where(any_active, ref_star, fallback), any_active


def finetuning_scale_logprobs(
    finetuned_logprobs: Sequence[torch.Tensor],
    reference_logprobs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    fallback: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fine-tuning-scale distribution p_fts, log-probs [B, V].

        log p_fts = log_softmax(log p_ref* + sum_b w_b (log p_ft_b - log p_ref_b))

    where log p_ref* is, per row, the mean of the distinct references of the behaviors whose
    weight is not 0 (one shared reference: that reference exactly). With one behavior at weight
    1 it is the fine-tuned (small chat) model itself. Rows with every weight 0 use `fallback`
    log-probs [B, V] as p_ref* (default: the mean of all distinct references).

    Inputs are log-probs; a reference shared by several behaviors is the same tensor object.
    """
    ref_star, _ = _active_reference(reference_logprobs, weights, fallback)
    deltas = _weighted_deltas(finetuned_logprobs, reference_logprobs, weights)
    return torch.log_softmax(ref_star + deltas, dim=-1)


def draft_logprobs(
    finetuned_logprobs: Sequence[torch.Tensor], weights: torch.Tensor
) -> torch.Tensor:
    """The default draft distribution q of speculative EFT, from the fine-tuned models alone.

        log q = log_softmax(sum_b a_b log p_ft_b),   a = max(w, 0) / sum(max(w, 0))

    a geometric mixture of the fine-tuned models with positive weight; rows without one draft
    from the first behavior's fine-tuned model. For one behavior at weight 1, q is that
    fine-tuned model itself: the paper's small chat model. Any q keeps speculative decoding
    exact; this one needs no reference model, so references only score drafts in parallel.
    Returns log-probs [B, V]; `weights` is [B, n_behaviors].
    """
    positive = weights.clamp(min=0)
    total = positive.sum(dim=-1, keepdim=True)  # [B, 1]
    first = torch.zeros_like(positive)
    first[:, 0] = 1.0
    mix = torch.where(total > 0, positive / total.clamp(min=1e-30), first)
    score = torch.zeros_like(finetuned_logprobs[0])
    for b, ft in enumerate(finetuned_logprobs):
        a = mix[:, b : b + 1]
        score = score + torch.where(a != 0, a * ft, 0.0)  # 0 * -inf would be nan
    return torch.log_softmax(score, dim=-1)


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    # cumulative sums over a large vocabulary drift in float32; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def top_p_mask(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask [B, V] of the smallest set of most likely tokens whose mass reaches `top_p`.

    Token y (in descending order of probability, ties by index) is kept iff the mass of the
    tokens before it is < top_p * total, which is transformers' TopPLogitsWarper rule (drop a
    token when the ascending cumulative mass up to it is <= 1 - top_p). The inputs need not be
    normalised (the total is measured), the most likely token is always kept, and top_p >= 1
    keeps every token exactly.
    """
    if top_p >= 1.0:
        return torch.ones_like(logprobs, dtype=torch.bool)
    sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    sorted_lp = sorted_lp.to(_accumulation_dtype(logprobs.device))
    probs = (sorted_lp - sorted_lp[..., :1]).exp()  # relative to the largest: no underflow
    cumulative = probs.cumsum(dim=-1)
    before = cumulative - probs
    keep_sorted = before < top_p * cumulative[..., -1:]
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def top_k_mask(logprobs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean mask [B, V] of the `top_k` most likely tokens (ties broken by index order)."""
    k = min(top_k, logprobs.shape[-1])
    indices = torch.topk(logprobs, k, dim=-1).indices
    return torch.zeros_like(logprobs, dtype=torch.bool).scatter(-1, indices, True)


def _conservative(
    base_lp: torch.Tensor,
    ft_lps: Sequence[torch.Tensor],
    ref_lps: Sequence[torch.Tensor],
    weights: torch.Tensor,
    top_p: float,
) -> torch.Tensor:
    """score = log p_fts + 1[top_p(p_fts)] * (log p_base - log p_ref*), one log_softmax.

    Rows without an active behavior use the base as p_ref*, so p_fts is the base and the score
    is the base alone.
    """
    ref_star, _ = _active_reference(ref_lps, weights, base_lp)
    deltas = _weighted_deltas(ft_lps, ref_lps, weights)
    fts = torch.log_softmax(ref_star + deltas, dim=-1)
    inside = top_p_mask(fts, top_p)
    # where(), not a product: 0 * (-inf - x) would be nan outside the set
    score = fts + torch.where(inside, base_lp - ref_star, 0.0)
    return torch.log_softmax(score, dim=-1)


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
        weights: [B, n_behaviors] behavior weights, one row per sequence; a behavior at
            weight 0 has no effect on its row.
        conservative_top_p: if set, the scale ratio p_base / p_ref* applies only inside the
            top-p set of the fine-tuning-scale distribution (paper section 4.4); 1.0 is plain
            EFT.
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
    if conservative_top_p is not None and conservative_top_p < 1.0:
        return _conservative(base_lp, ft_lps, ref_lps, weights, conservative_top_p)
    # plain EFT (conservative_top_p = 1 keeps every token inside: exactly this)
    return torch.log_softmax(base_lp + _weighted_deltas(ft_lps, ref_lps, weights), dim=-1)


def finite_rows(logprobs: torch.Tensor) -> torch.Tensor:
    """[...] bool: whether each distribution [..., V] can be sampled: no nan, no +inf, and
    at least one token with a finite score (a nan anywhere makes the logsumexp nan)."""
    return torch.isfinite(torch.logsumexp(logprobs, dim=-1))


def where_finite(logprobs: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """`logprobs` [..., V] with the rows that are not `ok` [...] replaced by a uniform
    distribution: they will be failed, and until then nothing downstream may see a nan (a
    nan in `torch.multinomial` is an error on the CPU and a device assert on CUDA)."""
    return torch.where(ok[..., None], logprobs, torch.zeros_like(logprobs))


def sampling_logprobs(
    logprobs: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p to composed log-probs; renormalised [B, V].

    As in transformers: log_softmax(lp / T), keep the top_k most likely, renormalise, then keep
    the top-p set of that renormalised distribution. Temperature must be > 0 here (greedy
    decoding takes the argmax and never calls this).
    """
    scaled = torch.log_softmax(logprobs / temperature, dim=-1)
    if top_k > 0:
        scaled = torch.log_softmax(
            scaled.masked_fill(~top_k_mask(scaled, top_k), float("-inf")), dim=-1
        )
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
