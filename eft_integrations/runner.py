"""The model runner: the only code that runs models, and the owner of the rows' KV state.

It holds the rows in flight, each batch aligned with every distinct model's `KVState` (block
tables over the models' pools, see `kv_memory.py`): the rows still prefilling their prompt,
the plain rows (one token per step, with the next-token logits of every model) and the
speculative rows (several tokens per round, see `speculative.py`). Its verbs:

    admit     new rows start prefilling (cached prefixes found); then one prefill chunk
              runs, and the rows whose prompt is read in every model join their batch
    decode    drop the rows that left, feed every other row its token (one forward per model)
    round     one speculative draft-verify round for the speculative rows
    drop      rows leave (cancelled, finished, failed); their blocks are let go

Chunked prefill: with `prefill_chunk` set, each step prefills at most that many prompt
tokens per model, so a long prompt is read over several steps while the running rows keep
decoding (Sarathi-Serve's chunked prefill, as vLLM schedules it).

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
from .kv_memory import KVMemory
from .kv_state import KVState
from .options import TokenLogprob
from .outputs import EngineStats
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
        """Rows in `gone` leave (their blocks are let go); the kept indices."""
        keep = [b for b, r in enumerate(self.rows) if r not in gone]
        if len(keep) == len(self.rows):
            return keep
        self.rows = [self.rows[b] for b in keep]
        if not self.rows:
            self.clear()
            return keep
        for state in self.states:
            state.select(keep)
        if self.logits:
            index = torch.tensor(keep, dtype=torch.long, device=self.logits[0].device)
            self.logits = [x.index_select(0, index) for x in self.logits]
        return keep

    def clear(self) -> None:
        """Every row leaves (its blocks are let go)."""
        for state in self.states:
            state.release()
        self.rows, self.states, self.logits = [], [], []

    def cached_tokens(self) -> int:
        return sum(s.num_tokens() for s in self.states)


@dataclass
class _Prefilling:
    """Rows reading their prompt chunk by chunk, and each row's next-token logits from the
    models that have read all of it."""

    batch: _Batch = field(default_factory=_Batch)
    finished: dict[Request, dict[int, torch.Tensor]] = field(default_factory=dict)

    def done(self, models: int) -> list[int]:
        """Indices of the rows every model has read."""
        return [b for b, r in enumerate(self.batch.rows) if len(self.finished[r]) == models]


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
    logprobs: dict[Request, list[TokenLogprob]] = field(default_factory=dict)
    """The emitted tokens' log-probs, for the rows whose request asked for them."""


