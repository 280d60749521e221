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

import functools
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import EFTRequestError
from .tool_formats import MISTRAL_CALLS, PYTHON_TAG
from .tool_grammars import (
    DEFAULT_MAX_STRING_LENGTH,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    bounded_schema,
    json_grammar,
    tool_call_grammar,
    tool_call_or_json_grammar,
)

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

TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"


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
    return _calls_of(values, tools)


def _calls_of(values: list[Any], tools: Mapping[str, Mapping[str, Any]]) -> list[ToolCall] | None:
    """The calls that decoded JSON `values` are, each naming a bound tool with arguments that
    validate against its schema; None when any is not such a call."""
    calls = []
    for value in values:
        if not isinstance(value, dict) or not {"name"} < set(value) <= _BARE_KEYS:
            return None
        call = _payload_call(value, tools, json.dumps(value))
        if not isinstance(call, ToolCall):
            return None
        if not schema_accepts(tools[call.name]["function"]["parameters"], call.arguments):
            return None
        calls.append(call)
    return calls


_BARE_KEYS = {"name", "arguments", "parameters"}
_FENCED = re.compile(r"\s*```(?:json)?[ \t]*\n(.*?)(?:```\s*)?", re.DOTALL | re.IGNORECASE)
# a bare call where a line starts (`^` stands for a line start the parser tracks): `{` (or
# `[{`) and the key "name"; group `json` is where its JSON starts, `fence` a ```json line
_BARE_OPENING = re.compile(
    r'(?:^|\n)(?P<fence>[ \t]*```(?:json)?[ \t]*\r?\n)?[ \t]*(?P<json>(?:\[\s*)?\{\s*"name")',
    re.IGNORECASE,
)
# what may still become one: `regex` (a dependency of transformers) matches partially
_BARE_PREFIX = r'[ \t]*(?:```(?:json)?[ \t]*\r?\n)?[ \t]*(?:\[\s*)?\{\s*"name"'


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
_PREFIXES = (PYTHON_TAG, MISTRAL_CALLS)
"""Markers after which calls follow as JSON, with no closing tag (Llama, Mistral)."""


