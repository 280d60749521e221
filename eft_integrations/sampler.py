"""The sampler: composed log-probs -> one token per row, for the whole batch at once.

Per step, for every row (nano-vllm's and vLLM v1's sampler, with EFT's composition first):

    compose      log p_eft from every model's logits at the row's weights (`Ensemble.compose`)
    process      logit_bias and the repetition / presence / frequency penalties
    constrain    -inf outside the row's grammar mask, renormalised
    sample       argmax for greedy rows; otherwise temperature -> top-k -> top-p (transformers'
                 order and semantics), then a draw: rows with their own seed draw one by one
                 from their own generator (a seeded row samples as it would alone); the
                 others draw together from the sampler's generator

The per-row options become tensors once per batch composition (`SamplingMetadata`), not once
per step. Grammar masks for a step are computed ahead, on the sampler's worker thread, while
the models run (`prefetch_masks`, called before each forward; llguidance and torch both release
the GIL), so a constrained row adds little to the step's critical path.

A row fails alone (`SamplerOutput.failed`) when its constraint raises or answers a
malformed mask, or when its distribution is not finite (nan, +inf, or no token left); its
batch-mates are sampled as if it were not there. One host sync per step: the tokens and the
finiteness flags together.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .composition import finite_rows, where_finite
from .ensemble import Ensemble
from .errors import EFTRequestError
from .logprobs import token_logprobs
from .options import TokenLogprob
from .request import Request
from .sampling import SamplingMetadata, sampling_transform, score_processors

__all__ = ["Sampler", "SamplerOutput"]


@dataclass
class SamplerOutput:
    """One token per row, and the rows that failed."""

    tokens: torch.Tensor  # [B] on the composing device
    token_ids: list[int]  # the same on the host
    failed: dict[Request, Exception] = field(default_factory=dict)
    logprobs: dict[Request, list[TokenLogprob]] = field(default_factory=dict)
    """The chosen token's log-probs, for the rows whose request asked for them."""


class Sampler:
    """Composes, constrains and samples the batch (see the module docstring)."""

    def __init__(self, ensemble: Ensemble) -> None:
        self.ensemble = ensemble
        self.device = ensemble.device
        self.generator = torch.Generator(device=self.device)
        """The random source of rows without a seed of their own."""
        self.generator.manual_seed(secrets.randbits(63))
        self._metadata: tuple[tuple[int, ...], SamplingMetadata] | None = None
        self._masks: dict[Request, Future[Any]] = {}  # next step's masks, being computed
        self._mask_worker: ThreadPoolExecutor | None = None

    def prefetch_masks(self, rows: Sequence[Request], *, whole_batch: bool = False) -> None:
        """Start computing the next step's grammar masks of `rows` on the worker thread (call
        it after the rows' constraints took their last token, before the models run). With
        `whole_batch`, `rows` are every row still decoding: masks prefetched for others
        belong to rows that left, and are dropped."""
        if whole_batch:
            self._masks.clear()
        constrained = [r for r in rows if r.row.constraint is not None and not r.row.finished]
        if not constrained:
            return
        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="eft-masks")
        vocab = self.ensemble.vocab_size
        for request in constrained:
            constraint = request.row.constraint
            assert constraint is not None
            self._masks[request] = self._mask_worker.submit(constraint.allowed_mask, vocab)

    def metadata(self, rows: Sequence[Request]) -> SamplingMetadata:
        """The batch's option tensors, rebuilt only when its rows change."""
        key = tuple(r.serial for r in rows)
        if self._metadata is None or self._metadata[0] != key:
            meta = SamplingMetadata.of(rows, self.ensemble.vocab_size, self.device)
            self._metadata = (key, meta)
        return self._metadata[1]

    def drop_masks(self) -> None:
        """Wait for the masks being computed and drop them (after a failed step: the rows'
        constraints are then touched by the engine thread alone)."""
        for future in self._masks.values():
            future.exception()  # waits; the mask or its error is not needed any more
        self._masks.clear()

    def sample(self, logits: list[torch.Tensor], rows: Sequence[Request]) -> SamplerOutput:
        """One token per row from every model's next-token logits [B, V]."""
        weights = torch.cat([r.weight_row for r in rows]).to(self.device)  # [B, W]
        composed = self.ensemble.compose(
            logits, weights, [r.options.conservative_top_p for r in rows]
        )  # [B, V]
        logprobs = composed
        meta = self.metadata(rows)
        if meta.bias is not None or meta.uses_penalties:
            history = (
                _history(rows, logprobs.shape[-1], self.device) if meta.uses_penalties else None
            )
            logprobs = score_processors(logprobs, meta, history)
        composed_ok = finite_rows(logprobs)  # [B]
        failed: dict[int, Exception] = {}
        masks = {r: self._masks.pop(r) for r in rows if r in self._masks}
        logprobs = _constrain(logprobs, rows, masks, failed)
        ok = finite_rows(logprobs) & composed_ok
        tokens = self.draw(where_finite(logprobs, ok), meta, failed)  # [B]
        # the step's one host sync: the tokens and which rows could be sampled
        token_ids, composed_ok_, ok_ = torch.stack([tokens, composed_ok.long(), ok.long()]).tolist()
        for b, request in enumerate(rows):
            if not ok_[b] and b not in failed:
                failed[b] = not_finite(request, composed=bool(composed_ok_[b]))
        out = SamplerOutput(tokens, token_ids, {rows[b]: e for b, e in failed.items()})
        out.logprobs = _chosen_logprobs(composed, tokens, rows, out.failed)
        return out

    def draw(
        self, logprobs: torch.Tensor, meta: SamplingMetadata, failed: dict[int, Exception]
    ) -> torch.Tensor:
        """Tokens [B] from log-probs [B, V]: argmax for greedy rows, a draw for the others."""
        greedy = logprobs.argmax(dim=-1)
        if meta.all_greedy:
            return greedy
        probs = sampling_transform(logprobs, meta).exp()
        tokens = greedy.clone()
        if meta.shared.numel():
            drawn = torch.multinomial(
                probs.index_select(0, meta.shared), 1, generator=self.generator
            )
            tokens.index_copy_(0, meta.shared, drawn[:, 0])
        for b in meta.seeded:  # a seeded row draws from its own stream, as it would alone
            if b in failed:
                continue
            generator = meta.generators[b]
            assert generator is not None
            try:
                row = probs[b : b + 1].to(generator.device)
                tokens[b] = torch.multinomial(row, 1, generator=generator)[0, 0].to(tokens.device)
            except Exception as error:
                failed[b] = error
        return tokens


