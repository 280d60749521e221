"""Exact speculative decoding for EFT, batched: the fine-tuned models draft, the rest verify.

EFT paper, section 4.3: a cheap distribution drafts k tokens and the expensive models score
all of them in one forward. Here the drafting models are the behaviors' fine-tuned models
(for one behavior at weight 1, the paper's small chat model); the base and every reference
score the pending token and the drafts in ONE forward each, so references never run per
drafted token. Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023) keeps
the output distribution exactly EFT's, whatever the draft distribution q:

    accept draft x_j with probability min(1, p_j(x_j) / q_j(x_j))
    at the first rejection, emit a sample of norm(max(0, p_j - q_j)) and end the round

where p_j is the EFT distribution (after temperature / top-k / top-p, applied alike to q, by
the sampler's batched `sampling_transform`). Greedy rows accept while the EFT argmax equals
the draft. The paper's own scheme matches seeds instead; this one is exact. Randomness as in
the sampler: a row with its own seed draws from its own generator exactly what it draws alone
(k uniforms, its drafts, one residual sample); the other sampled rows draw together.

One round for a batch of rows, each with its own number of drafts k_b (K = max k_b):

    draft     K + 1 one-token forwards [B, 1] of each drafting model: pending, x_1, ..., x_K
              (the last one scores the position after the drafts, for the bonus token)
    verify    1 forward [B, K + 1] of each scoring model over the same tokens
    accept    all rows and positions at once on the device; one host sync
    rollback  every model forgets what its row did not keep (per row: `KVState.rewind_rows`)

A row whose draft or target distribution is not finite (a weight or temperature that
overflows float32) is marked failed (`DraftPlan.failed`) and drafts from a uniform stand-in
until the round ends; its batch-mates' draws and decisions never depend on it.

Invariant between rounds: every model has read all of a row's tokens but the last one, the
row's `pending` token, which the next round feeds first. A round emits a_b + 1 tokens: the
a_b accepted drafts, then the replacement at the first rejection, or, when all k_b drafts
were accepted, a bonus token from the EFT distribution after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .composition import draft_logprobs, finite_rows, where_finite
from .ensemble import Ensemble
from .kv_state import KVState
from .logprobs import token_logprobs
from .options import TokenLogprob
from .sampling import SamplingMetadata, sampling_transform, score_processors

__all__ = ["DraftPlan", "SpeculativeRow", "speculative_round", "verify_drafts"]

MAX_ADAPTIVE_K = 16
"""The most drafts an adaptive row grows to per round."""


@dataclass
class SpeculativeRow:
    """A speculative request's drafting state: its next k, and what it has drafted so far."""

    k: int
    adaptive: bool = True
    k_max: int = MAX_ADAPTIVE_K
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    def plan(self, tokens_left: int) -> int:
        """Drafts for the next round: k, cut to the tokens the row may still emit."""
        return max(1, min(self.k, tokens_left))

    def update(self, drafted: int, accepted: int) -> None:
        """Record a round; adaptive rows grow k after full acceptance, shrink it after a
        rejection (transformers' heuristic schedule for assisted generation: +2 / -1)."""
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        if not self.adaptive:
            return
        if accepted == drafted:
            self.k = min(self.k + 2, max(self.k_max, self.k))
        else:
            self.k = max(1, self.k - 1)


@dataclass
class DraftPlan:
    """What one row brings to a round, and what the round did with it."""

    pending: int  # the last emitted token, not yet read by any model
    k: int  # drafts this round
    weights: torch.Tensor  # [1, n_behaviors]
    conservative_top_p: float | None
    emitted: list[int] = field(default_factory=list)  # filled by the round
    accepted: int = 0  # drafts the round accepted (filled by the round)
    failed: bool = False  # its q or p was not finite: it emits nothing (filled by the round)
    logprobs: int | None = None  # the request's `logprobs` option
    emitted_logprobs: list[TokenLogprob] = field(default_factory=list)  # with `logprobs`


