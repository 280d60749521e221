"""Measuring whether a coroutine leaves the asyncio event loop free while it decodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoopProbe:
    """What a ticker saw while a coroutine ran: the gaps between its wake-ups."""

    gaps: list[float]
    elapsed: float
    result: Any

    @property
    def ticks(self) -> int:
        return len(self.gaps)

    @property
    def max_gap(self) -> float:
        """The longest time the event loop was held (0 if the ticker never woke)."""
        return max(self.gaps, default=0.0)


async def run_beside_ticker(
    coro_factory: Callable[[], Awaitable[Any]], tick: float = 0.005
) -> LoopProbe:
    """Await `coro_factory()` while another task sleeps `tick` in a loop."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(tick)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = time.perf_counter()
    try:
        result = await coro_factory()
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        await task
    return LoopProbe(gaps, elapsed, result)
