"""Chat on an EFT decoder: templates, tool calling, structured output, streaming.

Framework-free: the LangChain and LlamaIndex adapters translate their messages and tools to
the plain dicts used here (Hugging Face chat-template messages, OpenAI-style tools) and back.

    result = chat(decoder, [{"role": "user", "content": "Weather in Paris?"}],
                  tools=[{"type": "function", "function": {"name": "get_weather", ...}}],
                  tool_choice="auto", weights={"chat": 1.0}, temperature=0)
    result.content, result.tool_calls, result.finish_reason   # "stop" | "length" | "tool_calls"

Rendering goes through `decoder.format_chat` (the fine-tuned model's template). A template
without tool support (the tools do not appear in its rendering) gets `FALLBACK_TOOL_PROMPT`
as a system message, and history tool calls / results are rewritten into that format.

Constrained decoding (llguidance, see `constraints.GrammarConstraint`) masks the EFT-composed
distribution: with a forced tool choice ("any", "required" or a tool name) the answer is a
call that validates against the tool's schema whatever the model; with "auto" the model
writes freely until it opens `<tool_call>`, and the rest is constrained to a valid call;
`response_format` constrains the whole answer to JSON (a schema, or any object); tools and
`response_format` together allow either calls or that JSON (an agent's last turn answers in
the schema). Where the tokenizer has the markup as an added token (Qwen, Hermes), the grammar
takes that token. In auto mode a call written as bare JSON naming a bound tool with valid
arguments is read as a call too, and the package's markup (`<tool_call>`, `<tool_response>`)
never reaches an answer's content.
Unbounded strings are capped (`tool_calls.DEFAULT_MAX_STRING_LENGTH`, or the
`max_string_length` argument) and, once the tokens left are what the shortest closing of the
answer so far needs, decoding runs in a closing mode, so constrained output closes within the
budget: max_new_tokens, or less where the context window leaves less. A budget below the
shortest complete answer is a ValueError naming the minimum; a schema that no answer can
satisfy (a callable tool's parameters, the response format's schema), as llguidance's JSON
schema compiler proves it, is a ValueError naming the tool or the schema, before decoding.

The grammar engine is llguidance, not xgrammar: one small self-contained wheel (xgrammar
pulls triton, ~1 GB), masks in microseconds on CPU, and a Lark dialect that embeds JSON
schemas next to free text, which the "auto" tool-call grammar needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .constraints import GrammarConstraint, TokenConstraint
from .errors import EFTRequestError
from .options import DEFAULT_MAX_NEW_TOKENS, RequestStats, TokenLogprob, Usage, merge_weights
from .tool_calls import (
    DEFAULT_MAX_STRING_LENGTH,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_OPEN,
    InvalidToolCall,
    ToolCall,
    ToolCallParser,
    cast_arguments,
    json_grammar,
    new_call_id,
    normalize_tools,
    schema_error,
    tool_call_grammar,
    tool_call_or_json_grammar,
)
from .tool_formats import MISTRAL_CALLS, PYTHON_TAG, ToolFormat, arming_pattern, tool_format

__all__ = [
    "FALLBACK_TOOL_PROMPT",
    "ChatDelta",
    "ChatRequest",
    "ChatResult",
    "InvalidToolCall",
    "ToolCall",
    "ToolCallChunk",
    "achat",
    "astream_chat",
    "chat",
    "chat_batch",
    "normalize_tool_choice",
    "prepare_chat",
    "resolved_weights",
    "stream_chat",
    "template_supports_tools",
]

FALLBACK_TOOL_PROMPT = """You can call the following tools. Their parameters are JSON schemas:
{tools}

