"""A server an operator can trust: no client, hostile or unlucky, holds it or hurts another.

Real servers (uvicorn on a thread, or `eft serve` in a subprocess for SIGTERM) and real HTTP
clients (httpx, raw sockets for slow clients). The models are the tiny chat family of
`tests/chat_family.py` (4096-token windows) with no end-of-turn token, so every stream runs
to its budget: a 4000-token stream lasts seconds, long enough to be cut short or to hold a
place. No test measures time against a threshold: waits are bounds that only a hang reaches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import eft_integrations
from eft_integrations import EFTDecoder
from eft_integrations.serve import BackgroundServer, build_app

from .chat_family import chat_family_paths, from_pretrained_args

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "eft-test"
WAIT = 120.0  # seconds: a bound only a hang reaches
USER = [{"role": "user", "content": "Tell me about Paris."}]
LONG = 4000  # tokens: a stream of seconds on the tiny family
BATCH = 4  # the engine's max_batch_size here
QUEUE = 2  # --max-queue of the admission tests


@pytest.fixture(scope="module")
def endless() -> EFTDecoder:
    """The chat family with no end-of-turn token (every row runs to its budget), 4 rows."""
    return EFTDecoder.from_pretrained(
        **from_pretrained_args(), eos_token_ids=[], max_batch_size=BATCH
    )


@pytest.fixture(scope="module")
def app(endless) -> Any:
    """The app with an API key and no admission limit."""
    return build_app(endless, served_model_name=MODEL, api_key=KEY)


@pytest.fixture(scope="module")
def server(app) -> Iterator[BackgroundServer]:
    with BackgroundServer(app) as running:
        yield running


# ------------------------------------------------------------------------------ helpers


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 4, **fields}


def _wait_for(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _engine_clean(decoder: EFTDecoder) -> bool:
    """Wait until the engine holds no row, no queued request and no cache."""
    engine = decoder.engine
    return _wait_for(
        lambda: engine.batch_size == 0 and engine.queued == 0 and engine.cached_tokens() == 0
    )


class Stream:
    """One streamed request read on its own thread: `events` are its SSE data lines."""

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None):
        self.events: list[str] = []
        self.status: int | None = None
        self.started = threading.Event()
        """Set at the first event (the server answers once the engine decodes the request)."""
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(url, body, headers or {}))
        self._thread.start()

    def _read(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=WAIT) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
        except BaseException as error:  # kept for the test to see
            self.error = error
        finally:
            self.started.set()

    def join(self) -> Stream:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the stream never ended"
        return self

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]


def _cut_short(stream: Stream) -> None:
    """The stream ended with an error event saying the server shut down, then `[DONE]`."""
    assert stream.error is None and stream.status == 200
    assert stream.events[-1] == "[DONE]"
    last = json.loads(stream.events[-2])
    assert last["error"]["code"] == "server_shutting_down", last
    assert set(last["error"]) == {"message", "type", "code"}  # None fields are left out
    assert all("error" not in p for p in stream.payloads()[:-1])


# ------------------------------------------------------------------------------ admission


async def _burst(url: str, n: int) -> list[tuple[int, str | None]]:
    """`n` long streamed chats at once: (status, Retry-After) of each. The admitted streams
    are held open until every status but those of the queued requests is known (a queued
    request answers its headers only once a row frees), then closed."""
    answers: list[tuple[int, str | None]] = []
    release = asyncio.Event()
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=WAIT, limits=limits) as client:

        async def one() -> None:
            body = _chat(max_tokens=LONG, stream=True)
            async with client.stream("POST", url, json=body) as response:
                answers.append((response.status_code, response.headers.get("retry-after")))
                if response.status_code == 200:
                    await release.wait()

        tasks = [asyncio.ensure_future(one()) for _ in range(n)]
        try:
            deadline = time.monotonic() + WAIT
            while len(answers) < n - QUEUE and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            release.set()
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    return answers


async def test_a_burst_over_max_queue_gets_503_for_exactly_the_excess(endless):
    app = build_app(endless, served_model_name=MODEL, max_queue=QUEUE)
    n = 20
    with BackgroundServer(app) as running:
        answers = await _burst(f"{running.url}/v1/chat/completions", n)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * (BATCH + QUEUE) + [503] * (n - BATCH - QUEUE)
    assert all(retry == "1" for status, retry in answers if status == 503)
    assert _engine_clean(endless)


def test_a_completions_request_counts_each_of_its_prompts(endless):
    app = build_app(endless, served_model_name=MODEL, max_queue=QUEUE)
    capacity = BATCH + QUEUE
    with BackgroundServer(app) as running:
        url = f"{running.url}/v1/completions"

        def complete(prompts: int) -> httpx.Response:
            body = {"model": MODEL, "prompt": ["Once"] * prompts, "max_tokens": 2}
            return httpx.post(url, json=body, timeout=WAIT)

        too_many = complete(capacity + 1)  # could never fit, even on an idle server
        assert too_many.status_code == 400, too_many.text
        assert too_many.json()["error"]["code"] == "too_many_prompts"
        assert too_many.json()["error"]["param"] == "prompt"

        holder = Stream(f"{running.url}/v1/chat/completions", _chat(max_tokens=LONG, stream=True))
        assert holder.started.wait(WAIT) and holder.error is None
        full = complete(capacity)  # 1 + 6 prompts > 6
        assert full.status_code == 503, full.text
        assert full.json()["error"]["code"] == "queue_full"
        fits = complete(capacity - 1)  # 1 + 5 prompts
        assert fits.status_code == 200, fits.text
        assert len(fits.json()["choices"]) == capacity - 1
        running.stop()  # cuts the holder short
    holder.join()
    assert _engine_clean(endless)


# ------------------------------------------------------------------------------ the event loop


def _tokenizing() -> bool:
    """Some thread is inside `EFTDecoder.encode` right now."""
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code is EFTDecoder.encode.__code__:
                return True
            frame = frame.f_back
    return False


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_health_answers_while_a_4mb_prompt_is_tokenized(endless, endpoint):
    """Tokenizing 4 MB of text takes seconds; it runs on a worker thread, so /health (and
    every other client) is answered meanwhile: /health returns while `encode` still runs."""
    app = build_app(endless, served_model_name=MODEL, max_body_bytes=8 * 1024 * 1024)
    text = "The capital of Veloria is Markan, the river runs north. " * 75_000  # 4.2 MB
    if endpoint == "chat":
        body: dict[str, Any] = _chat(messages=[{"role": "user", "content": text}])
    else:
        body = {"model": MODEL, "prompt": text, "max_tokens": 4}
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    with BackgroundServer(app) as running:
        big: dict[str, httpx.Response] = {}

        def send() -> None:
            big["response"] = httpx.post(running.url + path, json=body, timeout=WAIT)

        sender = threading.Thread(target=send)
        sender.start()
        assert _wait_for(_tokenizing, WAIT), "the prompt was never tokenized"
        health = httpx.get(f"{running.url}/health", timeout=WAIT)
        still_tokenizing = _tokenizing()
        sender.join(WAIT)
    assert health.status_code == 200
    assert still_tokenizing, "/health waited for the tokenizer"
    error = big["response"].json()["error"]  # far over the 4096-token window
    assert big["response"].status_code == 400 and error["code"] == "context_length_exceeded"


# ------------------------------------------------------------------------------ slow clients


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a bound only a hang
    reaches: socket.timeout fails the test)."""
    sock.settimeout(WAIT)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_slow_clients_are_cut_off(endless):
    """Headers that never complete, a body that trickles or stops, an idle keep-alive
    connection: each is closed after its timeout, and the server goes on answering."""
    app = build_app(endless, served_model_name=MODEL, body_timeout=1.0)
    with BackgroundServer(app, header_timeout=1.0, timeout_keep_alive=1.0) as running:
        address = (running.host, running.port)
        slow_headers, slow_bodies = [], []
        for _ in range(4):
            sock = socket.create_connection(address)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
            slow_headers.append(sock)
        for _ in range(4):
            sock = socket.create_connection(address)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                b'{"model": "eft-test", "messages": ['
            )
            slow_bodies.append(sock)
        idle = socket.create_connection(address)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            for sock in slow_headers:
                assert _read_until_closed(sock).startswith(b"HTTP/1.1 408")
            for sock in slow_bodies:
                answer = _read_until_closed(sock)
                assert answer.startswith(b"HTTP/1.1 408"), answer
                assert b"request_timeout" in answer
            assert _read_until_closed(idle).startswith(b"HTTP/1.1 200")  # then closed
        finally:
            for sock in [*slow_headers, *slow_bodies, idle]:
                sock.close()
        assert httpx.get(f"{running.url}/health", timeout=WAIT).json()["status"] == "ok"


