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

import asyncio
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
from langchain_core.messages.tool import tool_call_chunk
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
from .loading import LazyDecoder

__all__ = ["ChatEFT"]

# per-call options that go to the decoder, with the field they default to
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "conservative_top_p",
    "speculative_k",
)
_CHAT_KWARGS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


class ChatEFT(BaseChatModel):
    """Chat with an emulated fine-tuned model (EFT): base + weighted behavior deltas.

    Give a shared `decoder` (loaded once, reused by many chat models), or the arguments of
    `EFTDecoder.from_pretrained` (`base`, `behaviors`, ...): the models then load lazily on
    first use, so building a `ChatEFT` is cheap. Copies (`bind`, `configurable_fields`,
    `copy.deepcopy`) share the decoder; models are never copied. Every sampling field, and
    `weights`, can be given per call (`invoke(..., weights=...)`, `bind(...)`,
    `configurable_fields`).
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
    temperature: float = 0.7
    """Sampling temperature of the composed distribution; 0 decodes greedily."""
    max_tokens: int | None = 256
    """Most tokens to generate (None: the decoder's default)."""
    top_p: float = 1.0
    """Nucleus sampling over the composed distribution; 1 disables it."""
    top_k: int = 0
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
    max_string_length: int | None = 256
    """Cap on free strings inside constrained tool calls and structured output, so that
    forced JSON always closes within `max_tokens` (None: no cap)."""

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # a string is one stop sequence

    @model_validator(mode="after")
    def _lazy_decoder(self) -> ChatEFT:
        """From model paths, hold a `LazyDecoder`: building stays cheap, copies share it."""
        if self.decoder is None and self.base is not None:
            self.decoder = LazyDecoder(
                base=self.base,
                behaviors=self.behaviors,
                default_weights=self.default_weights,
                dtype=self.dtype,
                device_map=self.device_map,
                chat_template=self.chat_template,
            )
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
        if self.model_name:
            return self.model_name
        if isinstance(self.decoder, EFTDecoder):
            return self.decoder.model_name
        if isinstance(self.decoder, LazyDecoder):  # named without loading the models
            return (
                self.decoder.get().model_name
                if self.decoder.loaded
                else str(self.decoder.load_args["base"])
            )
        return "eft"

    def _resolve_model_profile(self) -> ModelProfile | None:
        """What LangChain may rely on (create_agent reads `structured_output` to constrain the
        answer itself instead of forcing a tool call every turn): tools, tool choice and
        structured output are grammar-constrained over the composed distribution."""
        profile = ModelProfile(
            text_inputs=True,
            image_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            pdf_inputs=False,
            text_outputs=True,
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=True,
            structured_output=True,
            temperature=True,
        )
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

    # ------------------------------------------------------------------ decoder

    def _get_decoder(self) -> EFTDecoder:
        """The shared decoder (a lazy one loads its models on the first call)."""
        renderer = self._renderer()
        return renderer.get() if isinstance(renderer, LazyDecoder) else renderer

    def _renderer(self) -> EFTDecoder | LazyDecoder:
        """The decoder as given: it renders prompts and holds the tokenizer, and a lazy one
        renders them without loading the models."""
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
        return list(self._renderer().tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens of the prompt these messages (and tools) render to through the decoder's
        chat template, generation prompt included: what a call with them reads."""
        renderer = self._renderer()
        prompt = renderer.format_chat(
            _to_core_messages(messages),
            tools=[convert_to_openai_tool(t) for t in tools] if tools else None,
        )
        tokenizer = renderer.tokenizer
        bos = tokenizer.bos_token  # special tokens as the decoder encodes a rendered prompt
        special = not (bos and prompt.startswith(bos))
        return len(tokenizer(prompt, add_special_tokens=special)["input_ids"])

    # ------------------------------------------------------------------ options

    def _stops(self, stop: str | Sequence[str] | None) -> list[str]:
        if isinstance(stop, str):
            stop = [stop]  # a string is one stop sequence, not one per character
        return [*(self.stop or []), *(stop or [])]

    def _call_options(self, stop: Sequence[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Per-call options for the core: fields, overridden by invoke/bind kwargs."""
        kwargs = dict(kwargs)
        options: dict[str, Any] = {
            name: kwargs.pop(name, getattr(self, name)) for name in _SAMPLING_FIELDS
        }
        options["weights"] = self._weights(kwargs.pop("weights", None))
        max_tokens = kwargs.pop("max_tokens", self.max_tokens)
        if max_tokens is not None:
            options["max_new_tokens"] = max_tokens
        options["stop"] = self._stops(stop) or None
        options["max_string_length"] = kwargs.pop("max_string_length", self.max_string_length)
        for name in _CHAT_KWARGS:
            if name in kwargs:
                options[name] = kwargs.pop(name)
        model = kwargs.pop("model", None)
        if model is not None and model != self._reported_model_name():
            raise ValueError(
                f"ChatEFT cannot switch models per call (got model={model!r}); the models are "
                "fixed when the decoder is built: use another ChatEFT"
            )
        unknown = [k for k in kwargs if not k.startswith("ls_")]
        if unknown:
            raise ValueError(
                f"unknown ChatEFT call options {unknown}; known: weights, max_tokens, stop, "
                f"{', '.join(_SAMPLING_FIELDS)}, tools, tool_choice, response_format"
            )
        return options

    def _weights(self, call_weights: Any) -> Any:
        """Per-call weights over the instance's: names the call leaves out keep the
        instance's weight (then the decoder's default)."""
        if isinstance(call_weights, Sequence) and not isinstance(call_weights, (str, Mapping)):
            raise ValueError(
                "weights is one dict per call; for different weights per input of a batch, "
                "make weights configurable (configurable_fields) and give one config per input"
            )
        if call_weights is not None and not isinstance(call_weights, Mapping):
            return call_weights  # the decoder names the error
        if self.weights is None and call_weights is None:
            return None
        return {**(self.weights or {}), **(call_weights or {})}

    def _metadata(self, options: Mapping[str, Any], finish_reason: str | None) -> dict[str, Any]:
        decoder = self._get_decoder()
        return {
            "model_name": self._reported_model_name(),
            "model_provider": "eft",
            "finish_reason": finish_reason,
            "weights": core.resolved_weights(decoder, options.get("weights")),
        }

    # ------------------------------------------------------------------ decoding

    def _chunk(self, delta: core.ChatDelta, options: Mapping[str, Any]) -> ChatGenerationChunk:
        chunks = [
            tool_call_chunk(name=c.name, args=c.arguments, id=c.id, index=c.index)
            for c in delta.tool_call_chunks
        ]
        message = AIMessageChunk(content=delta.content, tool_call_chunks=chunks)
        info: dict[str, Any] = {}
        if delta.finish_reason is not None:
            message.response_metadata = self._metadata(options, delta.finish_reason)
            message.chunk_position = "last"
            if delta.usage is not None:
                message.usage_metadata = _usage(delta.usage)
            info["finish_reason"] = delta.finish_reason
        errors = {c.id: c.error for c in delta.tool_call_chunks if c.error is not None}
        if errors:  # LangChain re-parses chunk args leniently; _generate restores these
            info[_INVALID_KEY] = errors
        return ChatGenerationChunk(message=message, generation_info=info or None)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        options = self._call_options(stop, kwargs)
        decoder = self._get_decoder()
        cancel = threading.Event()
        deltas = core.stream_chat(decoder, _to_core_messages(messages), cancel=cancel, **options)
        try:
            for delta in deltas:
                chunk = self._chunk(delta, options)
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
        options = self._call_options(stop, kwargs)
        decoder = await asyncio.to_thread(self._get_decoder)  # loading must not block the loop
        deltas = core.astream_chat(decoder, _to_core_messages(messages), **options)
        try:
            async for delta in deltas:
                chunk = self._chunk(delta, options)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(delta.content, chunk=chunk)
                yield chunk
        finally:
            await deltas.aclose()

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _mark_invalid(
            generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        )

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _mark_invalid(
            await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        )

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
        a tool name (that tool is forced). A forced choice makes one call unless
        `parallel_tool_calls=True`."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        if isinstance(tool_choice, dict):
            tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if tool_choice is True:
            tool_choice = "any"
        if tool_choice is False:
            tool_choice = None
        if tool_choice not in (None, "auto", "none", "any", "required", *names):
            raise ValueError(
                f"tool_choice must be auto, none, any, required or one of {names}, "
                f"got {tool_choice!r}"
            )
        bound: dict[str, Any] = {"tools": formatted, **kwargs}
        if tool_choice is not None:
            bound["tool_choice"] = tool_choice
        if parallel_tool_calls is None and tool_choice in ("any", "required", *names):
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


_INVALID_KEY = "eft_invalid_tool_calls"


def _mark_invalid(result: ChatResult) -> ChatResult:
    """Calls the core could not read stay invalid in the aggregated message (LangChain's
    lenient partial-JSON parse of chunk arguments would otherwise accept some of them)."""
    generation = result.generations[0]
    errors = (generation.generation_info or {}).pop(_INVALID_KEY, None)
    if not errors:
        return result
    message = generation.message
    keep = [c for c in message.tool_calls if c.get("id") not in errors]
    invalid = [c for c in message.invalid_tool_calls if c.get("id") not in errors] + [
        {
            "name": c.get("name"),
            "args": _raw_args(c),
            "id": c.get("id"),
            "error": errors[c.get("id")],
            "type": "invalid_tool_call",
        }
        for c in [*message.tool_calls, *message.invalid_tool_calls]
        if c.get("id") in errors
    ]
    generation.message = AIMessage(
        content=message.content,
        tool_calls=keep,
        invalid_tool_calls=invalid,
        usage_metadata=message.usage_metadata,
        response_metadata=message.response_metadata,
        id=message.id,
    )
    return result


def _raw_args(call: Mapping[str, Any]) -> str | None:
    args = call.get("args")
    return args if isinstance(args, str) or args is None else json.dumps(args)


def _usage(usage: Any) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
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
