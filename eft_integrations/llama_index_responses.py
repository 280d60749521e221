"""The core's results and streams as LlamaIndex responses, for `EFTLLM` (llama_index.py).

`TEXT` and `CHAT` are the two kinds of call `EFTLLM` makes: raw text through
`EFTDecoder.generate` / `stream` / `agenerate` / `astream`, and chat turns through
`eft_integrations.chat` (chat template, tools, structured output). Each `Route` runs its
request in one of four ways (sync or async, whole or streamed) and builds the responses, so
`EFTLLM`'s eight entry points are one line each.

Responses carry the token usage, finish reason, full weights and the engine's per-request
`stats` in `raw` (usage also in `additional_kwargs`, where `TokenCountingHandler` reads it).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    LogProb,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import BaseModel
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json
from llama_index.core.program.utils import create_flexible_model

from . import chat as core_chat
from .lazy import aget_decoder, get_decoder
from .logprobs import openai_logprobs
from .options import GenerationResult, StreamChunk, TokenLogprob, Usage

__all__ = [
    "CHAT",
    "TEXT",
    "Route",
    "StreamedReply",
    "StreamedText",
    "arguments_dict",
    "astructured_stream",
    "json_schema_format",
    "keep_first_tool_call",
    "parse_structured",
    "structured_stream",
    "tool_selections",
]


# ---------------------------------------------------------------------- one response


def usage_fields(usage: Usage | None) -> dict[str, int]:
    """Usage as `TokenCountingHandler` reads it (from `raw["usage"]` or `additional_kwargs`)."""
    if usage is None:
        return {}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def raw_fields(
    source: Any, weights: Mapping[str, float], token_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """`raw` of a response from the core's result or stream item `source` (a GenerationResult,
    StreamChunk, ChatResult or ChatDelta): finish reason, weights, and once known (the final
    item), usage and the engine's stats."""
    raw: dict[str, Any] = {"finish_reason": source.finish_reason, "weights": dict(weights)}
    if token_ids is not None:
        raw["token_ids"] = list(token_ids)
    if source.usage is not None:
        raw["usage"] = usage_fields(source.usage)
    if source.stats is not None:
        raw["stats"] = source.stats.as_dict()
    return raw


def index_logprobs(
    entries: Sequence[TokenLogprob] | None, tokenizer: Any
) -> list[list[LogProb]] | None:
    """Log-probs as LlamaIndex's OpenAI LLM gives them: per token, its `top_logprobs`
    alternatives (most likely first), or the chosen token alone when none were asked for."""
    if entries is None:
        return None
    out = []
    for token in openai_logprobs(entries, tokenizer):
        choices = token["top_logprobs"] or [token]
        out.append(
            [LogProb(token=c["token"], logprob=c["logprob"], bytes=c["bytes"]) for c in choices]
        )
    return out


def completion_response(
    text: str,
    source: Any,
    weights: Mapping[str, float],
    tokenizer: Any,
    token_ids: Sequence[int] | None = None,
    delta: str | None = None,
) -> CompletionResponse:
    return CompletionResponse(
        text=text,
        delta=delta,
        raw=raw_fields(source, weights, token_ids),
        additional_kwargs=usage_fields(source.usage),
        logprobs=index_logprobs(source.logprobs, tokenizer),
    )


def text_response(result: GenerationResult, tokenizer: Any) -> CompletionResponse:
    return completion_response(result.text, result, result.weights, tokenizer, result.token_ids)


def chat_reply(
    content: str,
    tool_calls: Sequence[core_chat.ToolCall],
    invalid_tool_calls: Sequence[core_chat.InvalidToolCall],
    source: Any,
    weights: Mapping[str, float],
    tokenizer: Any,
    delta: str | None = None,
) -> ChatResponse:
    """A LlamaIndex reply: text and tool-call blocks; calls the core could not read go to
    `additional_kwargs["invalid_tool_calls"]`."""
    blocks: list[Any] = [TextBlock(text=content)] if content else []
    blocks += [
        ToolCallBlock(tool_call_id=call.id, tool_name=call.name, tool_kwargs=call.arguments)
        for call in tool_calls
    ]
    extra = {"invalid_tool_calls": [asdict(c) for c in invalid_tool_calls]}
    message = ChatMessage(
        role=MessageRole.ASSISTANT,
        blocks=blocks,
        additional_kwargs=extra if invalid_tool_calls else {},
    )
    return ChatResponse(
        message=message,
        delta=delta,
        raw=raw_fields(source, weights),
        additional_kwargs=usage_fields(source.usage),
        logprobs=index_logprobs(source.logprobs, tokenizer),
    )


