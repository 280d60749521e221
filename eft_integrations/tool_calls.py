"""Tool calls in the Hermes / Qwen format: grammars that force valid calls, and the parser.

A call is written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

which is what Qwen 2/2.5/3, Hermes, SmolLM3 and most Hugging Face chat templates with tool
support render and expect. The grammars here (llguidance Lark with embedded JSON schemas)
make a forced call, or the rest of a call once the model has opened `<tool_call>`, validate
against the tool's schema whatever the model; the parser turns text into calls, casting
arguments to the schema's types, and never raises on bad output (it reports an invalid call).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import EFTRequestError

__all__ = [
    "DEFAULT_MAX_STRING_LENGTH",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "TOOL_RESPONSE_CLOSE",
    "TOOL_RESPONSE_OPEN",
    "InvalidToolCall",
    "ToolCall",
    "ToolCallParser",
    "bounded_schema",
    "cast_arguments",
    "json_grammar",
    "new_call_id",
    "normalize_tools",
    "parse_bare_calls",
    "parse_call",
    "schema_accepts",
    "schema_error",
    "tool_call_grammar",
    "tool_call_or_json_grammar",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

DEFAULT_MAX_STRING_LENGTH = 256
"""Strings a schema leaves unbounded are capped at this many characters in constrained output,
so a forced call or JSON answer always closes within a finite token budget."""

# compact, Python-json-like layout: one space after ':' and ',', no other whitespace. Flexible
# whitespace would let a weak model emit blanks forever inside a forced object.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolCall:
    """A parsed tool call; `arguments` are cast to the tool's JSON schema types."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class InvalidToolCall:
    """Output that looked like a tool call but could not be read as one."""

    id: str | None
    name: str | None
    arguments: str | None
    error: str


def new_call_id() -> str:
    """A unique tool-call id, OpenAI style."""
    return f"call_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------ tools


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI-style tool dicts `{"type": "function", "function": {name, description,
    parameters}}`; a bare `{name, description, parameters}` is wrapped. ValueError otherwise."""
    normalized = []
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise EFTRequestError(
                f"a tool is a dict {{'type': 'function', 'function': {{'name': ..., "
                f"'parameters': {{...}}}}}}, got {tool!r}",
                param="tools",
            )
        parameters = dict(function.get("parameters") or {"type": "object", "properties": {}})
        normalized.append(
            {
                "type": "function",
                "function": {
                    "name": function["name"],
                    "description": function.get("description", ""),
                    "parameters": parameters,
                },
            }
        )
    names = [t["function"]["name"] for t in normalized]
    if len(set(names)) != len(names):
        raise EFTRequestError(f"tool names must be unique, got {names}", param="tools")
    return normalized


# ------------------------------------------------------------------------------ grammars

_NOT_SUBSCHEMAS = {"enum", "const", "default", "examples", "required", "description", "title"}


def bounded_schema(
    schema: Mapping[str, Any], max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH
) -> dict[str, Any]:
    """A copy of `schema` that a sampler can always finish: objects without
    `additionalProperties` get `false` (no invented keys), and free strings get
    `maxLength` (and `minLength: 1`: a forced argument is never left empty).
    Every instance of the result is an instance of the original schema."""
    schema = copy.deepcopy(dict(schema))

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        if ("object" in types or "properties" in node) and "additionalProperties" not in node:
            node["additionalProperties"] = False
        free_string = not ({"maxLength", "enum", "const", "pattern", "format"} & node.keys())
        if "string" in types and free_string and max_string_length is not None:
            # never below the schema's own minLength: the cap must not leave no instance
            minimum = node.get("minLength")
            node["maxLength"] = max(max_string_length, minimum if _is_count(minimum) else 0)
            # closing mode would otherwise answer "" whenever the budget runs short
            node.setdefault("minLength", 1)
        for key, value in node.items():
            if key in _NOT_SUBSCHEMAS:
                continue
            if key in {"properties", "$defs", "definitions", "patternProperties"} and isinstance(
                value, dict
            ):
                for sub in value.values():
                    visit(sub)
            else:
                visit(value)

    visit(schema)
    return schema


def _is_count(value: Any) -> bool:
    """Whether `value` is a non-negative integer (a JSON schema length), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _call_schema(tool: Mapping[str, Any], max_string_length: int | None) -> dict[str, Any]:
    """JSON schema of one call `{"name": <const>, "arguments": <parameters>}`."""
    function = tool["function"]
    parameters = bounded_schema(function["parameters"], max_string_length)
    # `#/$defs/...` references resolve from the root, so definitions move up with them
    defs = {key: parameters.pop(key) for key in ("$defs", "definitions") if key in parameters}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        **defs,
    }


