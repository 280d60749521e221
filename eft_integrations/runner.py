"""The model runner: the only code that runs models, and the owner of the rows' KV state.

It holds two batches of rows in flight, each aligned with every distinct model's `KVState`:
the plain rows (one token per step, with the next-token logits of every model) and the
speculative rows (several tokens per round, see `speculative.py`). Its verbs:

    admit     prefill new rows (together; one at a time if that raises) and add them
    decode    drop the rows that left, feed every other row its token (one forward per model)
    round     one speculative draft-verify round for the speculative rows
    drop      rows leave (cancelled, finished, failed); their cache rows are freed

A batched forward that raises is never the whole batch's failure: the rows are prefilled again
from their own tokens, together and then one at a time, and only the rows that fail alone fail
(through the `fail` callback); speculative rows then run one round alone before rejoining,
so a row whose drafts break a model fails alone too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .ensemble import Ensemble
from .kv_state import KVState
from .request import Request
from .sampler import Sampler, not_finite
from .speculative import DraftPlan, SpeculativeRow, speculative_round

__all__ = ["ModelRunner", "RoundOutput"]

logger = logging.getLogger(__name__)

Fail = Callable[[Request, BaseException], None]


@dataclass
class _Batch:
    """Rows in flight, aligned with every model's state (and, for plain rows, the logits of
    their next token)."""

    rows: list[Request] = field(default_factory=list)
    states: list[KVState] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] per model

    def add(self, rows: list[Request], states: list[KVState], logits: list[torch.Tensor]) -> None:
        if not rows:
            return
        if not self.rows:
            self.rows, self.states, self.logits = list(rows), states, list(logits)
            return
        for mine, theirs in zip(self.states, states, strict=True):
            mine.merge(theirs)
        if logits:
            self.logits = [torch.cat([a, b]) for a, b in zip(self.logits, logits, strict=True)]
        self.rows += rows

    def drop(self, gone: Collection[Request]) -> list[int]:
        """Rows in `gone` leave (their cache rows are freed); the kept indices."""
        keep = [b for b, r in enumerate(self.rows) if r not in gone]
        if len(keep) == len(self.rows):
            return keep
        self.rows = [self.rows[b] for b in keep]
        if not self.rows:
            self.clear()
            return keep
        for state in self.states:
            state.select(torch.tensor(keep, dtype=torch.long, device=state.attention_mask.device))
        if self.logits:
            index = torch.tensor(keep, dtype=torch.long, device=self.logits[0].device)
            self.logits = [x.index_select(0, index) for x in self.logits]
        return keep

    def clear(self) -> None:
        self.rows, self.states, self.logits = [], [], []

    def cached_tokens(self) -> int:
        return sum(s.num_tokens() for s in self.states)


class _View(NamedTuple):
    """What a row's models read when it is (re)built: both prompt views and the tokens it
    may still add after them."""

    chat_ids: list[int]
    base_ids: list[int]
    room: int


def _prompt_view(request: Request) -> _View:
    """A new row: its prompt."""
    return _View(request.chat_ids, request.base_ids, request.row.tokens_left)


def _generated_view(request: Request) -> _View:
    """A plain row rebuilt: its prompt and every token it has generated."""
    tokens = request.row.token_ids
    return _View(request.chat_ids + tokens, request.base_ids + tokens, request.row.tokens_left)


def _pending_view(request: Request) -> _View:
    """A speculative row rebuilt: everything but its pending token (the round feeds it)."""
    tokens = request.row.token_ids[:-1]
    return _View(request.chat_ids + tokens, request.base_ids + tokens, request.row.tokens_left + 1)


@dataclass
class RoundOutput:
    """What a speculative round emitted per row, and the rows that failed."""

    tokens: dict[Request, list[int]] = field(default_factory=dict)
    failed: dict[Request, Exception] = field(default_factory=dict)


class ModelRunner:
    """Runs the ensemble over the rows in flight (see the module docstring)."""

    def __init__(self, ensemble: Ensemble, sampler: Sampler, fail: Fail) -> None:
        self.ensemble = ensemble
        self.sampler = sampler
        self.plain = _Batch()
        self.speculative = _Batch()
        self._fail = fail
        self.rounds = 0
        """Speculative rounds run."""

    def cached_tokens(self) -> int:
        """Cache positions held, summed over models and batches (padding included)."""
        return self.plain.cached_tokens() + self.speculative.cached_tokens()

    def drop(self, gone: Collection[Request]) -> None:
        """These rows leave whichever batch holds them."""
        if gone:
            self.plain.drop(gone)
            self.speculative.drop(gone)

    def clear(self) -> list[Request]:
        """Every row leaves; the rows that were in flight."""
        rows = [*self.plain.rows, *self.speculative.rows]
        self.plain.clear()
        self.speculative.clear()
        return rows

    # ------------------------------------------------------------------ admit

    def admit(self, requests: Iterable[Request]) -> tuple[list[Request], list[torch.Tensor]]:
        """Prefill new rows into their batch. Returns the new speculative rows and their
        next-token logits (their first token is sampled from them)."""
        ready = []
        for request in requests:
            try:
                request.generator = _generator(self.ensemble.device, request.options.seed)
            except Exception as error:  # validated at the edge; defence in depth
                self._fail(request, error)
                continue
            ready.append(request)
        plain = [r for r in ready if r.speculative_k is None]
        speculative = [r for r in ready if r.speculative_k is not None]
        if plain:
            self.plain.add(*self._prefill(plain, _prompt_view))
        if not speculative:
            return [], []
        rows, states, logits = self._prefill(speculative, _prompt_view)
        self.speculative.add(rows, states, [])  # speculative rows keep no logits
        return rows, logits

    def _prefill(
        self, rows: list[Request], view: Callable[[Request], _View]
    ) -> tuple[list[Request], list[KVState], list[torch.Tensor]]:
        """Prefill rows together; if that raises, each row alone, so only the rows whose own
        input fails are failed. Returns the rows kept, their states and next-token logits."""
        try:
            return rows, *self._prefill_together(rows, view)
        except Exception as error:
            if len(rows) == 1:
                self._fail(rows[0], error)
                return [], [], []
            logger.warning("a prefill of %d rows failed (%r); one row at a time", len(rows), error)
        kept = _Batch()
        for request in rows:
            try:
                kept.add([request], *self._prefill_together([request], view))
            except Exception as error:
                self._fail(request, error)
        return kept.rows, kept.states, kept.logits

    def _prefill_together(
        self, rows: list[Request], view: Callable[[Request], _View]
    ) -> tuple[list[KVState], list[torch.Tensor]]:
        views = [view(r) for r in rows]
        return self.ensemble.prefill(
            [v.chat_ids for v in views], [v.base_ids for v in views], [v.room for v in views]
        )

    # ------------------------------------------------------------------ decode

    def decode(self, tokens: torch.Tensor, gone: Collection[Request]) -> None:
        """The rows in `gone` leave; every other plain row reads its token (`tokens` [B],
        aligned with the rows before they left); their next logits are kept."""
        batch = self.plain
        keep = batch.drop(gone)
        if not batch.rows:
            return
        if len(keep) < len(tokens):
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)]
        try:
            batch.logits = self.ensemble.step(batch.states, tokens)
        except Exception as error:
            logger.warning(
                "a decode forward of %d rows failed (%r); rebuilding them", len(batch.rows), error
            )
            rows = batch.rows
            batch.clear()  # prefilled again with the token just sampled, and without it
            batch.add(*self._prefill(rows, _generated_view))

    # ------------------------------------------------------------------ speculative rounds

    def start_speculative(
        self, rows: list[Request], first_tokens: list[int], adaptive: bool
    ) -> None:
        """New speculative rows: their first token (sampled from the prefill) is pending."""
        for request, token in zip(rows, first_tokens, strict=True):
            assert request.speculative_k is not None  # only speculative rows come here
            request.speculative = SpeculativeRow(request.speculative_k, adaptive=adaptive)
            request.pending = token

    def round(self) -> RoundOutput:
        """One draft-and-verify round for every speculative row; if a forward raises, every
        row is rebuilt and runs one round alone, so a row whose drafts break a model fails
        alone (generators are rewound, so seeded rows draw as they would have)."""
        batch = self.speculative
        saved = [r.generator.get_state() if r.generator is not None else None for r in batch.rows]
        shared = self.sampler.generator.get_state()
        try:
            return self._round(batch)
        except Exception as error:
            logger.warning(
                "a speculative round of %d rows failed (%r); one row at a time",
                len(batch.rows),
                error,
            )
        self.sampler.generator.set_state(shared)
        rows = batch.rows
        batch.clear()
        out = RoundOutput()
        for request, state in zip(rows, saved, strict=True):
            if request.generator is not None and state is not None:
                request.generator.set_state(state)
            alone = _Batch()
            alone.add(*self._prefill([request], _pending_view))
            if not alone.rows:
                continue  # its own prefill failed: already answered
            try:
                result = self._round(alone)
            except Exception as error:
                self._fail(request, error)
                continue
            out.tokens.update(result.tokens)
            out.failed.update(result.failed)
            batch.add(alone.rows, alone.states, [])
        return out

    def _round(self, batch: _Batch) -> RoundOutput:
        self.rounds += 1
        plans = []
        for request in batch.rows:
            assert request.speculative is not None and request.pending is not None
            plans.append(
                DraftPlan(
                    pending=request.pending,
                    k=request.speculative.plan(request.row.tokens_left),
                    weights=request.weight_row,
                    conservative_top_p=request.options.conservative_top_p,
                )
            )
        meta = self.sampler.metadata(batch.rows)
        speculative_round(self.ensemble, batch.states, plans, meta, self.sampler.generator)
        out = RoundOutput()
        for request, plan in zip(batch.rows, plans, strict=True):
            if plan.failed:
                out.failed[request] = not_finite(request, composed=True)
                continue
            request.speculative.update(plan.k, plan.accepted)  # type: ignore[union-attr]
            request.pending = plan.emitted[-1]
            out.tokens[request] = plan.emitted
        return out


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    """A seeded request's own random source (None without a seed: the sampler's shared one)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
