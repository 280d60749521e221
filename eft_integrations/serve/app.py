"""An OpenAI-compatible HTTP app over one EFT engine (FastAPI), as vLLM's OpenAI entrypoint:
validate the body (`protocol.py`), convert it to a chat-core or decoder call, answer in JSON or
stream the engine's output as server-sent events (sse-starlette).

    from eft_integrations.serve import build_app
    app = build_app(decoder, served_model_name="eft", api_key="secret")
    # uvicorn.run(app, host="127.0.0.1", port=8000), or `eft serve`

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health.
Every request goes through the async core path, so it joins the engine's running batch; a
client that disconnects (mid-stream or while waiting) cancels its request, which leaves the
batch at the next step. Errors are OpenAI's error JSON with the matching status; a request
never takes the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..chat import achat, astream_chat, resolved_weights
from .protocol import (
    ChatChunks,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunks,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
)

__all__ = ["APIError", "ServingState", "build_app"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body accepted (413 beyond)."""

FALLBACK_MAX_TOKENS = 1024
"""Completion budget of a request that names none, for models without a known window."""


class APIError(Exception):
    """An error answered as OpenAI's error JSON with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.info).model_dump(mode="json")
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ClientDisconnected(APIError):
    """The client went away before its answer; nobody reads this response."""

    def __init__(self) -> None:
        super().__init__(499, "client closed the request", code="client_closed_request")


@dataclass
class ServingState:
    """What the routes need: the engine's decoder and the server's options."""

    decoder: Any
    model_names: tuple[str, ...]
    api_key: str | None = None
    max_queue: int | None = None
    default_max_tokens: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            raise APIError(
                404,
                f"The model {model!r} does not exist; this server serves {list(self.model_names)}",
                param="model",
                code="model_not_found",
            )

    def check_capacity(self) -> None:
        """503 with Retry-After when this request would make more than `max_queue` requests
        wait for a place in the engine's batch."""
        if self.max_queue is None:
            return
        engine = self.decoder.engine
        waiting = engine.queued + (engine.batch_size >= engine.max_batch_size)
        if waiting > self.max_queue:
            raise APIError(
                503,
                f"the server is full: {engine.batch_size} requests decoding (batch of "
                f"{engine.max_batch_size}), {engine.queued} waiting (max_queue="
                f"{self.max_queue}); retry shortly",
                type="server_overloaded",
                code="queue_full",
                headers={"Retry-After": "1"},
            )

    def weights(self, weights: dict[str, float] | None) -> dict[str, float]:
        """The full weights a request decodes with (400 naming the known behaviors)."""
        try:
            return resolved_weights(self.decoder, weights)
        except ValueError as error:
            raise APIError(400, str(error), param="eft_weights") from error

    def max_tokens(self) -> int:
        """The budget of a request that names none: the server's default, else the context
        window (the decoder cuts it to what the prompt leaves), as OpenAI and vLLM do."""
        return self.default_max_tokens or self.decoder.context_window or FALLBACK_MAX_TOKENS

    def card(self, name: str) -> ModelCard:
        decoder = self.decoder
        return ModelCard(
            id=name,
            created=self.created,
            root=decoder.model_name,
            behaviors=list(decoder.behavior_names),
            default_weights=dict(decoder.default_weights),
            context_window=decoder.context_window,
        )