def chat_response(result: core_chat.ChatResult, tokenizer: Any) -> ChatResponse:
    return chat_reply(
        result.content,
        result.tool_calls,
        result.invalid_tool_calls,
        result,
        result.weights,
        tokenizer,
    )


# ---------------------------------------------------------------------- streamed responses


class StreamedText:
    """The decoder's `StreamChunk`s as cumulative `CompletionResponse`s."""

    def __init__(self, weights: Mapping[str, float], tokenizer: Any) -> None:
        self.weights = weights
        self.tokenizer = tokenizer
        self.text = ""

    def add(self, chunk: StreamChunk) -> CompletionResponse:
        self.text += chunk.text
        return completion_response(self.text, chunk, self.weights, self.tokenizer, delta=chunk.text)


class StreamedReply:
    """The core's `ChatDelta`s as cumulative `ChatResponse`s. Each tool call arrives whole in
    one delta, read by the core (`tool_calls`) or not readable (`invalid_tool_calls`)."""

    def __init__(self, weights: Mapping[str, float], tokenizer: Any) -> None:
        self.weights = weights
        self.tokenizer = tokenizer
        self.content = ""
        self.tool_calls: list[core_chat.ToolCall] = []
        self.invalid_tool_calls: list[core_chat.InvalidToolCall] = []

    def add(self, delta: core_chat.ChatDelta) -> ChatResponse:
        self.content += delta.content
        self.tool_calls += delta.tool_calls
        self.invalid_tool_calls += delta.invalid_tool_calls
        return chat_reply(
            self.content,
            self.tool_calls,
            self.invalid_tool_calls,
            delta,
            self.weights,
            self.tokenizer,
            delta=delta.content,
        )


def responses(items: Iterator[Any], reply: StreamedText | StreamedReply) -> Iterator[Any]:
    """A stream's items as cumulative responses; closing it closes the stream."""
    try:
        for item in items:
            yield reply.add(item)
    finally:
        items.close()  # type: ignore[attr-defined]


async def aresponses(
    items: AsyncIterator[Any], reply: StreamedText | StreamedReply
) -> AsyncIterator[Any]:
    """`responses` for an async stream."""
    try:
        async for item in items:
            yield reply.add(item)
    finally:
        await items.aclose()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- the two kinds of call


@dataclass(frozen=True)
class Route:
    """One kind of call on the core: its four calls (each takes the decoder, then the request
    as keywords, with `weights` among them), the response of a whole result, and what turns
    stream items into cumulative responses. A holder is an `EFTDecoder` or `LazyDecoder`;
    the async calls load a lazy one on a worker thread."""

    run: Callable[..., Any]
    stream: Callable[..., Iterator[Any]]
    arun: Callable[..., Any]  # a coroutine function
    astream: Callable[..., AsyncIterator[Any]]
    response: Callable[[Any, Any], Any]  # (result, tokenizer)
    streamed: type[StreamedText] | type[StreamedReply]

    def call(self, holder: Any, request: Mapping[str, Any]) -> Any:
        decoder = get_decoder(holder)
        return self.response(self.run(decoder, **request), decoder.tokenizer)

    def stream_call(self, holder: Any, request: Mapping[str, Any]) -> Iterator[Any]:
        decoder = get_decoder(holder)
        weights = core_chat.resolved_weights(decoder, request["weights"])
        reply = self.streamed(weights, decoder.tokenizer)
        return responses(self.stream(decoder, **request), reply)

    async def acall(self, holder: Any, request: Mapping[str, Any]) -> Any:
        decoder = await aget_decoder(holder)
        return self.response(await self.arun(decoder, **request), decoder.tokenizer)

    async def astream_call(self, holder: Any, request: Mapping[str, Any]) -> AsyncIterator[Any]:
        decoder = await aget_decoder(holder)
        weights = core_chat.resolved_weights(decoder, request["weights"])
        reply = self.streamed(weights, decoder.tokenizer)
        return aresponses(self.astream(decoder, **request), reply)


