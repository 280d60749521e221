"""Several engine calls behind one HTTP request (`n` choices, several prompts): run them
together, answer when all are done, and stop the others as soon as one fails.

    results = await all_or_none(decoder.agenerate(p, seed=s) for s in seeds)
    async for index, chunk in merged(streams, firsts):     # streams, interleaved
        ...

The engine batches the calls (they are independent requests); with prefix caching, the
samples of one prompt read it from the cache after the first has computed it (see the
scheduler).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import Any, TypeVar

__all__ = ["all_or_none", "firsts", "merged"]

T = TypeVar("T")

_END = object()


async def all_or_none(work: Iterable[Awaitable[T]]) -> list[T]:
    """The results of every awaitable, in order; when one raises, the others are cancelled
    (and awaited) before its error propagates, so no call outlives the request."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def firsts(streams: Sequence[AsyncIterator[T]]) -> list[T]:
    """The first item of each stream, awaited together (a stream that ends empty is a
    RuntimeError)."""
    return await all_or_none(_first(s) for s in streams)


async def _first(stream: AsyncIterator[T]) -> T:
    try:
        return await anext(stream)
    except StopAsyncIteration:  # a Task may not raise it (it ends generators)
        raise RuntimeError("the engine ended the stream without output") from None


async def merged(
    streams: Sequence[AsyncIterator[T]], heads: Sequence[T]
) -> AsyncIterator[tuple[int, T]]:
    """`(index, item)` of every stream as items arrive, each stream's `heads` item first;
    the first error of any stream is raised. Closing it cancels and closes every stream."""
    tasks: list[asyncio.Future[None]] = []
    try:
        for index, head in enumerate(heads):
            yield index, head
        if len(streams) == 1:  # one choice: no task or queue between engine and client
            async for item in streams[0]:
                yield 0, item
            return
        arrivals: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
        tasks = [asyncio.ensure_future(_pump(i, s, arrivals)) for i, s in enumerate(streams)]
        live = len(streams)
        while live:
            index, item, error = await arrivals.get()
            if error is not None:
                raise error
            if item is _END:
                live -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


async def _pump(
    index: int,
    stream: AsyncIterator[Any],
    arrivals: asyncio.Queue[tuple[int, Any, BaseException | None]],
) -> None:
    """Move one stream's items (then its end, or its error) into `arrivals`; whatever ends
    the stream but a cancellation is reported, so `merged` never waits for it in vain."""
    try:
        async for item in stream:
            await arrivals.put((index, item, None))
    except asyncio.CancelledError:
        raise
    except BaseException as error:
        arrivals.put_nowait((index, None, error))
        if not isinstance(error, Exception):
            raise
    else:
        arrivals.put_nowait((index, _END, None))