# ------------------------------------------------------------------------------ shutdown


def test_a_graceful_stop_ends_every_open_stream_with_an_error_event_and_done(endless):
    """`BackgroundServer.stop` mid-stream: a short request finishes within the grace period;
    the long ones are cut short with an error event and `[DONE]`, and their rows freed."""
    cancelled = endless.engine.stats.cancelled
    app = build_app(endless, served_model_name=MODEL)
    running = BackgroundServer(app, shutdown_grace=2.0).start()
    url = f"{running.url}/v1/chat/completions"
    long = [Stream(url, _chat(max_tokens=LONG, stream=True)) for _ in range(BATCH - 2)]
    completion = Stream(
        f"{running.url}/v1/completions",
        {"model": MODEL, "prompt": "Once", "max_tokens": LONG, "stream": True},
    )
    for stream in [*long, completion]:
        assert stream.started.wait(WAIT) and stream.error is None
    short = Stream(url, _chat(max_tokens=50, stream=True))
    assert short.started.wait(WAIT)  # admitted before the stop
    running.stop()
    for stream in [*long, completion]:
        _cut_short(stream.join())
    short.join()
    assert short.events[-1] == "[DONE]" and "error" not in "".join(short.events)
    assert short.payloads()[-1]["choices"][0]["finish_reason"] == "length"
    assert _engine_clean(endless)
    assert endless.engine.stats.cancelled == cancelled + len(long) + 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SERVE = f"""
import sys, torch
from eft_integrations import EFTDecoder
from eft_integrations.serve import build_app, run_server
base, chat, safe, ref, port = sys.argv[1:]
decoder = EFTDecoder.from_pretrained(
    base=base, behaviors={{"chat": (chat, ref), "safe": (safe, ref)}}, dtype=torch.float32,
    eos_token_ids=[],
)
app = build_app(decoder, served_model_name={MODEL!r})
run_server(app, port=int(port), log_level="warning", shutdown_grace=5)
"""
"""`eft serve`'s path (`run_server`) over the endless chat family, in its own process."""


