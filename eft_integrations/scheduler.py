"""The engine: one decode loop per decoder that batches every concurrent caller.

Continuous (iteration-level) batching, as in Orca, vLLM and TGI: every call becomes a
`Request`; the engine thread admits waiting requests at the next step (their prompts are
prefilled and their cache rows join the batch), runs one EFT step for all rows, and retires
rows the step they finish (end of turn, stop string, budget, cancel, error in their own
constraint), freeing their cache rows. Each request keeps its own weights, sampling options,
random generator, stop strings, budget and constraint, so its output never depends on its
batch-mates.

The models run on the engine thread only, under inference mode; callers block on (or await)
their request's outbox, so no lock, grad or inference-mode state is ever held in a caller's
thread across a `yield`. The thread exits when there is nothing to do and starts again with
the next request, so an idle decoder holds no thread.

One iteration, in gpt-fast's manner:

    retire cancelled -> admit (prefill, merge) -> compose -> constrain -> sample -> record
    -> retire finished -> feed the sampled tokens to every model
    -> one speculative round for the speculative rows (see `speculative.py`)

Speculative requests form a second batch beside the plain one (their caches advance several
tokens per round, the plain rows' one per step); they are admitted and retired the same way.

Isolation: a request's failure is its own. Each phase fails only the rows that caused it:
admission (a bad seed, a prefill that raises: the group is retried one row at a time), compose
(a row whose distribution is not finite), constrain and sample (per row), record (per row), and
a batched forward that raises (`_rebuild`: each row is prefilled again alone from its tokens,
and only the rows that fail alone fail). The loop itself is supervised: an unexpected error
fails the rows in flight with an `EngineError` and the engine goes on; after
`MAX_CONSECUTIVE_CRASHES` failed iterations in a row it stops for good, sets `failure`, and
every waiting and later call fails at once instead of hanging.
"""

from __future__ import annotations

import atexit
import logging
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import torch

from .composition import finite_rows, sample_tokens, where_finite
from .ensemble import Ensemble
from .errors import EFTRequestError, EngineError, EngineUnavailableError
from .kv_state import KVState
from .options import GenerationOptions, GenerationResult, RequestStats, StreamChunk, Usage
from .speculative import DraftPlan, SpeculativeRow, speculative_round
from .stopping import RowText

__all__ = ["MAX_CONSECUTIVE_CRASHES", "Engine", "EngineStats", "Request"]

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_CRASHES = 3
"""Engine iterations that may fail in a row (each failing the rows in flight) before the
engine declares itself unusable."""

T = TypeVar("T")

Sink = Callable[[object], None]
"""Receives a request's outputs on the engine thread: StreamChunks (when streaming), then a
GenerationResult, or an exception."""


@dataclass(eq=False)
class Request:
    """One prompt to complete, with everything that is its own."""

    chat_ids: list[int]
    base_ids: list[int]
    weights: dict[str, float]
    weight_row: torch.Tensor  # [1, n_behaviors]
    options: GenerationOptions
    row: RowText
    sink: Sink
    caller_cancel: threading.Event | None = None
    """The caller's cancel event: only ever read (callers may share or reuse one)."""
    streaming: bool = False
    speculative_k: int | None = None
    solo: bool = False
    """Runs in forwards of its own (see `Ensemble.needs_own_forwards`)."""
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    speculative: SpeculativeRow | None = None
    pending: int | None = None  # speculative rows: the last token, not yet read by the models
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        """Cancelled by `cancel()` or by the caller's own event."""
        return self._cancelled.is_set() or (
            self.caller_cancel is not None and self.caller_cancel.is_set()
        )

    @property
    def token_footprint(self) -> int:
        """The most cache positions this request can occupy per model."""
        return max(len(self.chat_ids), len(self.base_ids)) + self.row.token_budget

    def cancel(self) -> None:
        """Stop decoding this request; its row leaves the batch at the next step. The
        caller's event is left as it is."""
        self._cancelled.set()

    def stats(self, now: float) -> RequestStats:
        admitted = self.admitted_at if self.admitted_at is not None else now
        decoding = max(now - admitted, 1e-9)
        spec = self.speculative
        return RequestStats(
            queue_time=admitted - self.submitted_at,
            time_to_first_token=(
                None if self.first_token_at is None else self.first_token_at - self.submitted_at
            ),
            tokens_per_second=len(self.row.token_ids) / decoding,
            total_time=now - self.submitted_at,
            speculative_rounds=spec.rounds if spec else None,
            drafted_tokens=spec.drafted if spec else None,
            accepted_tokens=spec.accepted if spec else None,
        )