To call a tool, answer with one block per call, each holding a JSON object with the tool's \
name and arguments, exactly like this:
<tool_call>
{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>
Results come back as <tool_response> blocks. If no tool is needed, answer normally."""
"""System prompt for chat templates without tool support (Hermes / Qwen tool-call format)."""

STRUCTURED_OUTPUT_PROMPT = "Answer with a single JSON value only{schema}."
"""System instruction added for `response_format`; the grammar enforces it either way."""

STRUCTURED_WITH_TOOLS_PROMPT = (
    "Call a tool when you need one. Once you can answer, answer with a single JSON value "
    "only{schema}."
)
"""System instruction for `response_format` in a turn that may also call tools."""

FORCED_CHOICES = ("any", "required")

_PLANNING_LIMIT = 4096
"""How far the minimum budget of a constrained answer is looked for (at least)."""


@dataclass(frozen=True)
class ToolCallChunk:
    """A streamed piece of a tool call (LangChain style: chunks with one index merge)."""

    index: int
    id: str | None
    name: str | None
    arguments: str | None  # JSON text of the arguments
    error: str | None = None  # set when the call could not be read (an invalid tool call)


@dataclass(frozen=True)
class ChatResult:
    """One assistant turn."""

    content: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[InvalidToolCall]
    finish_reason: str  # "stop" | "length" | "tool_calls"
    usage: Usage
    weights: dict[str, float] = field(default_factory=dict)
    stats: RequestStats | None = None
    """How the request went through the engine (see `GenerationResult.stats`)."""
    logprobs: list[TokenLogprob] | None = None
    """With the `logprobs` option: one entry per generated token."""


@dataclass(frozen=True)
class ChatDelta:
    """An increment of a streamed assistant turn; the last one has finish_reason, usage and
    the engine's stats. Each tool call arrives whole, in one delta: as a chunk (its JSON text,
    `error` set when unreadable) and as the call itself, read (`tool_calls`, arguments cast
    to the schema) or not (`invalid_tool_calls`), so no adapter parses it again."""

    content: str
    tool_call_chunks: list[ToolCallChunk]
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    stats: RequestStats | None = None
    logprobs: list[TokenLogprob] | None = None
    """With the `logprobs` option: the tokens decoded since the previous delta."""


@dataclass
class ChatRequest:
    """A rendered prompt plus what decoding and parsing need to know about it."""

    prompt: str
    tools: list[dict[str, Any]]
    parse_tools: bool
    grammar: str | None
    eos_token_ids: list[int]
    arm_after: str | None = None
    """Closing mode waits for text that this regex matches (a call opening: free text
    before a tool call is not cut short)."""
    bare_calls: bool = False
    """Calls written as bare JSON (no tags) are read too: in auto mode, and for forced calls
    whose tags a tokenizer decodes to nothing (markup that is a special token)."""
    strip_markup: bool = False
    """The prompt shows the package's markup: it is kept out of the answer's content."""
    echoes: tuple[str, ...] = ()
    """Tool results of the conversation (a `<tool_response>` block repeating one is dropped)."""
    kind: str = "the answer"
    """What the grammar makes of the answer, for error messages."""

    def constraint(
        self, decoder: Any, budget: int | None = None, *, budget_note: str = ""
    ) -> TokenConstraint | None:
        """A fresh constraint for one sequence (it holds parser state); `budget` is the most
        tokens the call may generate, so a constrained answer closes before it. ValueError when
        `budget` is below the shortest complete answer (`budget_note` says where it came from)."""
        if self.grammar is None:
            return None
        constraint = GrammarConstraint.from_lark(
            decoder.tokenizer,
            self.grammar,
            eos_token_ids=self.eos_token_ids,
            vocab_size=decoder.vocab_size,
            budget=budget,
            arm_pattern=self.arm_after,
        )
        if budget is not None:
            limit = max(budget, _PLANNING_LIMIT)
            needed = constraint.minimum_budget(limit=limit)
            if needed > limit:
                raise EFTRequestError(
                    f"no complete form of {self.kind} was found within {limit} new tokens "
                    "(the search for one is bounded): its schema may have no valid instance, "
                    "or need longer values than that; check the schema's patterns, lengths "
                    "and required keys",
                    param="max_new_tokens",
                )
            if budget < needed:
                raise EFTRequestError(
                    f"{self.kind} needs at least {needed} new tokens (its shortest complete "
                    f"form), but only {budget} may be generated{budget_note}; raise "
                    f"max_new_tokens (max_tokens) to at least {needed}",
                    param="max_new_tokens",
                )
        return constraint

    def parser(self) -> ToolCallParser | None:
        """A fresh parser of the answer, or None when the text is the content as it is."""
        if not (self.parse_tools or self.strip_markup):
            return None
        return ToolCallParser(
            self.tools, read_calls=self.parse_tools, bare_calls=self.bare_calls, echoes=self.echoes
        )


# ------------------------------------------------------------------------------ rendering

_TOOL_SUPPORT: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_TOOL_SUPPORT_LOCK = threading.Lock()
_PROBE_NAME = "eft_probe_tool_5f1c"


def template_supports_tools(decoder: Any) -> bool:
    """Whether the decoder's chat template renders tools (probed once per decoder)."""
    with _TOOL_SUPPORT_LOCK:
        if decoder not in _TOOL_SUPPORT:
            probe = [
                {
                    "type": "function",
                    "function": {
                        "name": _PROBE_NAME,
                        "description": "probe",
                        "parameters": {"type": "object", "properties": {}},
                    },
                }
            ]
            try:
                rendered = decoder.format_chat([{"role": "user", "content": "hi"}], tools=probe)
            except Exception:  # a template that chokes on tools does not support them
                rendered = ""
            _TOOL_SUPPORT[decoder] = _PROBE_NAME in rendered
        return _TOOL_SUPPORT[decoder]