def _json_rule(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_LAYOUT})


def _literal(text: str, markup_tokens: Mapping[str, int] | None, spelled: bool = True) -> str:
    """Lark for markup `text`: the tokenizer's added token for it (the way a model trained on
    the markup writes it) or, when `spelled`, the text itself. llguidance treats every added
    token as a special token, which a quoted literal never matches, hence `<[id]>`."""
    quoted = json.dumps(text)
    token = (markup_tokens or {}).get(text)
    if token is None:
        return quoted
    return f"(<[{token}]> | {quoted})" if spelled else f"<[{token}]>"


def _call_rules(
    tools: Sequence[Mapping[str, Any]],
    parallel: bool,
    max_string_length: int | None,
    markup_tokens: Mapping[str, int] | None,
    spelled: bool = True,
) -> list[str]:
    """Rules `calls` (after an opening tag: a call, its closing tag, and when `parallel` more
    tagged calls), `call` (the JSON), `open` and `close` (the tags). The last call's closing
    tag is optional, as for the parser: a call is complete when its JSON is."""
    if not tools:
        raise EFTRequestError("a tool-call grammar needs at least one tool", param="tools")
    call_schemas = [_call_schema(t, max_string_length) for t in tools]
    defs: dict[str, Any] = {}
    for schema in call_schemas:
        for key in ("$defs", "definitions"):
            defs.setdefault(key, {}).update(schema.pop(key, {}))
    one_call = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
    call = _json_rule({**one_call, **{k: v for k, v in defs.items() if v}})
    more = ' ("\\n" open calls)?' if parallel else ""
    return [
        f'calls: "\\n" call ("\\n" close{more})?',
        f"call: {call}",
        f"open: {_literal(TOOL_CALL_OPEN, markup_tokens, spelled)}",
        f"close: {_literal(TOOL_CALL_CLOSE, markup_tokens, spelled)}",
    ]


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    *,
    forced: bool,
    parallel: bool = True,
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
    markup_tokens: Mapping[str, int] | None = None,
    spelled_markup: bool = True,
) -> str:
    """llguidance Lark grammar for tool calls over normalized `tools`.

    forced=True: the answer is one call (several when `parallel`), nothing else.
    forced=False: free text without `<tool_call>`, or free text, `<tool_call>`, and from there
    a valid call (then more calls when `parallel`).
    `markup_tokens` maps markup (`<tool_call>`, `</tool_call>`) to the tokenizer's added token
    for it, when it has one: the grammar then takes that token, or the text spelled out unless
    `spelled_markup=False` (special tokens: their text is not part of the decoded answer).
    """
    lines = _call_rules(tools, parallel, max_string_length, markup_tokens, spelled_markup)
    if forced:
        return "\n".join(["start: open calls", *lines]) + "\n"
    tag = re.escape(TOOL_CALL_OPEN)
    token = (markup_tokens or {}).get(TOOL_CALL_OPEN)
    text_then_tag = f"[lazy]: /(.|\\n)*{tag}/"  # text up to the first tag, spelled out
    if token is None:
        opening = [f"opening{text_then_tag}"]
    elif spelled_markup:
        opening = [f"opening: TEXT? <[{token}]> | spelled", f"spelled{text_then_tag}"]
    else:
        opening = [f"opening: TEXT? <[{token}]>"]
    lines = [
        # free text that never contains the opening tag, or text up to the first tag
        "start: TEXT | opening calls",
        f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{tag}(.|\\n)*/",
        *opening,
        *lines,
    ]
    return "\n".join(lines) + "\n"


def tool_call_or_json_grammar(
    tools: Sequence[Mapping[str, Any]],
    schema: Mapping[str, Any] | None,
    *,
    parallel: bool = True,
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
    markup_tokens: Mapping[str, int] | None = None,
    spelled_markup: bool = True,
) -> str:
    """Either tool calls (as `tool_call_grammar(forced=True)`) or one JSON value of `schema`
    (None: any JSON object): a turn with tools and a response format, which ends the tool
    loop with the structured answer."""
    answer = bounded_schema(schema or {"type": "object"}, max_string_length)
    lines = [
        "start: open calls | answer",
        f"answer: {_json_rule(answer)}",
        *_call_rules(tools, parallel, max_string_length, markup_tokens, spelled_markup),
    ]
    return "\n".join(lines) + "\n"