@dataclass
class EngineStats:
    """What the engine has done; `batch_sizes` holds the rows of each recent plain decode
    step (speculative rows run in rounds of their own batch, counted in `speculative_rounds`)."""

    steps: int = 0
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    speculative_rounds: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))

    @property
    def max_batch_size_seen(self) -> int:
        return max(self.batch_sizes, default=0)


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

    def keep(self, keep: list[int]) -> None:
        """Keep only rows `keep`; the others' cache rows are freed."""
        self.rows = [self.rows[b] for b in keep]
        if not self.rows:
            self.clear()
            return
        for state in self.states:
            state.select(torch.tensor(keep, dtype=torch.long, device=state.attention_mask.device))
        if self.logits:
            index = torch.tensor(keep, dtype=torch.long, device=self.logits[0].device)
            self.logits = [x.index_select(0, index) for x in self.logits]

    def clear(self) -> None:
        self.rows, self.states, self.logits = [], [], []

    def cached_tokens(self) -> int:
        return sum(s.num_tokens() for s in self.states)


class Engine:
    """Owns the models' decode loop; `submit` requests from any thread."""

    def __init__(
        self,
        ensemble: Ensemble,
        max_batch_size: int = 32,
        max_tokens_in_flight: int = 131_072,
        adaptive_speculation: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_tokens_in_flight < 1:
            raise ValueError("max_batch_size and max_tokens_in_flight must be >= 1")
        self.ensemble = ensemble
        self.max_batch_size = max_batch_size
        self.max_tokens_in_flight = max_tokens_in_flight
        self.adaptive_speculation = adaptive_speculation
        """Speculative rows grow k after full acceptance and shrink it after a rejection."""
        self.stats = EngineStats()
        self.failure: str | None = None
        """None while the engine can serve; why it cannot, once its loop has failed
        `MAX_CONSECUTIVE_CRASHES` times in a row (every call then fails at once)."""
        self._crashes = 0  # consecutive failed iterations
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._tasks: deque[_Task[Any]] = deque()
        self._thread: threading.Thread | None = None
        # engine-thread state: the rows in flight
        self._plain = _Batch()
        self._speculative = _Batch()
        _ENGINES.add(self)

    # ------------------------------------------------------------------ callers' side

    def submit(self, request: Request) -> None:
        """Queue a request (FIFO); it joins the running batch at the next step. Raises
        `EngineUnavailableError` at once when the engine cannot serve."""
        with self._cond:
            self._check_usable()
            self._waiting.append(request)
            try:
                self._wake()
            except BaseException:
                self._waiting.remove(request)
                raise

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps (the models are never run by two
        threads at once) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        task: _Task[T] = _Task(fn)
        with self._cond:
            self._check_usable()
            self._tasks.append(task)
            self._wake()
        return task.wait()

    @property
    def queued(self) -> int:
        """Requests waiting for admission."""
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        """Rows decoding now (speculative requests included)."""
        return len(self._plain.rows) + len(self._speculative.rows)

    def cached_tokens(self) -> int:
        """Cache positions held by the batch, summed over models (padding included)."""
        return self._plain.cached_tokens() + self._speculative.cached_tokens()

    def _check_usable(self) -> None:
        if self.failure is not None:
            raise EngineUnavailableError(
                f"the EFT engine cannot serve: {self.failure}; restart the process (or build "
                "a new EFTDecoder)"
            )

    def _wake(self) -> None:
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="eft-engine", daemon=True)
            thread.start()
            self._thread = thread
            _THREADS.add(thread)
        self._cond.notify()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        """The engine thread: iterations until idle, each supervised (see the module doc)."""
        try:
            with torch.inference_mode():
                while self._has_work():
                    try:
                        self._iteration()
                    except Exception as error:
                        self._recover(error)
                    else:
                        self._crashes = 0
        except BaseException as error:  # not even recovery worked: nobody may wait forever
            self._stop_for_good(error)
            raise

    def _has_work(self) -> bool:
        with self._cond:
            if self.failure is None and (self._waiting or self._tasks or self.batch_size):
                return True
            self._thread = None  # idle: exit; the next submit starts a new one
            return False

    def _iteration(self) -> None:
        with self._cond:
            tasks = list(self._tasks)
            self._tasks.clear()
        for task in tasks:
            task.run()
        for batch in (self._plain, self._speculative):
            self._retire_cancelled(batch)
        self._admit(self._pop_admissible())
        if self._plain.rows:
            self._decode_step()
        if self._speculative.rows:
            self._speculative_step()

    def _recover(self, error: Exception) -> None:
        """An iteration failed outside any row's own phase: fail the rows in flight (their
        state is unknown) and go on; stop for good after too many failures in a row."""
        self._crashes += 1
        logger.error("EFT engine iteration failed; failing the rows in flight", exc_info=error)
        failure = EngineError(
            f"the EFT engine failed while this request was decoding ({type(error).__name__}: "
            f"{error}); the engine recovered: retry the request"
        )
        for batch in (self._plain, self._speculative):
            for request in batch.rows:
                self._fail(request, failure)
            batch.clear()
        if self._crashes >= MAX_CONSECUTIVE_CRASHES:
            self._stop_for_good(error)

    def _stop_for_good(self, error: BaseException) -> None:
        """Mark the engine unusable and answer everyone now: rows in flight, waiting requests
        and tasks get an `EngineUnavailableError`."""
        with self._cond:
            self.failure = (
                f"its decode loop failed {self._crashes or 1} times in a row, last with "
                f"{type(error).__name__}: {error}"
            )
            waiting, tasks = list(self._waiting), list(self._tasks)
            self._waiting.clear()
            self._tasks.clear()
            self._thread = None
        unavailable = EngineUnavailableError(f"the EFT engine cannot serve: {self.failure}")
        for batch in (self._plain, self._speculative):
            waiting += batch.rows
            batch.clear()
        for request in waiting:
            self._fail(request, unavailable)
        for task in tasks:
            task.fail(unavailable)

    def _pop_admissible(self) -> list[Request]:
        """Waiting requests that fit, first come first served. A solo request (see
        `Request.solo`) joins only an empty batch of its kind, and nothing joins it."""
        admitted: list[Request] = []
        with self._cond:
            in_flight = sum(r.token_footprint for r in [*self._plain.rows, *self._speculative.rows])
            rows = self.batch_size
            while self._waiting:
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    self._finish(request, "stop")
                    self.stats.cancelled += 1
                    continue
                kind = self._speculative if request.speculative_k is not None else self._plain
                mates = [*kind.rows, *(r for r in admitted if _same_kind(r, request))]
                if mates and (request.solo or any(r.solo for r in mates)):
                    break
                fits = (
                    rows < self.max_batch_size
                    and in_flight + request.token_footprint <= self.max_tokens_in_flight
                )
                if not fits and rows > 0:  # an empty batch always takes the next request
                    break
                self._waiting.popleft()
                admitted.append(request)
                rows += 1
                in_flight += request.token_footprint
        return admitted

    def _admit(self, requests: list[Request]) -> None:
        """Prefill new requests and add them to their batch; speculative rows sample their
        first token here (it becomes their pending token)."""
        now = time.monotonic()
        ready = []
        for request in requests:
            request.admitted_at = now
            self.stats.admitted += 1
            try:
                request.generator = _generator(self.ensemble.device, request.options.seed)
            except Exception as error:  # validated at the edge; defence in depth
                self._fail(request, error)
                continue
            ready.append(request)
        plain = [r for r in ready if r.speculative_k is None]
        speculative = [r for r in ready if r.speculative_k is not None]
        if plain:
            self._plain.add(*self._prefill(plain, _prompt_view))
        if speculative:
            rows, states, logits = self._prefill(speculative, _prompt_view)
            if rows:  # speculative rows need logits only for their first token
                self._speculative.add(rows, states, [])
                self._first_speculative_tokens(rows, logits)

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

    def _first_speculative_tokens(self, rows: list[Request], logits: list[torch.Tensor]) -> None:
        """Sample new speculative rows' first token from their prefill: their pending token."""
        batch = self._speculative
        _, tokens, failed = self._pick(logits, rows)
        for request, token in zip(rows, tokens, strict=True):
            assert request.speculative_k is not None  # only speculative rows come here
            request.speculative = SpeculativeRow(
                request.speculative_k, adaptive=self.adaptive_speculation
            )
            request.pending = token
        offset = len(batch.rows) - len(rows)  # the new rows are the batch's last
        self._record(
            batch,
            [[t] for t in tokens],
            failed={offset + b: error for b, error in failed.items()},
            offset=list(range(offset, len(batch.rows))),
        )

    def _decode_step(self) -> None:
        """One token for every plain row; finished rows leave; the rest feed their token."""
        batch = self._plain
        self.stats.steps += 1
        self.stats.batch_sizes.append(len(batch.rows))
        tokens, picked, failed = self._pick(batch.logits, batch.rows)  # [B]
        keep = self._record(batch, [[t] for t in picked], failed=failed)
        if not batch.rows:
            return
        if len(keep) < len(picked):
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)]
        try:
            batch.logits = self.ensemble.step(batch.states, tokens)
        except Exception as error:
            self._rebuild_plain(error)

    def _pick(
        self, logits: list[torch.Tensor], rows: list[Request]
    ) -> tuple[torch.Tensor, list[int], dict[int, Exception]]:
        """Compose, constrain and sample one token per row: (tokens [B] on the device, the
        same on the host, the rows that failed and why). A row fails alone when its
        constraint raises, its sampling raises, or its distribution is not finite."""
        weights = torch.cat([r.weight_row for r in rows]).to(self.ensemble.device)  # [B, W]
        logprobs = self.ensemble.compose(
            logits, weights, [r.options.conservative_top_p for r in rows]
        )  # [B, V]
        composed_ok = finite_rows(logprobs)  # [B]
        failed: dict[int, Exception] = {}
        logprobs = self._constrain(logprobs, rows, failed)
        ok = finite_rows(logprobs) & composed_ok
        tokens = self._sample(where_finite(logprobs, ok), rows, failed)  # [B]
        # the step's one host sync: the tokens and which rows could be sampled
        picked, composed_ok_, ok_ = torch.stack([tokens, composed_ok.long(), ok.long()]).tolist()
        for b, request in enumerate(rows):
            if not ok_[b] and b not in failed:
                failed[b] = _not_finite(request, composed=bool(composed_ok_[b]))
        return tokens, picked, failed

    def _record(
        self,
        batch: _Batch,
        tokens: list[list[int]],
        *,
        failed: dict[int, Exception],
        offset: list[int] | None = None,
    ) -> list[int]:
        """Record each row's new tokens (the host already has them: the step's one sync),
        stream what is safe to show, retire finished and failed rows. `tokens[i]` belongs to
        row `offset[i]` of the batch (default: row i). Returns the rows kept."""
        now = time.monotonic()
        positions = offset if offset is not None else list(range(len(tokens)))
        for b, new in zip(positions, tokens, strict=True):
            request = batch.rows[b]
            if b in failed:
                continue
            try:
                for token in new:
                    request.row.record(token)
                    if request.row.finished:
                        break
            except Exception as error:  # this row's constraint or stop handling failed
                failed[b] = error
                continue
            if request.first_token_at is None:
                request.first_token_at = now
            self._emit(request)
        done = [b for b in positions if b in failed or batch.rows[b].row.finished]
        for b in done:
            if b in failed:
                self._fail(batch.rows[b], failed[b])
            else:
                self._finish(batch.rows[b], batch.rows[b].row.finish_reason or "stop")
        gone = set(done)
        keep = [b for b in range(len(batch.rows)) if b not in gone]
        if done:
            batch.keep(keep)
        return keep

    def _constrain(
        self, logprobs: torch.Tensor, rows: list[Request], failed: dict[int, Exception]
    ) -> torch.Tensor:
        """Mask the tokens each row's constraint forbids, and renormalise those rows; a
        constraint that raises or answers a malformed mask fails its row alone."""
        masked = logprobs
        vocab = logprobs.shape[-1]
        for b, request in enumerate(rows):
            constraint = request.row.constraint
            if constraint is None:
                continue
            try:
                allowed = _checked_mask(constraint.allowed_mask(vocab), vocab)
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

    @staticmethod
    def _sample(
        logprobs: torch.Tensor, rows: list[Request], failed: dict[int, Exception]
    ) -> torch.Tensor:
        """One token per row [B]: argmax for greedy rows, each sampled row with its own
        generator (so a seeded row samples as it would alone)."""
        greedy = logprobs.argmax(dim=-1)
        picks = []
        for b, request in enumerate(rows):
            o = request.options
            if o.temperature == 0.0 or b in failed:
                picks.append(greedy[b])
                continue
            try:
                picks.append(
                    sample_tokens(
                        logprobs[b : b + 1], o.temperature, o.top_k, o.top_p, request.generator
                    )[0]
                )
            except Exception as error:
                failed[b] = error
                picks.append(greedy[b])
        return torch.stack(picks)

    def _retire_cancelled(self, batch: _Batch) -> None:
        gone = [b for b, r in enumerate(batch.rows) if r.cancelled]
        for b in gone:
            self._finish(batch.rows[b], "stop")
            self.stats.cancelled += 1
        if gone:
            cancelled = set(gone)
            batch.keep([b for b in range(len(batch.rows)) if b not in cancelled])

    def _rebuild_plain(self, error: Exception) -> None:
        """A batched forward raised: prefill every row again from its prompt and tokens
        (the token just sampled included), together, then one at a time if that raises too;
        only the rows that fail alone fail."""
        batch = self._plain
        rows = batch.rows
        logger.warning("a decode forward of %d rows failed (%r); rebuilding them", len(rows), error)
        batch.clear()
        batch.add(*self._prefill(rows, _generated_view))

    # ------------------------------------------------------------------ speculative rows

    def _speculative_step(self) -> None:
        """One round for the speculative batch; if a forward raises, every row is rebuilt
        and runs one round alone, so a row whose drafts break a model fails alone."""
        batch = self._speculative
        saved = [r.generator.get_state() for r in batch.rows]  # type: ignore[union-attr]
        try:
            self._speculative_round(batch)
        except Exception as error:
            logger.warning(
                "a speculative round of %d rows failed (%r); one row at a time",
                len(batch.rows),
                error,
            )
            rows = batch.rows
            batch.clear()
            for request, state in zip(rows, saved, strict=True):
                request.generator.set_state(state)  # type: ignore[union-attr]
                self._speculative_alone(request)

    def _speculative_alone(self, request: Request) -> None:
        """Rebuild one speculative row (everything but its pending token) and run one round
        for it alone; it rejoins the batch unless that fails."""
        alone = _Batch()
        rows, states, _ = self._prefill([request], _pending_view)
        if not rows:
            return
        alone.add(rows, states, [])
        try:
            self._speculative_round(alone)
        except Exception as error:
            self._fail(request, error)
            return
        if alone.rows:
            self._speculative.add(alone.rows, alone.states, [])

    def _speculative_round(self, batch: _Batch) -> None:
        """One draft-and-verify round for every row of `batch` (see `speculative.py`)."""
        self.stats.speculative_rounds += 1
        plans = []
        for request in batch.rows:
            assert request.speculative is not None and request.pending is not None
            o = request.options
            plans.append(
                DraftPlan(
                    pending=request.pending,
                    k=request.speculative.plan(request.row.tokens_left),
                    weights=request.weight_row,
                    conservative_top_p=o.conservative_top_p,
                    temperature=o.temperature,
                    top_k=o.top_k,
                    top_p=o.top_p,
                    generator=request.generator,  # type: ignore[arg-type]
                )
            )
        speculative_round(self.ensemble, batch.states, plans)
        failed: dict[int, Exception] = {}
        for b, (request, plan) in enumerate(zip(batch.rows, plans, strict=True)):
            if plan.failed:
                failed[b] = _not_finite(request, composed=True, speculative=True)
                continue
            request.speculative.update(plan.k, plan.accepted)  # type: ignore[union-attr]
            request.pending = plan.emitted[-1]
        self._record(batch, [plan.emitted for plan in plans], failed=failed)

    # ------------------------------------------------------------------ outputs

    def _emit(self, request: Request) -> None:
        """Send a streaming request the text that is safe to show."""
        if not request.streaming or request.row.finished:
            return
        piece = request.row.text.delta()
        if piece:
            _send(request, StreamChunk(text=piece, token_ids=request.row.take_unsent()))

    def _finish(self, request: Request, reason: str) -> None:
        row = request.row
        row.finish_reason = row.finish_reason or reason
        now = time.monotonic()
        usage = Usage(row.prompt_tokens, len(row.token_ids))
        stats = request.stats(now)
        self.stats.finished += 1
        if request.streaming:
            _send(
                request,
                StreamChunk(
                    text=row.text.delta(final=True),
                    token_ids=row.take_unsent(),
                    finish_reason=row.finish_reason,
                    usage=usage,
                    stats=stats,
                ),
            )
        _send(
            request,
            GenerationResult(
                text=row.text.text,
                token_ids=list(row.token_ids),
                finish_reason=row.finish_reason,
                usage=usage,
                weights=dict(request.weights),
                stats=stats,
            ),
        )

    def _fail(self, request: Request, error: BaseException) -> None:
        self.stats.failed += 1
        request.row.finish_reason = request.row.finish_reason or "error"
        _send(request, error)


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