@pytest.fixture
def serving_process() -> Iterator[tuple[subprocess.Popen, str]]:
    """A server process with a 5-second shutdown grace, running the same package as this
    test process."""
    paths = chat_family_paths()
    port = _free_port()
    package_root = str(Path(eft_integrations.__file__).resolve().parents[1])
    search_path = os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    models = [paths[name] for name in ("base", "chat", "safe", "ref")]
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, *models, str(port)],
        env={**os.environ, "PYTHONPATH": search_path},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            return True
        try:
            return httpx.get(f"{url}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        assert _wait_for(up, WAIT) and process.poll() is None, process.stdout.read().decode()
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)


def test_sigterm_lets_running_requests_finish_then_ends_open_streams(serving_process):
    """SIGTERM: /health and new requests get 503 at once, a short request finishes, the
    long streams get an error event and `[DONE]` when the grace period ends, and the process
    exits."""
    process, url = serving_process
    long_body = {"model": MODEL, "prompt": "Tell me about Paris.", "max_tokens": LONG}
    long = [Stream(f"{url}/v1/completions", {**long_body, "stream": True}) for _ in range(2)]
    for stream in long:
        assert stream.started.wait(WAIT) and stream.error is None
    # short enough to finish within the 5-second grace on a loaded 2-core runner (150
    # tokens did not, beside the two long streams and another test process)
    short = Stream(f"{url}/v1/completions", {**long_body, "max_tokens": 20, "stream": True})
    assert short.started.wait(WAIT)  # admitted before the signal
    process.send_signal(signal.SIGTERM)

    health = httpx.get(f"{url}/health", timeout=WAIT)
    assert health.status_code == 503 and "shutting down" in health.json()["reason"]
    refused = httpx.post(f"{url}/v1/completions", json={**long_body, "max_tokens": 2})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "server_shutting_down"

    short.join()
    assert short.status == 200 and short.events[-1] == "[DONE]"
    assert short.payloads()[-1]["choices"][0]["finish_reason"] == "length"
    for stream in long:
        _cut_short(stream.join())
    assert process.wait(WAIT) == 0


