"""The engine: one decode loop per decoder that batches every concurrent caller.

Continuous (iteration-level) batching, as in Orca, vLLM and TGI: every call becomes a
`Request`; each step the engine admits waiting requests (their prompts are prefilled and
their rows join the batch), decodes one token for every row, and retires rows the step they
finish, freeing their cache rows. Each request keeps its own weights, options, random
generator, stop strings, budget and constraint, so its output never depends on its
batch-mates.

A step is four rooms, as in nano-vllm and vLLM v1:

    schedule = scheduler.schedule(...)              who joins, who leaves (scheduler.py)
    runner.admit(schedule.admitted)                 prefill; the models run (runner.py)
    sampled  = sampler.sample(logits, rows)         compose, constrain, sample (sampler.py)
    done     = outputs.process(tokens, failed)      text, stops, streams (outputs.py)
    runner.decode(sampled.tokens, done)             the rows left feed their token

Speculative requests form a second batch beside the plain one (`runner.round()` drafts and
verifies several tokens per row, see `speculative.py`), admitted and retired the same way.

The models run on the engine thread only, under inference mode; callers block on (or await)
their request's outbox, so no lock, grad or inference-mode state is held in a caller's thread
across a `yield`. The thread exits when there is nothing to do and starts again with the next
request.

Isolation: a request's failure is its own (each room fails only its rows, see the runner and
the sampler). The loop itself is supervised: an unexpected error fails the rows in flight with
an `EngineError` and the engine goes on; after `MAX_CONSECUTIVE_CRASHES` failed iterations in
a row it stops for good, sets `failure`, and every waiting and later call fails at once
instead of hanging.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

from .adapters import adapter_batching
from .ensemble import Ensemble
from .errors import EFTRequestError, EngineError, EngineUnavailableError
from .kv_memory import KVMemory, default_kv_cache_tokens
from .outputs import EngineObserver, EngineStats, OutputProcessor
from .request import Request
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler

__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "MAX_CONSECUTIVE_CRASHES",
    "Engine",
    "EngineObserver",
    "EngineStats",
    "Request",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFILL_CHUNK = 512
"""Prompt tokens per model prefilled per step (see `benchmarks/kv_memory.py`)."""

MAX_CONSECUTIVE_CRASHES = 3
"""Engine iterations that may fail in a row (each failing the rows in flight) before the
engine declares itself unusable."""


class Engine:
    """Owns the models' decode loop; `submit` requests from any thread."""

    def __init__(
        self,
        ensemble: Ensemble,
        max_batch_size: int = 32,
        max_tokens_in_flight: int = 131_072,
        adaptive_speculation: bool = True,
        kv_cache_tokens: int | None = None,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
        prefix_caching: bool = True,
        block_size: int = 16,
        compile: bool | str = False,
    ) -> None:
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        self.ensemble = ensemble
        if kv_cache_tokens is None:
            kv_cache_tokens = default_kv_cache_tokens(
                ensemble.models, ensemble.device, max_tokens_in_flight
            )
        self.memory = KVMemory(
            ensemble.models,
            ensemble.devices,
            ensemble.pad_id,
            kv_cache_tokens,
            max_batch_size,
            block_size,
            prefix_caching,
            static=bool(compile),
        )
        if compile:
            ensemble.compile(compile if isinstance(compile, str) else None)
        """The models' KV pools and prefix caches (`memory.pools`)."""
        self.scheduler: Scheduler[Request] = Scheduler(
            max_batch_size, min(max_tokens_in_flight, kv_cache_tokens)
        )
        # an equal prompt still prefilling is waited for, then read from the prefix cache
        self.scheduler.share_prefills_from = block_size if prefix_caching else None
        self.sampler = Sampler(ensemble)
        self.stats = EngineStats(adapter_batching=adapter_batching(ensemble.models))
        self.outputs = OutputProcessor(self.stats)
        self.runner = ModelRunner(
            ensemble, self.sampler, self.outputs.fail, self.memory, self.stats, prefill_chunk
        )
        self._limits = (max_tokens_in_flight, adaptive_speculation, kv_cache_tokens)
        self._memory_args = (prefill_chunk, prefix_caching, block_size, compile)
        self.adaptive_speculation = adaptive_speculation
        """Speculative rows grow k after full acceptance and shrink it after a rejection."""
        self.failure: str | None = None
        """None while the engine can serve; why it cannot, once its loop has failed
        `MAX_CONSECUTIVE_CRASHES` times in a row (every call then fails at once)."""
        self._crashes = 0  # consecutive failed iterations
        self._cond = threading.Condition()
        self._tasks: list[_Task[Any]] = []
        self._in_transit: list[Request] = []  # scheduled, not yet held by the runner
        self._thread: threading.Thread | None = None
        _ENGINES.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # a pickled engine is its models and limits: it unpickles idle, with no thread and
        # an empty cache
        tokens, adaptive, kv_tokens = self._limits
        args = (self.ensemble, self.max_batch_size, tokens, adaptive, kv_tokens)
        return (Engine, (*args, *self._memory_args))

    @property
    def kv_cache_tokens(self) -> int:
        """The KV budget per model, in tokens (see `kv_memory.py`)."""
        return self.memory.kv_cache_tokens

    @property
    def max_batch_size(self) -> int:
        """Most rows decoding at once (the scheduler's limit)."""
        return self.scheduler.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self.scheduler.max_batch_size = value

    @property
    def max_tokens_in_flight(self) -> int:
        """Most cache positions (prompt + budget per request) in flight at once."""
        return self.scheduler.max_tokens_in_flight

    # ------------------------------------------------------------------ callers' side

    def submit(self, *requests: Request) -> None:
        """Queue requests (FIFO); they join the running batch together at the next step (a
        batch call's rows are queued under one lock, so the engine never admits half of them).
        Raises `EngineUnavailableError` at once when the engine cannot serve."""
        for request in requests:
            self._check_fits(request)
        with self._cond:
            self._check_usable()
            for request in requests:
                self.scheduler.add(request)
            try:
                self._wake()
            except BaseException:
                for request in requests:
                    self.scheduler.remove(request)
                raise

    def _check_fits(self, request: Request) -> None:
        """A request that could never fit in the KV budget is refused now (it would wait
        for ever)."""
        need, budget = request.token_footprint, self.memory.kv_cache_tokens
        if need > budget:
            raise EFTRequestError(
                f"this request needs up to {need} KV cache tokens per model (its prompt plus "
                f"max_tokens) but the decoder's KV budget is {budget} (kv_cache_tokens): "
                "shorten the prompt, lower max_tokens or build the decoder with a larger "
                "kv_cache_tokens",
                param="max_tokens",
                code="kv_cache_budget",
            )

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps (the models are never run by two
        threads at once) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        task: _Task[T] = _Task(fn)
        with self._cond:
            self._check_usable()
            self._tasks.append(task)
            self._wake()
        return task.wait()

    def add_observer(self, observer: EngineObserver) -> None:
        """Tell `observer` each row's token timing and each request's end, on the engine
        thread (see `EngineObserver`); a server's metrics listen this way. The engine holds
        it weakly: it listens while its owner keeps a reference to it."""
        self.outputs.add_observer(observer)

    def remove_observer(self, observer: EngineObserver) -> None:
        """Stop telling `observer` (no error when it was not listening)."""
        self.outputs.remove_observer(observer)

    @property
    def queued(self) -> int:
        """Requests waiting for admission."""
        return len(self.scheduler.waiting)

    @property
    def batch_size(self) -> int:
        """Rows decoding now (speculative requests included)."""
        return len(self.runner.plain_rows) + len(self.runner.speculative_rows)

    def cached_tokens(self) -> int:
        """Tokens the rows in flight hold in the models' caches, summed over models."""
        return self.runner.cached_tokens()

    def _check_usable(self) -> None:
        if self.failure is not None:
            raise EngineUnavailableError(
                f"the EFT engine cannot serve: {self.failure}; restart the process (or build "
                "a new EFTDecoder)"
            )

    def _wake(self) -> None:
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="eft-engine", daemon=True)
            thread.start()
            self._thread = thread
            _THREADS.add(thread)
        self._cond.notify()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        """The engine thread: steps until idle, each supervised (see the module doc)."""
        try:
            with torch.inference_mode():
                while self._has_work():
                    try:
                        self.step()
                    except Exception as error:
                        self._recover(error)
                    else:
                        self._crashes = 0
        except BaseException as error:  # not even recovery worked: nobody may wait forever
            self._stop_for_good(error)
            raise

    def _has_work(self) -> bool:
        with self._cond:
            if self.failure is None and (self.queued or self._tasks or self.batch_size):
                return True
            self._thread = None  # idle: exit; the next submit starts a new one
            return False

    def step(self) -> None:
        """One iteration: tasks, then schedule -> prefill -> decode (-> speculative round)."""
        with self._cond:
            tasks, self._tasks = self._tasks, []
            schedule = self.scheduler.schedule(self.runner.plain_rows, self.runner.speculative_rows)
            self._in_transit = [*schedule.admitted, *schedule.cancelled_waiting]
        for task in tasks:
            task.run()
        self.outputs.cancelled([*schedule.cancelled_waiting, *schedule.cancelled_running])
        self.runner.drop(set(schedule.cancelled_running))
        self.stats.admitted += len(schedule.admitted)
        self.sampler.prefetch_masks(schedule.admitted)  # computed while the prefill runs
        new_speculative, logits = self.runner.admit(schedule.admitted)
        self._in_transit = []
        if new_speculative:
            self._first_speculative_tokens(new_speculative, logits)
        if self.runner.plain.rows:
            self._decode_step()
        if self.runner.speculative.rows:
            self._speculative_step()

    def _decode_step(self) -> None:
        """One token for every plain row; finished rows leave; the rest feed their token."""
        rows = self.runner.plain.rows
        self.stats.steps += 1
        self.stats.batch_sizes.append(len(rows))
        sampled = self.sampler.sample(self.runner.plain.logits, rows)
        tokens = {r: [t] for r, t in zip(rows, sampled.token_ids, strict=True)}
        done = self.outputs.process(tokens, sampled.failed, sampled.logprobs)
        # the next step's grammar masks are computed while the models run
        self.sampler.prefetch_masks([r for r in rows if r not in done], whole_batch=True)
        self.runner.decode(sampled.tokens, done, sampled.token_ids)

    def _first_speculative_tokens(self, rows: list[Request], logits: list[torch.Tensor]) -> None:
        """New speculative rows sample their first token from their prefill: it is pending."""
        sampled = self.sampler.sample(logits, rows)
        self.runner.start_speculative(rows, sampled.token_ids, self.adaptive_speculation)
        tokens = {r: [t] for r, t in zip(rows, sampled.token_ids, strict=True)}
        self.runner.drop(self.outputs.process(tokens, sampled.failed, sampled.logprobs))

    def _speculative_step(self) -> None:
        """One draft-and-verify round for every speculative row."""
        self.stats.speculative_rounds += 1
        round_ = self.runner.round()
        self.runner.drop(self.outputs.process(round_.tokens, round_.failed, round_.logprobs))

    def _recover(self, error: Exception) -> None:
        """A step failed outside any row's own phase: fail the rows in flight (their state is
        unknown) and go on; stop for good after too many failures in a row."""
        self._crashes += 1
        logger.error("EFT engine step failed; failing the rows in flight", exc_info=error)
        self.sampler.drop_masks()
        if self._crashes >= MAX_CONSECUTIVE_CRASHES:
            self._stop_for_good(error)
            return
        failure = EngineError(
            f"the EFT engine failed while this request was decoding ({type(error).__name__}: "
            f"{error}); the engine recovered: retry the request"
        )
        for request in self._in_flight():
            self.outputs.fail(request, failure)

    def _in_flight(self) -> list[Request]:
        """Every request the engine thread holds and has not answered (the runner's rows and
        those scheduled but not yet admitted); the runner lets go of them."""
        held = [*self.runner.clear(), *self._in_transit]
        self._in_transit = []
        return [r for r in dict.fromkeys(held) if not r.row.finished]

    def _stop_for_good(self, error: BaseException) -> None:
        """Mark the engine unusable and answer everyone now: rows in flight, waiting requests
        and tasks get an `EngineUnavailableError`."""
        with self._cond:
            self.failure = (
                f"its decode loop failed {self._crashes or 1} times in a row, last with "
                f"{type(error).__name__}: {error}"
            )
            waiting = self.scheduler.drain()
            tasks, self._tasks = self._tasks, []
            self._thread = None
        unavailable = EngineUnavailableError(f"the EFT engine cannot serve: {self.failure}")
        for request in [*self._in_flight(), *waiting]:
            self.outputs.fail(request, unavailable)
        for task in tasks:
            task.fail(unavailable)


_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _join_engine_threads() -> None:
    """Let engine threads leave torch before the interpreter tears it down (a daemon thread
    killed inside a torch op aborts the process with `terminate called ...`)."""
    for engine in list(_ENGINES):
        with engine._cond:
            engine.scheduler.drain()
            for request in [*engine.runner.plain_rows, *engine.runner.speculative_rows]:
                request.cancel()
    # every engine thread, also one that has marked its engine idle and is still returning
    for thread in list(_THREADS):
        thread.join(timeout=10)


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

    def fail(self, error: BaseException) -> None:
        """Answer the caller with an error instead of running."""
        self._error = error
        self._done.set()

    def wait(self) -> T:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]
