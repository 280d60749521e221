"""The OpenAI wire format: pydantic models of requests and responses, and their translation
to and from the chat core (as vLLM keeps its `protocol.py` apart from the engine).

Requests follow OpenAI's chat-completions and completions APIs; EFT's own fields ride in the
body (OpenAI clients send them with `extra_body`): `eft_weights` ({behavior: float}), `top_k`,
`conservative_top_p`, `speculative_k`. Responses carry `eft_weights`, the full weights the
answer was decoded with. Nothing here knows HTTP; `app.py` serves these models.

Reference: https://platform.openai.com/docs/api-reference/chat/create
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..chat import ChatDelta, ChatResult, InvalidToolCall, ToolCall, ToolCallChunk
from ..errors import EFTRequestError
from ..logprobs import openai_logprobs
from ..options import (
    MAX_TOP_LOGPROBS,
    ContinuationScore,
    GenerationResult,
    StreamChunk,
    TokenLogprob,
    Usage,
    logprobs_option,
    sample_seed,
)

__all__ = [
    "MAX_N",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChoiceLogprobs",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "UsageInfo",
]

logger = logging.getLogger(__name__)

Finite = Annotated[float, Field(allow_inf_nan=False)]

MAX_N = 128
"""The most choices one prompt may ask for (each is a row of the engine's batch)."""


class OpenAIModel(BaseModel):
    """Base of the request models: fields OpenAI has and we do not use are accepted and
    ignored (clients send many), and logged so a misspelt EFT field is visible.

    Strict types, as the wire has them: `"max_tokens": "4"`, `"stream": "yes"`,
    `"temperature": "0.5"` or `"n": true` are 400s naming the field, not guesses. A float
    field still takes an integer (JSON clients send 1 for 1.0)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)

    @model_validator(mode="after")
    def _log_ignored_fields(self) -> OpenAIModel:
        if self.model_extra:
            logger.info("ignoring unsupported request fields: %s", sorted(self.model_extra))
        return self


# ------------------------------------------------------------------------------ requests


class FunctionCall(OpenAIModel):
    name: str
    arguments: str | dict[str, Any] = "{}"
    """JSON text of the arguments (a dict is accepted too)."""


class ToolCallModel(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    """One message of the conversation; `developer` is read as `system`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    """Text, or a list of content parts of which only `{"type": "text"}` ones are supported."""
    name: str | None = None
    tool_calls: list[ToolCallModel] | None = None
    tool_call_id: str | None = None

    def text(self) -> str | None:
        """The content as one string (text parts joined); an `EFTRequestError` for other
        parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise EFTRequestError(
                    f"only text content parts are supported, got a {part.get('type')!r} part",
                    param="messages",
                )
            texts.append(part["text"])
        return "".join(texts)

    def to_core(self) -> dict[str, Any]:
        """The message as the chat core takes it (Hugging Face chat-template form)."""
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(OpenAIModel):
    name: str = "response"
    description: str | None = None
    schema_definition: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.schema_definition is None
        ):
            raise ValueError('{"type": "json_schema"} needs "json_schema": {"schema": {...}}')
        return self

    def to_core(self) -> dict[str, Any] | None:
        """The chat core's `response_format` (None for plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        assert self.json_schema is not None
        return {"type": "json_schema", "schema": self.json_schema.schema_definition}


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    """Send one more chunk before `[DONE]` with empty choices and the usage."""


class SamplingFields(OpenAIModel):
    """What chat completions and completions share: sampling options and EFT's fields."""

    model: str
    temperature: Finite | None = Field(default=None, ge=0)
    top_p: Finite | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: Finite | None = None
    presence_penalty: Finite | None = None
    logit_bias: dict[str, float] | None = None

    eft_weights: dict[str, Finite] | None = None
    """Behavior weights of this request; names left out take the server's defaults."""
    top_k: int | None = Field(default=None, ge=0)
    """Keep only the k most likely composed tokens (0 keeps all)."""
    conservative_top_p: Finite | None = Field(default=None, gt=0, le=1)
    """EFT paper 4.4: up-scale only tokens in the top-p set of the fine-tuning-scale model."""
    speculative_k: int | None = Field(default=None, ge=1)
    """Draft k tokens per round with the behaviors' models (same output distribution)."""
    min_p: Finite | None = None
    """Drop tokens below min_p times the most likely one's probability (vLLM's field)."""
    repetition_penalty: Finite | None = None
    """> 1 discourages tokens already in the prompt or completion (vLLM's field)."""

    @field_validator("n")
    @classmethod
    def _choices(cls, n: int) -> int:
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N} (choices per prompt), got {n}")
        return n

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids (digits), got {key!r}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sample_options(self, options: Mapping[str, Any], index: int) -> dict[str, Any]:
        """`options` for choice `index` of a prompt: its own seed (`sample_seed`)."""
        return {**options, "seed": sample_seed(self.seed, index)}

    def generation_options(self, max_new_tokens: int) -> dict[str, Any]:
        """Keyword arguments of the decoder (and chat core) for this request."""
        options: dict[str, Any] = {
            "weights": self.eft_weights,
            "max_new_tokens": max_new_tokens,
            "temperature": 1.0 if self.temperature is None else float(self.temperature),
            "top_p": 1.0 if self.top_p is None else float(self.top_p),
            "top_k": self.top_k or 0,
            "conservative_top_p": self.conservative_top_p,
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or ()),
            "seed": self.seed,
        }
        extras = {
            "speculative_k": self.speculative_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": {int(t): b for t, b in self.logit_bias.items()}
            if self.logit_bias
            else None,
        }  # left out when unset: the core's defaults, validated there (400 naming the field)
        options.update({name: value for name, value in extras.items() if value is not None})
        return options


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    """Return each generated token's log-prob under the composed EFT distribution (before
    temperature, top-k and top-p, as vLLM reports them)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """With `logprobs`: the most likely alternatives returned per token."""

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true (as in OpenAI's API)")
        return value

    def budget(self, default: int) -> int:
        """max_completion_tokens, else max_tokens, else `default`."""
        return self.max_completion_tokens or self.max_tokens or default

    def chat_kwargs(self, default_max_tokens: int) -> dict[str, Any]:
        """Keyword arguments of `chat.achat` / `chat.astream_chat` (messages apart)."""
        kwargs = self.generation_options(self.budget(default_max_tokens))
        logprobs = logprobs_option(self.logprobs, self.top_logprobs)
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        if self.tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True, by_alias=True) for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            kwargs["tool_choice"] = self.tool_choice.function.name
        elif self.tool_choice is not None:
            kwargs["tool_choice"] = self.tool_choice
        if self.parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = self.parallel_tool_calls
        if self.response_format is not None:
            kwargs["response_format"] = self.response_format.to_core()
        return kwargs

    def core_messages(self) -> list[dict[str, Any]]:
        return [m.to_core() for m in self.messages]


class CompletionRequest(SamplingFields):
    """POST /v1/completions (the legacy text-completion API)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    """Return the prompt before the completion; with `logprobs`, the prompt tokens'
    log-probs too (the first token has none)."""
    max_tokens: int | None = Field(default=16, ge=0)
    """0 (with `echo`) scores the prompt without generating (lm-evaluation-harness)."""
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """Return each token's log-prob and those of its `logprobs` most likely alternatives."""
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: Any) -> Any:
        if not prompt or any(isinstance(p, (str, list)) and not p for p in prompt):
            raise ValueError("prompt is empty: give some text or token ids")
        return prompt

    @field_validator("max_tokens")
    @classmethod
    def _generate_or_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens must be >= 1 (0 only with echo: true, to score)")
        return value

    def generation_options(self, max_new_tokens: int) -> dict[str, Any]:
        options = super().generation_options(max_new_tokens)
        if self.logprobs is not None:
            options["logprobs"] = self.logprobs
        return options

    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("not supported; leave it unset")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of must be 1")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request, one per choice."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens read from the prefix cache (in every model)."""


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, *usages: Usage | None, n: int = 1) -> UsageInfo:
        """The sum of the usages given, in prompt-major order with `n` choices per prompt:
        each prompt's tokens count once (its first choice's), as OpenAI counts them."""
        given = [u for u in usages if u is not None]
        groups = (usages[i : i + n] for i in range(0, len(usages), n))
        prompts = [next(u for u in g if u is not None) for g in groups if g.count(None) < len(g)]
        prompt = sum(u.prompt_tokens for u in prompts)
        completion = sum(u.completion_tokens for u in given)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(u.cached_tokens for u in prompts)
            ),
        )


class ResponseFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction

    @classmethod
    def of(cls, call: ToolCall | InvalidToolCall) -> ResponseToolCall:
        """A call as OpenAI sends it; a call the model wrote but the core could not read goes
        out with its raw arguments, so the client reports it as invalid."""
        if isinstance(call, ToolCall):
            arguments = json.dumps(call.arguments, ensure_ascii=False)
            return cls(id=call.id, function=ResponseFunction(name=call.name, arguments=arguments))
        return cls(
            id=call.id or _id("call"),
            function=ResponseFunction(name=call.name or "", arguments=call.arguments or ""),
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] | None = None
    logprob: float


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """A chat choice's `logprobs`: one entry per generated token."""

    content: list[TokenLogprobInfo] | None

    @classmethod
    def of(cls, entries: Sequence[TokenLogprob] | None, tokenizer: Any) -> ChoiceLogprobs | None:
        if entries is None:
            return None
        tokens = openai_logprobs(entries, tokenizer)
        return cls(content=[TokenLogprobInfo.model_validate(t) for t in tokens])


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    eft_weights: dict[str, float]
    """The behavior weights the answer was decoded with (defaults filled in)."""

    @classmethod
    def of(
        cls, model: str, results: Sequence[ChatResult], tokenizer: Any
    ) -> ChatCompletionResponse:
        """One choice per result (the `n` samples of the turn)."""
        return cls(
            model=model,
            choices=[_chat_choice(i, r, tokenizer) for i, r in enumerate(results)],
            usage=UsageInfo.of(*(r.usage for r in results), n=len(results)),
            eft_weights=dict(results[0].weights),
        )