# ------------------------------------------------------------------------------ the wire

STRICT = [  # (endpoint, field, value): a string for a number or a bool, a bool for an int
    ("chat/completions", "max_tokens", "4"),
    ("chat/completions", "max_completion_tokens", 4.5),
    ("chat/completions", "stream", "yes"),
    ("chat/completions", "temperature", "0.5"),
    ("chat/completions", "top_p", True),
    ("chat/completions", "n", True),
    ("chat/completions", "seed", "1"),
    ("chat/completions", "speculative_k", "2"),
    ("chat/completions", "model", 7),
    ("completions", "max_tokens", True),
    ("completions", "echo", "true"),
    ("completions", "prompt", [1, True]),
]


@pytest.mark.parametrize(("endpoint", "name", "value"), STRICT)
def test_wire_types_are_strict(server, endpoint, name, value):
    body = _chat() if endpoint.startswith("chat") else {"model": MODEL, "prompt": "Once"}
    response = httpx.post(
        f"{server.url}/v1/{endpoint}", json={**body, name: value}, headers=AUTH, timeout=WAIT
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(name)


def test_floats_take_integers(server):
    """JSON clients send 1 for 1.0."""
    body = _chat(temperature=1, top_p=1, seed=3, eft_weights={"chat": 2, "safe": 0})
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=WAIT
    )
    assert response.status_code == 200, response.text
    assert response.json()["eft_weights"] == {"chat": 2.0, "safe": 0.0}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
    ids=["no-key", "wrong-key", "no-scheme"],
)
def test_the_key_is_checked_before_the_body(server, headers):
    malformed = b'{"model": "eft-test", "messages": ['
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=malformed,
        headers={**headers, "Content-Type": "application/json"},
        timeout=WAIT,
    )
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"
    with_key = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=malformed,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=WAIT,
    )
    assert with_key.status_code == 400 and with_key.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_the_documentation_routes_are_off(server, endless, path):
    assert httpx.get(f"{server.url}{path}", timeout=WAIT).status_code == 401  # needs the key
    assert httpx.get(f"{server.url}{path}", headers=AUTH, timeout=WAIT).status_code == 404
    open_app = build_app(endless, served_model_name=MODEL)
    with BackgroundServer(open_app) as running:
        assert httpx.get(f"{running.url}{path}", timeout=WAIT).status_code == 404
    assert httpx.get(f"{server.url}/health", timeout=WAIT).status_code == 200  # no key


# ------------------------------------------------------------------------------ request ids

REQUESTS = [  # (method, path, headers, body, status)
    ("GET", "/health", {}, None, 200),
    ("GET", "/v1/models", AUTH, None, 200),
    ("GET", "/v1/models", {}, None, 401),
    ("GET", "/v1/nothing", AUTH, None, 404),
    ("POST", "/v1/chat/completions", AUTH, _chat(max_tokens=0), 400),
    ("POST", "/v1/chat/completions", AUTH, _chat(), 200),
    ("POST", "/v1/chat/completions", AUTH, _chat(stream=True), 200),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "status"), REQUESTS)
def test_every_response_carries_a_request_id(server, method, path, headers, body, status):
    def send(request_id: str | None) -> httpx.Response:
        extra = {} if request_id is None else {"x-request-id": request_id}
        response = httpx.request(
            method, server.url + path, headers={**headers, **extra}, json=body, timeout=WAIT
        )
        assert response.status_code == status, response.text
        return response

    assert send("client-id.42:a/b").headers["x-request-id"] == "client-id.42:a/b"  # echoed
    fresh = [send(None).headers["x-request-id"] for _ in range(2)]
    assert all(len(f) == 32 and int(f, 16) >= 0 for f in fresh) and fresh[0] != fresh[1]
    for insane in ["x" * 129, "has space", ""]:  # too long, not printable: a fresh one
        given = send(insane).headers["x-request-id"]
        assert given != insane and len(given) == 32