TEXT = Route(
    run=lambda decoder, **request: decoder.generate(**request),
    stream=lambda decoder, **request: decoder.stream(**request),
    arun=lambda decoder, **request: decoder.agenerate(**request),
    astream=lambda decoder, **request: decoder.astream(**request),
    response=text_response,
    streamed=StreamedText,
)
"""Raw text: the request is `prompt` plus the decoder's generation options."""

CHAT = Route(
    run=core_chat.chat,
    stream=core_chat.stream_chat,
    arun=core_chat.achat,
    astream=core_chat.astream_chat,
    response=chat_response,
    streamed=StreamedReply,
)
"""Chat turns: the request is `messages` (the core's dicts) plus the chat options."""


# ---------------------------------------------------------------------- tool calls, JSON


def arguments_dict(arguments: Any) -> dict[str, Any]:
    """Tool arguments as a dict; a JSON string (possibly still streaming) is parsed."""
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if not arguments:
        return {}
    try:
        parsed = parse_partial_json(arguments)
    except (ValueError, json.JSONDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def tool_selections(response: ChatResponse, error_on_no_tool_call: bool) -> list[ToolSelection]:
    """The tool calls of a (possibly partial, streamed) response as `ToolSelection`s."""
    selections = [
        ToolSelection(
            tool_id=block.tool_call_id or "",
            tool_name=block.tool_name,
            tool_kwargs=arguments_dict(block.tool_kwargs),
        )
        for block in response.message.blocks
        if isinstance(block, ToolCallBlock)
    ]
    if not selections and error_on_no_tool_call:
        invalid = response.message.additional_kwargs.get("invalid_tool_calls")
        detail = f"; invalid calls: {invalid}" if invalid else ""
        raise ValueError(
            f"expected at least one tool call, got none{detail}; pass tool_required=True "
            "to force a call"
        )
    return selections


def keep_first_tool_call(response: ChatResponse) -> ChatResponse:
    """`response` with its first tool call only (parallel calls not allowed)."""
    calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    if len(calls) > 1:
        response.message.blocks = [
            b for b in response.message.blocks if not isinstance(b, ToolCallBlock) or b is calls[0]
        ]
    return response


def json_schema_format(output_cls: type[BaseModel]) -> dict[str, Any]:
    return {"type": "json_schema", "schema": output_cls.model_json_schema()}


class PartialObjects:
    """Partial JSON of a streamed structured answer -> flexible objects (fields optional)."""

    def __init__(self, output_cls: type[BaseModel]) -> None:
        self.flexible = create_flexible_model(output_cls)
        self.seen: dict[str, Any] | None = None

    def add(self, response: ChatResponse) -> list[BaseModel]:
        fields = arguments_dict(response.message.content or "")
        if not fields or fields == self.seen:
            return []
        self.seen = fields
        try:
            return [self.flexible.model_validate(fields)]
        except ValueError:  # a half-written value that does not fit yet
            return []


def parse_structured(output_cls: type[BaseModel], response: ChatResponse) -> BaseModel:
    content = response.message.content or ""
    try:
        return output_cls.model_validate_json(content)
    except ValueError as error:  # only when decoding stopped early (max_new_tokens)
        reason = (response.raw or {}).get("finish_reason")
        raise ValueError(
            f"structured output for {output_cls.__name__} is not valid (finish_reason="
            f"{reason!r}); raise max_new_tokens. Output: {content!r}"
        ) from error


def structured_stream(
    output_cls: type[BaseModel], stream: Iterator[ChatResponse]
) -> Iterator[BaseModel]:
    """Partial objects (all fields optional) while the constrained JSON streams, then the
    schema-valid `output_cls`."""
    partial = PartialObjects(output_cls)
    last = None
    for last in stream:
        yield from partial.add(last)
    if last is not None:
        yield parse_structured(output_cls, last)


async def astructured_stream(
    output_cls: type[BaseModel], stream: AsyncIterator[ChatResponse]
) -> AsyncIterator[BaseModel]:
    """`structured_stream` for an async stream."""
    partial = PartialObjects(output_cls)
    last = None
    async for last in stream:
        for obj in partial.add(last):
            yield obj
    if last is not None:
        yield parse_structured(output_cls, last)