def json_grammar(
    schema: Mapping[str, Any] | None,
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
) -> str:
    """Lark grammar for one JSON value of `schema` (None: any JSON object)."""
    schema = bounded_schema(schema or {"type": "object"}, max_string_length)
    return f"start: {_json_rule(schema)}\n"


# ------------------------------------------------------------------------------ casting


def cast_arguments(value: Any, schema: Mapping[str, Any] | None, root: Any = None) -> Any:
    """Cast a parsed JSON value to the types of `schema`, where that is lossless:
    "7" -> 7 for integers, "true" -> True for booleans, 3 -> "3" for strings, recursively
    through objects, arrays, $ref and anyOf/oneOf. Values that do not fit stay as they are."""
    if not isinstance(schema, Mapping):
        return value
    root = schema if root is None else root
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        return cast_arguments(value, target, root)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            if value is None:
                return value
            for option in schema[key]:
                cast = cast_arguments(value, option, root)
                if _fits(cast, option):
                    return cast
            return value
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        return {
            k: cast_arguments(
                v, properties.get(k, extra if isinstance(extra, dict) else None), root
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [cast_arguments(v, schema.get("items"), root) for v in value]
    if "integer" in types and not isinstance(value, bool):
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if "number" in types and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if re.fullmatch(r"\s*-?\d+\s*", value) else number
    if "boolean" in types and isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    if types == ["string"] and isinstance(value, (int, float)) and not isinstance(value, bool):
        return json.dumps(value)
    return value


def _fits(value: Any, schema: Mapping[str, Any]) -> bool:
    """Shallow type check of a value against a schema's `type` (for anyOf choices)."""
    types = schema.get("type")
    if types is None:
        return True
    types = types if isinstance(types, list) else [types]
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "null": lambda v: v is None,
    }
    return any(checks.get(t, lambda v: True)(value) for t in types)


# ------------------------------------------------------------------------------ parsing


def parse_call(raw: str, tools: Mapping[str, Mapping[str, Any]]) -> ToolCall | InvalidToolCall:
    """One `<tool_call>` body -> a call; `tools` maps names to normalized tool dicts."""
    text = raw.strip()
    try:
        payload, end = json.JSONDecoder().raw_decode(text)
        rest = text[end:].strip()
        # a call cut inside its closing tag (length limit) is still a complete call
        if rest and not TOOL_CALL_CLOSE.startswith(rest):
            raise json.JSONDecodeError("extra text after the call", text, end)
    except json.JSONDecodeError as error:
        return InvalidToolCall(None, _guess_name(text), text, f"not valid JSON: {error}")
    return _payload_call(payload, tools, text)


def _payload_call(
    payload: Any, tools: Mapping[str, Mapping[str, Any]], text: str
) -> ToolCall | InvalidToolCall:
    """A decoded `{"name": ..., "arguments": {...}}` -> a call with cast arguments."""
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return InvalidToolCall(None, None, text, 'a call is {"name": ..., "arguments": {...}}')
    name = payload["name"]
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):  # some models double-encode the arguments
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return InvalidToolCall(None, name, arguments, f"arguments are not JSON: {error}")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return InvalidToolCall(None, name, json.dumps(arguments), "arguments must be an object")
    if name not in tools:
        return InvalidToolCall(
            None, name, json.dumps(arguments), f"unknown tool {name!r}; known: {list(tools)}"
        )
    parameters = tools[name]["function"]["parameters"]
    return ToolCall(new_call_id(), name, cast_arguments(arguments, parameters))


def _guess_name(text: str) -> str | None:
    match = re.search(r'"name"\s*:\s*"([^"]+)"', text)
    return match.group(1) if match else None


class _ByteVocabulary:
    """A vocabulary of the 256 bytes (plus an end token) for llguidance: a grammar then
    matches text byte by byte, whatever model tokenizer is around."""

    def __init__(self) -> None:
        self.eos_token_id = 256
        self.bos_token_id = None
        self.tokens = [bytes([b]) for b in range(256)] + [b"<eos>"]
        self.special_token_ids = [256]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


@functools.lru_cache(maxsize=1)
def _byte_tokenizer() -> Any:
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()))


def schema_accepts(schema: Mapping[str, Any], value: Any) -> bool:
    """Whether `value` is an instance of the JSON `schema`, checked by llguidance (leniently:
    keywords it does not implement are ignored). A schema it cannot read accepts nothing."""
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        dict(schema), overrides={"whitespace_flexible": True, "lenient": True}
    )
    matcher = llguidance.LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    text = json.dumps(value, ensure_ascii=False).encode()
    return not matcher.is_error() and matcher.consume_tokens(list(text)) and matcher.is_accepting()


