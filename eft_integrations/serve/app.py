"""An OpenAI-compatible HTTP app over one EFT engine (FastAPI), as vLLM's OpenAI entrypoint:
validate the body (`protocol.py`), convert it to a chat-core or decoder call, answer in JSON or
stream the engine's output as server-sent events (sse-starlette).

    from eft_integrations.serve import build_app
    app = build_app(decoder, served_model_name="eft", api_key="secret")
    # uvicorn.run(app, host="127.0.0.1", port=8000), or `eft serve`

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health,
GET /metrics (Prometheus, `metrics.py`; behind the API key when there is one).
Every request goes through the async core path, so it joins the engine's running batch; a
client that disconnects (mid-stream or while waiting) cancels its request, which leaves the
batch at the next step. Errors are OpenAI's error JSON with the matching status; a request
never takes the server down.

What keeps one client from hurting the others:
- admission (`admission.py`): a request reserves its prompts before its first `await`, so
  `max_queue` holds under a burst and a completions request counts each of its prompts;
- the event loop only routes: templating, tokenizing and grammar compilation run on worker
  threads, after the cheap checks (body size, model, capacity);
- middleware (`middleware.py`): the API key is checked before the body is read, a body that
  does not arrive in time gets 408, every response carries an `x-request-id`, and a 500 names
  that id instead of the error (the log has the traceback); every request ends with an access
  log line (status, latency, tokens, request id);
- shutdown (`ServingState.drain`, run by `server.Server` on SIGTERM): 503 for new requests,
  a grace period for the running ones, then each open stream ends with an error event and
  `[DONE]` and its engine rows are cancelled.
The documentation routes (/docs, /redoc, /openapi.json) are off: they would describe the API
to anyone who can reach the port, key or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from ..chat import ChatDelta, ChatResult, astream_chat, resolved_weights
from ..errors import EFTRequestError, EngineError, EngineUnavailableError
from ..options import GenerationResult, TokenLogprob, Usage
from ..tool_calls import InvalidToolCall, ToolCall
from .admission import Admission, Reservation
from .defaults import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES
from .errors import APIError, ClientDisconnected, internal_error
from .fanout import all_or_none, firsts, merged
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .middleware import (
    AccessLog,
    BodySizeLimit,
    BodyTimeout,
    RequestContext,
    RequireKey,
    note_usage,
    on_end,
    request_id,
)
from .protocol import (
    ChatChunks,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionChunks,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)

__all__ = ["APIError", "ServingState", "build_app"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CHOICES = 4096
"""The most choices (prompts x n) one completions request may ask for: each is an engine
request, built before the first one runs."""

FALLBACK_MAX_TOKENS = 1024
"""Completion budget of a request that names none, for models without a known window."""


@dataclass
class ServingState:
    """What the routes need: the engine's decoder, the server's options and its admission."""

    decoder: Any
    model_names: tuple[str, ...]
    admission: Admission
    metrics: ServerMetrics
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

    def admit(self, request: Request, prompts: int, prompt_field: str) -> Reservation:
        """Reserve the request's prompts (503 when full or shutting down). Synchronous: the
        routes call it before their first `await`, so no other request slips in between the
        check and the reservation; released when the request ends, however it ends."""
        reservation = self.admission.reserve(prompts, prompt_field)
        on_end(request.scope, reservation.release)
        return reservation

    async def drain(self, grace: float) -> bool:
        """Shut down gracefully (see `Admission.drain`); True when every request ended."""
        return await self.admission.drain(grace)

    def unavailable(self) -> str | None:
        """Why the server cannot serve now (None while it can)."""
        failure = getattr(self.decoder.engine, "failure", None)
        if failure:
            return f"the engine cannot serve: {failure}"
        if self.admission.draining:
            return "the server is shutting down"
        return None

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
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
) -> FastAPI:
    """The OpenAI-compatible app over `decoder` (an `EFTDecoder`, i.e. one engine).

    Args:
        served_model_name: the name(s) clients put in `model` (default "eft").
        api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`
            (401 otherwise, before the body is read).
        max_queue: admit at most `max_batch_size + max_queue` prompts at once (503 with
            Retry-After beyond; a completions request counts each prompt).
        max_body_bytes: larger request bodies get 413 (None: no limit).
        default_max_tokens: budget of chat requests that name none (default: the window).
        body_timeout: seconds a body may take to arrive after the headers (408 beyond;
            None: no limit).
    """
    if isinstance(served_model_name, str):
        names: tuple[str, ...] = (served_model_name,)
    else:
        names = tuple(served_model_name or ("eft",))
    app = FastAPI(
        title="eft-integrations",
        summary="OpenAI-compatible EFT server",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    admission = Admission(decoder.engine, max_queue)
    metrics = ServerMetrics(decoder, admission)
    metrics.attach()
    app.state.eft = ServingState(decoder, names, admission, metrics, default_max_tokens)
    app.include_router(_v1, prefix="/v1")
    app.include_router(_plain)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    # added innermost first: AccessLog ends up outermost
    if max_body_bytes is not None:
        app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if body_timeout is not None:
        app.add_middleware(BodyTimeout, seconds=body_timeout)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)
    app.add_middleware(RequestContext)
    app.add_middleware(AccessLog, metrics=metrics)
    return app


# ------------------------------------------------------------------------------ routes

_v1 = APIRouter()
_plain = APIRouter()


def _state(request: Request) -> ServingState:
    return request.app.state.eft


@_plain.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 with the engine's load while the server can serve; 503 with the reason while it
    cannot (the engine failed for good, or the server is shutting down), so that a load
    balancer takes it out of rotation."""
    state = _state(request)
    reason = state.unavailable()
    if reason is not None:
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
    engine = state.decoder.engine
    return JSONResponse(
        {
            "status": "ok",
            "batch_size": engine.batch_size,
            "queued": engine.queued,
            "prompts_in_flight": state.admission.prompts,
        }
    )


@_plain.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics of the server and its engine (see `metrics.py`)."""
    body = await asyncio.to_thread(_state(request).metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


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
    """One assistant turn (`n` sampled turns); `stream: true` answers with server-sent
    events."""
    state = _state(request)
    state.check_model(body.model)
    admitted = state.admit(request, body.n, "n" if body.n > 1 else "messages")  # no await yet
    weights = state.weights(body.eft_weights)
    with _core_errors(request):
        messages = body.core_messages()
    turn = _TurnDecoder(state.decoder, admitted.cancel)
    kwargs = body.chat_kwargs(state.max_tokens())
    turns = [astream_chat(turn, messages, **body.sample_options(kwargs, i)) for i in range(body.n)]
    tokenizer = state.decoder.tokenizer
    if body.stream:
        heads = await _firsts(request, admitted, turns, "messages")
        chunks = ChatChunks(body.model, weights, body.include_usage, tokenizer, body.n)
        return _sse(_chat_events(request, admitted, chunks, merged(turns, heads)))
    with _core_errors(request):
        whole = all_or_none(_whole_turn(t, weights) for t in turns)
        results = await _unless_disconnected(request, whole)
    admitted.check()
    response = ChatCompletionResponse.of(body.model, results, tokenizer)
    note_usage(request.scope, response.usage.prompt_tokens, response.usage.completion_tokens)
    return response


@_v1.post("/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    """Complete raw prompts (`n` choices per prompt, prompt-major); `stream: true` takes one
    prompt."""
    state = _state(request)
    state.check_model(body.model)
    prompts = body.prompts()
    if body.stream and len(prompts) != 1:
        raise APIError(
            400, f"a streamed completion takes one prompt, got {len(prompts)}", param="prompt"
        )
    if body.stream and body.max_tokens == 0:
        raise APIError(
            400, "max_tokens 0 scores the prompt only; send it with stream: false", param="stream"
        )
    n = body.n
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(
            400,
            f"{len(prompts)} prompts x n={n} make {len(prompts) * n} choices; one request "
            f"makes at most {MAX_CHOICES}: send fewer prompts or a smaller n",
            param="n" if n > 1 else "prompt",
        )
    field = "n" if n > 1 else "prompt"
    admitted = state.admit(request, len(prompts) * n, field)  # before the first await
    weights = state.weights(body.eft_weights)
    decoder = state.decoder
    options = body.generation_options(body.max_tokens or state.max_tokens())
    options["cancel"] = admitted.cancel
    with _core_errors(request, "prompt"):
        ids, echoes = await _unless_disconnected(
            request, asyncio.to_thread(_tokenized, decoder, prompts, body.echo)
        )
        logprobs = await _unless_disconnected(
            request, asyncio.to_thread(_prompt_logprobs, decoder, ids, body)
        )
    if body.stream:
        streams = [decoder.astream(ids[0], **body.sample_options(options, j)) for j in range(n)]
        heads = await _firsts(request, admitted, streams, "prompt")
        chunks = CompletionChunks(body.model, weights, body.include_usage, decoder.tokenizer, n)
        echo = (
            [chunks.text(echoes[0], _copy(logprobs[0]), None, j) for j in range(n)]
            if body.echo
            else []
        )
        return _sse(_completion_events(request, admitted, chunks, echo, merged(streams, heads)))
    if body.max_tokens == 0:  # scoring only
        samples = [[_nothing_generated(len(p), weights, body.logprobs) for p in ids]] * n
    else:
        batch = ids if len(ids) > 1 else ids[0]
        calls = (decoder.agenerate(batch, **body.sample_options(options, j)) for j in range(n))
        with _core_errors(request, "prompt"):
            samples = await _unless_disconnected(request, all_or_none(calls))
        samples = [s if isinstance(s, list) else [s] for s in samples]
    admitted.check()
    results = [samples[j][p] for p in range(len(ids)) for j in range(n)]  # prompt-major
    choice_echoes = [echoes[p] for p in range(len(ids)) for _ in range(n)]
    choice_logprobs = [_copy(logprobs[p]) for p in range(len(ids)) for _ in range(n)]
    for lp, result in zip(choice_logprobs, results, strict=True):
        if lp is not None and result.logprobs is not None:
            lp.add(decoder.tokenizer, result.logprobs)
    response = CompletionResponse.of(body.model, results, choice_echoes, choice_logprobs, n)
    note_usage(request.scope, response.usage.prompt_tokens, response.usage.completion_tokens)
    return response


def _copy(logprobs: CompletionLogprobs | None) -> CompletionLogprobs | None:
    """A choice's own copy of its prompt's log-probs (each choice extends its own)."""
    return None if logprobs is None else logprobs.model_copy(deep=True)


# ------------------------------------------------------------------------------ off the loop


def _tokenized(
    decoder: Any, prompts: Sequence[str | list[int]], echo: bool
) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt (validated), and the text to echo before each completion.
    Runs on a worker thread: a long prompt takes seconds to tokenize."""
    ids = [decoder.encode(p) for p in prompts]
    echoes = [_echo(decoder, p) if echo else "" for p in prompts]
    return ids, echoes


def _prompt_logprobs(
    decoder: Any, ids: Sequence[list[int]], body: CompletionRequest
) -> list[CompletionLogprobs | None]:
    """Per prompt, the log-probs a choice starts with: with `echo`, the prompt's tokens
    (each scored after the ones before it, in one teacher-forced batch); without, none yet.
    None where the request asked for no log-probs. Runs on a worker thread."""
    if body.logprobs is None:
        return [None] * len(ids)
    if not body.echo:
        return [CompletionLogprobs() for _ in ids]
    longer = [p for p in ids if len(p) > 1]
    scores = iter(
        decoder.score(
            [p[:1] for p in longer],
            [p[1:] for p in longer],
            weights=body.eft_weights,
            top_logprobs=body.logprobs,
            conservative_top_p=body.conservative_top_p,
        )
        if longer
        else []
    )
    return [
        CompletionLogprobs().add_prompt(decoder.tokenizer, p, next(scores) if len(p) > 1 else None)
        for p in ids
    ]


def _nothing_generated(
    prompt_tokens: int, weights: Mapping[str, float], logprobs: int | None
) -> GenerationResult:
    """The result of a request that only scores its prompt (`max_tokens` 0)."""
    return GenerationResult(
        text="",
        token_ids=[],
        finish_reason="length",
        usage=Usage(prompt_tokens, 0),
        weights=dict(weights),
        logprobs=None if logprobs is None else [],
    )


def _echo(decoder: Any, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else decoder.tokenizer.decode(prompt)


class _TurnDecoder:
    """The decoder as one chat turn sees it (`astream_chat` renders, compiles the grammar and
    calls `astream` on it): the same engine and attributes, but `astream` tokenizes the
    rendered prompt on a worker thread (the decoder tokenizes in its caller's thread, here
    the event loop) and passes the request's cancel event (the chat core keeps `cancel` for
    itself), which the server sets to cut the request short."""

    def __init__(self, decoder: Any, cancel: threading.Event) -> None:
        self._decoder = decoder
        self._cancel = cancel

    def __getattr__(self, name: str) -> Any:
        return getattr(self._decoder, name)

    async def astream(self, prompt: str, **kwargs: Any) -> AsyncIterator[Any]:
        ids = await asyncio.to_thread(self._decoder.encode, prompt)
        stream = self._decoder.astream(ids, cancel=self._cancel, **kwargs)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()


async def _whole_turn(deltas: AsyncIterator[ChatDelta], weights: Mapping[str, float]) -> ChatResult:
    """The streamed turn as one result: its deltas joined (they equal `chat`'s answer).
    Not `chat.achat`, which compiles the turn's grammar on the event loop."""
    content: list[str] = []
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    logprobs: list[TokenLogprob] | None = None
    last: ChatDelta | None = None
    try:
        async for delta in deltas:
            content.append(delta.content)
            calls += delta.tool_calls
            invalid += delta.invalid_tool_calls
            if delta.logprobs is not None:  # extended in place: a long turn stays linear
                logprobs = [] if logprobs is None else logprobs
                logprobs.extend(delta.logprobs)
            last = delta
    finally:
        await deltas.aclose()
    if last is None or last.finish_reason is None or last.usage is None:
        raise RuntimeError("the engine ended the turn without its last delta")
    return ChatResult(
        "".join(content),
        calls,
        invalid,
        last.finish_reason,
        last.usage,
        dict(weights),
        last.stats,
        logprobs,
    )


# ------------------------------------------------------------------------------ streaming


def _sse(events: AsyncIterator[str]) -> EventSourceResponse:
    """Server-sent events as OpenAI frames them (`data: ...` lines, `\\n` separated)."""
    return EventSourceResponse(events, sep="\n")


async def _firsts(
    request: Request, admitted: Reservation, streams: Sequence[AsyncIterator[T]], field: str
) -> list[T]:
    """The first item of the first core stream, before any response is sent, so that a
    request the core refuses (or the server cuts short) gets its error status rather than a
    broken stream; the other choices (same prompt, same options) start as the response
    streams. `field` holds the request's prompt. Every stream is closed if it fails."""
    try:
        with _core_errors(request, field):
            heads = await _unless_disconnected(request, firsts(streams[:1]))
        admitted.check()
    except BaseException:
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        raise
    return heads


async def _chat_events(
    request: Request,
    admitted: Reservation,
    chunks: ChatChunks,
    deltas: AsyncIterator[tuple[int, Any]],
) -> AsyncIterator[str]:
    """The SSE data of one streamed chat completion (`deltas`: each choice's core deltas,
    interleaved, its first first); closing it closes the core streams (which removes their
    requests from the batch). An error after the headers, or the server cutting the request
    short, goes out as an error event; `[DONE]` always ends it."""
    started: set[int] = set()
    try:
        async for index, delta in deltas:
            admitted.check()  # cut short: its last delta is the engine's cancellation
            if index not in started:
                started.add(index)
                yield _json(chunks.first(index))
            for chunk in chunks.of(delta, index):
                yield _json(chunk)
    except Exception as error:
        yield _json(_error_of(error, request).body())
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
        _note_streamed(request, chunks.choices.usages)
    yield "[DONE]"


async def _completion_events(
    request: Request,
    admitted: Reservation,
    chunks: CompletionChunks,
    echoes: Sequence[CompletionChunk],
    items: AsyncIterator[tuple[int, Any]],
) -> AsyncIterator[str]:
    """The SSE data of one streamed completion (see `_chat_events`); `echoes` are the
    chunks of the echoed prompt, one per choice."""
    try:
        for echo in echoes:
            yield _json(echo)
        async for index, item in items:
            admitted.check()
            for chunk in chunks.of(item, index):
                yield _json(chunk)
    except Exception as error:
        yield _json(_error_of(error, request).body())
    finally:
        await items.aclose()  # type: ignore[attr-defined]
        _note_streamed(request, chunks.choices.usages)
    yield "[DONE]"


def _note_streamed(request: Request, usages: Sequence[Usage | None]) -> None:
    """A stream's usage (its choices that finished) for the access log."""
    usage = UsageInfo.of(*usages, n=len(usages))
    note_usage(request.scope, usage.prompt_tokens, usage.completion_tokens)


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

_WIRE_NAMES = {  # the core's parameter names -> the request fields that carry them
    "weights": "eft_weights",
    "max_new_tokens": "max_tokens",
    "constraints": "response_format",
}


@contextlib.contextmanager
def _core_errors(request: Request, prompt_field: str = "messages") -> Iterator[None]:
    """The core's ValueErrors are the request's fault (400); anything else is ours (500).
    `prompt_field` is the request's field holding the prompt."""
    try:
        yield
    except (APIError, asyncio.CancelledError):
        raise
    except Exception as error:
        raise _error_of(error, request, prompt_field) from error


def _error_of(error: BaseException, request: Request, prompt_field: str = "messages") -> APIError:
    """The answer to an error of the core: 400 for the request's own fault, 503 when the
    engine cannot serve it, else a 500 naming the request id (the log has the traceback)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineUnavailableError):  # its reason is public: /health shows it
        return APIError(503, str(error), type="service_unavailable", code="engine_unavailable")
    if isinstance(error, EFTRequestError):  # typed: the field comes with it, never from text
        param = error.param
        param = prompt_field if param in ("prompt", "messages") else _WIRE_NAMES.get(param, param)
        return APIError(400, str(error), param=param, code=error.code)
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    rid = request_id(request.scope)
    logger.error("request %s failed", rid, exc_info=error)
    if isinstance(error, EngineError):  # the engine recovered: the request may be retried
        return APIError(
            503,
            f"the engine failed while decoding this request (request id {rid}); retry it",
            type="service_unavailable",
            code="engine_error",
            headers={"Retry-After": "1"},
        )
    return internal_error(rid)


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
    code = {
        404: "not_found",
        405: "method_not_allowed",
        408: "request_timeout",
        413: "request_too_large",
    }
    return APIError(
        error.status_code,
        str(error.detail),
        code=code.get(error.status_code),
        headers=getattr(error, "headers", None),
    ).response()
