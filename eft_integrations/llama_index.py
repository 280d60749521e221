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

Responses carry the token usage, finish reason, full weights and the engine's per-request
`stats` in `raw` (usage also in `additional_kwargs`, where `TokenCountingHandler` reads it).

RAG packing: `metadata.context_window` is the smallest context window of the composed models
and `num_output` is `max_new_tokens`; reading `metadata` never loads the models (before a lazy
decoder loads, the window comes from the models' configs). LlamaIndex counts prompt tokens
with its global tokenizer (tiktoken by default); for exact packing set
`Settings.tokenizer = llm.decoder.tokenizer.encode`.
"""

from __future__ import annotations

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
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.types import PydanticProgramMode

from .decoder import EFTDecoder
from .lazy import LazyDecoder, get_decoder
from .llama_index_responses import (
    CHAT,
    TEXT,
    arguments_dict,
    astructured_stream,
    json_schema_format,
    keep_first_tool_call,
    parse_structured,
    structured_stream,
    tool_selections,
)
from .options import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_CHAT_TEMPERATURE,
    GenerationOptions,
    logprobs_option,
    merge_call_options,
    merge_call_weights,
)
from .tool_calls import DEFAULT_MAX_STRING_LENGTH

if TYPE_CHECKING:
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools.types import BaseTool

__all__ = ["EFTLLM"]

dispatcher = get_dispatcher(__name__)

# fields a call may override, under the core's names (a call may say max_tokens too)
_GENERATION_FIELDS = (
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
# chat calls only: a field, and the chat arguments that go to the core as given
_CHAT_FIELDS = ("max_string_length",)
_CHAT_KWARGS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


class _JSONStructuredOutput(FunctionCallingLLM):
    """`EFTLLM`'s structured output: the reply is constrained to the output class's JSON
    schema (the core's `response_format`) instead of LlamaIndex's default program, which asks
    for a tool call; with another `pydantic_program_mode`, LlamaIndex's program is used."""

    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[BaseModel],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> BaseModel:
        """A schema-valid `output_cls`: the reply is constrained to its JSON schema."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        _structured_start(output_cls, prompt, prompt_args)
        messages, kwargs = self._structured_chat(output_cls, prompt, llm_kwargs, prompt_args)
        return _structured_end(output_cls, self.chat(messages, **kwargs))

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[BaseModel],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> BaseModel:
        """`structured_predict`, decoded on the engine while the event loop keeps running."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        _structured_start(output_cls, prompt, prompt_args)
        messages, kwargs = self._structured_chat(output_cls, prompt, llm_kwargs, prompt_args)
        return _structured_end(output_cls, await self.achat(messages, **kwargs))

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
        messages, kwargs = self._structured_chat(output_cls, prompt, llm_kwargs, prompt_args)
        return structured_stream(output_cls, self.stream_chat(messages, **kwargs))

    async def _structured_astream_call(
        self,
        output_cls: type[BaseModel],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncIterator[BaseModel]:
        """`_structured_stream_call` on the event loop."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super()._structured_astream_call(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
        messages, kwargs = self._structured_chat(output_cls, prompt, llm_kwargs, prompt_args)
        return astructured_stream(output_cls, await self.astream_chat(messages, **kwargs))

    def _structured_chat(
        self,
        output_cls: type[BaseModel],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None,
        prompt_args: Mapping[str, Any],
    ) -> tuple[list[ChatMessage], dict[str, Any]]:
        """The messages and chat keywords of a structured call."""
        messages = self._get_messages(prompt, **prompt_args)
        return messages, dict(response_format=json_schema_format(output_cls), **(llm_kwargs or {}))


def _structured_start(
    output_cls: type[BaseModel], prompt: PromptTemplate, prompt_args: Mapping[str, Any]
) -> None:
    dispatcher.event(
        LLMStructuredPredictStartEvent(
            output_cls=output_cls, template=prompt, template_args=dict(prompt_args)
        )
    )


def _structured_end(output_cls: type[BaseModel], response: ChatResponse) -> BaseModel:
    result = parse_structured(output_cls, response)
    dispatcher.event(LLMStructuredPredictEndEvent(output=result))
    return result


class EFTLLM(_JSONStructuredOutput):
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
    `TokenCountingHandler` reads them, plus `raw["finish_reason"]`, `raw["weights"]` and, on
    the final response, `raw["stats"]` (the engine's queue time, time to first token,
    speed and speculative acceptance).
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
        default=DEFAULT_CHAT_TEMPERATURE,
        ge=0.0,
        description="Sampling temperature over the EFT-composed distribution; 0 is greedy.",
    )
    max_new_tokens: int = Field(
        default=DEFAULT_CHAT_MAX_TOKENS,
        gt=0,
        description="Most tokens generated per call; reported as metadata.num_output.",
    )
    top_p: float = Field(
        default=GenerationOptions.top_p,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling over the composed distribution; 1 disables it.",
    )
    top_k: int = Field(
        default=GenerationOptions.top_k,
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
    logprobs: bool | None = Field(
        default=None,
        description="Return each generated token's log-prob under the composed EFT "
        "distribution (before temperature, top-k and top-p, as vLLM reports them) in the "
        "response's `logprobs`, as LlamaIndex's OpenAI LLM does.",
    )
    top_logprobs: int = Field(
        default=0,
        ge=0,
        le=20,
        description="With logprobs: the most likely alternatives returned per token.",
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
        return get_decoder(self._holder)

    def with_options(self, **options: Any) -> EFTLLM:
        """A copy with other default options (fields), sharing this LLM's decoder.

        `engine = index.as_query_engine(llm=llm.with_options(temperature=0))`.
        """
        unknown = sorted(set(options) - set(type(self).model_fields))
        if unknown:
            raise ValueError(f"unknown EFTLLM options {unknown}; known: {_GENERATION_FIELDS}")
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
        inside a query engine a failing call only shows as an empty answer (the behaviors
        of a lazy decoder are known unloaded)."""
        merge_call_weights(self.weights, None, self._holder.behavior_names)

    @property
    def metadata(self) -> LLMMetadata:
        """Honest limits: RAG packing relies on context_window and num_output. Reading them
        never loads the models: before a lazy decoder loads, they come from the models'
        configs (a few small files), with the values the loaded decoder will report."""
        holder = self._holder  # an EFTDecoder, or a LazyDecoder that knows them unloaded
        window, name = holder.context_window, holder.model_name
        return LLMMetadata(
            # no model states a limit: fall back to LlamaIndex's default guess
            context_window=window or DEFAULT_CONTEXT_WINDOW,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model_name or name,
            system_role=MessageRole.SYSTEM,
        )

    # ------------------------------------------------------------------ options

    def _options(self, call: Mapping[str, Any], chat: bool = False) -> dict[str, Any]:
        """This LLM's options with a call's overrides, for the decoder (or, with `chat`, the
        core's chat functions); per-call weights merge over `weights`."""
        names = (*_GENERATION_FIELDS, *_CHAT_FIELDS) if chat else _GENERATION_FIELDS
        call = dict(call)
        fields = {name: getattr(self, name) for name in names}
        fields["logprobs"] = logprobs_option(
            call.pop("logprobs", self.logprobs), call.pop("top_logprobs", self.top_logprobs)
        )
        return merge_call_options(
            fields,
            call,
            owner="EFTLLM",
            passthrough=_CHAT_KWARGS if chat else (),
            behaviors=self._holder.behavior_names,
        )

    def _chat_request(
        self, messages: Sequence[ChatMessage], call: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Keyword arguments for the core's chat functions."""
        return {"messages": _to_core_messages(messages), **self._options(call, chat=True)}

    def _text_request(
        self, prompt: str, formatted: bool, call: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Keyword arguments for the decoder: the prompt (through `completion_to_prompt`
        unless `formatted`) and the options."""
        options = self._options(call)
        return {"prompt": prompt if formatted else self.completion_to_prompt(prompt), **options}

    # ------------------------------------------------------------------ completion
    # Not derived from chat, nor chat from completion (llama-index-core's generic_utils
    # decorators): completion continues raw text with no chat template, and chat needs the
    # core's template, tools and constrained output. Both run through one driver (`Route`).

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Continue `prompt` as raw text (no chat template); kwargs override options."""
        return TEXT.call(self._holder, self._text_request(prompt, formatted, kwargs))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream the continuation of `prompt`: `delta` is new text, `text` is cumulative."""
        return TEXT.stream_call(self._holder, self._text_request(prompt, formatted, kwargs))

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """`complete`, decoded on the engine while the event loop keeps running."""
        return await TEXT.acall(self._holder, self._text_request(prompt, formatted, kwargs))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """`stream_complete` on the event loop; closing the stream stops decoding."""
        request = self._text_request(prompt, formatted, kwargs)
        return await TEXT.astream_call(self._holder, request)

    # ------------------------------------------------------------------ chat

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Reply through the decoder's chat template; kwargs override options and may carry
        `tools`, `tool_choice`, `parallel_tool_calls` and `response_format` for the core."""
        return CHAT.call(self._holder, self._chat_request(messages, kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream a reply: `delta` is new text, `message` the reply so far (tool calls too)."""
        return CHAT.stream_call(self._holder, self._chat_request(messages, kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """`chat`, decoded on the engine while the event loop keeps running."""
        return await CHAT.acall(self._holder, self._chat_request(messages, kwargs))

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """`stream_chat` on the event loop; closing the stream stops decoding."""
        return await CHAT.astream_call(self._holder, self._chat_request(messages, kwargs))

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
        if not tools:
            return {"messages": messages, **kwargs}
        return {
            "messages": messages,
            "tools": [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools],
            "tool_choice": (
                tool_choice if tool_choice is not None else "required" if tool_required else "auto"
            ),
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
        return response if allow_parallel_tool_calls else keep_first_tool_call(response)

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The tool calls of a (possibly partial, streamed) response as `ToolSelection`s."""
        return tool_selections(response, error_on_no_tool_call)


# ---------------------------------------------------------------------- before the models load


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
        "function": {"name": name, "arguments": arguments_dict(arguments)},
    }