def schema_error(
    schema: Mapping[str, Any] | None,
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
) -> str | None:
    """Why llguidance cannot constrain output to `schema` as the grammars here use it
    (`bounded_schema`, compact layout), or None when it can. Its JSON schema compiler proves
    most unsatisfiable schemas empty (`minimum` above `maximum`, an `allOf` of two types, an
    anchored pattern shorter than `minLength`, a required property that cannot hold) and
    names keywords it does not implement; this asks it, with a byte vocabulary, before any
    model tokenizer is involved."""
    import llguidance

    lark = llguidance.LLMatcher.grammar_from_lark(json_grammar(schema, max_string_length))
    error = _validate(lark)
    if not error:
        return None
    # "at 1(8): failed to compile JSON schema: <reason>" and then the grammar's listing
    reason = error.split("\n", 1)[0]
    return reason.split("failed to compile JSON schema: ", 1)[-1].strip()


@functools.lru_cache(maxsize=256)
def _validate(lark: str) -> str:
    """llguidance's error for a grammar (empty when it compiles); remembered per grammar."""
    import llguidance

    return llguidance.LLMatcher.validate_grammar(lark, _byte_tokenizer())


def parse_bare_calls(text: str, tools: Mapping[str, Mapping[str, Any]]) -> list[ToolCall] | None:
    """Calls written without tags: `text` is only JSON objects (or arrays of them), each
    `{"name": <a bound tool>, "arguments" (or "parameters"): {...}}` with arguments that
    validate against the tool's schema, as vLLM's JSON tool parsers and Ollama read them; a
    markdown code fence around them (```json) is allowed. None when `text` is anything else
    (it is then content)."""
    fenced = _FENCED.fullmatch(text)
    values = _json_values(fenced.group(1) if fenced else text)
    if not values:
        return None
    calls = []
    for value in values:
        if not isinstance(value, dict) or not {"name"} < set(value) <= _BARE_KEYS:
            return None
        call = _payload_call(value, tools, text)
        if not isinstance(call, ToolCall):
            return None
        if not schema_accepts(tools[call.name]["function"]["parameters"], call.arguments):
            return None
        calls.append(call)
    return calls


_BARE_KEYS = {"name", "arguments", "parameters"}
_FENCED = re.compile(r"\s*```(?:json)?[ \t]*\n(.*?)(?:```\s*)?", re.DOTALL | re.IGNORECASE)
_FENCE_OPENING = re.compile(r"```(?:json)?[ \t]*\n\s*", re.IGNORECASE)


def _may_be_bare(text: str) -> bool:
    """Whether `text`, the start of an answer, may still turn out to be bare JSON calls: it
    starts with `{` or `[`, or with a code fence (```json) whose content does or may."""
    text = text.lstrip()
    if not text or text[0] in "{[":
        return True
    opening = _FENCE_OPENING.match(text)
    if opening:
        return opening.end() == len(text) or text[opening.end()] in "{["
    return "```json".startswith(text.lower()) or bool(
        re.fullmatch(r"```(?:json)?[ \t]*", text, re.IGNORECASE)
    )


def _json_values(text: str) -> list[Any] | None:
    """The JSON values `text` consists of (arrays flattened), separated by whitespace, commas
    or semicolons; None if anything else is in it."""
    decoder = json.JSONDecoder()
    text = text.strip()
    values: list[Any] = []
    position = 0
    while position < len(text):
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return None
        values += value if isinstance(value, list) else [value]
        while position < len(text) and text[position] in " \t\r\n,;":
            position += 1
    return values


_BLOCKS = {TOOL_CALL_OPEN: TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN: TOOL_RESPONSE_CLOSE}
_MARKUP = (TOOL_CALL_OPEN, TOOL_RESPONSE_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_CLOSE)
"""The package's own markup (the Hermes format): never part of an answer's content."""