def _chat_choice(index: int, result: ChatResult, tokenizer: Any) -> ChatChoice:
    calls = [ResponseToolCall.of(c) for c in [*result.tool_calls, *result.invalid_tool_calls]]
    message = AssistantMessage(
        content=result.content if result.content or not calls else None,
        tool_calls=calls or None,
    )
    return ChatChoice(
        index=index,
        message=message,
        finish_reason=result.finish_reason,
        logprobs=ChoiceLogprobs.of(result.logprobs, tokenizer),
    )


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction

    @classmethod
    def of(cls, chunk: ToolCallChunk) -> DeltaToolCall:
        return cls(
            index=chunk.index,
            id=chunk.id or _id("call"),
            type="function",
            function=DeltaFunction(name=chunk.name or "", arguments=chunk.arguments or ""),
        )


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    eft_weights: dict[str, float] | None = None
    """On the chunk with the finish_reason: the weights the answer was decoded with."""


class _ChoiceUsages:
    """The usage of each of a stream's `n` choices, and the total once all have finished
    (each prompt counted once, `UsageInfo.of`)."""

    def __init__(self, n: int) -> None:
        self.usages: list[Usage | None] = [None] * n
        self._finished = 0

    def finish(self, index: int, usage: Usage | None) -> UsageInfo | None:
        """Choice `index` finished with `usage`: the total after the last choice, else None."""
        self.usages[index] = usage
        self._finished += 1
        if self._finished < len(self.usages):
            return None
        return UsageInfo.of(*self.usages, n=len(self.usages))


