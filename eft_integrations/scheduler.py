"""The scheduler: which requests join the running batch this step, and which leave it.

Plain Python, no torch, no threads (the engine calls it under its lock), so the policy can be
read and tested on its own, as nano-vllm's and vLLM's schedulers are:

- first come, first served: the waiting queue is FIFO and nobody overtakes its head;
- a request waits while the batch has `max_batch_size` rows, or while admitting it would put
  more than `max_tokens_in_flight` cache positions (prompt + budget per request) in flight;
  an empty engine always takes the next request, whatever its size;
- a solo request (one that may reach a position where a model's RoPE changes for the whole
  forward, see `Ensemble.needs_own_forwards`) joins only an empty batch of its kind, and
  nothing joins a batch it is in;
- a cancelled request leaves: from the queue before it ever runs, from the batch at the
  next step;
- with prefix caching (`share_prefills_from`), a request whose prompt equals that of a
  request still prefilling waits until that prefill is done, then reads the prompt from the
  prefix cache: the n samples of one prompt, or a burst of equal prompts, compute it once.
  Such a request steps aside while it waits (the requests behind it may pass it), so a long
  prefill holds only its own followers.

Plain and speculative requests form two batches (see `engine.py`); limits count both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

__all__ = ["Schedulable", "Scheduler", "SchedulerOutput"]


class Schedulable(Protocol):
    """What the scheduler reads of a request."""

    @property
    def cancelled(self) -> bool: ...

    @property
    def token_footprint(self) -> int: ...

    @property
    def solo(self) -> bool: ...

    @property
    def speculative_k(self) -> int | None: ...

    @property
    def prompt_key(self) -> Hashable:
        """Equal for requests whose models read the same prompt tokens."""
        ...

    @property
    def prompt_length(self) -> int: ...

    @property
    def prefilled(self) -> bool:
        """Its prompt is in the cache (its first token is out)."""
        ...


R = TypeVar("R", bound=Schedulable)


@dataclass
class SchedulerOutput(Generic[R]):
    """One step's decisions."""

    admitted: list[R] = field(default_factory=list)
    """Waiting requests that join the batch now, in arrival order."""
    cancelled_waiting: list[R] = field(default_factory=list)
    """Requests cancelled before they ran: they leave the queue."""
    cancelled_running: list[R] = field(default_factory=list)
    """Running requests cancelled since the last step: they leave the batch."""


class Scheduler(Generic[R]):
    """The waiting queue and the admission policy (see the module docstring)."""

    def __init__(self, max_batch_size: int = 32, max_tokens_in_flight: int = 131_072) -> None:
        if max_batch_size < 1 or max_tokens_in_flight < 1:
            raise ValueError("max_batch_size and max_tokens_in_flight must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_tokens_in_flight = max_tokens_in_flight
        self.waiting: deque[R] = deque()
        self.share_prefills_from: int | None = None
        """Prompts of at least this many tokens wait for an equal one still prefilling (the
        engine sets it to the KV block size with prefix caching; None: never wait)."""

    def add(self, request: R) -> None:
        """Queue a request at the back."""
        self.waiting.append(request)

    def remove(self, request: R) -> None:
        """Take a request back out of the queue (it could not be handed to the engine)."""
        self.waiting.remove(request)

    def drain(self) -> list[R]:
        """Empty the queue and return what it held."""
        waiting = list(self.waiting)
        self.waiting.clear()
        return waiting

    def schedule(self, plain: Sequence[R], speculative: Sequence[R]) -> SchedulerOutput[R]:
        """Decide this step, given the requests running in the plain and speculative batch."""
        out: SchedulerOutput[R] = SchedulerOutput()
        out.cancelled_running = [r for r in (*plain, *speculative) if r.cancelled]
        leaving = {id(r) for r in out.cancelled_running}
        running = {
            False: [r for r in plain if id(r) not in leaving],
            True: [r for r in speculative if id(r) not in leaving],
        }
        rows = len(running[False]) + len(running[True])
        in_flight = sum(r.token_footprint for batch in running.values() for r in batch)
        prefilling = {r.prompt_key for batch in running.values() for r in batch if self._shares(r)}
        cached = {r.prompt_key for batch in running.values() for r in batch if r.prefilled}
        aside: deque[R] = deque()  # waiting for an equal prompt's prefill, in order
        while self.waiting:
            request = self.waiting[0]
            if request.cancelled:
                out.cancelled_waiting.append(self.waiting.popleft())
                continue
            if self._shares(request) and request.prompt_key in prefilling:
                aside.append(self.waiting.popleft())  # it reads the cache once that is done
                continue
            mates = running[request.speculative_k is not None]
            if mates and (request.solo or any(r.solo for r in mates)):
                break
            fits = (
                rows < self.max_batch_size
                and in_flight + request.token_footprint <= self.max_tokens_in_flight
            )
            if not fits and rows > 0:  # an empty engine always takes the next request
                break
            self.waiting.popleft()
            out.admitted.append(request)
            mates.append(request)
            rows += 1
            in_flight += request.token_footprint
            if self._shares(request) and request.prompt_key not in cached:
                prefilling.add(request.prompt_key)  # the first of its prompt computes it
        self.waiting.extendleft(reversed(aside))
        return out

    def _shares(self, request: R) -> bool:
        """Whether `request`'s prompt is long enough to share, and not yet in the cache."""
        least = self.share_prefills_from
        return least is not None and request.prompt_length >= least and not request.prefilled