class ToolCallParser:
    """Splits model output, fed in pieces, into content and tool calls; the package's markup
    (`<tool_call>`, `<tool_response>` and their closing tags) never reaches the content.

    - a `<tool_call>` block becomes a call (`read_calls=False`: it is dropped, for turns
      where no call may be made);
    - a `<tool_response>` block the model writes keeps its text without the tags, unless it
      repeats a tool result of `echoes`: then it is dropped, or, where the answer has no
      words of its own (nor calls), it is the answer; stray closing tags are dropped;
    - `bare_calls=True`: an answer that is only JSON naming bound tools with schema-valid
      arguments (`parse_bare_calls`) is read as calls; content that starts like JSON (`{`,
      `[`, or a ```json fence) is then held back until the end.

    `feed(piece)` and `finish()` return (content increment, completed calls). Content never
    includes a partial tag, and whitespace right before or after a block is dropped, so feeding
    the whole text at once gives the same content as feeding it token by token.
    """

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]],
        *,
        read_calls: bool = True,
        bare_calls: bool = False,
        echoes: Sequence[str] = (),
    ) -> None:
        self._tools = {t["function"]["name"]: t for t in normalize_tools(tools)}
        self._read_calls = read_calls
        self._bare = bare_calls and bool(self._tools)
        self._echoes = {e.strip() for e in echoes if e.strip()}
        self._buffer = ""
        self._block: str | None = None  # the opening tag of the block being read
        self._after_block = False
        self._emitted = False  # some content was returned already
        self._worded = False  # some of it was more than blanks
        self._echo: str | None = None  # a repeated tool result, the answer if nothing else is
        self.calls: list[ToolCall | InvalidToolCall] = []

    def feed(self, piece: str) -> tuple[str, list[ToolCall | InvalidToolCall]]:
        self._buffer += piece
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[ToolCall | InvalidToolCall]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, list[ToolCall | InvalidToolCall]]:
        content: list[str] = []
        calls: list[ToolCall | InvalidToolCall] = []
        while True:
            if self._block is not None:
                if not self._read_block(final, calls):
                    break
                continue
            if self._after_block:
                stripped = self._buffer.lstrip()
                if not stripped and not final:
                    break  # only whitespace so far: it may still precede another block
                self._buffer, self._after_block = stripped, bool(not stripped)
                if stripped and (self._emitted or any(content)):  # text on both sides: a space
                    self._buffer = " " + stripped
            if self._bare and not self._read_bare(final, calls):
                break
            start, tag = _first_tag(self._buffer)
            if tag is not None:
                content.append(self._buffer[:start].rstrip())
                self._buffer = self._buffer[start + len(tag) :]
                self._bare = False
                if tag in _BLOCKS:
                    self._block = tag
                else:  # a closing tag with no block open: dropped
                    self._after_block = True
                continue
            if final:
                content.append(self._buffer)
                self._buffer = ""
                break
            safe = _safe_length(self._buffer)
            content.append(self._buffer[:safe])
            self._buffer = self._buffer[safe:]
            break
        self.calls += calls
        text = "".join(content)
        self._worded = self._worded or bool(text.strip())
        if final and self._echo and not (self._worded or self.calls):
            text, self._worded = self._echo, True
        self._emitted = self._emitted or bool(text)
        return text, calls

    def _read_block(self, final: bool, calls: list[ToolCall | InvalidToolCall]) -> bool:
        """Consume the open block once it is closed (or the text ends); False: wait."""
        assert self._block is not None
        close = _BLOCKS[self._block]
        end = self._buffer.find(close)
        if end < 0 and not final:
            return False
        body = self._buffer if end < 0 else self._buffer[:end]
        self._buffer = "" if end < 0 else self._buffer[end + len(close) :]
        if self._block == TOOL_CALL_OPEN:
            if self._read_calls:
                calls.append(parse_call(body, self._tools))
        elif body.strip() in self._echoes:
            self._echo = body.strip()
        else:
            self._buffer = body.strip() + self._buffer  # the model's own words stay
        self._block, self._after_block = None, True
        return bool(self._buffer) or end >= 0

    def _read_bare(self, final: bool, calls: list[ToolCall | InvalidToolCall]) -> bool:
        """While the answer may still be bare JSON calls, hold it back; at the end read it.
        False: wait for more text."""
        stripped = self._buffer.lstrip()
        if not _may_be_bare(stripped):
            self._bare = False
            return True
        if not final:
            return False
        self._bare = False
        found = parse_bare_calls(stripped, self._tools) if stripped else None
        if found:
            calls += found
            self._buffer = ""
        return True


def _first_tag(text: str) -> tuple[int, str | None]:
    """Position and text of the first markup tag in `text` ((-1, None) if none)."""
    found = [(text.find(tag), tag) for tag in _MARKUP if tag in text]
    return min(found) if found else (-1, None)


def _safe_length(text: str) -> int:
    """Length of the prefix of `text` that can be emitted as content now: it holds back a
    tail that could still become a markup tag and the whitespace before such a tail."""
    end = len(text)
    longest = max(len(tag) for tag in _MARKUP)
    for n in range(min(longest - 1, len(text)), 0, -1):
        if any(tag.startswith(text[-n:]) for tag in _MARKUP):
            end -= n
            break
    return len(text[:end].rstrip())