def build_app(
    decoder: Any,
    *,
    served_model_name: str | Sequence[str] | None = None,
    api_key: str | None = None,
    max_queue: int | None = None,
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    default_max_tokens: int | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over `decoder` (an `EFTDecoder`, i.e. one engine).

    Args:
        served_model_name: the name(s) clients put in `model` (default "eft").
        api_key: when set, /v1 routes need `Authorization: Bearer <api_key>` (401 otherwise).
        max_queue: answer 503 (Retry-After) while this many requests wait for admission.
        max_body_bytes: larger request bodies get 413 (None: no limit).
        default_max_tokens: budget of chat requests that name none (default: the window).
    """
    if isinstance(served_model_name, str):
        names: tuple[str, ...] = (served_model_name,)
    else:
        names = tuple(served_model_name or ("eft",))
    app = FastAPI(title="eft-integrations", summary="OpenAI-compatible EFT server")
    app.state.eft = ServingState(decoder, names, api_key, max_queue, default_max_tokens)
    app.include_router(_v1, prefix="/v1", dependencies=[Depends(_check_key)])
    app.include_router(_plain)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    if max_body_bytes is not None:
        app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app


# ------------------------------------------------------------------------------ routes

_v1 = APIRouter()
_plain = APIRouter()


def _state(request: Request) -> ServingState:
    return request.app.state.eft


def _check_key(request: Request) -> None:
    """401 unless the request carries the server's key (when it has one)."""
    key = _state(request).api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(
            401,
            "missing API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
    if not secrets.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


@_plain.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """200 while the server answers, with the engine's load."""
    engine = _state(request).decoder.engine
    return {"status": "ok", "batch_size": engine.batch_size, "queued": engine.queued}


@_v1.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    return ModelList(data=[state.card(name) for name in state.model_names])


@_v1.get("/models/{model}", response_model=ModelCard)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    state = _state(request)
    state.check_model(model)
    return state.card(model)


@_v1.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    """One assistant turn; `stream: true` answers with server-sent events."""
    state = _state(request)
    state.check_model(body.model)
    state.check_capacity()
    weights = state.weights(body.eft_weights)
    with _core_errors():
        messages = body.core_messages()
    kwargs = body.chat_kwargs(state.max_tokens())
    if body.stream:
        deltas = astream_chat(state.decoder, messages, **kwargs)
        first = await _first(request, deltas, "messages")
        chunks = ChatChunks(body.model, weights, body.include_usage)
        return _sse(_chat_events(chunks, first, deltas))
    with _core_errors():
        result = await _unless_disconnected(request, achat(state.decoder, messages, **kwargs))
    return ChatCompletionResponse.of(body.model, result)


@_v1.post("/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    """Complete raw prompts (one choice per prompt); `stream: true` takes one prompt."""
    state = _state(request)
    state.check_model(body.model)
    state.check_capacity()
    weights = state.weights(body.eft_weights)
    decoder = state.decoder
    options = body.generation_options(body.max_tokens or state.max_tokens())
    prompts = body.prompts()
    echoes = [_echo(decoder, p) if body.echo else "" for p in prompts]
    if body.stream:
        if len(prompts) != 1:
            raise APIError(
                400, f"a streamed completion takes one prompt, got {len(prompts)}", param="prompt"
            )
        stream = decoder.astream(prompts[0], **options)
        first = await _first(request, stream, "prompt")
        chunks = CompletionChunks(body.model, weights, body.include_usage)
        return _sse(_completion_events(chunks, echoes[0], first, stream))
    with _core_errors("prompt"):
        results = await _unless_disconnected(
            request, decoder.agenerate(prompts if len(prompts) > 1 else prompts[0], **options)
        )
    results = results if isinstance(results, list) else [results]
    return CompletionResponse.of(body.model, results, echoes)


def _echo(decoder: Any, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else decoder.tokenizer.decode(prompt)


# ------------------------------------------------------------------------------ streaming


def _sse(events: AsyncIterator[str]) -> EventSourceResponse:
    """Server-sent events as OpenAI frames them (`data: ...` lines, `\\n` separated)."""
    return EventSourceResponse(events, sep="\n")


async def _first(request: Request, items: AsyncIterator[T], prompt_field: str) -> T:
    """The first item of a core stream, before any response is sent, so that a request the
    core refuses gets its error status rather than a broken stream."""
    with _core_errors(prompt_field):
        try:
            return await _unless_disconnected(request, anext(items))
        except StopAsyncIteration:
            raise APIError(
                500, "the engine ended the stream without output", type="server_error"
            ) from None


async def _chat_events(
    chunks: ChatChunks, first: Any, deltas: AsyncIterator[Any]
) -> AsyncIterator[str]:
    """The SSE data of one streamed chat completion; closing it closes the core stream
    (which removes the request from the batch)."""
    try:
        yield _json(chunks.first())
        for chunk in chunks.of(first):
            yield _json(chunk)
        async for delta in deltas:
            for chunk in chunks.of(delta):
                yield _json(chunk)
    except Exception as error:  # after the headers: the error goes out as an event
        yield _json(ErrorResponse(error=_error_of(error).info))
    finally:
        await deltas.aclose()
    yield "[DONE]"


async def _completion_events(
    chunks: CompletionChunks, echo: str, first: Any, stream: AsyncIterator[Any]
) -> AsyncIterator[str]:
    """The SSE data of one streamed completion."""
    try:
        if echo:
            yield _json(chunks.text(echo))
        for chunk in chunks.of(first):
            yield _json(chunk)
        async for item in stream:
            for chunk in chunks.of(item):
                yield _json(chunk)
    except Exception as error:
        yield _json(ErrorResponse(error=_error_of(error).info))
    finally:
        await stream.aclose()
    yield "[DONE]"


def _json(model: BaseModel) -> str:
    return model.model_dump_json(exclude_none=True)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so its engine request) if the client disconnects
    first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects (the body is read by now)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ------------------------------------------------------------------------------ errors

_PARAMS = (  # words of the core's ValueErrors -> the request field they are about (first hit)
    ("speculative", "speculative_k"),
    ("context window", "<prompt>"),
    ("max_new_tokens", "max_tokens"),
    ("behavior", "eft_weights"),
    ("weight", "eft_weights"),
    ("tool_choice", "tool_choice"),
    ("tool", "tools"),
    ("response_format", "response_format"),
    ("schema", "response_format"),
    ("token id", "<prompt>"),
    ("content", "<prompt>"),
    ("prompt", "<prompt>"),
)


@contextlib.contextmanager
def _core_errors(prompt_field: str = "messages") -> Iterator[None]:
    """The core's ValueErrors are the request's fault (400); anything else is ours (500).
    `prompt_field` is the request's field holding the prompt."""
    try:
        yield
    except (APIError, asyncio.CancelledError):
        raise
    except Exception as error:
        raise _error_of(error, prompt_field) from error


def _error_of(error: BaseException, prompt_field: str = "messages") -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):
        message = str(error)
        param = next((p for words, p in _PARAMS if words in message), None)
        param = prompt_field if param == "<prompt>" else param
        code = "context_length_exceeded" if "context window" in message else None
        return APIError(400, message, param=param, code=code)
    logger.error("request failed", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    return error.response()


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    """400 naming the first offending field (or the position of malformed JSON)."""
    assert isinstance(error, RequestValidationError)
    errors = list(error.errors())
    if not errors:
        return APIError(400, "invalid request").response()
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        position = first["loc"][-1] if len(first.get("loc", ())) > 1 else "?"
        return APIError(
            400, f"malformed JSON body: {detail} (at character {position})", code="invalid_json"
        ).response()
    details = "; ".join(f"{_param(e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5])
    return APIError(
        400, f"invalid request: {details}", param=_param(first.get("loc", ()))
    ).response()


def _param(loc: Sequence[Any]) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "body"


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return APIError(
        error.status_code,
        str(error.detail),
        code=code.get(error.status_code),
        headers=getattr(error, "headers", None),
    ).response()


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    return _error_of(error).response()


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
            error = APIError(413, self._message(int(declared)), code="request_too_large")
            await error.response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI passes HTTPExceptions from here on
                    raise HTTPException(413, self._message(None))
            return message

        await self.app(scope, counted, send)

    def _message(self, size: int | None) -> str:
        of = f" of {size} bytes" if size is not None else ""
        return f"request body{of} exceeds the server's limit of {self.max_bytes} bytes"