def _transform(lp: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Every row's score processors (logit_bias; penalties are refused with speculative_k)
    and sampling transforms: lp is [B, V] or [B, N, V]."""
    if lp.dim() == 3:
        batch, n, vocab = lp.shape
        return _transform(lp.reshape(batch * n, vocab), meta.repeat(n)).reshape(lp.shape)
    return sampling_transform(score_processors(lp, meta), meta)


def _draw(
    q: torch.Tensor,
    plans: Sequence[DraftPlan],
    j: int,
    meta: SamplingMetadata,
    shared: torch.Generator,
) -> torch.Tensor:
    """Draft tokens [B] from q [B, V]: greedy rows (and rows past their own k) take the
    argmax; seeded rows draw with their own generator for their own k drafts only (so a
    row's random stream never depends on its batch-mates); the rest draw together."""
    tokens = q.argmax(-1)
    if meta.all_greedy:
        return tokens
    probs = q.exp()
    if meta.shared.numel():
        drawn = torch.multinomial(probs.index_select(0, meta.shared), 1, generator=shared)[:, 0]
        within = torch.tensor([plans[b].k > j for b in meta.shared.tolist()], device=q.device)
        tokens.index_copy_(0, meta.shared, torch.where(within, drawn, tokens[meta.shared]))
    for b in meta.seeded:
        if j < plans[b].k:
            generator = meta.generators[b]
            assert generator is not None
            tokens[b] = torch.multinomial(probs[b].to(generator.device), 1, generator=generator)[0]
    return tokens


def _uniforms(
    plans: Sequence[DraftPlan],
    k_max: int,
    meta: SamplingMetadata,
    shared: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """[B, K] acceptance uniforms: each seeded row draws exactly its k from its own generator;
    the other rows draw together; positions past a row's k are 1 (never accepted anyway)."""
    u = torch.ones(len(plans), k_max, device=device)
    if meta.shared.numel():
        u[meta.shared] = torch.rand(len(meta.shared), k_max, generator=shared, device=device)
    for b in meta.seeded:
        generator = meta.generators[b]
        assert generator is not None
        u[b, : plans[b].k] = torch.rand(
            plans[b].k, generator=generator, device=generator.device
        ).to(device)
    return u


def verify_drafts(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    plans: Sequence[DraftPlan],
    meta: SamplingMetadata,
    shared: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept/reject every draft of every row at once.

    Args:
        p: [B, K + 1, V] target (EFT) log-probs at each drafted position and the one after.
        q: [B, K, V] log-probs the drafts were drawn from.
        drafts: [B, K] drafted tokens; row b verifies only its first `plans[b].k`.
    Returns (accepted [B], next_token [B]): how many leading drafts each row keeps, and the
    token emitted after them: a sample of the residual norm(max(0, p - q)) at the first
    rejection, or of p after the last draft when every draft was accepted.
    """
    batch, k_max, _ = q.shape
    p_x = p[:, :k_max].gather(-1, drafts[..., None]).squeeze(-1).exp()  # [B, K]
    q_x = q.gather(-1, drafts[..., None]).squeeze(-1).exp()  # [B, K]
    u = _uniforms(plans, k_max, meta, shared, p.device)  # [B, K]
    # q >= p: accept with probability p/q; q < p: always accept
    accept = torch.where(meta.greedy[:, None], p[:, :k_max].argmax(-1) == drafts, u * q_x < p_x)
    limit = torch.tensor([plan.k for plan in plans], device=p.device)
    accept &= torch.arange(k_max, device=p.device) < limit[:, None]
    accepted = accept.long().cumprod(-1).sum(-1)  # [B] leading accepted drafts
    rows = torch.arange(batch, device=p.device)
    p_at = p[rows, accepted].exp()  # [B, V]
    # after full acceptance there is no draft to subtract: q is 0 there, the residual is p
    q_ext = torch.cat([q, torch.full_like(q[:, :1], float("-inf"))], dim=1)  # [B, K + 1, V]
    full = accepted == limit
    q_at = torch.where(full[:, None], 0.0, q_ext[rows, accepted].exp())
    residual = (p_at - q_at).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)  # p == q
    next_token = p_at.argmax(-1)
    if meta.shared.numel():
        drawn = torch.multinomial(residual.index_select(0, meta.shared), 1, generator=shared)
        next_token.index_copy_(0, meta.shared, drawn[:, 0])
    for b in meta.seeded:
        generator = meta.generators[b]
        assert generator is not None
        next_token[b] = torch.multinomial(residual[b].to(generator.device), 1, generator=generator)[
            0
        ]
    return accepted, next_token


def _emitted_logprobs(composed: torch.Tensor, plans: Sequence[DraftPlan]) -> None:
    """Fill `emitted_logprobs` of the rows that ask for log-probs: token j of a round was
    emitted from the EFT distribution at position j, composed[b, j] [B, K + 1, V] (an
    accepted draft and a residual sample alike: p is the distribution they follow)."""
    places = [
        (b, j, token)
        for b, plan in enumerate(plans)
        if plan.logprobs is not None and not plan.failed
        for j, token in enumerate(plan.emitted)
    ]
    if not places:
        return
    columns = zip(*places, strict=True)
    rows, positions, tokens = (torch.tensor(x, device=composed.device) for x in columns)
    entries = token_logprobs(
        composed[rows, positions], tokens, [plans[b].logprobs or 0 for b, _, _ in places]
    )
    for (b, _, _), entry in zip(places, entries, strict=True):
        plans[b].emitted_logprobs.append(entry)


def speculative_round(
    ensemble: Ensemble,
    states: list[KVState],
    plans: Sequence[DraftPlan],
    meta: SamplingMetadata,
    shared: torch.Generator,
) -> None:
    """One draft-verify-accept-rollback round for every row; fills each plan's `emitted`.
    `meta` holds the rows' sampling options; `shared` is the generator of unseeded rows."""
    batch, k_max = len(plans), max(plan.k for plan in plans)
    drafting, scoring = ensemble.drafting_models, ensemble.scoring_models
    weights = torch.cat([plan.weights for plan in plans]).to(ensemble.device)  # [B, W]
    tokens = torch.tensor([[plan.pending] for plan in plans], device=ensemble.device)  # [B, 1]
    fed = [tokens]
    # draft: the fine-tuned models propose K tokens, one forward each per token, and score
    # the position after the last draft (for the bonus token)
    draft_logits: dict[int, list[torch.Tensor]] = {i: [] for i in drafting}
    q_steps, drafts = [], []
    limit = torch.tensor([plan.k for plan in plans], device=ensemble.device)  # [B]
    ok = torch.ones(batch, dtype=torch.bool, device=ensemble.device)  # [B] finite so far
    for j in range(k_max + 1):
        # the drafters that are adapter views of one backbone draft in one forward
        for i, logits in ensemble.feed_models(drafting, states, fed[-1]).items():
            draft_logits[i].append(logits[:, -1])  # [B, V]
        if j == k_max:
            break
        finetuned = [
            torch.log_softmax(draft_logits[pair.finetuned][j].float(), -1)
            for pair in ensemble.pairs
        ]
        q = _transform(draft_logprobs(finetuned, weights), meta)  # [B, V]
        ok &= finite_rows(q) | (j >= limit)  # positions past a row's k are never read
        q = where_finite(q, ok)
        token = _draw(q, plans, j, meta, shared)  # [B]
        q_steps.append(q)
        drafts.append(token)
        fed.append(token[:, None])
    # verify: every other model scores pending + the K drafts in one forward
    window = torch.cat(fed, dim=1)  # [B, K + 1]
    scored = ensemble.feed_models(scoring, states, window, keep=k_max + 1)
    per_model = [
        torch.stack(draft_logits[i], dim=1) if i in draft_logits else scored[i]
        for i in range(len(ensemble.models))
    ]  # each [B, K + 1, V]
    vocab = per_model[0].shape[-1]
    p = ensemble.compose(
        [x.reshape(batch * (k_max + 1), vocab) for x in per_model],
        weights.repeat_interleave(k_max + 1, dim=0),
        [plan.conservative_top_p for plan in plans for _ in range(k_max + 1)],
    ).reshape(batch, k_max + 1, vocab)
    composed = p  # what the rows that ask for log-probs are told
    p = _transform(p, meta)
    read = torch.arange(k_max + 1, device=p.device) <= limit[:, None]  # [B, K + 1]
    ok &= (finite_rows(p) | ~read).all(-1)
    p = where_finite(p, ok[:, None].expand(-1, k_max + 1))
    drafted = torch.stack(drafts, dim=1)  # [B, K]
    accepted, next_token = verify_drafts(
        p, torch.stack(q_steps, dim=1), drafted, plans, meta, shared
    )
    # the round's one host sync: the decisions and tokens of every row
    accepted_, next_, drafted_ = accepted.tolist(), next_token.tolist(), drafted.tolist()
    ok_ = ok.tolist()
    forget = []
    for b, plan in enumerate(plans):
        plan.failed = not ok_[b]
        n = plan.accepted = 0 if plan.failed else accepted_[b]
        plan.emitted = [] if plan.failed else [*drafted_[b][:n], next_[b]]
        forget.append(k_max - n)  # the models read pending + K drafts; they keep pending + n
    _emitted_logprobs(composed, plans)
    for i in range(len(ensemble.models)):
        states[i].rewind_rows(forget)
