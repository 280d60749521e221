"""The output processor: sampled tokens -> text, stop decisions and what each caller is sent.

For every row of a step it records the new tokens (incremental text, stop strings, budget,
constraint, end of turn: `RowText`), streams the text that is safe to show, and finishes or
fails the rows that are done. A caller that cannot take its output (a closed event loop, a
broken sink) loses its own request, never the engine.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .options import GenerationResult, StreamChunk, TokenLogprob, Usage
from .request import Request

__all__ = ["EngineStats", "OutputProcessor"]

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
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))

    @property
    def max_batch_size_seen(self) -> int:
        return max(self.batch_sizes, default=0)


class OutputProcessor:
    """Turns a step's tokens into text, stream chunks, results and errors."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats

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
            self.finish(request, "stop")
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

    def finish(self, request: Request, reason: str) -> None:
        """Send the final chunk (streams) and the result."""
        row = request.row
        row.finish_reason = row.finish_reason or reason
        now = time.monotonic()
        usage = Usage(row.prompt_tokens, len(row.token_ids), request.cached_prompt_tokens)
        stats = request.stats(now)
        self.stats.finished += 1
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
        _send(request, error)


def _send(request: Request, item: object) -> None:
    """Hand an output to the request's caller; a caller that cannot take it loses its
    request, never the engine."""
    try:
        request.sink(item)
    except Exception:
        logger.warning("could not deliver to a request's caller; cancelling it", exc_info=True)
        request.cancel()