class ChatChunks:
    """Builds the chunks of one streamed chat completion, OpenAI's way: per choice a first
    chunk with the role, one per content or tool-call delta, one with the finish_reason (and
    `eft_weights`); once every one of the `n` choices has finished, when `include_usage`, one
    with empty choices and the usage."""

    def __init__(
        self,
        model: str,
        weights: Mapping[str, float],
        include_usage: bool,
        tokenizer: Any,
        n: int = 1,
    ) -> None:
        self.id = _id("chatcmpl")
        self.created = int(time.time())
        self.model = model
        self.weights = dict(weights)
        self.include_usage = include_usage
        self.tokenizer = tokenizer
        self.choices = _ChoiceUsages(n)

    def _chunk(self, choices: list[ChatChunkChoice], **fields: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, **fields
        )

    def first(self, index: int = 0) -> ChatCompletionChunk:
        message = DeltaMessage(role="assistant", content="")
        return self._chunk([ChatChunkChoice(index=index, delta=message)])

    def of(self, delta: ChatDelta, index: int = 0) -> list[ChatCompletionChunk]:
        """The chunks one core delta of choice `index` becomes."""
        chunks = []
        logprobs = ChoiceLogprobs.of(delta.logprobs, self.tokenizer)
        if delta.content or delta.tool_call_chunks:
            message = DeltaMessage(
                content=delta.content or None,
                tool_calls=[DeltaToolCall.of(c) for c in delta.tool_call_chunks] or None,
            )
            choice = ChatChunkChoice(index=index, delta=message, logprobs=logprobs)
            chunks.append(self._chunk([choice]))
            logprobs = None
        if delta.finish_reason is not None:
            chunks += self.last(delta.finish_reason, delta.usage, logprobs, index)
        return chunks

    def last(
        self,
        finish_reason: str,
        usage: Usage | None,
        logprobs: ChoiceLogprobs | None = None,
        index: int = 0,
    ) -> list[ChatCompletionChunk]:
        """The chunk with choice `index`'s finish_reason (and the log-probs of tokens no
        content chunk carried: a held-back end); after the last choice's, the usage chunk
        when asked for."""
        choice = ChatChunkChoice(
            index=index, delta=DeltaMessage(), finish_reason=finish_reason, logprobs=logprobs
        )
        chunks = [self._chunk([choice], eft_weights=self.weights)]
        total = self.choices.finish(index, usage)
        if self.include_usage and total is not None:
            chunks.append(self._chunk([], usage=total))
        return chunks


