"""llguidance grammars for tool calls and JSON answers (Lark with embedded JSON schemas).

- `tool_call_grammar(forced=True)`: the answer is a call (or several) in `<tool_call>` tags.
- `tool_call_grammar(forced=False)` (auto mode): free text, or text and then a call that is
  constrained from its first characters, in every syntax of `tool_formats.ToolFormat`: the
  `<tool_call>` tag, a bare JSON call (or list) at the start of the answer or of a line, and
  the prefixed syntaxes the model's template uses (`<|python_tag|>`, `[TOOL_CALLS]`). Each
  trigger is a lazy lexeme (it ends where the trigger text first appears, as llguidance's
  structural tags do); free text is text that holds no trigger. Once a call (or the list of
  parallel calls, where the syntax has one) closes, the grammar ends: the turn is over.
- `tool_call_or_json_grammar`: calls or one JSON value (an agent's structured last turn).
- `json_grammar`: one JSON value of a schema, or any object.

JSON is written with bounded flexible whitespace (`tool_formats.JSON_WHITESPACE`): the layout
a model was trained to write (a newline and indentation after `{`) stays open to it, which a
compact-only grammar forbids (it bends the model's distribution: `{` then `}` wins), and each
gap holds at most one line break, so a model cannot loop on blanks. Parallel calls in one
turn are capped at `MAX_CALLS_PER_TURN`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import EFTRequestError
from .tool_formats import ARGUMENT_KEYS, JSON_WHITESPACE, MISTRAL_CALLS, PYTHON_TAG, ToolFormat

__all__ = [
    "DEFAULT_MAX_STRING_LENGTH",
    "MAX_CALLS_PER_TURN",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "bounded_schema",
    "json_grammar",
    "tool_call_grammar",
    "tool_call_or_json_grammar",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

DEFAULT_MAX_STRING_LENGTH = 256
"""Strings a schema leaves unbounded are capped at this many characters in constrained output,
so a forced call or JSON answer always closes within a finite token budget."""

MAX_CALLS_PER_TURN = 8
"""The most calls one turn may hold: a model repeating its call stops here, not at the budget
(identical repeats are merged by the parser)."""

_JSON_LAYOUT = {"whitespace_flexible": True, "whitespace_pattern": JSON_WHITESPACE}
# the same gaps between the hand-written parts of a call (name, arguments key, tags)
_WS_RULES = ["ws: WS", f"WS: /{JSON_WHITESPACE}/"]
# inside trigger regexes: unbounded, as bounded repetition inside "text that contains no
# trigger" multiplies the lexer's states (llguidance gives up); the JSON after is bounded
_GAP = r"[ \t\r\n]*"


# ------------------------------------------------------------------------------ schemas

_ANY_OBJECT = {"type": "object", "additionalProperties": True}
"""json_object without a schema: any keys (bounding would otherwise close it to `{}`)."""

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


def _json_rule(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_LAYOUT})


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


def _literal(text: str, markup_tokens: Mapping[str, int] | None, spelled: bool = True) -> str:
    """Lark for markup `text`: the tokenizer's added token for it (the way a model trained on
    the markup writes it) or, when `spelled`, the text itself. llguidance treats every added
    token as a special token, which a quoted literal never matches, hence `<[id]>`."""
    quoted = json.dumps(text)
    token = (markup_tokens or {}).get(text)
    if token is None:
        return quoted
    return f"(<[{token}]> | {quoted})" if spelled else f"<[{token}]>"


def _repeated(item: str, count: int) -> str:
    """Lark for `item` zero to `count` times (nothing when `count` is 0)."""
    return f"({item}){{0,{count}}}" if count > 0 else ""


# ------------------------------------------------------------------------------ tagged calls


def _call_rules(
    tools: Sequence[Mapping[str, Any]],
    parallel: bool,
    max_string_length: int | None,
    markup_tokens: Mapping[str, int] | None,
    spelled: bool = True,
) -> list[str]:
    """Rules `calls` (after an opening tag: a call, its closing tag, and when `parallel` more
    tagged calls, `MAX_CALLS_PER_TURN` in all), `call` (the JSON), `open` and `close` (the
    tags). The last call's closing tag is optional, as for the parser: a call is complete
    when its JSON is."""
    if not tools:
        raise EFTRequestError("a tool-call grammar needs at least one tool", param="tools")
    call_schemas = [_call_schema(t, max_string_length) for t in tools]
    defs: dict[str, Any] = {}
    for schema in call_schemas:
        for key in ("$defs", "definitions"):
            defs.setdefault(key, {}).update(schema.pop(key, {}))
    one_call = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
    call = _json_rule({**one_call, **{k: v for k, v in defs.items() if v}})
    count = MAX_CALLS_PER_TURN if parallel else 1
    return [
        f"calls: ws? call {_repeated('ws? close ws? open ws? call', count - 1)} (ws? close)?",
        f"call: {call}",
        f"open: {_literal(TOOL_CALL_OPEN, markup_tokens, spelled)}",
        f"close: {_literal(TOOL_CALL_CLOSE, markup_tokens, spelled)}",
        *_WS_RULES,
    ]


# ------------------------------------------------------------------------------ bare calls


def _object_rules(tools: Sequence[Mapping[str, Any]], max_string_length: int | None) -> list[str]:
    """Rules for a call written as a JSON object by hand, so that a trigger lexeme may take
    its first characters: `call_object` (the whole object) and `call_rest` (what follows
    `{"name"`): the tool's name, "arguments" or "parameters", the tool's arguments as its
    schema says, and `}`."""
    rules = [
        'call_object: "{" ws? "\\"name\\"" call_rest',
        'call_rest: ws? ":" ws? (' + " | ".join(f"named_{i}" for i in range(len(tools))) + ")",
        "arguments_key: " + " | ".join(json.dumps(json.dumps(k)) for k in ARGUMENT_KEYS),
    ]
    for i, tool in enumerate(tools):
        function = tool["function"]
        name = json.dumps(json.dumps(function["name"]))
        parameters = bounded_schema(function["parameters"], max_string_length)
        rules += [
            f'named_{i}: {name} ws? "," ws? arguments_key ws? ":" ws? arguments_{i} ws? "}}"',
            f"arguments_{i}: {_json_rule(parameters)}",
        ]
    return rules


def _list_rules(count: int) -> list[str]:
    """`call_list`: a JSON list of up to `count` calls; `list_rest`: the rest of one after
    its first call's `{"name"` (which a trigger took)."""
    more = _repeated('ws? "," ws? call_object', count - 1) + ' ws? "]"'
    return [f'call_list: "[" ws? call_object {more}', f"list_rest: call_rest {more}"]


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    *,
    forced: bool,
    parallel: bool = True,
    max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
    markup_tokens: Mapping[str, int] | None = None,
    spelled_markup: bool = True,
    tool_format: ToolFormat | None = None,
) -> str:
    """llguidance Lark grammar for tool calls over normalized `tools`.

    forced=True: the answer is one call (several when `parallel`) in `<tool_call>` tags.
    forced=False: free text without a call, or free text and then a call in any syntax of
    `tool_format` (default: the tags and bare JSON), valid for its tool's schema from its
    first characters; the turn ends when the call (or the list of parallel calls) closes.
    `markup_tokens` maps markup (`<tool_call>`, `</tool_call>`, `[TOOL_CALLS]`, ...) to the
    tokenizer's added token for it, when it has one: the grammar then takes that token, or
    the text spelled out unless `spelled_markup=False` (special tokens: their text is not
    part of the decoded answer).
    """
    lines = _call_rules(tools, parallel, max_string_length, markup_tokens, spelled_markup)
    if forced:
        return "\n".join(["start: open calls", *lines]) + "\n"
    fmt = tool_format or ToolFormat()
    count = MAX_CALLS_PER_TURN if parallel else 1
    tokens = dict(markup_tokens or {})
    # the triggers: (spelled text as a regex, its added token or None, the rule after it)
    triggers = [(re.escape(TOOL_CALL_OPEN), tokens.get(TOOL_CALL_OPEN), "calls")]
    if fmt.python_tag:
        triggers.append((re.escape(PYTHON_TAG), tokens.get(PYTHON_TAG), "ws? call_object"))
    if fmt.mistral:
        triggers.append((re.escape(MISTRAL_CALLS), tokens.get(MISTRAL_CALLS), "ws? call_list"))
    bare_object = r"[ \t]*\{" + _GAP + '"name"'
    bare_list = r"[ \t]*\[" + _GAP + r"\{" + _GAP + '"name"'
    line = r"((.|\n)*\n)?"
    starts, forbidden = [], []
    for i, (text, token, after) in enumerate(triggers):
        if token is None or spelled_markup:
            lines.append(f"spelled_{i}[lazy]: /(.|\\n)*{text}/")
            starts.append(f"spelled_{i} {after}")
            forbidden.append(text)
        if token is not None:
            # a special marker decodes to nothing: after free text it would leave the call's
            # JSON in the content, so it opens a call only where the answer starts (as the
            # families that have one, Llama's python_tag and Mistral's, write it)
            marker = f"<[{token}]> {after}"
            starts.append(f"TEXT? {marker}" if spelled_markup else marker)
    lines.append(f"bare_object[lazy]: /{line}{bare_object}/")
    starts.append("bare_object call_rest")
    if parallel:
        lines.append(f"bare_list[lazy]: /{line}{bare_list}/")
        starts.append("bare_list list_rest")
    lines += _object_rules(tools, max_string_length)
    lines += _list_rules(count)
    # free text: no trigger in it, nor a bare call at its start or a line's
    anywhere = "|".join([*forbidden, r"\n" + bare_object])
    text_rule = (
        f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*({anywhere})(.|\\n)*/"
        f" & ~/({bare_object}|{bare_list})(.|\\n)*/"
        # a list of calls at a line start: calls (parallel) or not allowed at all
        f" & ~/(.|\\n)*\\n{bare_list}(.|\\n)*/"
    )
    return "\n".join([f"start: TEXT | {' | '.join(starts)}", text_rule, *lines]) + "\n"


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
    answer = bounded_schema(schema or _ANY_OBJECT, max_string_length)
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
    schema = bounded_schema(schema or _ANY_OBJECT, max_string_length)
    return f"start: {_json_rule(schema)}\n"