def _native_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as HF templates expect them: string content, dict arguments, typed calls."""
    rendered = []
    for message in messages:
        message = dict(message)
        if message.get("content") is None:
            message["content"] = ""
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call.get("function", call))
                arguments = function.get("arguments", {})
                if isinstance(arguments, str):
                    with contextlib.suppress(json.JSONDecodeError):  # else rendered as given
                        arguments = json.loads(arguments) if arguments.strip() else {}
                function["arguments"] = arguments
                calls.append({"id": call.get("id"), "type": "function", "function": function})
            message["tool_calls"] = calls
        rendered.append(message)
    return rendered


def _call_text(call: Mapping[str, Any]) -> str:
    function = call["function"]
    payload = {"name": function.get("name"), "arguments": function.get("arguments", {})}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(payload, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def _fallback_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History for a template without tool support: calls as text, results as user turns."""
    converted = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            parts = [message.get("content") or ""]
            parts += [_call_text(c) for c in message["tool_calls"]]
            converted.append({"role": "assistant", "content": "\n".join(p for p in parts if p)})
        elif role == "tool":
            converted.append(
                {
                    "role": "user",
                    "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>",
                }
            )
        else:
            converted.append({k: v for k, v in message.items() if k != "tool_calls"})
    return converted


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Add `text` to the system message (first), or put a system message first."""
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{text}".strip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _render(
    decoder: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> str:
    try:
        return decoder.format_chat(messages, tools=tools)
    except Exception:
        # templates that reject a system role: fold it into the first user message
        if not messages or messages[0].get("role") != "system" or len(messages) < 2:
            raise
        system, first, *rest = messages
        merged = dict(first)
        merged["content"] = f"{system.get('content', '')}\n\n{first.get('content') or ''}"
        return decoder.format_chat([merged, *rest], tools=tools)


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str | None:
    """A tool choice as the core takes it: None or "auto" (the model decides), "none", "any"
    or "required" (a call is forced), or a tool name (that tool is forced). The adapters' and
    OpenAI's spellings are read too: True is "any", False is None, and a dict
    {"type": "function", "function": {"name": ...}} (or {"name": ...}) names a tool.
    ValueError otherwise, naming the choices."""
    if isinstance(tool_choice, Mapping):
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    elif isinstance(tool_choice, bool):
        tool_choice = "any" if tool_choice else None
    choices = (None, "auto", "none", *FORCED_CHOICES)
    if tool_choice not in choices and tool_choice not in names:
        raise EFTRequestError(
            f"tool_choice must be one of {list(choices)} or a tool name {list(names)}, "
            f"got {tool_choice!r}",
            param="tool_choice",
        )
    return tool_choice


def prepare_chat(
    decoder: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | None = None,
    parallel_tool_calls: bool = True,
    response_format: Mapping[str, Any] | None = None,
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
) -> ChatRequest:
    """Render the prompt and build the grammar for one conversation (no decoding).

    With tools and a `response_format` together (and no forced tool), the answer is either
    tool calls or the JSON of the response format: an agent calls tools, then answers in the
    schema. A forced tool choice makes the answer a call whatever the response format."""
    if not messages:
        raise EFTRequestError("messages is empty: give at least one message", param="messages")
    tools = normalize_tools(tools)
    names = [t["function"]["name"] for t in tools]
    tool_choice = normalize_tool_choice(tool_choice, names)
    if tool_choice is not None and tool_choice != "none" and not tools:
        raise EFTRequestError(f"tool_choice={tool_choice!r} needs tools", param="tool_choice")
    use_tools = bool(tools) and tool_choice != "none"
    forced = use_tools and (tool_choice in FORCED_CHOICES or tool_choice in names)
    schema = _response_schema(response_format) if response_format is not None else None
    called = [t for t in tools if forced and t["function"]["name"] == tool_choice] or tools
    _check_schemas(
        called if use_tools else [],
        schema if response_format is not None and not forced else None,
        max_string_length,
    )
    rendered_messages, template_tools = _conversation(decoder, messages, tools, use_tools)
    if response_format is not None and not forced:
        hint = f" matching this JSON schema: {json.dumps(schema)}" if schema else ""
        instruction = STRUCTURED_WITH_TOOLS_PROMPT if use_tools else STRUCTURED_OUTPUT_PROMPT
        rendered_messages = _with_system(rendered_messages, instruction.format(schema=hint))
    prompt = _render(decoder, rendered_messages, template_tools)
    options = {"max_string_length": max_string_length, **_markup_tokens(decoder)}
    grammar, arm_after, kind = None, None, "the answer"
    if forced:
        # a named tool is one call of it (as OpenAI and vLLM answer); "required" may be several
        parallel = parallel_tool_calls and tool_choice not in names
        grammar = tool_call_grammar(called, forced=True, parallel=parallel, **options)
        kind = "a forced tool call"
    elif use_tools and response_format is not None:
        grammar = tool_call_or_json_grammar(tools, schema, parallel=parallel_tool_calls, **options)
        kind = "a tool call or the structured output"
    elif use_tools:
        fmt = _tool_format(decoder)
        grammar = tool_call_grammar(
            tools, forced=False, parallel=parallel_tool_calls, tool_format=fmt, **options
        )
        arm_after, kind = arming_pattern(fmt), "a tool call"
    elif response_format is not None:
        grammar, kind = json_grammar(schema, max_string_length), "the structured output"
    return ChatRequest(
        prompt=prompt,
        tools=tools,
        parse_tools=use_tools,
        grammar=grammar,
        eos_token_ids=sorted(decoder.eos_token_ids),
        arm_after=arm_after,
        bare_calls=forced or (use_tools and response_format is None),
        strip_markup=use_tools or any(t in prompt for t in (TOOL_CALL_OPEN, TOOL_RESPONSE_OPEN)),
        echoes=tuple(_text(m.get("content")) for m in messages if m.get("role") == "tool"),
        kind=kind,
    )


def _check_schemas(
    tools: Sequence[Mapping[str, Any]],
    schema: Mapping[str, Any] | None,
    max_string_length: int | None,
) -> None:
    """Refuse, before anything is rendered or decoded, a schema the answer's grammar could
    never satisfy: the parameters of a tool that may be called, or the response format's
    schema. llguidance's JSON schema compiler decides (`tool_calls.schema_error`); the
    ValueError names the tool or the schema and what to change."""
    for tool in tools:
        function = tool["function"]
        reason = schema_error(function["parameters"], max_string_length)
        if reason is not None:
            raise EFTRequestError(
                f"tool {function['name']!r} cannot be called: its parameters schema "
                f"{_shown(function['parameters'])} cannot constrain the arguments: {reason}. "
                "Fix the tool's parameters (an unsatisfiable schema has no valid arguments: "
                "change or remove the keywords named) or leave the tool out",
                param="tools",
            )
    if schema is not None:
        reason = schema_error(schema, max_string_length)
        if reason is not None:
            raise EFTRequestError(
                f"response_format's JSON schema {_shown(schema)} cannot constrain the "
                f"answer: {reason}. Fix the schema (an unsatisfiable schema has no valid "
                "answer: change or remove the keywords named)",
                param="response_format",
            )


def _shown(schema: Mapping[str, Any], limit: int = 300) -> str:
    """A schema as JSON for an error message, cut at `limit` characters."""
    text = json.dumps(schema, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def _conversation(
    decoder: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: list[dict[str, Any]],
    use_tools: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages to render and the tools for the template: natively where the template
    renders tools, else in the fallback format (a system prompt, calls and results as text)."""
    native = _native_messages(messages)
    if use_tools and template_supports_tools(decoder):
        return native, tools
    if use_tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        fallback = _fallback_messages(native)
        return _with_system(fallback, FALLBACK_TOOL_PROMPT.format(tools=listing)), None
    return _fallback_messages(native), None