class ToolCallParser:
    """Splits model output, fed in pieces, into content and tool calls; the package's markup
    (`<tool_call>`, `<tool_response>` and their closing tags) never reaches the content.

    - a `<tool_call>` block becomes a call (`read_calls=False`: it is dropped, for turns
      where no call may be made);
    - JSON after `<|python_tag|>` or `[TOOL_CALLS]` (Llama's and Mistral's markers) is read
      as calls (a call or a list of them);
    - a `<tool_response>` block the model writes keeps its text without the tags, unless it
      repeats a tool result of `echoes`: then it is dropped, or, where the answer has no
      words of its own (nor calls), it is the answer; stray closing tags are dropped;
    - `bare_calls=True`: a JSON object (or list of them) that starts the answer or a line
      (after a ```json fence line, if any) and names a bound tool with schema-valid arguments
      is read as calls; text that may still become one is held back until it is decided.
    A call identical to one read before in the turn (name and arguments) is merged into it.
    JSON left unreadable after a call (the model ran on into the budget) is dropped: the
    call stands.

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
        self._json = False  # the buffer starts with JSON calls (bare or after a marker)
        self._skipped = ""  # the text between the content and a bare call's JSON
        self._fence_after = False  # a ``` may follow the calls just read
        self._after_block = False
        self._line_start = True  # the buffer starts a line (or the answer)
        self._emitted = False  # some content was returned already
        self._worded = False  # some of it was more than blanks
        self._echo: str | None = None  # a repeated tool result, the answer if nothing else is
        self._read: set[str] = set()  # the calls read so far (merging repeats)
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
            if self._json:
                if not self._read_json(final, calls, content):
                    break
                continue
            if self._after_block:
                stripped = self._buffer.lstrip()
                if not stripped and not final:
                    break  # only whitespace so far: it may still precede another block
                if self._fence_after:  # the ``` that closes a fenced bare call: dropped
                    if "```".startswith(stripped) and not final:
                        break
                    self._fence_after = False
                    if stripped.startswith("```"):
                        stripped = stripped[3:].lstrip()
                        if not stripped and not final:
                            self._buffer = ""
                            break
                self._buffer, self._after_block = stripped, bool(not stripped)
                self._line_start = True
                if stripped and (self._emitted or any(content)):  # text on both sides: a space
                    self._buffer = " " + stripped
            start, tag = _first_tag(self._buffer)
            bare = self._bare_opening()
            if bare is not None and (tag is None or bare[1] <= start):
                before = self._buffer[: bare[0]].rstrip()
                self._emit(content, before)
                # the line break (and fence line) before it: content again if it is no call
                self._skipped = self._buffer[len(before) : bare[1]]
                self._buffer, self._json = self._buffer[bare[1] :], True
                continue
            if tag is not None:
                self._emit(content, self._buffer[:start].rstrip())
                self._buffer = self._buffer[start + len(tag) :]
                if tag in _BLOCKS:
                    self._block = tag
                elif tag in _PREFIXES:
                    self._json, self._skipped = True, ""
                else:  # a closing tag with no block open: dropped
                    self._after_block = True
                continue
            if final:
                if not self._cut_call_after_calls(self._buffer):
                    self._emit(content, self._buffer)
                self._buffer = ""
                break
            held = self._buffer[: self._undecided()]
            safe = min(_safe_length(self._buffer), len(held.rstrip()))
            self._emit(content, self._buffer[:safe])
            self._buffer = self._buffer[safe:]
            break
        text = "".join(content)
        self._worded = self._worded or bool(text.strip())
        if final and self._echo and not (self._worded or self.calls):
            text, self._worded = self._echo, True
        self._emitted = self._emitted or bool(text)
        return text, calls

    def _emit(self, content: list[str], text: str) -> None:
        """Add `text` to the content; remember whether the buffer now starts a line."""
        if text:
            content.append(text)
            self._line_start = text.endswith("\n")

    def _cut_call_after_calls(self, text: str) -> bool:
        """Whether `text`, the answer's last, is the start of one more call cut by the budget
        after calls were read (dropped: the calls stand)."""
        if not (self._bare and any(isinstance(c, ToolCall) for c in self.calls)):
            return False
        import regex

        return bool(text.strip()) and bool(
            regex.fullmatch(_BARE_PREFIX, text.lstrip(), partial=True)
        )

    def _bare_opening(self) -> tuple[int, int] | None:
        """Where the first bare call in the buffer starts: (end of the content before it, with
        a ```json fence line left out; start of its JSON); None when there is none."""
        if not (self._bare and self._read_calls):
            return None
        # a sentinel line start stands for the buffer's own, where it starts a line
        text = ("\n" if self._line_start else "x") + self._buffer
        match = _BARE_OPENING.search(text)
        if match is None:
            return None
        return max(match.start() - 1 + (text[match.start()] == "\n"), 0), match.start("json") - 1

    def _undecided(self) -> int:
        """Where the text that may still become a bare call (or its ```json fence) starts:
        it is held back until more text decides it."""
        if not (self._bare and self._read_calls):
            return len(self._buffer)
        import regex

        starts = [i + 1 for i, c in enumerate(self._buffer) if c == "\n"]
        starts = ([0] if self._line_start else []) + starts
        for start in starts[-4:]:  # a fence line, `[`, `{` and the key's line at most
            if regex.fullmatch(_BARE_PREFIX, self._buffer[start:], partial=True):
                return start
        return len(self._buffer)

    def _read_json(
        self, final: bool, calls: list[ToolCall | InvalidToolCall], content: list[str]
    ) -> bool:
        """Read the JSON calls at the start of the buffer once complete (False: wait).
        JSON that is not calls stays content; a closing ``` fence after calls is dropped."""
        text = self._buffer.lstrip()
        try:
            value, end = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError:
            if not final:
                return False
            self._buffer, self._json = "", False
            if any(isinstance(c, ToolCall) for c in self.calls):
                return True  # the model ran on after its call: the call stands
            name = _guess_name(text)
            if name in self._tools and not self._read_calls:
                return True  # markup of a call where none may be read: dropped, as a block's
            if name in self._tools:  # a call cut short or broken: reported, not content
                self._add(calls, InvalidToolCall(None, name, text, "not valid JSON"))
            else:
                self._emit(content, self._skipped + text)
            return True
        self._json = False
        found = _calls_of(value if isinstance(value, list) else [value], self._tools)
        if found is None:  # JSON, but not calls: the model's content, as it was written
            self._emit(content, self._skipped + text[:end])
            self._buffer = text[end:]
            return True
        for call in found if self._read_calls else ():  # else dropped, as a block's body
            self._add(calls, call)
        self._buffer = text[end:]
        self._after_block = self._fence_after = True
        return True

    def _add(
        self, calls: list[ToolCall | InvalidToolCall], call: ToolCall | InvalidToolCall
    ) -> None:
        """Add a call unless an identical one was read before in this turn."""
        if isinstance(call, ToolCall):
            key = json.dumps([call.name, call.arguments], sort_keys=True)
            if key in self._read:
                return
            self._read.add(key)
        calls.append(call)
        self.calls.append(call)

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
                self._add(calls, parse_call(body, self._tools))
        elif body.strip() in self._echoes:
            self._echo = body.strip()
        else:
            self._buffer = body.strip() + self._buffer  # the model's own words stay
        self._block, self._after_block = None, True
        return bool(self._buffer) or end >= 0


def _first_tag(text: str) -> tuple[int, str | None]:
    """Position and text of the first markup tag or call marker in `text` ((-1, None) if
    none)."""
    found = [(text.find(tag), tag) for tag in (*_MARKUP, *_PREFIXES) if tag in text]
    return min(found) if found else (-1, None)


def _safe_length(text: str) -> int:
    """Length of the prefix of `text` that can be emitted as content now: it holds back a
    tail that could still become a markup tag and the whitespace before such a tail."""
    end = len(text)
    tags = (*_MARKUP, *_PREFIXES)
    longest = max(len(tag) for tag in tags)
    for n in range(min(longest - 1, len(text)), 0, -1):
        if any(tag.startswith(text[-n:]) for tag in tags):
            end -= n
            break
    return len(text[:end].rstrip())
