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
"""

from __future__ import annotations

import atexit
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from .composition import sample_tokens
from .ensemble import Ensemble
from .kv_state import KVState
from .options import GenerationOptions, GenerationResult, RequestStats, StreamChunk, Usage
from .speculative import DraftPlan, SpeculativeRow, speculative_round
from .stopping import RowText

__all__ = ["Engine", "EngineStats", "Request"]

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
    cancel_event: threading.Event
    streaming: bool = False
    speculative_k: int | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    speculative: SpeculativeRow | None = None
    pending: int | None = None  # speculative rows: the last token, not yet read by the models

    @property
    def token_footprint(self) -> int:
        """The most cache positions this request can occupy per model."""
        return max(len(self.chat_ids), len(self.base_ids)) + self.row.token_budget

    def cancel(self) -> None:
        """Stop decoding this request; its row leaves the batch at the next step."""
        self.cancel_event.set()

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
        """Queue a request (FIFO); it joins the running batch at the next step."""
        with self._cond:
            self._waiting.append(request)
            self._wake()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps (the models are never run by two
        threads at once) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        task: _Task[T] = _Task(fn)
        with self._cond:
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

    def _wake(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="eft-engine", daemon=True)
            _THREADS.add(self._thread)
            self._thread.start()
        self._cond.notify()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not (self._waiting or self._tasks or self.batch_size):
                        self._thread = None  # idle: exit; the next submit starts a new one
                        return
                    tasks = list(self._tasks)
                    self._tasks.clear()
                for task in tasks:
                    task.run()
                for batch in (self._plain, self._speculative):
                    self._retire_cancelled(batch)
                self._admit(self._pop_admissible())
                for batch, step in (
                    (self._plain, self._decode_step),
                    (self._speculative, self._speculative_round),
                ):
                    if batch.rows:
                        try:
                            step()
                        except Exception as error:  # a model failed: the step's rows fail
                            self._fail_batch(batch, error)

    def _pop_admissible(self) -> list[Request]:
        """Waiting requests that fit, first come first served."""
        admitted: list[Request] = []
        with self._cond:
            in_flight = sum(r.token_footprint for r in [*self._plain.rows, *self._speculative.rows])
            rows = self.batch_size
            while self._waiting:
                request = self._waiting[0]
                if request.cancel_event.is_set():
                    self._waiting.popleft()
                    self._finish(request, "stop")
                    self.stats.cancelled += 1
                    continue
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
        for request in requests:
            request.admitted_at = now
            request.generator = _generator(self.ensemble.device, request.options.seed)
            self.stats.admitted += 1
        plain = [r for r in requests if r.speculative_k is None]
        speculative = [r for r in requests if r.speculative_k is not None]
        for rows, batch in ((plain, self._plain), (speculative, self._speculative)):
            if not rows:
                continue
            try:
                states, logits = self.ensemble.prefill(
                    [r.chat_ids for r in rows], [r.base_ids for r in rows]
                )
            except Exception as error:  # the running batch is untouched
                for request in rows:
                    self._fail(request, error)
                continue
            if batch is self._plain:
                batch.add(rows, states, logits)
            else:  # speculative rows need logits only for their first token
                batch.add(rows, states, [])
                self._first_speculative_tokens(rows, logits)

    def _first_speculative_tokens(self, rows: list[Request], logits: list[torch.Tensor]) -> None:
        """Sample new speculative rows' first token from their prefill: their pending token."""
        batch = self._speculative
        tokens = self._pick(logits, rows, {}).tolist()
        for request, token in zip(rows, tokens, strict=True):
            assert request.speculative_k is not None  # only speculative rows come here
            request.speculative = SpeculativeRow(
                request.speculative_k, adaptive=self.adaptive_speculation
            )
            request.pending = token
        offset = len(batch.rows) - len(rows)  # the new rows are the batch's last
        self._record(
            batch, [[t] for t in tokens], failed={}, offset=list(range(offset, len(batch.rows)))
        )

    def _decode_step(self) -> None:
        """One token for every plain row; finished rows leave; the rest feed their token."""
        batch = self._plain
        self.stats.steps += 1
        self.stats.batch_sizes.append(len(batch.rows))
        failed: dict[int, Exception] = {}
        tokens = self._pick(batch.logits, batch.rows, failed)  # [B]
        keep = self._record(batch, [[t] for t in tokens.tolist()], failed=failed)
        if batch.rows:
            if len(keep) < len(tokens):
                tokens = tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)]
            batch.logits = self.ensemble.step(batch.states, tokens)

    def _pick(
        self, logits: list[torch.Tensor], rows: list[Request], failed: dict[int, Exception]
    ) -> torch.Tensor:
        """Compose, constrain and sample one token per row [B]."""
        weights = torch.cat([r.weight_row for r in rows]).to(self.ensemble.device)  # [B, W]
        logprobs = self.ensemble.compose(
            logits, weights, [r.options.conservative_top_p for r in rows]
        )  # [B, V]
        logprobs = self._constrain(logprobs, rows, failed)
        return self._sample(logprobs, rows)

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
        """Mask the tokens each row's constraint forbids, and renormalise those rows."""
        masked = logprobs
        vocab = logprobs.shape[-1]
        for b, request in enumerate(rows):
            constraint = request.row.constraint
            if constraint is None:
                continue
            try:
                allowed = constraint.allowed_mask(vocab)
            except Exception as error:
                failed[b] = error
                continue
            if allowed is None:
                continue
            allowed = allowed.to(device=logprobs.device, dtype=torch.bool, non_blocking=True)
            if masked is logprobs:
                masked = logprobs.clone()
            masked[b] = torch.log_softmax(logprobs[b].masked_fill(~allowed, float("-inf")), -1)
        return masked

    @staticmethod
    def _sample(logprobs: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        """One token per row [B]: argmax for greedy rows, each sampled row with its own
        generator (so a seeded row samples as it would alone)."""
        greedy = logprobs.argmax(dim=-1)
        picks = []
        for b, request in enumerate(rows):
            o = request.options
            if o.temperature == 0.0:
                picks.append(greedy[b])
            else:
                picks.append(
                    sample_tokens(
                        logprobs[b : b + 1], o.temperature, o.top_k, o.top_p, request.generator
                    )[0]
                )
        return torch.stack(picks)

    def _retire_cancelled(self, batch: _Batch) -> None:
        gone = [b for b, r in enumerate(batch.rows) if r.cancel_event.is_set()]
        for b in gone:
            self._finish(batch.rows[b], "stop")
            self.stats.cancelled += 1
        if gone:
            cancelled = set(gone)
            batch.keep([b for b in range(len(batch.rows)) if b not in cancelled])

    def _fail_batch(self, batch: _Batch, error: Exception) -> None:
        for request in batch.rows:
            self._fail(request, error)
        batch.clear()

    # ------------------------------------------------------------------ speculative rows

    def _speculative_round(self) -> None:
        """One draft-and-verify round for every speculative row (see `speculative.py`)."""
        batch = self._speculative
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
        for request, plan in zip(batch.rows, plans, strict=True):
            request.speculative.update(plan.k, plan.accepted)  # type: ignore[union-attr]
            request.pending = plan.emitted[-1]
        self._record(batch, [plan.emitted for plan in plans], failed={})

    # ------------------------------------------------------------------ outputs

    def _emit(self, request: Request) -> None:
        """Send a streaming request the text that is safe to show."""
        if not request.streaming or request.row.finished:
            return
        piece = request.row.text.delta()
        if piece:
            request.sink(StreamChunk(text=piece, token_ids=request.row.take_unsent()))

    def _finish(self, request: Request, reason: str) -> None:
        row = request.row
        row.finish_reason = row.finish_reason or reason
        now = time.monotonic()
        usage = Usage(row.prompt_tokens, len(row.token_ids))
        stats = request.stats(now)
        self.stats.finished += 1
        if request.streaming:
            request.sink(
                StreamChunk(
                    text=row.text.delta(final=True),
                    token_ids=row.take_unsent(),
                    finish_reason=row.finish_reason,
                    usage=usage,
                    stats=stats,
                )
            )
        request.sink(
            GenerationResult(
                text=row.text.text,
                token_ids=list(row.token_ids),
                finish_reason=row.finish_reason,
                usage=usage,
                weights=dict(request.weights),
                stats=stats,
            )
        )

    def _fail(self, request: Request, error: BaseException) -> None:
        self.stats.failed += 1
        request.row.finish_reason = request.row.finish_reason or "error"
        request.sink(error)


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
