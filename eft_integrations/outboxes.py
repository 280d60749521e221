"""Where the engine thread hands a request's chunks and result to its caller.

A blocking caller (`generate`, `stream`) reads a `queue.SimpleQueue`; a coroutine (`agenerate`,
`astream`) awaits an `asyncio.Queue` fed through its event loop's mailbox. The engine only ever
calls a request's sink, which never blocks it.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["loop_sink", "queue_sink", "unwrap"]


def queue_sink(outboxes: list[queue.SimpleQueue[object]]) -> Callable[[object], None]:
    """A new outbox for a request read by a blocking caller; its `put` is the sink."""
    outboxes.append(queue.SimpleQueue())
    return outboxes[-1].put


def loop_sink(outboxes: list[asyncio.Queue[object]]) -> Callable[[object], None]:
    """A new outbox for a request awaited on this event loop; the sink hands items from the
    engine thread to it through the loop's mailbox."""
    loop = asyncio.get_running_loop()
    mailbox = _MAILBOXES.get(loop)
    if mailbox is None:
        mailbox = _MAILBOXES[loop] = _LoopMailbox(loop)
    outboxes.append(asyncio.Queue())
    return functools.partial(mailbox.put, outboxes[-1])


def unwrap(item: object) -> Any:
    """An outbox item: a StreamChunk or GenerationResult, or the request's error, raised."""
    if isinstance(item, BaseException):
        raise item
    return item


class _LoopMailbox:
    """Items from the engine thread for one event loop's outboxes. A step's items for every
    request awaited on the loop arrive with ONE wake-up of the loop (`call_soon_threadsafe`
    writes to the loop's self-pipe), not one per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: list[tuple[asyncio.Queue[object], object]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, outbox: asyncio.Queue[object], item: object) -> None:
        with self._lock:
            self._items.append((outbox, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is waiting
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for outbox, item in items:
            outbox.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopMailbox] = (
    weakref.WeakKeyDictionary()
)