def _markup_tokens(decoder: Any) -> dict[str, Any]:
    """Grammar options for the tokenizer's added tokens for the tool-call markup, if any:
    `markup_tokens` (tag -> id) and `spelled_markup` (False where they are special tokens,
    whose text the decoded answer leaves out: the tags must be those tokens)."""
    tokenizer = decoder.tokenizer
    added = getattr(tokenizer, "get_added_vocab", dict)()
    tokens = {
        tag: added[tag]
        for tag in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, PYTHON_TAG, MISTRAL_CALLS)
        if added.get(tag, decoder.vocab_size) < decoder.vocab_size
    }
    decoders = getattr(tokenizer, "added_tokens_decoder", {})
    special = any(getattr(decoders.get(i), "special", False) for i in tokens.values())
    return {"markup_tokens": tokens, "spelled_markup": not special}


def _tool_format(decoder: Any) -> ToolFormat:
    """The call syntaxes of the decoder's chat template (its own, else the tokenizer's)."""
    template = getattr(decoder, "_chat_template", None)
    return tool_format(decoder.tokenizer, template)


def _text(content: Any) -> str:
    """A message's content as text (content blocks joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(b.get("text", "") if isinstance(b, Mapping) else str(b) for b in content)
    return "" if content is None else str(content)


def _response_schema(response_format: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = response_format.get("type")
    if kind == "json_object":
        return None
    if kind == "json_schema":
        schema = response_format.get("schema")
        if schema is None and isinstance(response_format.get("json_schema"), Mapping):
            schema = response_format["json_schema"].get("schema")  # OpenAI's nesting
        if not isinstance(schema, Mapping):
            raise EFTRequestError(
                'response_format {"type": "json_schema"} needs "schema": {...}',
                param="response_format",
            )
        return dict(schema)
    raise EFTRequestError(
        'response_format is {"type": "json_schema", "schema": {...}} or {"type": "json_object"}'
        f", got {dict(response_format)!r}",
        param="response_format",
    )


# ------------------------------------------------------------------------------ parsing


def _parse(
    decoder: Any, request: ChatRequest, text: str
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    parser = request.parser()
    if parser is None:
        return text, [], []
    parsed = _parse_with_response_template(decoder, request, text)
    if parsed is not None:
        return parsed
    content, calls = parser.feed(text)
    tail, more = parser.finish()
    calls = calls + more
    return (
        content + tail,
        [c for c in calls if isinstance(c, ToolCall)],
        [c for c in calls if isinstance(c, InvalidToolCall)],
    )


def _parse_with_response_template(
    decoder: Any, request: ChatRequest, text: str
) -> tuple[str, list[ToolCall], list[InvalidToolCall]] | None:
    """The tokenizer's own response parser (transformers `parse_response`), where it has one."""
    tokenizer = decoder.tokenizer
    if not request.parse_tools or getattr(tokenizer, "response_template", None) is None:
        return None
    try:
        message = tokenizer.parse_response(text, prefix=request.prompt, tools=request.tools)
    except Exception:
        return None  # fall back to the Hermes parser
    by_name = {t["function"]["name"]: t for t in request.tools}
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        name, arguments = function.get("name"), function.get("arguments", {})
        if name not in by_name or not isinstance(arguments, dict):
            invalid.append(
                InvalidToolCall(
                    None,
                    name,
                    json.dumps(arguments),
                    "unknown tool or arguments that are not an object",
                )
            )
            continue
        parameters = by_name[name]["function"]["parameters"]
        calls.append(ToolCall(new_call_id(), name, cast_arguments(arguments, parameters)))
    return _without_markup(request, str(message.get("content") or "")), calls, invalid


