"""Prometheus metrics of one server and its engine, served at `GET /metrics`, with names in
the style of vLLM's (`eft_` where vLLM has `vllm:`).

Three sources, so that each figure is counted once, where it happens:
- the engine (`ServerMetrics` is an `EngineObserver`): time to first token, inter-token
  latency (one observation per row per step, as vLLM counts it), end-to-end latency, queue
  time, prompt / generated / cached tokens, finish reasons, failures, speculative drafts;
- the HTTP layer (`middleware.AccessLog` calls `observe_http`): requests by route and status,
  and their latency as the client sees it;
- the engine's live state, read at each scrape (`_LiveState`): requests waiting and running,
  prompts the server holds, KV blocks in use, prefix-cache hits, whether the engine serves.

Each app has its own registry, so that several apps in one process (tests, notebooks) do
not share figures; prometheus-client is thread-safe, so the engine thread observes directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from ..engine import EngineObserver
from ..options import RequestStats, Usage

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics", "route_label"]

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
"""vLLM's time-to-first-token buckets: from a cached one-token prompt to a long queue."""
_INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
    0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip

_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def route_label(path: str) -> str:
    """The route a path belongs to; any other path is "other" (a label per unknown path
    would let clients grow the server's memory without bound)."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class ServerMetrics(EngineObserver):
    """The metrics of one app over one engine: `attach` starts hearing the engine, `render`
    gives the exposition text a Prometheus scrape reads."""

    def __init__(self, decoder: Any, admission: Any) -> None:
        self.engine = engine = decoder.engine
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.http_requests = Counter(
            "eft_http_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=registry,
        )
        self.http_latency = Histogram(
            "eft_http_request_duration_seconds",
            "From a request's arrival to its response's last byte (a stream's [DONE]).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "eft_time_to_first_token_seconds",
            "From submission to the engine to a request's first token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "eft_inter_token_latency_seconds",
            "Between a row's successive steps with new tokens.",
            buckets=_INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.e2e_latency = Histogram(
            "eft_e2e_request_latency_seconds",
            "From submission to the engine to a request's last token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "eft_request_queue_time_seconds",
            "From submission to admission into the running batch.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "eft_request_success",
            "Engine requests that ended with a result, by finish reason (abort: cancelled by "
            "their caller).",
            ["finished_reason"],
            registry=registry,
        )
        self.failed = Counter(
            "eft_request_failure",
            "Engine requests that ended with an error, by error type.",
            ["error"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "eft_prompt_tokens", "Prompt tokens read by finished requests.", registry=registry
        )
        self.cached_prompt_tokens = Counter(
            "eft_prompt_tokens_cached",
            "Prompt tokens every model read from the prefix cache.",
            registry=registry,
        )
        self.generation_tokens = Counter(
            "eft_generation_tokens", "Tokens generated by finished requests.", registry=registry
        )
        self.draft_tokens = Counter(
            "eft_spec_decode_num_draft_tokens",
            "Tokens proposed by the drafting models (speculative requests).",
            registry=registry,
        )
        self.accepted_tokens = Counter(
            "eft_spec_decode_num_accepted_tokens",
            "Drafted tokens the verification accepted (speculative requests).",
            registry=registry,
        )
        registry.register(_LiveState(engine, admission, decoder.model_names))

    # ------------------------------------------------------------ the engine's events

    def attach(self) -> None:
        """Start hearing the engine (idempotent; held weakly by it, see `add_observer`)."""
        self.engine.add_observer(self)

    def detach(self) -> None:
        self.engine.remove_observer(self)

    def on_first_token(self, time_to_first_token: float) -> None:
        self.time_to_first_token.observe(time_to_first_token)

    def on_tokens(self, gap: float, tokens: int) -> None:
        self.inter_token_latency.observe(gap)

    def on_finish(self, stats: RequestStats, usage: Usage, finish_reason: str) -> None:
        self.finished.labels(finish_reason).inc()
        self.e2e_latency.observe(stats.total_time)
        self.queue_time.observe(stats.queue_time)
        if stats.time_to_first_token is not None:  # its prompt was read (not cancelled early)
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.cached_prompt_tokens.inc(usage.cached_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        if stats.drafted_tokens:
            self.draft_tokens.inc(stats.drafted_tokens)
            self.accepted_tokens.inc(stats.accepted_tokens or 0)

    def on_failure(self, error: BaseException) -> None:
        self.failed.labels(type(error).__name__).inc()

    # ------------------------------------------------------------ the HTTP layer

    def observe_http(self, path: str, status: int, seconds: float) -> None:
        """One answered HTTP request (`middleware.AccessLog`)."""
        route = route_label(path)
        self.http_requests.labels(route, str(status)).inc()
        self.http_latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        """The exposition text of every metric (content type `CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)


class _LiveState(Collector):
    """Gauges read from the engine and the admission at each scrape (plain reads of counters
    the engine thread writes: a scrape may see a step half done, never a broken value)."""

    def __init__(self, engine: Any, admission: Any, model_names: list[str]) -> None:
        self.engine = engine
        self.admission = admission
        self.model_names = model_names

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the names are only known by collecting; nothing to check them against

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        yield _gauge("eft_num_requests_waiting", "Requests waiting for admission.", engine.queued)
        yield _gauge(
            "eft_num_requests_running", "Rows decoding now (speculative included).",
            engine.batch_size,
        )  # fmt: skip
        yield _gauge(
            "eft_num_prompts_in_flight",
            "Prompts the server holds (admitted, not yet answered).",
            self.admission.prompts,
        )
        yield _gauge(
            "eft_engine_up", "1 while the engine can serve, 0 once it failed for good.",
            int(engine.failure is None),
        )  # fmt: skip
        yield from self._kv(engine)
        stats = engine.stats
        if stats.adapter_batching:
            backbones = GaugeMetricFamily(
                "eft_adapter_backbone_info",
                "1 per adapter backbone; batching: mixed (one forward for every adapter's "
                "rows) or per_adapter (its PEFT method cannot mix them).",
                labels=["backbone", "batching"],
            )
            for backbone, how in stats.adapter_batching.items():
                backbones.add_metric([backbone, "mixed" if how == "mixed" else "per_adapter"], 1)
            yield backbones
        yield _counter("eft_engine_steps", "Decode steps the engine ran.", stats.steps)
        yield _counter(
            "eft_prefix_cache_hit_tokens",
            "Prompt tokens read from the prefix cache, summed over models.",
            stats.prompt_tokens_cached,
        )
        yield _counter(
            "eft_prompt_tokens_computed",
            "Prompt tokens the models computed, summed over models.",
            stats.prompt_tokens_computed,
        )

    def _kv(self, engine: Any) -> Iterator[Metric]:
        pools = engine.memory.pools
        used = GaugeMetricFamily(
            "eft_kv_cache_usage_perc",
            "Share of each model's KV blocks held by rows (1 = full).",
            labels=["model"],
        )
        cached = GaugeMetricFamily(
            "eft_kv_cache_cached_blocks",
            "KV blocks that only keep a cached prefix, per model.",
            labels=["model"],
        )
        for name, pool in zip(self.model_names, pools, strict=True):
            usable = max(pool.capacity_blocks - 1, 1)  # block 0 pads
            used.add_metric([name], pool.used_blocks / usable)
            cached.add_metric([name], pool.cached_blocks)
        yield used
        yield cached
        yield _gauge(
            "eft_kv_cache_budget_tokens", "The KV budget per model, in tokens.",
            engine.kv_cache_tokens,
        )  # fmt: skip


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
