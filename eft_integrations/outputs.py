"""The output processor: sampled tokens -> text, stop decisions and what each caller is sent.

For every row of a step it records the new tokens (incremental text, stop strings, budget,
constraint, end of turn: `RowText`), streams the text that is safe to show, and finishes or
fails the rows that are done. A caller that cannot take its output (a closed event loop, a
broken sink) loses its own request, never the engine.

Observers (`EngineObserver`, added with `Engine.add_observer`) hear each row's token timing
and each request's end on the engine thread, as vLLM's stat loggers do: the server's
Prometheus metrics are one. An observer that raises is logged and left out of that event;
the rows never see it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .options import GenerationResult, RequestStats, StreamChunk, TokenLogprob, Usage
from .request import Request

__all__ = ["EngineObserver", "EngineStats", "OutputProcessor"]

logger = logging.getLogger(__name__)


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
    prefill_chunks: int = 0
    """Prefill steps run (a prompt longer than `prefill_chunk` takes several)."""
    prompt_tokens_computed: int = 0
    """Prompt tokens the models computed, summed over models."""
    prompt_tokens_cached: int = 0
    """Prompt tokens the models read from the prefix cache, summed over models."""
    failed_decode_forwards: int = 0
    """Decode forwards that raised (their rows were rebuilt by prefilling them again)."""
    adapter_batching: dict[str, str] = field(default_factory=dict)
    """How each adapter backbone runs its views: "mixed" (one decode forward for the rows of
    every adapter) or "one forward per adapter: <why>" (PEFT cannot mix its adapters)."""
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))

    @property
    def max_batch_size_seen(self) -> int:
        return max(self.batch_sizes, default=0)


class EngineObserver:
    """Hears what the engine does, on the engine thread (keep each call short: the step
    waits for it). Override what you need; every method does nothing by default."""

    def on_first_token(self, time_to_first_token: float) -> None:
        """A request's first tokens arrived, this long after it was submitted."""

    def on_tokens(self, gap: float, tokens: int) -> None:
        """A running request got `tokens` more (one, or a speculative round's), `gap` seconds
        after its previous ones (one inter-token latency per step, as vLLM counts it)."""

    def on_finish(self, stats: RequestStats, usage: Usage, finish_reason: str) -> None:
        """A request ended with a result: its finish reason, or "abort" when its caller
        cancelled it (a client gone, a server shutting down)."""

    def on_failure(self, error: BaseException) -> None:
        """A request ended with `error` instead of a result."""


class OutputProcessor:
    """Turns a step's tokens into text, stream chunks, results and errors."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats
        # weak references (an app's metrics go when the app goes, not with the engine), in a
        # tuple replaced whole under a lock: the engine thread reads one attribute, never a
        # collection another thread is changing
        self._observers: tuple[weakref.ref[EngineObserver], ...] = ()
        self._observers_lock = threading.Lock()

    @property
    def observers(self) -> list[EngineObserver]:
        """The observers listening now."""
        return [o for ref in self._observers if (o := ref()) is not None]

    def add_observer(self, observer: EngineObserver) -> None:
        with self._observers_lock:
            if observer not in self.observers:
                self._observers = (*self._live_refs(), weakref.ref(observer))

    def remove_observer(self, observer: EngineObserver) -> None:
        with self._observers_lock:
            self._observers = tuple(r for r in self._live_refs() if r() is not observer)

    def _live_refs(self) -> tuple[weakref.ref[EngineObserver], ...]:
        return tuple(r for r in self._observers if r() is not None)

    def _tell(self, event: str, *args: object) -> None:
        """Call `event` on every observer; one that raises is logged, never the rows' loss."""
        for ref in self._observers:
            observer = ref()
            if observer is None:
                continue
            try:
                getattr(observer, event)(*args)
            except Exception:
                logger.warning("engine observer %r failed on %s", observer, event, exc_info=True)

    def process(
        self,
        tokens: Mapping[Request, list[int]],
        failed: Mapping[Request, Exception],
        logprobs: Mapping[Request, list[TokenLogprob]] | None = None,
    ) -> set[Request]:
        """Record each row's new tokens (and their `logprobs`, for the rows that asked),
        stream what is safe to show, finish the rows that are done and fail the rows in
        `failed` (or whose recording raised). Returns the rows that left (finished or
        failed)."""
        now = time.monotonic()
        failures = dict(failed)
        for request, new in tokens.items():
            if request in failures:
                continue
            entries = (logprobs or {}).get(request) or [None] * len(new)
            try:
                for token, entry in zip(new, entries, strict=True):
                    request.row.record(token, entry)
                    if request.row.finished:
                        break
            except Exception as error:  # this row's constraint or stop handling failed
                failures[request] = error
                continue
            if request.first_token_at is None:
                request.first_token_at = now
                self._tell("on_first_token", now - request.submitted_at)
            else:
                self._tell("on_tokens", now - request.last_token_at, len(new))
            request.last_token_at = now
            self._emit(request)
        done = set(failures)
        for request, error in failures.items():
            self.fail(request, error)
        for request in tokens:
            if request not in done and request.row.finished:
                self.finish(request, request.row.finish_reason or "stop")
                done.add(request)
        return done

    def cancelled(self, requests: Iterable[Request]) -> None:
        """Requests cancelled by their callers: they end with what they have."""
        for request in requests:
            self.finish(request, "stop", aborted=True)
            self.stats.cancelled += 1

    def _emit(self, request: Request) -> None:
        """Send a streaming request the text that is safe to show."""
        if not request.streaming or request.row.finished:
            return
        piece = request.row.text.delta()
        if piece:
            _send(
                request,
                StreamChunk(
                    text=piece,
                    token_ids=request.row.take_unsent(),
                    logprobs=request.row.take_unsent_logprobs(),
                ),
            )

    def finish(self, request: Request, reason: str, aborted: bool = False) -> None:
        """Send the final chunk (streams) and the result; `aborted`: its caller cancelled it
        (observers hear the reason "abort")."""
        row = request.row
        row.finish_reason = row.finish_reason or reason
        now = time.monotonic()
        usage = Usage(row.prompt_tokens, len(row.token_ids), request.cached_prompt_tokens)
        stats = request.stats(now)
        self.stats.finished += 1
        self._tell("on_finish", stats, usage, "abort" if aborted else row.finish_reason)
        if request.streaming:
            _send(
                request,
                StreamChunk(
                    text=row.text.delta(final=True),
                    token_ids=row.take_unsent(),
                    logprobs=row.take_unsent_logprobs(),
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
                logprobs=None if row.logprobs is None else list(row.logprobs),
            ),
        )

    def fail(self, request: Request, error: BaseException) -> None:
        """Answer the request with its error."""
        self.stats.failed += 1
        request.row.finish_reason = request.row.finish_reason or "error"
        self._tell("on_failure", error)
        _send(request, error)


def _send(request: Request, item: object) -> None:
    """Hand an output to the request's caller; a caller that cannot take it loses its
    request, never the engine."""
    try:
        request.sink(item)
    except Exception:
        logger.warning("could not deliver to a request's caller; cancelling it", exc_info=True)
        request.cancel()