def _chosen_logprobs(
    composed: torch.Tensor,
    tokens: torch.Tensor,
    rows: Sequence[Request],
    failed: Mapping[Request, Exception],
) -> dict[Request, list[TokenLogprob]]:
    """The composed log-probs [B, V] of each chosen token [B] and its alternatives, for the
    rows that asked for them (one more host transfer, only when a row did)."""
    wanted = [b for b, r in enumerate(rows) if r.options.logprobs is not None and r not in failed]
    if not wanted:
        return {}
    index = torch.tensor(wanted, device=composed.device)
    entries = token_logprobs(
        composed.index_select(0, index),
        tokens.index_select(0, index),
        [rows[b].options.logprobs or 0 for b in wanted],
    )
    return {rows[b]: [entry] for b, entry in zip(wanted, entries, strict=True)}


def _history(
    rows: Sequence[Request], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen [B, V]: in the prompt or the completion, counts [B, V]: in the completion) for
    the penalties, built from the rows that use them (others stay empty). Rebuilt each step
    from the rows' tokens: the cost is one pass over those tokens."""
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool)
    counts = torch.zeros(len(rows), vocab_size)
    for b, request in enumerate(rows):
        if not request.options.uses_history:
            continue
        completion = torch.tensor(request.row.token_ids, dtype=torch.long)
        counts[b] = torch.bincount(completion, minlength=vocab_size)[:vocab_size].float()
        seen[b, torch.tensor(request.chat_ids, dtype=torch.long)] = True
        seen[b] |= counts[b] > 0
    return seen.to(device), counts.to(device)


def _constrain(
    logprobs: torch.Tensor,
    rows: Sequence[Request],
    masks: dict[Request, Future[Any]],
    failed: dict[int, Exception],
) -> torch.Tensor:
    """Mask the tokens each row's constraint forbids, and renormalise those rows; a
    constraint that raises or answers a malformed mask fails its row alone. `masks` holds the
    masks prefetched while the models ran; a row without one computes its mask here."""
    masked = logprobs
    vocab = logprobs.shape[-1]
    for b, request in enumerate(rows):
        constraint = request.row.constraint
        if constraint is None:
            continue
        try:
            future = masks.get(request)
            mask = future.result() if future is not None else constraint.allowed_mask(vocab)
            allowed = _checked_mask(mask, vocab)
        except Exception as error:
            failed[b] = error
            continue
        if allowed is None:
            continue
        allowed = allowed.to(device=logprobs.device, non_blocking=True)
        if masked is logprobs:
            masked = logprobs.clone()
        masked[b] = torch.log_softmax(logprobs[b].masked_fill(~allowed, float("-inf")), -1)
    return masked


def _checked_mask(mask: Any, vocab_size: int) -> torch.Tensor | None:
    """A constraint's answer as a bool [V] mask, or a clear error naming what is wrong."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise EFTRequestError(
            f"the constraint's allowed_mask returned {type(mask).__name__}; it must return a "
            f"bool tensor of shape [{vocab_size}] or None",
            param="constraints",
        )
    if tuple(mask.shape) != (vocab_size,):
        raise EFTRequestError(
            f"the constraint's allowed_mask returned shape {tuple(mask.shape)}; it must be "
            f"[{vocab_size}] (the vocabulary size)",
            param="constraints",
        )
    return mask.to(torch.bool)


def not_finite(request: Request, *, composed: bool) -> EFTRequestError:
    """Why a row's next-token distribution cannot be sampled: its composition overflowed
    (`composed` False), or its constraint left no token."""
    at = len(request.row.token_ids)
    if not composed:
        return EFTRequestError(
            f"the EFT distribution of this request is not finite at token {at} (weights "
            f"{request.weights}, temperature {request.options.temperature}): the weights "
            "overflow float32 when multiplied by the models' log-prob deltas; use smaller "
            "weights",
            param="weights",
        )
    return EFTRequestError(
        f"the request's constraint allows no token at token {at}: its grammar cannot continue "
        "here; check the grammar, schema or tool definitions",
        param="constraints",
    )
