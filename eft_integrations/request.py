"""One request to the engine: a prompt to complete and everything that is its own."""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .options import GenerationOptions, RequestStats
from .speculative import SpeculativeRow
from .stopping import RowText

__all__ = ["Request", "Sink"]

_SERIALS = itertools.count()

Sink = Callable[[object], None]
"""Receives a request's outputs on the engine thread: StreamChunks (when streaming), then a
GenerationResult, or an exception."""


@dataclass(eq=False)
class Request:
    """One prompt to complete, with everything that is its own (compared by identity)."""

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
    last_token_at: float = 0.0
    """When its latest tokens were recorded (inter-token latency)."""
    generator: torch.Generator | None = None
    """Its own random source when it has a seed (None: the sampler's shared one)."""
    speculative: SpeculativeRow | None = None
    pending: int | None = None  # speculative rows: the last token, not yet read by the models
    cached_prompt_tokens: int = 0
    """Prompt tokens every model found in the prefix cache (the fewest over the models)."""
    serial: int = field(default_factory=lambda: next(_SERIALS))
    """Unique for the process's lifetime (an `id()` is reused once a request is freed)."""
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        """Cancelled by `cancel()` or by the caller's own event."""
        return self._cancelled.is_set() or (
            self.caller_cancel is not None and self.caller_cancel.is_set()
        )

    @functools.cached_property
    def prompt_key(self) -> tuple[int, int, int]:
        """Equal for requests whose models read the same prompt (a hash collision only
        makes the scheduler wait one prefill longer)."""
        return (len(self.chat_ids), hash(tuple(self.chat_ids)), hash(tuple(self.base_ids)))

    @property
    def prompt_length(self) -> int:
        return len(self.chat_ids)

    @property
    def prefilled(self) -> bool:
        """Its prompt is in the models' caches (its first token is out)."""
        return self.first_token_at is not None

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