def _without_markup(request: ChatRequest, content: str) -> str:
    """`content` with the package's markup taken out (calls in it are not read)."""
    parser = ToolCallParser([], read_calls=False, echoes=request.echoes)
    return parser.feed(content)[0] + parser.finish()[0]


def _finish_reason(reason: str, calls: Sequence[ToolCall]) -> str:
    return "tool_calls" if calls and reason != "length" else reason


def _chunk(index: int, call: ToolCall | InvalidToolCall) -> ToolCallChunk:
    if isinstance(call, ToolCall):
        return ToolCallChunk(
            index, call.id, call.name, json.dumps(call.arguments, ensure_ascii=False)
        )
    return ToolCallChunk(index, call.id or new_call_id(), call.name, call.arguments, call.error)


# ------------------------------------------------------------------------------ API


def resolved_weights(decoder: Any, weights: Mapping[str, float] | None) -> dict[str, float]:
    """The full weight dict a call with `weights` decodes with (defaults filled in)."""
    return merge_weights(weights, decoder.default_weights)


def _result(decoder: Any, request: ChatRequest, generated: Any) -> ChatResult:
    content, calls, invalid = _parse(decoder, request, generated.text)
    return ChatResult(
        content=content,
        tool_calls=calls,
        invalid_tool_calls=invalid,
        finish_reason=_finish_reason(generated.finish_reason, calls),
        usage=generated.usage,
        weights=dict(generated.weights),
        stats=generated.stats,
        logprobs=generated.logprobs,
    )


