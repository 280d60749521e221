"""Operators' view of `eft serve`: Prometheus metrics at /metrics and one access log line per
request. The metrics are read back with prometheus-client's own parser and checked against
what the clients were answered (usage, statuses): they move exactly as requests run."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eft_integrations.engine import EngineObserver
from eft_integrations.serve import BackgroundServer, build_app

from .chat_family import chat_decoder

KEY = "metrics-key"
MODEL = "eft-metrics"
USER = [{"role": "user", "content": "Tell me about Paris."}]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def decoder():
    return chat_decoder(tools_template=True)


@pytest.fixture(scope="module")
def server(decoder) -> Iterator[BackgroundServer]:
    with BackgroundServer(build_app(decoder, served_model_name=MODEL, api_key=KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _scrape(server: BackgroundServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    response = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def test_metrics_count_requests_tokens_and_latencies_as_they_run(server, client):
    before = _scrape(server)
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    stream_usage = [c.usage for c in streamed if c.usage is not None][-1]
    completion = client.completions.create(
        model=MODEL, prompt=["Once", "Upon a"], max_tokens=7, temperature=0
    )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, temperature=-1)
    after = _scrape(server)

    chat_route = {"route": "/v1/chat/completions"}
    assert _delta(before, after, "eft_http_requests_total", status="200", **chat_route) == 2
    assert _delta(before, after, "eft_http_requests_total", status="400", **chat_route) == 1
    completions = {"route": "/v1/completions", "status": "200"}
    assert _delta(before, after, "eft_http_requests_total", **completions) == 1
    assert _delta(before, after, "eft_http_request_duration_seconds_count", **chat_route) == 3

    usages = [chat.usage, stream_usage, completion.usage]
    prompt = sum(u.prompt_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages)
    assert _delta(before, after, "eft_prompt_tokens_total") == prompt
    assert _delta(before, after, "eft_generation_tokens_total") == generated
    finished = sum(
        _delta(before, after, "eft_request_success_total", finished_reason=reason)
        for reason in ("stop", "length", "tool_calls")
    )
    assert finished == 4  # two chat turns, two completion prompts
    for histogram in (
        "eft_time_to_first_token_seconds",
        "eft_e2e_request_latency_seconds",
        "eft_request_queue_time_seconds",
    ):
        assert _delta(before, after, f"{histogram}_count") == 4, histogram
        assert _delta(before, after, f"{histogram}_sum") > 0, histogram
    # one inter-token gap per step after a row's first: every token but each row's first
    assert _delta(before, after, "eft_inter_token_latency_seconds_count") == generated - 4


def test_speculative_rows_count_their_drafts(server, client):
    before = _scrape(server)
    client.completions.create(
        model=MODEL, prompt="Once", temperature=0, max_tokens=10, extra_body={"speculative_k": 3}
    )
    after = _scrape(server)
    drafted = _delta(before, after, "eft_spec_decode_num_draft_tokens_total")
    accepted = _delta(before, after, "eft_spec_decode_num_accepted_tokens_total")
    assert drafted > 0
    assert 0 <= accepted <= drafted


def test_live_gauges_follow_a_running_stream(server, client, decoder):
    idle = _scrape(server)
    assert _value(idle, "eft_num_requests_running") == 0
    assert _value(idle, "eft_engine_up") == 1
    budget = _value(idle, "eft_kv_cache_budget_tokens")
    assert budget == decoder.engine.kv_cache_tokens
    started, release = threading.Event(), threading.Event()

    def stream() -> None:
        chunks = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=400, temperature=0, stream=True
        )
        for _ in chunks:
            started.set()
            release.wait(30)  # hold the stream open (the row decodes on meanwhile)
        chunks.close()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert started.wait(60)
        running = _scrape(server)
        assert _value(running, "eft_num_requests_running") >= 1
        assert _value(running, "eft_num_prompts_in_flight") == 1
        usage = [v for (n, _), v in running.items() if n == "eft_kv_cache_usage_perc"]
        assert len(usage) == len(decoder.model_names) and max(usage) > 0
    finally:
        release.set()
        thread.join(60)
    assert _value(_scrape(server), "eft_num_prompts_in_flight") == 0


def test_metrics_need_the_api_key(server):
    response = httpx.get(f"{server.url}/metrics", timeout=30)
    assert response.status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_each_request_gets_an_access_log_line(server, client, caplog):
    with caplog.at_level(logging.INFO, logger="eft_integrations.access"):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=USER, max_tokens=5, temperature=0
        )
        rid = raw.headers["x-request-id"]
        usage = raw.parse().usage
        httpx.get(f"{server.url}/v1/models/nope", headers=AUTH, timeout=30)
    lines = [r.getMessage() for r in caplog.records if r.name == "eft_integrations.access"]
    ours = [line for line in lines if f"request_id={rid}" in line]
    assert len(ours) == 1, lines
    assert '"POST /v1/chat/completions" 200' in ours[0]
    assert f"prompt_tokens={usage.prompt_tokens} " in ours[0]
    assert f"completion_tokens={usage.completion_tokens} " in ours[0]
    assert any('"GET /v1/models/nope" 404' in line for line in lines)


def test_unknown_paths_share_one_route_label(server):
    for path in ("/a", "/b", "/c/d"):
        httpx.get(f"{server.url}{path}", headers=AUTH, timeout=30)
    samples = _scrape(server)
    routes = {dict(labels).get("route") for (name, labels) in samples if "http" in name}
    assert "other" in routes
    assert not routes & {"/a", "/b", "/c/d"}


class _Raising(EngineObserver):
    def __init__(self) -> None:
        self.calls = 0

    def on_tokens(self, gap: float, tokens: int) -> None:
        self.calls += 1
        raise RuntimeError("observer bug")

    def on_finish(self, *args: Any) -> None:
        raise RuntimeError("observer bug")


def test_an_observer_that_raises_costs_the_rows_nothing(decoder):
    prompts = ["Once", "Upon a time", "The city"]
    solo = [decoder.generate(p, max_new_tokens=6, temperature=0).text for p in prompts]
    observer = _Raising()
    decoder.engine.add_observer(observer)
    try:
        batched = decoder.generate(prompts, max_new_tokens=6, temperature=0)
    finally:
        decoder.engine.remove_observer(observer)
    assert observer.calls > 0
    assert [r.text for r in batched] == solo
    assert decoder.generate("Once", max_new_tokens=6, temperature=0).text == solo[0]


def test_the_engine_holds_observers_weakly(decoder):
    observer = _Raising()
    decoder.engine.add_observer(observer)
    assert observer in decoder.engine.outputs.observers
    del observer
    assert not any(isinstance(o, _Raising) for o in decoder.engine.outputs.observers)


def test_a_cancelled_request_counts_as_an_abort_not_a_success(server, client):
    before = _scrape(server)
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=400, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()  # the client leaves: the server cancels its request

    def aborted() -> float:
        return _delta(before, _scrape(server), "eft_request_success_total", finished_reason="abort")

    deadline = time.monotonic() + 30
    while aborted() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborted() == 1
    assert _delta(before, _scrape(server), "eft_request_success_total", finished_reason="stop") == 0


def test_observers_added_while_the_engine_runs_cost_it_nothing(decoder):
    kwargs = {"max_new_tokens": 40, "temperature": 0}
    solo = decoder.generate(USER[0]["content"], **kwargs).token_ids
    stop = threading.Event()

    def churn() -> None:  # add and drop observers from another thread, as build_app does
        while not stop.is_set():
            observer = EngineObserver()
            decoder.engine.add_observer(observer)
            decoder.engine.remove_observer(observer)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        results = [decoder.generate(USER[0]["content"], **kwargs).token_ids for _ in range(3)]
    finally:
        stop.set()
        thread.join(10)
    assert results == [solo] * 3
    assert decoder.engine.failure is None


def test_the_access_log_keeps_a_path_encoded(server, caplog):
    with caplog.at_level(logging.INFO, logger="eft_integrations.access"):
        httpx.get(f"{server.url}/x%0d%0a1.2.3.4:1%20%22POST%20/v1%22%20200", timeout=30)
    (line,) = [r.getMessage() for r in caplog.records if "/x%0d%0a" in r.getMessage()]
    assert "\n" not in line and "\r" not in line
