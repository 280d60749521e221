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
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_MAX_STRING_LENGTH",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "InvalidToolCall",
    "ToolCall",
    "ToolCallParser",
    "bounded_schema",
    "cast_arguments",
    "json_grammar",
    "new_call_id",
    "normalize_tools",
    "parse_call",
    "tool_call_grammar",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

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
            raise ValueError(
                f"a tool is a dict {{'type': 'function', 'function': {{'name': ..., "
                f"'parameters': {{...}}}}}}, got {tool!r}"
            )
        parameters = dict(function.get("parameters") or {"type": "object", "properties": {}})
        normalized.append({
            "type": "function",
            "function": {
                "name": function["name"],
                "description": function.get("description", ""),
                "parameters": parameters,
            },
        })
    names = [t["function"]["name"] for t in normalized]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
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
            node["maxLength"] = max_string_length
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


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    *,
    forced: bool,
    parallel: bool = True,
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
) -> str:
    """llguidance Lark grammar for tool calls over normalized `tools`.

    forced=True: the answer is one call (several when `parallel`), nothing else.
    forced=False: free text without `<tool_call>`, or free text, `<tool_call>`, and from there
    a valid call (then more calls when `parallel`).
    """
    if not tools:
        raise ValueError("tool_call_grammar needs at least one tool")
    call_schemas = [_call_schema(t, max_string_length) for t in tools]
    defs: dict[str, Any] = {}
    for schema in call_schemas:
        for key in ("$defs", "definitions"):
            defs.setdefault(key, {}).update(schema.pop(key, {}))
    one_call = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
    call = _json_rule({**one_call, **{k: v for k, v in defs.items() if v}})
    more = ' ("\\n" block)*' if parallel else ""
    lines = [
        f'block: "{TOOL_CALL_OPEN}\\n" call "\\n{TOOL_CALL_CLOSE}"',
        f"call: {call}",
    ]
    if forced:
        lines.insert(0, f"start: block{more}")
    else:
        lines[:0] = [
            # free text that never contains the opening tag, or text up to the first tag
            f'start: TEXT | opening "\\n" call "\\n{TOOL_CALL_CLOSE}"{more}',
            f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{re.escape(TOOL_CALL_OPEN)}(.|\\n)*/",
            f"opening[lazy]: /(.|\\n)*{re.escape(TOOL_CALL_OPEN)}/",
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
            k: cast_arguments(v, properties.get(k, extra if isinstance(extra, dict) else None),
                              root)
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


def parse_call(
    raw: str, tools: Mapping[str, Mapping[str, Any]]
) -> ToolCall | InvalidToolCall:
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


class ToolCallParser:
    """Splits model output, fed in pieces, into content and `<tool_call>` blocks.

    `feed(piece)` and `finish()` return (content increment, completed calls). Content never
    includes a partial opening tag, and whitespace right before or after a block is dropped,
    so feeding the whole text at once gives the same content as feeding it token by token.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]]) -> None:
        self._tools = {t["function"]["name"]: t for t in normalize_tools(tools)}
        self._buffer = ""
        self._in_call = False
        self._after_block = False
        self._emitted = False  # some content was returned already
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
            if self._in_call:
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0 and not final:
                    break
                body = self._buffer if end < 0 else self._buffer[:end]
                self._buffer = "" if end < 0 else self._buffer[end + len(TOOL_CALL_CLOSE):]
                calls.append(parse_call(body, self._tools))
                self._in_call, self._after_block = False, True
                if end < 0:
                    break
                continue
            if self._after_block:
                stripped = self._buffer.lstrip()
                if not stripped and not final:
                    break  # only whitespace so far: it may still precede another block
                self._buffer, self._after_block = stripped, bool(not stripped)
                if stripped and (self._emitted or any(content)):  # text on both sides: a space
                    self._buffer = " " + stripped
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start >= 0:
                content.append(self._buffer[:start].rstrip())
                self._buffer = self._buffer[start + len(TOOL_CALL_OPEN):]
                self._in_call = True
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
        self._emitted = self._emitted or bool(text)
        return text, calls


def _safe_length(text: str) -> int:
    """Length of the prefix of `text` that can be emitted as content now: it holds back a
    tail that could still become the opening tag and the whitespace before such a tail."""
    end = len(text)
    for n in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-n:]):
            end -= n
            break
    return len(text[:end].rstrip())