def chat(
    decoder: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | None = None,
    parallel_tool_calls: bool = True,
    response_format: Mapping[str, Any] | None = None,
    weights: Mapping[str, float] | None = None,
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
    **generation_options: Any,
) -> ChatResult:
    """One assistant turn for `messages`. `generation_options` go to `decoder.generate`
    (max_new_tokens, temperature, top_p, top_k, conservative_top_p, stop, seed,
    speculative_k, cancel); speculative_k applies to unconstrained turns only."""
    request = prepare_chat(
        decoder,
        messages,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        response_format=response_format,
        max_string_length=max_string_length,
    )
    generated = decoder.generate(
        request.prompt,
        weights=weights,
        constraints=[_constraint(decoder, request, generation_options)],
        **_decoding(generation_options, [request]),
    )
    return _result(decoder, request, generated)


def chat_batch(
    decoder: Any,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | None = None,
    parallel_tool_calls: bool = True,
    response_format: Mapping[str, Any] | None = None,
    weights: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
    **generation_options: Any,
) -> list[ChatResult]:
    """One assistant turn per conversation, decoded as ONE batch (per-row `weights` allowed:
    a list of dicts, one per conversation)."""
    if not conversations:
        return []
    requests = [
        prepare_chat(
            decoder,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            response_format=response_format,
            max_string_length=max_string_length,
        )
        for messages in conversations
    ]
    generated = decoder.generate(
        [r.prompt for r in requests],
        weights=list(weights) if isinstance(weights, Sequence) else weights,
        constraints=[_constraint(decoder, r, generation_options) for r in requests],
        **_decoding(generation_options, requests),
    )
    return [_result(decoder, r, g) for r, g in zip(requests, generated, strict=True)]