class CompletionLogprobs(BaseModel):
    """A completion choice's `logprobs`, in the legacy completions shape: per token its text,
    log-prob (None for the first prompt token, which nothing predicts), its most likely
    alternatives (text -> log-prob) and its character offset in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def add(
        self, tokenizer: Any, entries: Sequence[TokenLogprob], start: int = 0
    ) -> CompletionLogprobs:
        """Append `entries`; the first token of an empty one is at offset `start` (a
        streamed chunk's: the text streamed before it)."""
        if self.tokens:
            start = self.text_offset[-1] + len(self.tokens[-1])
        for token in openai_logprobs(entries, tokenizer):
            self.text_offset.append(start)
            self.tokens.append(token["token"])
            self.token_logprobs.append(token["logprob"])
            self.top_logprobs.append({t["token"]: t["logprob"] for t in token["top_logprobs"]})
            start += len(token["token"])
        return self

    def add_prompt(
        self, tokenizer: Any, prompt: Sequence[int], score: ContinuationScore | None
    ) -> CompletionLogprobs:
        """The echoed prompt's tokens: the first without a log-prob, then `score` (the rest
        of the prompt scored after it; None for a one-token prompt)."""
        first = tokenizer.decode([prompt[0]])
        self.tokens.append(first)
        self.token_logprobs.append(None)
        self.top_logprobs.append(None)
        self.text_offset.append(0)
        if score is not None:
            tops = score.top_logprobs or [{} for _ in score.token_ids]
            entries = [
                TokenLogprob(token_id=t, logprob=lp, top_logprobs=top)
                for t, lp, top in zip(score.token_ids, score.logprobs, tops, strict=True)
            ]
            self.add(tokenizer, entries)
        return self


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    eft_weights: dict[str, float]

    @classmethod
    def of(
        cls,
        model: str,
        results: Sequence[GenerationResult],
        echoes: Sequence[str],
        logprobs: Sequence[CompletionLogprobs | None] | None = None,
        n: int = 1,
    ) -> CompletionResponse:
        """One choice per result, prompt-major with `n` choices per prompt; `echoes` and
        `logprobs` (None where the request asked for none) are per choice."""
        logprobs = logprobs or [None] * len(results)
        choices = [
            CompletionChoice(
                index=i, text=echo + r.text, finish_reason=r.finish_reason, logprobs=lp
            )
            for i, (r, echo, lp) in enumerate(zip(results, echoes, logprobs, strict=True))
        ]
        return cls(
            model=model,
            choices=choices,
            usage=UsageInfo.of(*(r.usage for r in results), n=n),
            eft_weights=dict(results[0].weights),
        )


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    eft_weights: dict[str, float] | None = None


class CompletionChunks:
    """Builds the chunks of one streamed completion (one prompt, `n` choices); with
    log-probs, each chunk carries its tokens' (offsets continue over each choice's stream).
    The usage chunk, when asked for, follows the last choice's finish."""

    def __init__(
        self,
        model: str,
        weights: Mapping[str, float],
        include_usage: bool,
        tokenizer: Any,
        n: int = 1,
    ) -> None:
        self.id = _id("cmpl")
        self.created = int(time.time())
        self.model = model
        self.weights = dict(weights)
        self.include_usage = include_usage
        self.tokenizer = tokenizer
        self._offsets = [0] * n  # per choice, the text offset of its next token
        self.choices = _ChoiceUsages(n)

    def _chunk(self, choices: list[CompletionChoice], **fields: Any) -> CompletionChunk:
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, **fields
        )

    def text(
        self,
        text: str,
        logprobs: CompletionLogprobs | None = None,
        finish_reason: str | None = None,
        index: int = 0,
    ) -> CompletionChunk:
        if logprobs is not None and logprobs.tokens:
            self._offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        choice = CompletionChoice(
            index=index, text=text, finish_reason=finish_reason, logprobs=logprobs
        )
        return self._chunk([choice], eft_weights=self.weights if finish_reason else None)

    def of(self, chunk: StreamChunk, index: int = 0) -> list[CompletionChunk]:
        """The chunks one decoder chunk of choice `index` becomes."""
        logprobs = None
        if chunk.logprobs is not None:
            logprobs = CompletionLogprobs().add(
                self.tokenizer, chunk.logprobs, self._offsets[index]
            )
        if chunk.finish_reason is None:
            return [self.text(chunk.text, logprobs, None, index)] if chunk.text or logprobs else []
        chunks = [self.text(chunk.text, logprobs, chunk.finish_reason, index)]
        total = self.choices.finish(index, chunk.usage)
        if self.include_usage and total is not None:
            chunks.append(self._chunk([], usage=total))
        return chunks


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "eft-integrations"
    root: str
    """The composition served, e.g. `base + chat(ft - ref)`."""
    behaviors: list[str]
    default_weights: dict[str, float]
    context_window: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
