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

One step, in gpt-fast's manner:

    retire cancelled -> admit (prefill, merge) -> compose -> constrain -> sample -> record
    -> retire finished -> feed the sampled tokens to every model
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from .composition import sample_tokens
from .ensemble import Ensemble
from .kv_state import KVState
from .options import GenerationOptions, GenerationResult, RequestStats, StreamChunk, Usage
from .speculative import SpeculativeRun
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
    speculative: SpeculativeRun | None = None

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
        spec = self.speculative.stats if self.speculative is not None else None
        return RequestStats(
            queue_time=admitted - self.submitted_at,
            time_to_first_token=(None if self.first_token_at is None
                                 else self.first_token_at - self.submitted_at),
            tokens_per_second=len(self.row.token_ids) / decoding,
            total_time=now - self.submitted_at,
            speculative_rounds=spec.rounds if spec else None,
            drafted_tokens=spec.drafted if spec else None,
            accepted_tokens=spec.accepted if spec else None,
        )


@dataclass
class EngineStats:
    """What the engine has done; `batch_sizes` holds the rows of each recent batched decode
    step (speculative requests run their own single-row rounds, counted apart)."""

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


class Engine:
    """Owns the models' decode loop; `submit` requests from any thread."""

    def __init__(self, ensemble: Ensemble, max_batch_size: int = 32,
                 max_tokens_in_flight: int = 131_072) -> None:
        if max_batch_size < 1 or max_tokens_in_flight < 1:
            raise ValueError("max_batch_size and max_tokens_in_flight must be >= 1")
        self.ensemble = ensemble
        self.max_batch_size = max_batch_size
        self.max_tokens_in_flight = max_tokens_in_flight
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._tasks: deque[_Task[Any]] = deque()
        self._thread: threading.Thread | None = None
        # engine-thread state: the rows in flight, aligned with every model's state
        self._rows: list[Request] = []
        self._states: list[KVState] = []
        self._logits: list[torch.Tensor] = []  # next-token logits [B, V] per model
        self._speculative: list[Request] = []

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
        return len(self._rows) + len(self._speculative)

    def cached_tokens(self) -> int:
        """Cache positions held by the batch, summed over models (padding included)."""
        return sum(s.num_tokens() for s in self._states) + sum(
            s.num_tokens() for r in self._speculative if r.speculative
            for s in r.speculative.states
        )

    def _wake(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="eft-engine", daemon=True)
            self._thread.start()
        self._cond.notify()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not (self._waiting or self._tasks or self._rows or self._speculative):
                        self._thread = None  # idle: exit; the next submit starts a new one
                        return
                    tasks = list(self._tasks)
                    self._tasks.clear()
                for task in tasks:
                    task.run()
                self._retire_cancelled()
                self._admit(self._pop_admissible())
                if self._rows:
                    try:
                        self._decode_step()
                    except Exception as error:  # a model failed: the whole step's rows fail
                        self._fail_batch(error)
                for request in list(self._speculative):
                    self._speculative_round(request)

    def _pop_admissible(self) -> list[Request]:
        """Waiting requests that fit, first come first served."""
        admitted: list[Request] = []
        with self._cond:
            in_flight = sum(r.token_footprint for r in [*self._rows, *self._speculative])
            rows = self.batch_size
            while self._waiting:
                request = self._waiting[0]
                if request.cancel_event.is_set():
                    self._waiting.popleft()
                    self._finish(request, "stop")
                    self.stats.cancelled += 1
                    continue
                fits = (rows < self.max_batch_size
                        and in_flight + request.token_footprint <= self.max_tokens_in_flight)
                if not fits and rows > 0:  # an empty batch always takes the next request
                    break
                self._waiting.popleft()
                admitted.append(request)
                rows += 1
                in_flight += request.token_footprint
        return admitted

    def _admit(self, requests: list[Request]) -> None:
        """Prefill new requests; plain ones join the running batch, speculative ones get
        their own single-row caches."""
        now = time.monotonic()
        for request in requests:
            request.admitted_at = now
            request.generator = _generator(self.ensemble.device, request.options.seed)
            self.stats.admitted += 1
        plain = [r for r in requests if r.speculative_k is None]
        for request in (r for r in requests if r.speculative_k is not None):
            try:
                self._start_speculative(request)
            except Exception as error:
                self._fail(request, error)
        if not plain:
            return
        try:
            states, logits = self.ensemble.prefill([r.chat_ids for r in plain],
                                                   [r.base_ids for r in plain])
        except Exception as error:  # the running batch is untouched
            for request in plain:
                self._fail(request, error)
            return
        if not self._rows:
            self._states, self._logits = states, logits
        else:
            for mine, theirs in zip(self._states, states, strict=True):
                mine.merge(theirs)
            self._logits = [torch.cat([a, b]) for a, b in zip(self._logits, logits, strict=True)]
        self._rows += plain

    def _decode_step(self) -> None:
        rows = self._rows
        self.stats.steps += 1
        self.stats.batch_sizes.append(len(rows))
        weights = torch.cat([r.weight_row for r in rows]).to(self.ensemble.device)  # [B, W]
        logprobs = self.ensemble.compose(
            self._logits, weights, [r.options.conservative_top_p for r in rows]
        )  # [B, V]
        failed: dict[int, Exception] = {}
        logprobs = self._constrain(logprobs, rows, failed)
        tokens = self._sample(logprobs, rows)  # [B]
        now = time.monotonic()
        for b, (request, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if b in failed:
                continue
            try:  # the one host sync of the step is the .tolist() above
                request.row.record(token)
            except Exception as error:  # this row's constraint or stop handling failed
                failed[b] = error
                continue
            if request.first_token_at is None:
                request.first_token_at = now
            self._emit(request)
        done = [b for b, r in enumerate(rows) if b in failed or r.row.finished]
        for b in done:
            if b in failed:
                self._fail(rows[b], failed[b])
            else:
                self._finish(rows[b], rows[b].row.finish_reason or "stop")
        if done:
            keep = [b for b in range(len(rows)) if b not in set(done)]
            self._select(keep)
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)]
        if self._rows:
            self._logits = self.ensemble.step(self._states, tokens)

    def _constrain(self, logprobs: torch.Tensor, rows: list[Request],
                   failed: dict[int, Exception]) -> torch.Tensor:
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
                picks.append(sample_tokens(logprobs[b : b + 1], o.temperature, o.top_k, o.top_p,
                                           request.generator)[0])
        return torch.stack(picks)

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows `keep` in the batch; the others' cache rows are freed."""
        self._rows = [self._rows[b] for b in keep]
        if not self._rows:
            self._states, self._logits = [], []
            return
        for state in self._states:
            state.select(torch.tensor(keep, dtype=torch.long, device=state.attention_mask.device))
        index = torch.tensor(keep, dtype=torch.long, device=self.ensemble.device)
        self._logits = [x.index_select(0, index) for x in self._logits]

    def _retire_cancelled(self) -> None:
        gone = [b for b, r in enumerate(self._rows) if r.cancel_event.is_set()]
        for b in gone:
            self._finish(self._rows[b], "stop")
            self.stats.cancelled += 1
        if gone:
            self._select([b for b in range(len(self._rows)) if b not in set(gone)])
        for request in [r for r in self._speculative if r.cancel_event.is_set()]:
            self._speculative.remove(request)
            self._finish(request, "stop")
            self.stats.cancelled += 1

    def _fail_batch(self, error: Exception) -> None:
        for request in self._rows:
            self._fail(request, error)
        self._rows, self._states, self._logits = [], [], []

    # ------------------------------------------------------------------ speculative rows

    def _start_speculative(self, request: Request) -> None:
        states, logits = self.ensemble.prefill([request.chat_ids], [request.base_ids])
        o = request.options
        assert request.generator is not None and request.speculative_k is not None
        request.speculative = SpeculativeRun(
            self.ensemble, states, logits, request.weight_row.to(self.ensemble.device),
            o.conservative_top_p, o.temperature, o.top_k, o.top_p, request.speculative_k,
            request.generator,
        )
        self._speculative.append(request)

    def _speculative_round(self, request: Request) -> None:
        """One draft-and-verify round of a speculative request (a single-row batch)."""
        assert request.speculative is not None
        self.stats.speculative_rounds += 1
        try:
            emitted = request.speculative.round(request.row.tokens_left)
            for token in emitted:
                request.row.record(token)
                if request.row.finished:
                    break
        except Exception as error:
            self._speculative.remove(request)
            self._fail(request, error)
            return
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
        self._emit(request)
        if request.row.finished:
            self._speculative.remove(request)
            self._finish(request, request.row.finish_reason or "stop")

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
            request.sink(StreamChunk(text=row.text.delta(final=True),
                                     token_ids=row.take_unsent(),
                                     finish_reason=row.finish_reason, usage=usage, stats=stats))
        request.sink(GenerationResult(
            text=row.text.text, token_ids=list(row.token_ids),
            finish_reason=row.finish_reason, usage=usage, weights=dict(request.weights),
            stats=stats,
        ))

    def _fail(self, request: Request, error: BaseException) -> None:
        self.stats.failed += 1
        request.row.finish_reason = request.row.finish_reason or "error"
        request.sink(error)


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