class _DeltaBuilder:
    """StreamChunks -> ChatDeltas: content increments and one tool-call chunk per call.

    `push(chunk)` returns the deltas that chunk completes; the last delta (for the chunk with
    a finish_reason) carries finish_reason and usage."""

    def __init__(self, decoder: Any, request: ChatRequest) -> None:
        self._decoder = decoder
        self._request = request
        # the tokenizer's own parser reads whole responses: then one delta at the end
        self._whole = request.parse_tools and (
            getattr(decoder.tokenizer, "response_template", None) is not None
        )
        self._parser = request.parser()
        self._text: list[str] = []
        self._index = 0
        self._valid = 0
        self._logprobs: list[TokenLogprob] | None = None  # decoded, not yet in a delta

    def push(self, chunk: Any) -> list[ChatDelta]:
        final = chunk.finish_reason is not None
        if chunk.logprobs is not None:
            self._logprobs = [*(self._logprobs or []), *chunk.logprobs]
        if self._whole:
            self._text.append(chunk.text)
            if not final:
                return []
            content, valid, invalid = _parse(self._decoder, self._request, "".join(self._text))
            calls: list[ToolCall | InvalidToolCall] = [*valid, *invalid]
        elif self._parser is None:
            content, calls = chunk.text, []
        else:
            content, calls = self._parser.feed(chunk.text)
            if final:
                tail, more = self._parser.finish()
                content, calls = content + tail, calls + more
        pieces, valid, invalid = [], [], []
        for call in calls:
            piece = _chunk(self._index, call)
            self._index += 1
            pieces.append(piece)
            if isinstance(call, ToolCall):
                valid.append(call)
            else:  # the id its chunk carries
                invalid.append(dataclasses.replace(call, id=piece.id))
        self._valid += len(valid)
        delta = ChatDelta(content, pieces, valid, invalid)
        if final or content or pieces:
            delta = dataclasses.replace(delta, logprobs=self._logprobs)
            self._logprobs = None
        if final:
            reason = chunk.finish_reason
            if self._valid and reason != "length":
                reason = "tool_calls"
            return [
                dataclasses.replace(
                    delta, finish_reason=reason, usage=chunk.usage, stats=chunk.stats
                )
            ]
        return [delta] if content or pieces else []


def stream_chat(
    decoder: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | None = None,
    parallel_tool_calls: bool = True,
    response_format: Mapping[str, Any] | None = None,
    weights: Mapping[str, float] | None = None,
    cancel: threading.Event | None = None,
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
    **generation_options: Any,
) -> Iterator[ChatDelta]:
    """Stream one assistant turn. Content deltas joined equal `chat`'s content; each tool
    call arrives as one `ToolCallChunk` once complete; the last delta carries finish_reason
    and usage. Setting `cancel` stops decoding."""
    request = prepare_chat(
        decoder,
        messages,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        response_format=response_format,
        max_string_length=max_string_length,
    )
    chunks = decoder.stream(
        request.prompt,
        weights=weights,
        constraint=_constraint(decoder, request, generation_options),
        cancel=cancel,
        **_decoding(generation_options, [request]),
    )
    builder = _DeltaBuilder(decoder, request)
    for chunk in chunks:
        yield from builder.push(chunk)


