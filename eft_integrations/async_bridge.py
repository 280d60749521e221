"""Run a blocking token iterator on a worker thread and consume it from asyncio.

Decoding is compute-bound torch code; running it on the event loop would freeze every other
coroutine. The worker thread pushes items through a queue, and cancelling the consumer sets an
event the producer checks between tokens, so decoding stops and its caches are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

__all__ = ["iterate_in_thread"]

T = TypeVar("T")

_DONE = object()


async def iterate_in_thread(
    make_iterator: Callable[[threading.Event], Iterator[T]],
) -> AsyncIterator[T]:
    """Yield the items of `make_iterator(cancel)` produced on a daemon worker thread.

    `make_iterator` receives a `threading.Event` that is set when the consumer stops early
    (cancellation, `break`, or an exception); the iterator should stop soon after.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    cancel = threading.Event()

    def produce() -> None:
        iterator = make_iterator(cancel)
        try:
            for item in iterator:
                loop.call_soon_threadsafe(queue.put_nowait, item)
                if cancel.is_set():
                    break
        except BaseException as error:  # re-raised on the consumer's side
            loop.call_soon_threadsafe(queue.put_nowait, _Failure(error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            # a closed loop means nobody is waiting any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    worker = threading.Thread(target=produce, name="eft-decode", daemon=True)
    worker.start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        cancel.set()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error