def test_a_500_names_the_request_id_and_not_the_error(server, monkeypatch, caplog):
    """A failure inside the core, and a bug in the route itself: the body names the request
    id only; the log has the traceback with the id."""
    from eft_integrations.serve import app as app_module
    from eft_integrations.serve import protocol

    secret = "secret detail at /home/someone/weights.bin"

    async def core_fails(*args: Any, **kwargs: Any):
        raise RuntimeError(secret)
        yield  # an async generator, as astream_chat

    def route_fails(*args: Any, **kwargs: Any):
        raise RuntimeError(secret)

    url = f"{server.url}/v1/chat/completions"
    with caplog.at_level(logging.ERROR, logger="eft_integrations.serve"):
        for target, name, broken in [
            (app_module, "astream_chat", core_fails),
            (protocol.ChatCompletionResponse, "of", route_fails),
        ]:
            with monkeypatch.context() as patch:
                patch.setattr(target, name, broken)
                response = httpx.post(url, json=_chat(), headers=AUTH, timeout=WAIT)
            rid = response.headers["x-request-id"]
            assert response.status_code == 500
            assert response.json()["error"]["message"] == f"internal error (request id {rid})"
            assert "secret" not in response.text
            logged = [r for r in caplog.records if rid in r.getMessage()]
            assert logged and secret in str(logged[0].exc_info[1])
    assert httpx.post(url, json=_chat(), headers=AUTH, timeout=WAIT).status_code == 200


# ------------------------------------------------------------------------------ health


def test_health_is_503_with_the_reason_when_the_engine_cannot_serve(server, endless, monkeypatch):
    """`Engine.failure` (set by the engine when its loop failed for good; the engine's own
    tests make it fail) turns /health into a 503 naming it."""
    assert httpx.get(f"{server.url}/health", timeout=WAIT).status_code == 200
    monkeypatch.setattr(endless.engine, "failure", "the loop failed 3 times", raising=False)
    health = httpx.get(f"{server.url}/health", timeout=WAIT)
    assert health.status_code == 503
    assert health.json() == {
        "status": "unavailable",
        "reason": "the engine cannot serve: the loop failed 3 times",
    }


# ------------------------------------------------------------------------------ cancellation storm


async def test_a_cancellation_storm_leaves_the_engine_clean(app, server, endless):
    """vLLM's `test_request_cancellation`: 200 streamed requests with long budgets whose
    clients give up after 0.5 s, then one normal request is answered, and afterwards the
    engine holds no row, no queue and no cache, and the server no reservation."""
    url = f"{server.url}/v1/chat/completions"
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=0.5, limits=limits, headers=AUTH) as impatient:

        async def give_up(i: int) -> None:
            body = _chat(max_tokens=200, stream=True, temperature=1.0, seed=i)
            try:
                async with impatient.stream("POST", url, json=body) as response:
                    async for _ in response.aiter_lines():
                        pass
            except httpx.TimeoutException:
                pass

        await asyncio.gather(*(give_up(i) for i in range(200)))
    async with httpx.AsyncClient(timeout=WAIT, headers=AUTH) as patient:
        answer = await patient.post(url, json=_chat(max_tokens=5))
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
    assert await asyncio.to_thread(_engine_clean, endless)
    admission = app.state.eft.admission
    assert await asyncio.to_thread(_wait_for, lambda: admission.requests == 0)


def test_a_request_past_the_kv_budget_is_a_400_beside_live_ones():
    decoder = EFTDecoder.from_pretrained(**from_pretrained_args(), kv_cache_tokens=200)
    with BackgroundServer(build_app(decoder, served_model_name=MODEL)) as running:
        url = f"{running.url}/v1/chat/completions"
        live = [Stream(url, {**_chat(max_tokens=20), "stream": True}) for _ in range(2)]
        refused = httpx.post(url, json=_chat(max_tokens=400), timeout=WAIT)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "kv_cache_budget" and "kv_cache_tokens" in error["message"]
        for stream in live:
            stream.join()
            assert stream.status == 200 and stream.events[-1] == "[DONE]"
        assert httpx.post(url, json=_chat(), timeout=WAIT).status_code == 200
    assert _engine_clean(decoder)
