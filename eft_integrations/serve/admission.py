"""Admission control and graceful shutdown: which requests the server holds, in prompts.

A request reserves its prompts (one for a chat turn, one per prompt of a completions request)
synchronously, in the route, before its first `await`: no other request runs between the
check and the reservation, so a burst over the limit gets 503 for exactly the excess (the
engine's own counters would lag: a request reaches them only after its prompt is tokenized on
a worker thread). The reservation is released when the request ends, however it ends (answer
sent, error, client gone), by the request's end callbacks (`middleware.RequestContext`).

Shutdown (`Admission.drain`): admit nothing more (503), give the requests held a grace period
to finish, then abort the rest: each reservation's cancel event is set, the engine retires
their rows at its next step, and the routes answer an aborted request with an error (a
stream ends with an error event and `[DONE]`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from .errors import APIError, ServerShuttingDown

__all__ = ["Admission", "Reservation"]

POLL_SECONDS = 0.05
"""How often a drain looks whether the requests held have ended."""
ABORT_WAIT = 10.0
"""Seconds the requests cut short get to send their last words (an error event, `[DONE]`)."""


class Reservation:
    """One request's place in the server: its prompts, and the cancel event the engine reads
    for its rows (set when the server aborts it)."""

    def __init__(self, admission: Admission, prompts: int) -> None:
        self._admission = admission
        self.prompts = prompts
        self.cancel = threading.Event()
        """Passed to the decoder as `cancel` (only read there): set when the server cuts the
        request short, and when the request ends (rows a lost stream left behind go too)."""
        self.aborted = False
        """The server cut this request short (shutting down): its output is incomplete."""
        self._released = False

    def abort(self) -> None:
        """Cut the request short: the engine retires its rows at its next step."""
        self.aborted = True
        self.cancel.set()

    def check(self) -> None:
        """Raise `ServerShuttingDown` when the request was aborted."""
        if self.aborted:
            raise ServerShuttingDown(
                "the server is shutting down and cut this request short; retry on another server"
            )

    def release(self) -> None:
        """Give the prompts back and cancel whatever the engine still runs for the request
        (idempotent)."""
        self.cancel.set()
        if not self._released:
            self._released = True
            self._admission._release(self)


class Admission:
    """The requests the server holds, counted in prompts, against `max_queue`: at most
    `engine.max_batch_size + max_queue` prompts at once (all decoding, or a batch full and
    `max_queue` waiting). `max_queue=None` admits everything (the count still serves the
    drain). Only this server's requests count: in-process callers of the same engine do not."""

    def __init__(self, engine: Any, max_queue: int | None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.prompts = 0
        """Prompts held by the requests admitted and not yet ended."""
        self.draining = False
        """Set by `drain`: nothing more is admitted."""
        self._held: set[Reservation] = set()

    @property
    def requests(self) -> int:
        """Requests admitted and not yet ended."""
        return len(self._held)

    def capacity(self) -> int | None:
        """Most prompts held at once (None: no limit)."""
        if self.max_queue is None:
            return None
        return self.engine.max_batch_size + self.max_queue

    def reserve(self, prompts: int, prompt_field: str = "messages") -> Reservation:
        """Admit a request of `prompts` prompts, or raise: 503 while shutting down or full
        (with Retry-After), 400 for a request larger than the whole capacity (it would never
        fit). Synchronous: call it before the request's first `await`."""
        if self.draining:
            raise ServerShuttingDown()
        capacity = self.capacity()
        if capacity is not None:
            if prompts > capacity:
                raise APIError(
                    400,
                    f"this request has {prompts} prompts but the server holds at most "
                    f"{capacity} at once (max_batch_size={self.engine.max_batch_size} + "
                    f"max_queue={self.max_queue}); split it into smaller requests",
                    param=prompt_field,
                    code="too_many_prompts",
                )
            if self.prompts + prompts > capacity:
                raise APIError(
                    503,
                    f"the server is full: {self.prompts} prompts in flight, at most {capacity} "
                    f"(batch of {self.engine.max_batch_size}, max_queue={self.max_queue}); "
                    "retry shortly",
                    type="server_overloaded",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
        reservation = Reservation(self, prompts)
        self._held.add(reservation)
        self.prompts += prompts
        return reservation

    def _release(self, reservation: Reservation) -> None:
        self._held.discard(reservation)
        self.prompts -= reservation.prompts

    def abort(self) -> None:
        """Cut every request held short: the engine retires their rows at its next step."""
        for reservation in list(self._held):
            reservation.abort()

    async def drain(self, grace: float, abort_wait: float = ABORT_WAIT) -> bool:
        """Stop admitting; wait up to `grace` seconds for the requests held to end; abort the
        rest and wait up to `abort_wait` seconds for them to answer. True when every request
        ended."""
        self.draining = True
        if await self._ended_within(grace):
            return True
        self.abort()
        return await self._ended_within(abort_wait)

    async def _ended_within(self, seconds: float) -> bool:
        # polling, not an asyncio.Event: the app may be served by more than one event loop
        # over its life (tests, notebooks), and an Event binds to the first
        deadline = time.monotonic() + seconds
        while self._held and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        return not self._held
