"""LlamaIndex adapter: `EFTLLM`, a `FunctionCallingLLM` that decodes with emulated fine-tuning.

    from eft_integrations import EFTDecoder
    from eft_integrations.llama_index import EFTLLM

    decoder = EFTDecoder.from_pretrained(base=..., behaviors={"chat": (ft, ref)})
    llm = EFTLLM(decoder=decoder, temperature=0.0)              # or EFTLLM(base=..., behaviors=...)
    llm.complete("The capital of France is", weights={"chat": 0.5})   # per call
    engine = index.as_query_engine(llm=llm.with_weights({"chat": 1.5}))  # fixed for an engine

Each log-prob is `log p_base + sum_b w_b (log p_ft_b - log p_ref_b)`, renormalised per token
(Mitchell et al., ICLR 2024); the decoder does the maths. This module only translates:
LlamaIndex messages and tools <-> the core's chat dicts (`eft_integrations.chat`), and
LlamaIndex call options <-> `EFTDecoder` options. `complete` continues raw text (no chat
template); `chat`, tools and structured output go through the core's chat functions.

RAG packing: `metadata.context_window` is the smallest context window of the composed models
and `num_output` is `max_new_tokens`. LlamaIndex counts prompt tokens with its global
tokenizer (tiktoken by default); for exact packing set
`Settings.tokenizer = llm.decoder.tokenizer.encode`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW, DEFAULT_NUM_OUTPUTS
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json
from llama_index.core.program.utils import create_flexible_model
from llama_index.core.types import PydanticProgramMode

from . import chat as core_chat
from .decoder import EFTDecoder
from .loading import LazyDecoder
from .options import GenerationOptions, Usage, merge_weights
from .tool_calls import DEFAULT_MAX_STRING_LENGTH

if TYPE_CHECKING:
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools.types import BaseTool

__all__ = ["EFTLLM"]

dispatcher = get_dispatcher(__name__)

_DEFAULTS = GenerationOptions()

# options a call may override; everything else in **kwargs is a mistake worth reporting
_GENERATION_OPTIONS = (
    "weights",
    "temperature",
    "max_new_tokens",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "conservative_top_p",
    "speculative_k",
)
_CHAT_OPTIONS = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "max_string_length",
)


class EFTLLM(FunctionCallingLLM):
    """A LlamaIndex LLM decoding with emulated fine-tuning (EFT) through an `EFTDecoder`.

    Build it from a shared decoder, `EFTDecoder` or `LazyDecoder` (`EFTLLM(decoder=decoder,
    ...)`; several LLMs, and `ChatEFT`s, may share one), or from the
    `EFTDecoder.from_pretrained` arguments, `EFTLLM(base="...", behaviors={"chat": ("ft",
    "ref")}, load_kwargs={"dtype": "bfloat16"})`, which loads the models on first use.

    Every generation option below is a default; each call may override it, e.g.
    `llm.complete(prompt, weights={"chat": 0.5}, temperature=0)` or
    `llm.chat(messages, weights={...})`. Per-call weights are merged over `weights`. To fix
    options for a whole query engine, chat engine or agent, hand it a copy:
    `llm.with_weights({"chat": 1.5})` or `llm.with_options(temperature=0)` share the loaded
    models with `llm`.

    Responses carry token usage in `raw["usage"]` and in `additional_kwargs`
    (`prompt_tokens`, `completion_tokens`, `total_tokens`), as LlamaIndex's
    `TokenCountingHandler` reads them, plus `raw["finish_reason"]` and `raw["weights"]`.
    """

    model_name: str = Field(
        default="",
        description="Name reported in metadata; defaults to the decoder's composition name, "
        "e.g. `base + chat(ft - ref)`.",
    )
    weights: dict[str, float] | None = Field(
        default=None,
        description="Behavior weights (name -> float) used by default; names left out take "
        "the decoder's defaults (1.0 each). 0 removes a behavior, > 1 amplifies it, < 0 "
        "reverses it.",
    )
    temperature: float = Field(
        default=0.7,
        ge=0.0,
        description="Sampling temperature over the EFT-composed distribution; 0 is greedy.",
    )
    max_new_tokens: int = Field(
        default=DEFAULT_NUM_OUTPUTS,
        gt=0,
        description="Most tokens generated per call; reported as metadata.num_output.",
    )
    top_p: float = Field(
        default=_DEFAULTS.top_p,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling over the composed distribution; 1 disables it.",
    )
    top_k: int = Field(
        default=_DEFAULTS.top_k,
        ge=0,
        description="Keep the k most likely composed tokens; 0 disables it.",
    )
    stop: list[str] | None = Field(
        default=None, description="Strings that end generation (trimmed from the output)."
    )
    seed: int | None = Field(
        default=None, description="Seed for sampling; the same seed gives the same output."
    )
    conservative_top_p: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="EFT paper 4.4: re-weight only tokens in the top-p set of the "
        "fine-tuning-scale distribution; None re-weights every token.",
    )
    speculative_k: int | None = Field(
        default=None,
        ge=1,
        description="Draft this many tokens with the fine-tuning-scale models and verify them "
        "with the base in one forward (exact: same distribution); None decodes token by "
        "token. Constrained chat replies (tool calls, structured output) never speculate.",
    )
    max_string_length: int | None = Field(
        default=DEFAULT_MAX_STRING_LENGTH,
        ge=1,
        description="Cap on strings a tool or output schema leaves unbounded, so that a "
        "constrained call or JSON answer always closes; None: no cap.",
    )
    base: Any = Field(
        default=None,
        description="Lazy loading: the base model (hub id or path) for "
        "EFTDecoder.from_pretrained. Leave unset when passing decoder=.",
    )
    behaviors: dict[str, Any] | None = Field(
        default=None,
        description="Lazy loading: behavior name -> (finetuned, reference) model ids or paths.",
    )
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Lazy loading: further EFTDecoder.from_pretrained arguments, e.g. "
        "default_weights, dtype, device_map.",
    )

    _holder: EFTDecoder | LazyDecoder = PrivateAttr()

    def __init__(self, decoder: EFTDecoder | LazyDecoder | None = None, **data: Any) -> None:
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        super().__init__(**data)
        if (decoder is None) == (self.base is None):
            raise ValueError(
                "EFTLLM needs exactly one of decoder=EFTDecoder(...) or LazyDecoder(...) (a "
                "shareable decoder) or base=... with behaviors=... (loaded on first use)"
            )
        if decoder is not None and not isinstance(decoder, (EFTDecoder, LazyDecoder)):
            raise ValueError(
                f"decoder must be an EFTDecoder or a LazyDecoder, got {type(decoder).__name__}"
            )
        # copies (with_weights, with_options) share this holder, so models load once
        self._holder = (
            decoder
            if decoder is not None
            else LazyDecoder(base=self.base, behaviors=self.behaviors, **self.load_kwargs)
        )
        self._check_weights()
        if isinstance(decoder, EFTDecoder) and not self.model_name:
            self.model_name = decoder.model_name

    @classmethod
    def class_name(cls) -> str:
        return "EFTLLM"

    # ------------------------------------------------------------------ decoder and copies

    @property
    def decoder(self) -> EFTDecoder:
        """The `EFTDecoder` (loaded now if this LLM was built from model names)."""
        holder = self._holder
        return holder.get() if isinstance(holder, LazyDecoder) else holder

    def _unloaded(self) -> LazyDecoder | None:
        """The lazy holder while its models are not loaded yet, else None."""
        holder = self._holder
        return holder if isinstance(holder, LazyDecoder) and not holder.loaded else None

    async def _adecoder(self) -> EFTDecoder:
        # a first lazy load takes a while: keep it off the event loop too
        lazy = self._unloaded()
        if lazy is None:
            return self.decoder
        return await asyncio.to_thread(lazy.get)

    def with_options(self, **options: Any) -> EFTLLM:
        """A copy with other default options (fields), sharing this LLM's decoder.

        `engine = index.as_query_engine(llm=llm.with_options(temperature=0))`.
        """
        unknown = sorted(set(options) - set(type(self).model_fields))
        if unknown:
            raise ValueError(f"unknown EFTLLM options {unknown}; known: {_GENERATION_OPTIONS}")
        if isinstance(options.get("stop"), str):
            options["stop"] = [options["stop"]]
        # model_copy keeps the private holder (shared decoder), the callback manager and the
        # prompt callables; each new value is validated as on assignment
        copy = self.model_copy()
        for name, value in options.items():
            type(self).__pydantic_validator__.validate_assignment(copy, name, value)
        copy._check_weights()
        return copy

    def with_weights(self, weights: Mapping[str, float]) -> EFTLLM:
        """A copy that decodes with these behavior weights by default, sharing the decoder.

        Hand it to a query engine, chat engine or agent to fix the weights for all its calls:
        `index.as_query_engine(llm=llm.with_weights({"chat": 1.5}))`.
        """
        return self.with_options(weights={**(self.weights or {}), **weights})

    def _check_weights(self) -> None:
        """Fail now, naming the known behaviors, on weights the decoder would reject later:
        inside a query engine a failing call only shows as an empty answer."""
        if self.weights is not None:
            merge_weights(self.weights, dict.fromkeys(self._behavior_names(), 1.0))

    def _behavior_names(self) -> list[str]:
        """The behaviors weights may name: the decoder's, or the load arguments' while the
        models are not loaded (nothing is loaded to find them)."""
        lazy = self._unloaded()
        if lazy is not None:
            return list(lazy.load_args["behaviors"])
        return list(self.decoder.behavior_names)

    @property
    def metadata(self) -> LLMMetadata:
        """Honest limits: RAG packing relies on context_window and num_output."""
        decoder = self.decoder
        return LLMMetadata(
            # no model states a limit: fall back to LlamaIndex's default guess
            context_window=decoder.context_window or DEFAULT_CONTEXT_WINDOW,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model_name or decoder.model_name,
            system_role=MessageRole.SYSTEM,
        )

    # ------------------------------------------------------------------ options

    def _generation_options(self, call: Mapping[str, Any]) -> dict[str, Any]:
        """This LLM's options with a call's overrides; per-call weights merge over `weights`."""
        call = dict(call)
        if "max_tokens" in call:  # the name most LlamaIndex LLMs use
            call["max_new_tokens"] = call.pop("max_tokens")
        unknown = sorted(set(call) - set(_GENERATION_OPTIONS))
        if unknown:  # a ValueError, as in ChatEFT and the core
            raise ValueError(
                f"unknown EFTLLM call options {unknown}; accepted: "
                f"{[*_GENERATION_OPTIONS, 'max_tokens', *_CHAT_OPTIONS]}"
            )
        options = {name: getattr(self, name) for name in _GENERATION_OPTIONS}
        options.update(call)
        call_weights = call.get("weights")
        if call_weights is not None and not isinstance(call_weights, Mapping):
            raise ValueError(
                "weights must be a dict of behavior name -> float, got "
                f"{type(call_weights).__name__}"
            )
        weights = {**(self.weights or {}), **(call_weights or {})}
        options["weights"] = weights or None
        if options["speculative_k"] is None:  # the decoder's default: token by token
            del options["speculative_k"]
        return options

    def _completion_prompt(self, prompt: str, formatted: bool) -> str:
        return prompt if formatted else self.completion_to_prompt(prompt)

    def _chat_request(
        self, messages: Sequence[ChatMessage], call: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Keyword arguments for the core's chat functions."""
        call = dict(call)
        request: dict[str, Any] = {"max_string_length": self.max_string_length}
        request.update({k: call.pop(k) for k in _CHAT_OPTIONS if k in call})
        request.update(self._generation_options(call))
        request["messages"] = _to_core_messages(messages)
        return request

    def _resolved_weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        return core_chat.resolved_weights(self.decoder, weights)

    # ------------------------------------------------------------------ completion

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Continue `prompt` as raw text (no chat template); kwargs override options."""
        options = self._generation_options(kwargs)
        result = self.decoder.generate(self._completion_prompt(prompt, formatted), **options)
        return _completion_response(
            result.text,
            None,
            result.usage,
            result.finish_reason,
            result.weights,
            result.token_ids,
        )

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream the continuation of `prompt`: `delta` is new text, `text` is cumulative."""
        options = self._generation_options(kwargs)
        full_prompt = self._completion_prompt(prompt, formatted)
        weights = self._resolved_weights(options["weights"])
        chunks = self.decoder.stream(full_prompt, **options)

        def gen() -> Iterator[CompletionResponse]:
            text = ""
            for chunk in chunks:
                text += chunk.text
                yield _completion_response(
                    text, chunk.text, chunk.usage, chunk.finish_reason, weights
                )

        return gen()

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """`complete`, decoded on a worker thread so the event loop keeps running."""
        options = self._generation_options(kwargs)
        decoder = await self._adecoder()
        result = await decoder.agenerate(self._completion_prompt(prompt, formatted), **options)
        return _completion_response(
            result.text,
            None,
            result.usage,
            result.finish_reason,
            result.weights,
            result.token_ids,
        )

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """`stream_complete`, decoded on a worker thread; closing the stream stops decoding."""
        options = self._generation_options(kwargs)
        full_prompt = self._completion_prompt(prompt, formatted)
        decoder = await self._adecoder()
        weights = self._resolved_weights(options["weights"])

        async def gen() -> AsyncIterator[CompletionResponse]:
            text = ""
            async for chunk in decoder.astream(full_prompt, **options):
                text += chunk.text
                yield _completion_response(
                    text, chunk.text, chunk.usage, chunk.finish_reason, weights
                )

        return gen()

    # ------------------------------------------------------------------ chat

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Reply through the decoder's chat template; kwargs override options and may carry
        `tools`, `tool_choice`, `parallel_tool_calls` and `response_format` for the core."""
        request = self._chat_request(messages, kwargs)
        return _chat_response(core_chat.chat(self.decoder, **request))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream a reply: `delta` is new text, `message` the reply so far (tool calls too)."""
        request = self._chat_request(messages, kwargs)
        weights = self._resolved_weights(request["weights"])  # bad weights fail here
        deltas = core_chat.stream_chat(self.decoder, **request)

        def gen() -> Iterator[ChatResponse]:
            reply = _StreamedReply(weights)
            for delta in deltas:
                yield reply.add(delta)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """`chat`, decoded on a worker thread so the event loop keeps running."""
        request = self._chat_request(messages, kwargs)
        decoder = await self._adecoder()
        return _chat_response(await core_chat.achat(decoder, **request))

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """`stream_chat`, decoded on a worker thread; closing the stream stops decoding."""
        request = self._chat_request(messages, kwargs)
        decoder = await self._adecoder()
        weights = self._resolved_weights(request["weights"])

        async def gen() -> AsyncIterator[ChatResponse]:
            reply = _StreamedReply(weights)
            async for delta in core_chat.astream_chat(decoder, **request):
                yield reply.add(delta)

        return gen()

    # ------------------------------------------------------------------ tools

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Arguments for `chat`: the messages, the tools as OpenAI-style dicts, and how the
        core must pick: `tool_required` (or `tool_choice="required"`) forces a schema-valid
        call through constrained decoding; a tool name forces that tool."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        if not specs:
            return {"messages": messages, **kwargs}
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        return {
            "messages": messages,
            "tools": specs,
            "tool_choice": _core_tool_choice(tool_choice),
            "parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Keep one tool call when parallel calls are not allowed."""
        if allow_parallel_tool_calls:
            return response
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if len(calls) > 1:
            response.message.blocks = [
                b
                for b in response.message.blocks
                if not isinstance(b, ToolCallBlock) or b is calls[0]
            ]
        return response

    def get_tool_calls_from_response(
        self,
        response: ChatResponse,
        error_on_no_tool_call: bool = True,
        **kwargs: Any,
    ) -> list[ToolSelection]:
        """The tool calls of a (possibly partial, streamed) response as `ToolSelection`s."""
        selections = [
            ToolSelection(
                tool_id=block.tool_call_id or "",
                tool_name=block.tool_name,
                tool_kwargs=_arguments_dict(block.tool_kwargs),
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

    # ------------------------------------------------------------------ structured output

    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[BaseModel],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> BaseModel:
        """A schema-valid `output_cls`: the reply is constrained to its JSON schema.

        With `pydantic_program_mode` other than DEFAULT, LlamaIndex's program is used.
        """
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(
            LLMStructuredPredictStartEvent(
                output_cls=output_cls, template=prompt, template_args=prompt_args
            )
        )
        messages = self._get_messages(prompt, **prompt_args)
        response = self.chat(
            messages, response_format=_json_schema_format(output_cls), **(llm_kwargs or {})
        )
        result = _parse_structured(output_cls, response)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[BaseModel],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> BaseModel:
        """`structured_predict`, decoded on a worker thread."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(
            LLMStructuredPredictStartEvent(
                output_cls=output_cls, template=prompt, template_args=prompt_args
            )
        )
        messages = self._get_messages(prompt, **prompt_args)
        response = await self.achat(
            messages, response_format=_json_schema_format(output_cls), **(llm_kwargs or {})
        )
        result = _parse_structured(output_cls, response)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    def _structured_stream_call(
        self,
        output_cls: type[BaseModel],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Iterator[BaseModel]:
        """Partial objects (all fields optional) while the constrained JSON streams, then
        the schema-valid `output_cls` (behind `stream_structured_predict` and
        `as_structured_llm(...).stream_chat`)."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super()._structured_stream_call(output_cls, prompt, llm_kwargs, **prompt_args)
        messages = self._get_messages(prompt, **prompt_args)
        stream = self.stream_chat(
            messages, response_format=_json_schema_format(output_cls), **(llm_kwargs or {})
        )

        def gen() -> Iterator[BaseModel]:
            partial = _PartialObjects(output_cls)
            last = None
            for last in stream:
                yield from partial.add(last)
            if last is not None:
                yield _parse_structured(output_cls, last)

        return gen()

    async def _structured_astream_call(
        self,
        output_cls: type[BaseModel],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncIterator[BaseModel]:
        """`_structured_stream_call`, decoded on a worker thread."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super()._structured_astream_call(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
        messages = self._get_messages(prompt, **prompt_args)
        stream = await self.astream_chat(
            messages, response_format=_json_schema_format(output_cls), **(llm_kwargs or {})
        )

        async def gen() -> AsyncIterator[BaseModel]:
            partial = _PartialObjects(output_cls)
            last = None
            async for last in stream:
                for obj in partial.add(last):
                    yield obj
            if last is not None:
                yield _parse_structured(output_cls, last)

        return gen()


# ---------------------------------------------------------------------- translation helpers

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def _to_core_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages -> the chat-template dicts of `eft_integrations.chat`."""
    converted: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}  # tool_call_id -> name, for tool results lacking a name
    for message in messages:
        role = _ROLES[MessageRole(message.role)]
        text_parts, calls = [], []
        for block in message.blocks:
            if isinstance(block, TextBlock):
                text_parts.append(block.text)
            elif isinstance(block, ToolCallBlock):
                calls.append(
                    _core_tool_call(block.tool_call_id, block.tool_name, block.tool_kwargs)
                )
            else:
                raise ValueError(
                    f"EFTLLM reads text and tool calls only; got a {type(block).__name__} in "
                    f"a {role} message"
                )
        # histories written by other LLM integrations keep OpenAI-style calls here
        for call in message.additional_kwargs.get("tool_calls") or []:
            function = call["function"] if isinstance(call, Mapping) else call.function
            name = function["name"] if isinstance(function, Mapping) else function.name
            args = function["arguments"] if isinstance(function, Mapping) else function.arguments
            call_id = call.get("id") if isinstance(call, Mapping) else call.id
            calls.append(_core_tool_call(call_id, name, args))
        entry: dict[str, Any] = {"role": role, "content": "\n".join(text_parts)}
        if calls:
            entry["tool_calls"] = calls
            tool_names.update({c["id"]: c["function"]["name"] for c in calls})
        if role == "tool":
            call_id = message.additional_kwargs.get("tool_call_id")
            if call_id is not None:
                entry["tool_call_id"] = call_id
            name = message.additional_kwargs.get("name") or tool_names.get(call_id or "")
            if name:
                entry["name"] = name
        converted.append(entry)
    return converted


def _core_tool_call(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    return {
        "id": call_id or "",
        "type": "function",
        "function": {"name": name, "arguments": _arguments_dict(arguments)},
    }


def _arguments_dict(arguments: Any) -> dict[str, Any]:
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


def _core_tool_choice(tool_choice: str | Mapping[str, Any]) -> str:
    """LlamaIndex / OpenAI tool_choice -> the core's: "auto", "none", "required" or a name."""
    if isinstance(tool_choice, Mapping):  # {"type": "function", "function": {"name": ...}}
        return str(tool_choice.get("function", {}).get("name") or tool_choice.get("name"))
    return tool_choice


def _usage_fields(usage: Usage | None) -> dict[str, int]:
    if usage is None:
        return {}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _raw(
    usage: Usage | None,
    finish_reason: str | None,
    weights: Mapping[str, float],
    token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    raw: dict[str, Any] = {"finish_reason": finish_reason, "weights": dict(weights)}
    if token_ids is not None:
        raw["token_ids"] = list(token_ids)
    if usage is not None:
        raw["usage"] = _usage_fields(usage)
    return raw


def _completion_response(
    text: str,
    delta: str | None,
    usage: Usage | None,
    finish_reason: str | None,
    weights: Mapping[str, float],
    token_ids: Sequence[int] | None = None,
) -> CompletionResponse:
    return CompletionResponse(
        text=text,
        delta=delta,
        raw=_raw(usage, finish_reason, weights, token_ids),
        additional_kwargs=_usage_fields(usage),
    )


def _assistant_message(
    content: str,
    tool_calls: Sequence[tuple[str | None, str, dict[str, Any] | str]],
    invalid_tool_calls: Sequence[Any] = (),
) -> ChatMessage:
    blocks: list[Any] = [TextBlock(text=content)] if content else []
    blocks += [
        ToolCallBlock(tool_call_id=call_id, tool_name=name, tool_kwargs=arguments)
        for call_id, name, arguments in tool_calls
    ]
    extra: dict[str, Any] = {}
    if invalid_tool_calls:
        extra["invalid_tool_calls"] = [
            {"id": c.id, "name": c.name, "arguments": c.arguments, "error": c.error}
            for c in invalid_tool_calls
        ]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def _chat_response(result: core_chat.ChatResult) -> ChatResponse:
    message = _assistant_message(
        result.content,
        [(c.id, c.name, c.arguments) for c in result.tool_calls],
        result.invalid_tool_calls,
    )
    return ChatResponse(
        message=message,
        raw=_raw(result.usage, result.finish_reason, result.weights),
        additional_kwargs=_usage_fields(result.usage),
    )


class _StreamedReply:
    """Accumulates the core's `ChatDelta`s into cumulative LlamaIndex `ChatResponse`s.

    The core streams each tool call as one complete chunk, and an unreadable call too, with
    its `error` set: those are reported in `additional_kwargs["invalid_tool_calls"]`, as
    `chat` does. The arguments of a readable call are the core's JSON of its cast arguments.
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = weights
        self.content = ""
        self.calls: dict[int, core_chat.ToolCallChunk] = {}  # chunks with one index merge

    def add(self, delta: core_chat.ChatDelta) -> ChatResponse:
        self.content += delta.content or ""
        for chunk in delta.tool_call_chunks or ():
            seen = self.calls.get(chunk.index)
            self.calls[chunk.index] = (
                chunk
                if seen is None
                else dataclasses.replace(
                    seen,
                    arguments=(seen.arguments or "") + (chunk.arguments or ""),
                    error=chunk.error or seen.error,
                )
            )
        calls = list(self.calls.values())
        valid = [(c.id, c.name, json.loads(c.arguments or "{}")) for c in calls if c.error is None]
        invalid = [
            core_chat.InvalidToolCall(c.id, c.name, c.arguments, c.error)
            for c in calls
            if c.error is not None
        ]
        return ChatResponse(
            message=_assistant_message(self.content, valid, invalid),
            delta=delta.content or "",
            raw=_raw(delta.usage, delta.finish_reason, self.weights),
            additional_kwargs=_usage_fields(delta.usage),
        )


def _json_schema_format(output_cls: type[BaseModel]) -> dict[str, Any]:
    return {"type": "json_schema", "schema": output_cls.model_json_schema()}


class _PartialObjects:
    """Partial JSON of a streamed structured answer -> flexible objects (fields optional)."""

    def __init__(self, output_cls: type[BaseModel]) -> None:
        self.flexible = create_flexible_model(output_cls)
        self.seen: dict[str, Any] | None = None

    def add(self, response: ChatResponse) -> list[BaseModel]:
        fields = _arguments_dict(response.message.content or "")
        if not fields or fields == self.seen:
            return []
        self.seen = fields
        try:
            return [self.flexible.model_validate(fields)]
        except ValueError:  # a half-written value that does not fit yet
            return []


def _parse_structured(output_cls: type[BaseModel], response: ChatResponse) -> BaseModel:
    content = response.message.content or ""
    try:
        return output_cls.model_validate_json(content)
    except ValueError as error:  # only when decoding stopped early (max_new_tokens)
        reason = (response.raw or {}).get("finish_reason")
        raise ValueError(
            f"structured output for {output_cls.__name__} is not valid (finish_reason="
            f"{reason!r}); raise max_new_tokens. Output: {content!r}"
        ) from error
