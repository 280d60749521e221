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

from dataclasses import dataclass, field

import torch

from .composition import sample_tokens, sampling_logprobs
from .ensemble import Ensemble
from .kv_state import KVState

__all__ = ["SpeculativeRun", "accept_draft"]


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


@dataclass
class SpeculativeStats:
    """Drafting statistics of one request."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class SpeculativeRun:
    """One request decoded in speculative rounds, on its own single-row caches.

    Invariant between rounds: every drafting model has read all emitted tokens but `pending`
    (the last one), and the base has read all but `pending`; the next round feeds `pending`
    to the drafting models, and to the base together with the new drafts (one base forward
    per round).
    """

    ensemble: Ensemble
    states: list[KVState]  # one single-row state per distinct model
    logits: list[torch.Tensor]  # next-token logits [1, V] per model, right after prefill
    weights: torch.Tensor  # [1, n_behaviors]
    conservative_top_p: float | None
    temperature: float
    top_k: int
    top_p: float
    k: int
    generator: torch.Generator
    pending: int | None = None
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)

    def _transform(self, lp: torch.Tensor) -> torch.Tensor:
        """The sampling transforms, applied alike to the target p and the draft q."""
        if self.temperature == 0.0:
            return lp
        return sampling_logprobs(lp, self.temperature, self.top_k, self.top_p)

    def round(self, tokens_left: int) -> list[int]:
        """Draft up to k tokens, verify them with one base forward; the emitted tokens."""
        ens, states = self.ensemble, self.states
        greedy = self.temperature == 0.0
        drafting = ens.drafting_models
        if self.pending is None:
            draft_logits = {i: self.logits[i] for i in drafting}  # each [1, V]
            base_rows = [self.logits[ens.base]]
        else:
            step = torch.tensor([[self.pending]])
            draft_logits = {i: ens.feed(i, states[i], step)[:, -1] for i in drafting}
            base_rows = []
        k_round = max(0, min(self.k, tokens_left - 1))
        # draft: the fine-tuning-scale models propose k_round tokens, one at a time
        history = [draft_logits]
        drafts: list[int] = []
        draft_lps = []
        for _ in range(k_round):
            q = self._transform(ens.finetuning_scale(history[-1], self.weights))  # [1, V]
            token = int(sample_tokens(q, 0.0 if greedy else 1.0, generator=self.generator))
            drafts.append(token)
            draft_lps.append(q[0])
            step = torch.tensor([[token]])
            history.append({i: ens.feed(i, states[i], step)[:, -1] for i in drafting})
        # verify: the base scores pending + drafts in one forward
        base_inputs = ([self.pending] if self.pending is not None else []) + drafts
        if base_inputs:
            out = ens.feed(ens.base, states[ens.base], torch.tensor([base_inputs]),
                           keep=len(base_inputs))  # [1, n, V]
            base_rows += [out[:, j] for j in range(out.shape[1])]
        targets = torch.cat([
            self._transform(ens.compose(
                [base_rows[j] if i == ens.base else history[j].get(i)
                 for i in range(len(ens.models))],
                self.weights, [self.conservative_top_p],
            ))
            for j in range(k_round + 1)
        ])  # [k_round + 1, V]
        draft_stack = torch.stack(draft_lps) if draft_lps else targets[:0]
        emitted = accept_draft(targets, draft_stack, drafts, greedy, self.generator)
        rejected = k_round - (len(emitted) - 1)
        for i in [*drafting, ens.base]:  # roll every context back to the accepted prefix
            states[i].rewind(rejected)
        self.stats.rounds += 1
        self.stats.drafted += k_round
        self.stats.accepted += len(emitted) - 1
        self.pending = emitted[-1]
        return emitted