async def achat(decoder: Any, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> ChatResult:
    """`chat` without blocking the event loop (rendering and decoding on worker threads)."""
    options = dict(kwargs)
    request = await asyncio.to_thread(_prepare_from_kwargs, decoder, messages, options)
    generated = await decoder.agenerate(
        request.prompt,
        constraints=[_constraint(decoder, request, options)],
        **_decoding(options, [request]),
    )
    return _result(decoder, request, generated)


async def astream_chat(
    decoder: Any, messages: Sequence[Mapping[str, Any]], **kwargs: Any
) -> AsyncIterator[ChatDelta]:
    """`stream_chat` without blocking the event loop: decoding runs on a worker thread and
    closing the consumer stops it (see `EFTDecoder.astream`)."""
    options = dict(kwargs)
    options.pop("cancel", None)  # astream owns cancellation
    request = await asyncio.to_thread(_prepare_from_kwargs, decoder, messages, options)
    constraint = await asyncio.to_thread(_constraint, decoder, request, options)
    builder = _DeltaBuilder(decoder, request)
    stream = decoder.astream(request.prompt, constraint=constraint, **_decoding(options, [request]))
    try:
        async for chunk in stream:
            for delta in builder.push(chunk):
                yield delta
    finally:
        await stream.aclose()


def _decoding(options: Mapping[str, Any], requests: Sequence[ChatRequest]) -> dict[str, Any]:
    """Generation options for the decoder. Speculative decoding takes one unconstrained
    prompt at a time: constrained turns (tools, structured output) and batches decode token
    by token instead, with the same output distribution."""
    options = dict(options)
    if len(requests) > 1 or any(r.grammar is not None for r in requests):
        options.pop("speculative_k", None)
    return options


def _constraint(
    decoder: Any, request: ChatRequest, options: Mapping[str, Any]
) -> TokenConstraint | None:
    """The request's constraint, planned against the tokens the call may really generate."""
    if request.grammar is None:
        return None
    budget, note = _budget(decoder, request, options)
    return request.constraint(decoder, budget, budget_note=note)


def _budget(decoder: Any, request: ChatRequest, options: Mapping[str, Any]) -> tuple[int, str]:
    """The tokens a call may generate, as the decoder counts them: max_new_tokens (the
    decoder's default when not given), cut to what the context window leaves after the prompt
    (the longer of the prompt and `base_prompt`); and a note saying which limit it is."""
    asked = int(options.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    prompts = [request.prompt, options.get("base_prompt")]
    used = max(len(decoder.encode(p)) for p in prompts if p is not None)
    budget = decoder.token_budget(used, asked)  # a ValueError when the window leaves nothing
    if budget < asked:
        return budget, (
            f" (max_new_tokens={asked}, but the context window of {decoder.context_window} "
            f"tokens leaves {budget} after the {used}-token prompt)"
        )
    return asked, f" (max_new_tokens={asked})"


def _prepare_from_kwargs(
    decoder: Any, messages: Sequence[Mapping[str, Any]], options: dict[str, Any]
) -> ChatRequest:
    """Pop the chat arguments from `options` (the rest are generation options)."""
    return prepare_chat(
        decoder,
        messages,
        tools=options.pop("tools", None),
        tool_choice=options.pop("tool_choice", None),
        parallel_tool_calls=options.pop("parallel_tool_calls", True),
        response_format=options.pop("response_format", None),
        max_string_length=options.pop("max_string_length", DEFAULT_MAX_STRING_LENGTH),
    )