class ModelRunner:
    """Runs the ensemble over the rows in flight (see the module docstring)."""

    def __init__(
        self,
        ensemble: Ensemble,
        sampler: Sampler,
        fail: Fail,
        memory: KVMemory,
        stats: EngineStats,
        prefill_chunk: int | None = None,
    ) -> None:
        self.ensemble = ensemble
        self.sampler = sampler
        self.memory = memory
        self.prefill_chunk = prefill_chunk
        self.prefilling = _Prefilling()
        self.plain = _Batch()
        self.speculative = _Batch()
        self._fail = fail
        self.stats = stats
        self.rounds = 0
        """Speculative rounds run."""

    @property
    def plain_rows(self) -> list[Request]:
        """Plain rows in flight, prefilling ones included."""
        return [*self.plain.rows, *(r for r in self.prefilling.batch.rows if not r.speculative_k)]

    @property
    def speculative_rows(self) -> list[Request]:
        """Speculative rows in flight, prefilling ones included."""
        return [*self.speculative.rows, *(r for r in self.prefilling.batch.rows if r.speculative_k)]

    def cached_tokens(self) -> int:
        """Tokens the rows in flight hold in the models' caches, summed over models."""
        batches = (self.prefilling.batch, self.plain, self.speculative)
        return sum(b.cached_tokens() for b in batches)

    def drop(self, gone: Collection[Request]) -> None:
        """These rows leave whichever batch holds them."""
        if gone:
            self.prefilling.batch.drop(gone)
            for request in gone:
                self.prefilling.finished.pop(request, None)
            self.plain.drop(gone)
            self.speculative.drop(gone)

    def clear(self) -> list[Request]:
        """Every row leaves; the rows that were in flight."""
        rows = [*self.prefilling.batch.rows, *self.plain.rows, *self.speculative.rows]
        self.prefilling.batch.clear()
        self.prefilling.finished.clear()
        self.plain.clear()
        self.speculative.clear()
        return rows

    # ------------------------------------------------------------------ admit

    def admit(self, requests: Iterable[Request]) -> tuple[list[Request], list[torch.Tensor]]:
        """New rows start prefilling; one prefill chunk runs. Rows whose prompt every model
        has read join their batch. Returns the new speculative rows and their next-token
        logits (their first token is sampled from them)."""
        ready = []
        for request in requests:
            try:
                request.generator = _generator(self.ensemble.device, request.options.seed)
            except Exception as error:  # validated at the edge; defence in depth
                self._fail(request, error)
                continue
            ready.append(request)
        if ready:
            self._start(ready)
        if not self.prefilling.batch.rows:
            return [], []
        try:
            self._prefill_step()
        except Exception as error:
            logger.warning(
                "a prefill chunk of %d rows failed (%r); one row at a time",
                len(self.prefilling.batch.rows),
                error,
            )
            rows = self.prefilling.batch.rows
            self.prefilling.batch.clear()  # their blocks go back; whole prompts again
            self.prefilling.finished.clear()
            return self._join(*self._prefill(rows, _prompt_view))
        return self._join(*self._take_done())

    def _start(self, requests: list[Request]) -> None:
        """Rows for new requests in every model, each from its longest cached prefix."""
        views = [_prompt_view(r) for r in requests]
        states = self.ensemble.start(
            self.memory,
            [v.chat_ids for v in views],
            [v.base_ids for v in views],
            [v.room for v in views],
        )
        self._count_prompts(requests, states)
        for request in requests:
            self.prefilling.finished[request] = {}
        self.prefilling.batch.add(requests, states, [])

    def _count_prompts(self, requests: list[Request], states: list[KVState]) -> None:
        for b, request in enumerate(requests):
            rows = [state.rows[b] for state in states]
            request.cached_prompt_tokens = min(r.cached for r in rows)
            self.stats.prompt_tokens_cached += sum(r.cached for r in rows)
            self.stats.prompt_tokens_computed += sum(len(r.tokens) - r.cached for r in rows)

    def _prefill_step(self) -> None:
        """One chunk of every model's pending prompt tokens; record who finished where."""
        batch = self.prefilling.batch
        self.stats.prefill_chunks += 1
        # a solo row (see `Ensemble.needs_own_forwards`) is prefilled in forwards of its own
        solo = [b for b, r in enumerate(batch.rows) if r.solo]
        groups = [[b] for b in solo] + [[b for b, r in enumerate(batch.rows) if not r.solo]]
        for group in groups if solo else [list(range(len(batch.rows)))]:
            if not group:
                continue
            states = [state.subset(group) for state in batch.states]
            out = self.ensemble.prefill_chunk(states, self.prefill_chunk)
            for model, (logits, finishing) in enumerate(out):
                for b in finishing:
                    self.prefilling.finished[batch.rows[group[b]]][model] = logits[b]

    def _take_done(self) -> tuple[list[Request], list[KVState], list[torch.Tensor]]:
        """Move the rows every model has read out of the prefilling batch (no cache is
        copied): the rows, their states and next-token logits [n, V] per model."""
        prefilling, models = self.prefilling, len(self.ensemble.models)
        done = prefilling.done(models)
        if not done:
            return [], [], []
        rows = [prefilling.batch.rows[b] for b in done]
        states = [state.split(done) for state in prefilling.batch.states]
        kept = [b for b in range(len(prefilling.batch.rows)) if b not in set(done)]
        prefilling.batch.rows = [prefilling.batch.rows[b] for b in kept]
        finished = [prefilling.finished.pop(r) for r in rows]
        logits = [torch.stack([f[i] for f in finished]) for i in range(models)]
        if not prefilling.batch.rows:
            prefilling.batch.clear()
        return rows, states, logits

    def _join(
        self, rows: list[Request], states: list[KVState], logits: list[torch.Tensor]
    ) -> tuple[list[Request], list[torch.Tensor]]:
        """Prefilled rows join their batch; the speculative ones and their logits."""
        if not rows:
            return [], []
        plain = [b for b, r in enumerate(rows) if r.speculative_k is None]
        speculative = [b for b, r in enumerate(rows) if r.speculative_k is not None]
        if plain and speculative:
            plain_states = [state.split(plain) for state in states]
            plain_logits = [x[plain] for x in logits]
            logits = [x[speculative] for x in logits]
        elif plain:
            plain_states, plain_logits, states, logits = states, logits, [], []
        if plain:
            self.plain.add([rows[b] for b in plain], plain_states, plain_logits)
        if not speculative:
            return [], []
        rows = [rows[b] for b in speculative]
        self.speculative.add(rows, states, [])  # speculative rows keep no logits
        return rows, logits

    def _prefill(
        self, rows: list[Request], view: Callable[[Request], _View]
    ) -> tuple[list[Request], list[KVState], list[torch.Tensor]]:
        """Prefill whole prompts together; if that raises, each row alone, so only the rows
        whose own input fails are failed. Returns the rows kept, their states and logits."""
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
            self.memory,
            [v.chat_ids for v in views],
            [v.base_ids for v in views],
            [v.room for v in views],
        )

    # ------------------------------------------------------------------ decode

    def decode(self, tokens: torch.Tensor, gone: Collection[Request], token_ids: list[int]) -> None:
        """The rows in `gone` leave; every other plain row reads its token (`tokens` [B] on
        the device, `token_ids` the same on the host, aligned with the rows before they
        left); their next logits are kept."""
        batch = self.plain
        keep = batch.drop(gone)
        if not batch.rows:
            return
        if len(keep) < len(tokens):
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)]
        try:
            batch.logits = self.ensemble.step(batch.states, tokens)
            fed = [[token_ids[b]] for b in keep]
            for state in batch.states:
                state.record(fed)
        except Exception as error:
            logger.warning(
                "a decode forward of %d rows failed (%r); rebuilding them", len(batch.rows), error
            )
            self.stats.failed_decode_forwards += 1
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
            out.logprobs.update(result.logprobs)
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
                    logprobs=request.options.logprobs,
                )
            )
        meta = self.sampler.metadata(batch.rows)
        speculative_round(self.ensemble, batch.states, plans, meta, self.sampler.generator)
        out = RoundOutput()
        read: list[tuple[int, list[int]]] = []  # what each row's caches now hold, at the end
        for b, (request, plan) in enumerate(zip(batch.rows, plans, strict=True)):
            if plan.failed:
                out.failed[request] = not_finite(request, composed=True)
                continue
            request.speculative.update(plan.k, plan.accepted)  # type: ignore[union-attr]
            read.append((b, [plan.pending, *plan.emitted[:-1]]))
            request.pending = plan.emitted[-1]
            out.tokens[request] = plan.emitted
            if plan.logprobs is not None:
                out.logprobs[request] = plan.emitted_logprobs
        known = {b: ids for b, ids in read}
        for state in batch.states:  # a failed row's tokens stay unknown: never registered
            state.record([known.get(b, []) for b in range(len(batch.rows))])
        return out


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    """A seeded request's own random source (None without a seed: the sampler's shared one)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