def _same_kind(a: Request, b: Request) -> bool:
    return (a.speculative_k is None) == (b.speculative_k is None)


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


def _not_finite(request: Request, *, composed: bool, speculative: bool = False) -> EFTRequestError:
    """Why a row's next-token distribution cannot be sampled."""
    at = len(request.row.token_ids)
    if not composed or speculative:
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


def _send(request: Request, item: object) -> None:
    """Hand an output to the request's caller; a caller that cannot take it (a closed event
    loop, a broken sink) loses its request, never the engine."""
    try:
        request.sink(item)
    except Exception:
        logger.warning("could not deliver to a request's caller; cancelling it", exc_info=True)
        request.cancel()


_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _join_engine_threads() -> None:
    """Let engine threads leave torch before the interpreter tears it down (a daemon thread
    killed inside a torch op aborts the process with `terminate called ...`)."""
    for engine in list(_ENGINES):
        with engine._cond:
            engine._waiting.clear()
            for batch in (engine._plain, engine._speculative):
                for request in batch.rows:
                    request.cancel()
    # every engine thread, also one that has marked its engine idle and is still returning
    for thread in list(_THREADS):
        thread.join(timeout=10)


class _Task(Generic[T]):
    """A function to run on the engine thread, and its outcome."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._done = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as error:  # re-raised in the caller's thread
            self._error = error
        finally:
            self._done.set()

    def fail(self, error: BaseException) -> None:
        """Answer the caller with an error instead of running."""
        self._error = error
        self._done.set()

    def wait(self) -> T:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A request's own random source: its seed, or fresh entropy (never the global RNG)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator
