"""Run the app with uvicorn: in the foreground (`eft serve`) or on a background thread (tests,
benchmarks, notebooks).

    with BackgroundServer(build_app(decoder)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")

Both run `Server`, uvicorn's server with what a server facing unknown clients needs:
- timeouts: keep-alive (idle connections between requests), headers (`header_timeout`: a
  connection whose request headers are not in by then is closed; uvicorn has no such timeout,
  see `_HeaderDeadline`), body (`build_app(body_timeout=...)`, 408);
- `limit_concurrency`: over that many connections and tasks, uvicorn answers 503 at once;
- a graceful stop (SIGTERM, Ctrl-C, `BackgroundServer.stop`): the app stops admitting (503),
  the requests running get `shutdown_grace` seconds to finish, then each open stream ends
  with an error event and `[DONE]` and its engine rows are cancelled; then uvicorn closes.
  A second Ctrl-C quits at once.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
import threading
import time
from types import FrameType, TracebackType
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .admission import ABORT_WAIT
from .defaults import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_LIMIT_CONCURRENCY,
    DEFAULT_SHUTDOWN_GRACE,
)

__all__ = [
    "BackgroundServer",
    "Server",
    "run_server",
]

logger = logging.getLogger(__name__)

UVICORN_SHUTDOWN_TIMEOUT = 5
"""Seconds uvicorn waits for connections after the drain (by then every request ended)."""

_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class _HeaderDeadline:
    """A mixin for uvicorn's HTTP protocol classes: a connection whose request headers are
    not complete `header_timeout` seconds after it opened (or, between requests, after the
    first byte of the next one) gets 408 and is closed. uvicorn has no such timeout: its
    keep-alive timer is reset by every byte received, so a client trickling headers would
    hold the connection forever (uvicorn issue #157)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._headers_pending():
            self._await_headers()
        else:
            self._headers_in()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_in()
        super().connection_lost(exc)  # type: ignore[misc]

    def _headers_pending(self) -> bool:
        """No request is being answered: the connection owes the next request's headers."""
        cycle = self.cycle  # type: ignore[attr-defined]
        return cycle is None or cycle.response_complete

    def _await_headers(self) -> None:
        if self._header_timer is None:
            loop = self.loop  # type: ignore[attr-defined]
            self._header_timer = loop.call_later(self.header_timeout, self._headers_late)

    def _headers_in(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        transport = self.transport  # type: ignore[attr-defined]
        if self._headers_pending() and not transport.is_closing():
            transport.write(_REQUEST_TIMEOUT)
            transport.close()


def _http_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11) with the header deadline."""
    return type(
        "HeaderDeadlineProtocol",
        (_HeaderDeadline, AutoHTTPProtocol),
        {"header_timeout": header_timeout},
    )


def _config(
    app: Any,
    *,
    log_level: str,
    timeout_keep_alive: float,
    header_timeout: float,
    limit_concurrency: int | None,
    **more: Any,
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,  # the app's own access log has the request id, latency and tokens
        http=_http_protocol(header_timeout),
        timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]
        limit_concurrency=limit_concurrency,
        timeout_graceful_shutdown=UVICORN_SHUTDOWN_TIMEOUT,
        **more,
    )


class Server(uvicorn.Server):
    """uvicorn's server, whose exit (SIGTERM, Ctrl-C, `stop()`) first drains the app: the
    app's `ServingState.drain(shutdown_grace)` (503 for new requests, a grace period for the
    running ones, then the rest cut short); only then does uvicorn stop listening. An app
    without that state stops as uvicorn stops it."""

    def __init__(self, config: uvicorn.Config, shutdown_grace: float) -> None:
        super().__init__(config)
        self.shutdown_grace = shutdown_grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._drain: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stopping:  # a second signal: uvicorn's own handling (Ctrl-C: quit at once)
            super().handle_exit(sig, frame)
            return
        self.stop()

    def stop(self) -> None:
        """Drain the app, then exit; callable from any thread (and from a signal handler)."""
        if self._stopping:
            return
        self._stopping = True
        loop = self._loop
        if loop is None or loop.is_closed():  # not serving yet: nothing to drain
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        state = getattr(getattr(self.config.app, "state", None), "eft", None)
        try:
            if state is not None and not await state.drain(self.shutdown_grace):
                logger.warning("some requests did not end after being cut short; closing")
        except Exception:
            logger.exception("draining the app failed; closing")
        finally:
            self.should_exit = True


def _log_config(log_level: str) -> dict[str, Any]:
    """uvicorn's logging, plus the package's loggers (the access log, errors with request
    ids) on uvicorn's console handler at `log_level`."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["eft_integrations"] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    return config


def run_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    *,
    timeout_keep_alive: float = DEFAULT_KEEP_ALIVE,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
) -> None:
    """Serve `app` until SIGTERM or Ctrl-C, then stop gracefully (see `Server`)."""
    config = _config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=timeout_keep_alive,
        header_timeout=header_timeout,
        limit_concurrency=limit_concurrency,
        log_config=_log_config(log_level),
    )
    Server(config, shutdown_grace).run()


class BackgroundServer:
    """uvicorn serving `app` on a daemon thread; `port=0` takes a free port. A context
    manager: entering waits until the server accepts connections, leaving stops it
    gracefully (`stop`). The options are `run_server`'s."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        *,
        timeout_keep_alive: float = DEFAULT_KEEP_ALIVE,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY,
        shutdown_grace: float = 5.0,
    ) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        config = _config(
            app,
            log_level=log_level,
            timeout_keep_alive=timeout_keep_alive,
            header_timeout=header_timeout,
            limit_concurrency=limit_concurrency,
        )
        self._server = Server(config, shutdown_grace)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name=f"uvicorn-{self.port}",
            daemon=True,
        )

    @property
    def url(self) -> str:
        """`http://host:port` (add `/v1` for OpenAI clients)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully (see `Server`) and wait for the thread, at most `timeout` seconds
        (default: long enough for the grace period and the requests cut short)."""
        self._server.stop()
        if self._thread.is_alive():
            limit = self._server.shutdown_grace + ABORT_WAIT + UVICORN_SHUTDOWN_TIMEOUT + 5
            self._thread.join(limit if timeout is None else timeout)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
