"""The app's ASGI middleware, outermost first:

- `AccessLog`: one log line per request (client, route, status, latency, tokens, request id)
  and the HTTP metrics.
- `RequestContext`: every response carries an `x-request-id`; an error no handler answered
  becomes a 500 naming that id (the log has the traceback); the request's end callbacks run
  however it ends (they release its admission).
- `RequireKey`: 401 before a byte of the body is read, so an unauthenticated client learns
  nothing from the server's parsing and costs it nothing.
- `BodyTimeout`: 408 when the body has not arrived in time (uvicorn has no such timeout).
- `BodySizeLimit`: 413 for bodies over the limit, declared or streamed.

Each is plain ASGI (no `BaseHTTPMiddleware`), so streamed responses pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, internal_error

__all__ = [
    "OPEN_PATHS",
    "AccessLog",
    "BodySizeLimit",
    "BodyTimeout",
    "RequestContext",
    "RequireKey",
    "note_usage",
    "on_end",
    "request_id",
]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("eft_integrations.access")
"""One INFO line per request (`eft serve` prints it; uvicorn's own access log is off)."""

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
"""A client's request id is echoed when it is 1-128 visible ASCII characters."""

OPEN_PATHS = frozenset({"/health"})
"""Paths answered without the API key (a load balancer's probe has none)."""

_ID_KEY = "eft.request_id"
_END_KEY = "eft.on_end"
_USAGE_KEY = "eft.usage"

CLIENT_CLOSED = 499
"""The status logged for a request whose client left before any response (nginx's)."""


def request_id(scope: Scope) -> str:
    """The id of the request (set by `RequestContext`)."""
    return scope.get(_ID_KEY, "-")


def note_usage(scope: Scope, prompt_tokens: int, completion_tokens: int) -> None:
    """Add tokens to what the request's access log line reports."""
    prompt, completion = scope.get(_USAGE_KEY, (0, 0))
    scope[_USAGE_KEY] = (prompt + prompt_tokens, completion + completion_tokens)


def on_end(scope: Scope, callback: Callable[[], object]) -> None:
    """Run `callback` when the request ends, however it ends (`RequestContext`)."""
    scope[_END_KEY].append(callback)


class RequestContext:
    """The outermost layer of the app: request ids, the last word on errors, end callbacks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        scope[_ID_KEY] = rid
        ends: list[Callable[[], object]] = []
        scope[_END_KEY] = ends
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                header = (REQUEST_ID_HEADER.encode(), rid.encode())
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:  # a bug: the client gets the id, the log the traceback
            logger.error("request %s failed", rid, exc_info=error)
            if not started:
                await internal_error(rid).response()(scope, receive, send_with_id)
        finally:
            for callback in reversed(ends):
                callback()


def _request_id(given: str | None) -> str:
    """The client's id when it is sane (bounded, printable), else a fresh one."""
    if given is not None and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


class AccessLog:
    """The outermost layer: when a request has ended (a stream: after its last event), log
    one line with its client, route, status, latency, tokens and request id, and count it
    in the HTTP metrics (`metrics.observe_http`, when given). A client that left before any
    response is logged with status 499."""

    def __init__(self, app: ASGIApp, metrics: Any = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = CLIENT_CLOSED

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self._log(scope, status, time.monotonic() - started)

    def _log(self, scope: Scope, status: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_http(scope["path"], status, seconds)
        if not access_logger.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        prompt, completion = scope.get(_USAGE_KEY, (0, 0))
        access_logger.info(
            '%s "%s %s" %d %.1f ms prompt_tokens=%d completion_tokens=%d request_id=%s',
            f"{client[0]}:{client[1]}" if client else "-",
            scope["method"],
            _logged_path(scope),
            status,
            seconds * 1000,
            prompt,
            completion,
            request_id(scope),
        )


_LOGGED_PATH_LENGTH = 256


def _logged_path(scope: Scope) -> str:
    """The path as the client sent it, still percent-encoded (a decoded `%0d%0a` would let
    a client forge log lines), with any other unprintable byte escaped, cut to a length."""
    raw = scope.get("raw_path") or scope["path"].encode()
    text = raw.decode("latin-1")
    text = "".join(c if " " < c < "\x7f" else f"%{ord(c):02X}" for c in text)
    return text[:_LOGGED_PATH_LENGTH] + ("..." if len(text) > _LOGGED_PATH_LENGTH else "")


class RequireKey:
    """401 unless the request carries `Authorization: Bearer <key>`, checked on the headers
    alone, before the body is read; `OPEN_PATHS` need no key. The 401 carries
    `WWW-Authenticate: Bearer` (RFC 6750) and closes the connection, so the unread body of
    an unauthenticated client is not waited for."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        problem = self._problem(Headers(scope=scope).get("authorization", ""))
        if problem is None:
            await self.app(scope, receive, send)
            return
        error = APIError(
            401,
            problem,
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer", "Connection": "close"},
        )
        await error.response()(scope, receive, send)

    def _problem(self, authorization: str) -> str | None:
        """What is wrong with the Authorization header (None: nothing)."""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return "missing API key: send the header 'Authorization: Bearer <key>'"
        if not secrets.compare_digest(given.strip().encode(), self.key):
            return "incorrect API key"
        return None


class BodyTimeout:
    """408 (and the connection closed) when a request's body has not fully arrived `seconds`
    after its headers. uvicorn bounds neither headers nor bodies: its keep-alive timer is
    reset by every byte, so a client that sends headers and then trickles the body, or stops,
    would hold its connection and its task forever. Once the body is in, `receive` is passed
    through unbounded (the routes use it to learn that a client went away)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False

        async def bounded() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:  # FastAPI passes HTTPExceptions from the body's reading on
                raise HTTPException(
                    408,
                    f"the request body did not arrive within {self.seconds:g} s",
                    headers={"Connection": "close"},
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, bounded, send)


class BodySizeLimit:
    """413 for request bodies over `max_bytes` (declared or streamed), before any parsing."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = APIError(
                413,
                self._message(int(declared)),
                code="request_too_large",
                headers={"Connection": "close"},
            )
            await error.response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI passes HTTPExceptions from here on
                    raise HTTPException(413, self._message(None), headers={"Connection": "close"})
            return message

        await self.app(scope, counted, send)

    def _message(self, size: int | None) -> str:
        of = f" of {size} bytes" if size is not None else ""
        return f"request body{of} exceeds the server's limit of {self.max_bytes} bytes"
