"""LangChain chat model over an EFT decoder: `ChatEFT(BaseChatModel)`.

    from eft_integrations.langchain import ChatEFT
    chat = ChatEFT(decoder=decoder, weights={"helpful": 0.5, "harmless": 0.5}, temperature=0)
    chat.invoke("Hi", weights={"helpful": 1.0, "harmless": 0.0})   # per-call weights
    chat.bind_tools([get_weather], tool_choice="any").invoke("Weather in Paris?")
    chat.with_structured_output(Joke).invoke("Tell me a joke")

The adapter only translates LangChain messages and tools to the plain dicts of
`eft_integrations.chat` and back; decoding, tool-call grammars and parsing live in the core.
`_stream` is the one decoding path (`_generate` aggregates it); the async twins run the
decoder on a worker thread. `batch` / `abatch` are LangChain's: one call per input, run
concurrently, and the decoder batches concurrent calls itself (an input that fails fails
alone). Token counts use the decoder's tokenizer and chat template; a ChatEFT built from model
paths loads only the tokenizer for them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import LanguageModelInput, ModelProfile
from langchain_core.language_models.chat_models import (
    BaseChatModel,
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call_chunk
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableGenerator,
    RunnableMap,
    RunnablePassthrough,
)
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, field_validator, model_validator

from . import chat as core
from .decoder import EFTDecoder
from .lazy import LazyDecoder, aget_decoder, get_decoder
from .logprobs import openai_logprobs
from .options import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_CHAT_TEMPERATURE,
    GenerationOptions,
    logprobs_option,
    merge_call_options,
)
from .tool_calls import DEFAULT_MAX_STRING_LENGTH

__all__ = ["ChatEFT"]

# fields that go to the core under their own name (max_tokens goes as max_new_tokens)
_CALL_FIELDS = (
    "weights",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "conservative_top_p",
    "speculative_k",
    "max_string_length",
)
# call options without a field: the chat arguments of `bind_tools` and structured output
_CHAT_KWARGS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
# the fields a ChatEFT built from model paths hands to `EFTDecoder.from_pretrained`
_LOAD_FIELDS = ("base", "behaviors", "default_weights", "dtype", "device_map", "chat_template")
_INVALID_KEY = "eft_invalid_tool_calls"


class ChatEFT(BaseChatModel):
    """Chat with an emulated fine-tuned model (EFT): base + weighted behavior deltas.

    Give a shared `decoder` (loaded once, reused by many chat models), or the arguments of
    `EFTDecoder.from_pretrained` (`base`, `behaviors`, ...): the models then load lazily on
    first use, so building a `ChatEFT` is cheap. Copies (`bind`, `configurable_fields`,
    `copy.deepcopy`) share the decoder; models are never copied. Every sampling field, and
    `weights`, can be given per call (`invoke(..., weights=...)`, `bind(...)`,
    `configurable_fields`). The final message's `response_metadata` holds `finish_reason`,
    the full `weights` and the engine's `stats` (queue time, time to first token, speed,
    speculative acceptance).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    decoder: EFTDecoder | LazyDecoder | None = Field(default=None, exclude=True)
    """The decoder to share: a loaded `EFTDecoder`, or a `LazyDecoder` that loads it on first
    use. When None and `base` is given, a `LazyDecoder` of the from_pretrained fields below is
    built here (and shared by this model's copies)."""
    base: Any = None
    """Base model for `EFTDecoder.from_pretrained` (hub id, path, ModelSpec or model)."""
    behaviors: dict[str, Any] | None = None
    """Behaviors for `EFTDecoder.from_pretrained`: name -> Behavior or (finetuned, reference)."""
    default_weights: dict[str, float] | None = None
    """Default behavior weights of a decoder loaded here (None: every behavior at 1.0)."""
    dtype: Any = "auto"
    """torch dtype of models loaded here ("auto" keeps the checkpoint's)."""
    device_map: Any = None
    """transformers device_map of models loaded here."""
    chat_template: str | None = None
    """Chat template override for a decoder loaded here."""
    model_name: str | None = Field(default=None, alias="model")
    """Name reported in response metadata and traces (default: the decoder's model_name)."""
    weights: dict[str, float] | None = None
    """Behavior weights, e.g. {"helpful": 0.3, "harmless": 0.7}; None takes the defaults.
    Per-call `weights` update these (names a call leaves out keep the values here)."""
    temperature: float = DEFAULT_CHAT_TEMPERATURE
    """Sampling temperature of the composed distribution; 0 decodes greedily."""
    max_tokens: int | None = DEFAULT_CHAT_MAX_TOKENS
    """Most tokens to generate (None: the decoder's default)."""
    top_p: float = GenerationOptions.top_p
    """Nucleus sampling over the composed distribution; 1 disables it."""
    top_k: int = GenerationOptions.top_k
    """Keep only the k most likely composed tokens; 0 disables it."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop strings (trimmed from the output); per-call `stop` adds to them."""
    seed: int | None = None
    """Seed of each call's random generator; same seed, same samples."""
    conservative_top_p: float | None = None
    """EFT paper 4.4: re-weight only tokens in the top-p set of the fine-tuning-scale model."""
    speculative_k: int | None = None
    """Draft this many tokens with the fine-tuning-scale models and verify them with one base
    forward (exact: same distribution). Applies to unconstrained turns; tool calls and
    structured output decode token by token."""
    streaming: bool = False
    """Whether `invoke` streams internally (callbacks then see every token)."""
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH
    """Cap on free strings inside constrained tool calls and structured output, so that
    forced JSON always closes within `max_tokens` (None: no cap)."""
    logprobs: bool | None = None
    """Return each generated token's log-prob (and `top_logprobs` alternatives) under the
    composed EFT distribution, in `response_metadata["logprobs"]["content"]` as ChatOpenAI
    does (before temperature, top-k and top-p, as vLLM reports them)."""
    top_logprobs: int | None = None
    """With `logprobs`: the most likely alternatives returned per token (0 to 20)."""

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # a string is one stop sequence

    @model_validator(mode="after")
    def _lazy_decoder(self) -> ChatEFT:
        """From model paths, hold a `LazyDecoder`: building stays cheap, copies share it."""
        if self.decoder is None and self.base is not None:
            self.decoder = LazyDecoder(**{name: getattr(self, name) for name in _LOAD_FIELDS})
        return self

    # ------------------------------------------------------------------ identity

    @property
    def _llm_type(self) -> str:
        return "eft"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self._reported_model_name(),
            "weights": self.weights,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "conservative_top_p": self.conservative_top_p,
            "speculative_k": self.speculative_k,
        }

    def _reported_model_name(self) -> str:
        """The `model_name` field, else the decoder's (a lazy one names its base unloaded)."""
        if self.model_name:
            return self.model_name
        return self.decoder.model_name if self.decoder is not None else "eft"

    def _resolve_model_profile(self) -> ModelProfile | None:
        """What LangChain may rely on (create_agent reads `structured_output` to constrain the
        answer itself instead of forcing a tool call every turn): tools, tool choice and
        structured output are grammar-constrained over the composed distribution; text only."""
        profile = ModelProfile(**_SUPPORTED, **_UNSUPPORTED)  # type: ignore[typeddict-item]
        if isinstance(self.decoder, EFTDecoder) and self.decoder.context_window is not None:
            profile["max_input_tokens"] = self.decoder.context_window
        return profile

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        params: dict[str, Any] = {
            "ls_provider": "eft",
            "ls_model_name": kwargs.get("model") or self._reported_model_name(),
            "ls_model_type": "chat",
            "ls_temperature": kwargs.get("temperature", self.temperature),
        }
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = self._stops(stop)
        if stops:
            params["ls_stop"] = stops
        return params

    def _holder(self) -> EFTDecoder | LazyDecoder:
        """The decoder as given: it renders prompts and holds the tokenizer, and a lazy one
        does both without loading the models."""
        if self.decoder is None:
            raise ValueError(
                "ChatEFT needs decoder=EFTDecoder(...) or base=... (and behaviors=...) "
                "to load one with EFTDecoder.from_pretrained"
            )
        return self.decoder

    # ------------------------------------------------------------------ token counts

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` in the decoder's tokenizer (no special tokens added)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return list(self._holder().tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens of the prompt these messages (and tools) render to through the decoder's
        chat template, generation prompt included: what a call with them reads."""
        holder = self._holder()
        prompt = holder.format_chat(
            _to_core_messages(messages),
            tools=[convert_to_openai_tool(t) for t in tools] if tools else None,
        )
        tokenizer = holder.tokenizer
        bos = tokenizer.bos_token  # special tokens as the decoder encodes a rendered prompt
        special = not (bos and prompt.startswith(bos))
        return len(tokenizer(prompt, add_special_tokens=special)["input_ids"])

    # ------------------------------------------------------------------ options

    def _stops(self, stop: str | Sequence[str] | None) -> list[str]:
        if isinstance(stop, str):
            stop = [stop]  # a string is one stop sequence, not one per character
        return [*(self.stop or []), *(stop or [])]

    def _call_options(self, stop: Sequence[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The core's options for one call: the fields, overridden by invoke/bind kwargs
        (LangChain's own `ls_*` tracing kwargs are not options)."""
        model = kwargs.pop("model", None)
        if model is not None and model != self._reported_model_name():
            raise ValueError(
                f"ChatEFT cannot switch models per call (got model={model!r}); the models are "
                "fixed when the decoder is built: use another ChatEFT"
            )
        fields = {name: getattr(self, name) for name in _CALL_FIELDS}
        fields.update(max_new_tokens=self.max_tokens, stop=self._stops(stop) or None)
        fields["logprobs"] = logprobs_option(
            kwargs.pop("logprobs", self.logprobs), kwargs.pop("top_logprobs", self.top_logprobs)
        )
        return merge_call_options(
            fields,
            {k: v for k, v in kwargs.items() if not k.startswith("ls_")},
            owner="ChatEFT",
            passthrough=_CHAT_KWARGS,
            behaviors=self._holder().behavior_names,
        )

    # ------------------------------------------------------------------ decoding

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """The one decoding path: the core's chat deltas as LangChain chunks."""
        options = self._call_options(stop, kwargs)
        decoder = get_decoder(self._holder())
        metadata = self._metadata(decoder, options)
        cancel = threading.Event()
        deltas = core.stream_chat(decoder, _to_core_messages(messages), cancel=cancel, **options)
        try:
            for delta in deltas:
                chunk = _chunk(delta, metadata, decoder.tokenizer)
                if run_manager is not None:
                    run_manager.on_llm_new_token(delta.content, chunk=chunk)
                yield chunk
        finally:
            cancel.set()  # a consumer that stops early stops decoding
            deltas.close()

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """`_stream` on the event loop: decoding runs on the engine, loading on a thread."""
        options = self._call_options(stop, kwargs)
        decoder = await aget_decoder(self._holder())
        metadata = self._metadata(decoder, options)
        deltas = core.astream_chat(decoder, _to_core_messages(messages), **options)
        try:
            async for delta in deltas:
                chunk = _chunk(delta, metadata, decoder.tokenizer)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(delta.content, chunk=chunk)
                yield chunk
        finally:
            await deltas.aclose()  # closing the stream stops decoding

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """`_stream`, aggregated (LangChain reads `run_manager` here to stream callbacks)."""
        chunks = self._stream(messages, stop, run_manager, **kwargs)
        return _mark_invalid(generate_from_stream(chunks))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """`_astream`, aggregated."""
        chunks = self._astream(messages, stop, run_manager, **kwargs)
        return _mark_invalid(await agenerate_from_stream(chunks))

    def _metadata(self, decoder: EFTDecoder, options: Mapping[str, Any]) -> dict[str, Any]:
        """Response metadata of a call (the last chunk adds finish_reason and stats)."""
        return {
            "model_name": self._reported_model_name(),
            "model_provider": "eft",
            "weights": core.resolved_weights(decoder, options.get("weights")),
        }

    # ------------------------------------------------------------------ tools

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (pydantic models, functions, LangChain tools or OpenAI dicts).

        tool_choice: None / "auto" (the model decides; once it opens a call, the call is
        constrained to a valid one), "none", "any" / "required" / True (a call is forced), or
        a tool name or OpenAI's {"type": "function", "function": {"name": ...}} (that tool is
        forced). A forced choice makes one call unless `parallel_tool_calls=True`."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        tool_choice = core.normalize_tool_choice(tool_choice, names)
        bound: dict[str, Any] = {"tools": formatted, **kwargs}
        if tool_choice is not None:
            bound["tool_choice"] = tool_choice
        if parallel_tool_calls is None and tool_choice not in (None, "auto", "none"):
            # a forced call is one call unless asked otherwise: small models tend to repeat it
            parallel_tool_calls = False
        if parallel_tool_calls is not None:
            bound["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(**bound)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Answers parsed into `schema` (pydantic model, TypedDict or JSON schema).

        json_schema: the whole answer is constrained to the schema. function_calling: a forced
        tool call whose arguments follow the schema. json_mode: a JSON object, also
        constrained to the schema (it is known here). Also works when streaming (partial
        objects). An answer cut by `max_tokens` is an OutputParserException that says so
        (with include_raw: `parsing_error`, next to the raw message)."""
        kwargs.pop("strict", None)  # constrained decoding is always strict
        if kwargs:
            raise ValueError(f"unexpected arguments {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        structured = {"kwargs": {"method": method}, "schema": schema}
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools(
                [schema],
                tool_choice=name,
                parallel_tool_calls=False,
                ls_structured_output_format=structured,
            )
            complete: Callable[[BaseMessage], bool] = _has_tool_call
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            # json_mode promises a JSON object; the schema is known here, so it constrains
            # that object too (a weak model would otherwise miss the keys the parser needs)
            response_format = {"type": "json_schema", "schema": convert_to_json_schema(schema)}
            llm = self.bind(response_format=response_format, ls_structured_output_format=structured)
            complete = _is_json
            parser = (
                PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
                if is_pydantic
                else JsonOutputParser()
            )
        else:
            raise ValueError(
                f"method must be json_schema, function_calling or json_mode, got {method!r}"
            )
        parser = _budget_check(complete) | parser
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        ).with_fallbacks(
            # the fallback's input carries the parser's exception under "parsing_error"
            [RunnablePassthrough.assign(parsed=lambda _: None)],
            exception_key="parsing_error",
        )
        return RunnableMap(raw=llm) | parsed


def _budget_check(complete: Callable[[BaseMessage], bool]) -> RunnableGenerator:
    """Passes the model's message (or its chunks) on unchanged; an answer the token budget
    cut (finish_reason "length") before it was `complete` raises an error that names the
    budget, where the parser would say only that it failed (or read a partial object)."""

    def check(chunks: Iterator[BaseMessage]) -> Iterator[BaseMessage]:
        message = None
        for chunk in chunks:
            message = chunk if message is None else message + chunk
            yield chunk
        _raise_if_cut(message, complete)

    async def acheck(chunks: AsyncIterator[BaseMessage]) -> AsyncIterator[BaseMessage]:
        message = None
        async for chunk in chunks:
            message = chunk if message is None else message + chunk
            yield chunk
        _raise_if_cut(message, complete)

    return RunnableGenerator(check, acheck, name="budget_check")


def _raise_if_cut(message: BaseMessage | None, complete: Callable[[BaseMessage], bool]) -> None:
    if message is None or message.response_metadata.get("finish_reason") != "length":
        return
    if complete(message):  # it closed just at the budget
        return
    used = (getattr(message, "usage_metadata", None) or {}).get("output_tokens")
    raise OutputParserException(
        "the structured answer is incomplete: the token budget ran out (finish_reason "
        f"'length'{f', {used} tokens generated' if used is not None else ''}) before it "
        "closed. Raise max_tokens (ChatEFT(max_tokens=...) or .bind(max_tokens=...)) so the "
        "answer fits; a lower max_string_length shortens its free strings.",
        llm_output=_text(message.content),
    )


def _has_tool_call(message: BaseMessage) -> bool:
    return bool(getattr(message, "tool_calls", None))


def _is_json(message: BaseMessage) -> bool:
    try:
        json.loads(_text(message.content))
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- translation

# what ChatEFT's profile declares: text in and out; tools, tool choice and structured output
# grammar-constrained over the composed distribution
_SUPPORTED = dict.fromkeys(
    (
        "text_inputs",
        "text_outputs",
        "tool_calling",
        "tool_choice",
        "tool_call_streaming",
        "structured_output",
        "temperature",
    ),
    True,
)
_UNSUPPORTED = dict.fromkeys(("image_inputs", "audio_inputs", "video_inputs", "pdf_inputs"), False)


def _chunk(
    delta: core.ChatDelta, metadata: Mapping[str, Any], tokenizer: Any
) -> ChatGenerationChunk:
    """A core `ChatDelta` as a LangChain chunk; the last one carries the call's metadata,
    usage and the engine's stats. Log-probs go where ChatOpenAI puts them:
    `response_metadata["logprobs"]["content"]`, which LangChain concatenates over chunks."""
    chunks = [
        tool_call_chunk(name=c.name, args=c.arguments, id=c.id, index=c.index)
        for c in delta.tool_call_chunks
    ]
    message = AIMessageChunk(content=delta.content, tool_call_chunks=chunks)
    info: dict[str, Any] = {}
    if delta.logprobs is not None:
        logprobs = {"content": openai_logprobs(delta.logprobs, tokenizer)}
        message.response_metadata = {"logprobs": logprobs}
        info["logprobs"] = logprobs
    if delta.finish_reason is not None:
        stats = delta.stats.as_dict() if delta.stats is not None else None
        message.response_metadata = {
            **message.response_metadata,
            **metadata,
            "finish_reason": delta.finish_reason,
            "stats": stats,
        }
        message.chunk_position = "last"
        if delta.usage is not None:
            message.usage_metadata = _usage(delta.usage)
        info["finish_reason"] = delta.finish_reason
    invalid = {
        c.id: invalid_tool_call(name=c.name, args=c.arguments, id=c.id, error=c.error)
        for c in delta.tool_call_chunks
        if c.error is not None
    }
    if invalid:  # LangChain re-parses chunk args leniently; _mark_invalid restores these
        info[_INVALID_KEY] = invalid
    return ChatGenerationChunk(message=message, generation_info=info or None)


def _mark_invalid(result: ChatResult) -> ChatResult:
    """Calls the core could not read stay invalid in the aggregated message (LangChain's
    lenient partial-JSON parse of chunk arguments would otherwise accept some of them)."""
    generation = result.generations[0]
    invalid = (generation.generation_info or {}).pop(_INVALID_KEY, None)
    if invalid:
        message = generation.message
        generation.message = message.model_copy(
            update={
                "tool_calls": [c for c in message.tool_calls if c["id"] not in invalid],
                "invalid_tool_calls": [
                    *(c for c in message.invalid_tool_calls if c["id"] not in invalid),
                    *invalid.values(),
                ],
            }
        )
    return result


def _usage(usage: Any) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        # prompt tokens read from the prefix cache, where LangChain's providers report them
        input_token_details={"cache_read": usage.cached_tokens},
    )


def _text(content: Any) -> str:
    """Message content as text: strings as they are, text blocks joined, other blocks JSON."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call"):
            continue  # rendered from message.tool_calls
        elif isinstance(block, dict) and block.get("type") in (
            "image",
            "image_url",
            "audio",
            "file",
            "video",
        ):
            raise ValueError(f"ChatEFT reads text only; got a {block['type']!r} content block")
        else:
            parts.append(json.dumps(block, ensure_ascii=False))
    return "".join(parts)


def _to_core_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> Hugging Face chat-template dicts."""
    converted: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            item: dict[str, Any] = {"role": "system", "content": _text(message.content)}
        elif isinstance(message, HumanMessage):
            item = {"role": "user", "content": _text(message.content)}
        elif isinstance(message, AIMessage):
            item = {"role": "assistant", "content": _text(message.content)}
            if message.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": call.get("id"),
                        "type": "function",
                        "function": {"name": call["name"], "arguments": call.get("args", {})},
                    }
                    for call in message.tool_calls
                ]
        elif isinstance(message, ToolMessage):
            content = _text(message.content)
            if getattr(message, "status", "success") == "error":
                content = f"Error: {content}"
            item = {"role": "tool", "content": content, "tool_call_id": message.tool_call_id}
            if message.name:
                item["name"] = message.name
        elif isinstance(message, ChatMessage):
            item = {"role": message.role, "content": _text(message.content)}
        else:
            raise ValueError(f"ChatEFT cannot render a {type(message).__name__}")
        if message.name and "name" not in item:
            item["name"] = message.name
        converted.append(item)
    return converted
