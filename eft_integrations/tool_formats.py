"""The syntaxes in which open model families write tool calls, and which ones a model uses.

A model trained on tools writes a call in its template's syntax, and many also write one as a
bare JSON object (Qwen 2.5's coder models, Llama 3.x with custom tools):

    <tool_call>{"name": "add", "arguments": {...}}</tool_call>     Hermes, Qwen, SmolLM3
    {"name": "add", "arguments" | "parameters": {...}}               bare JSON (Llama 3.x)
    [{"name": "add", "arguments": {...}}, ...]                       a bare list of calls
    <|python_tag|>{"name": "add", "parameters": {...}}               Llama 3.1+ (ipython)
    [TOOL_CALLS][{"name": "add", "arguments": {...}}, ...]           Mistral

A bare call counts where it starts the answer or a line (llama.cpp's grammar triggers and
vLLM's JSON tool parsers read it there too). `ToolFormat` says which prefixed syntaxes a
model's template uses, read from the template text and the tokenizer's added tokens; the
auto-mode grammar (`tool_grammars.py`) constrains a call from its first characters in each of
them, and the parser (`tool_calls.ToolCallParser`) reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ARGUMENT_KEYS",
    "JSON_WHITESPACE",
    "MISTRAL_CALLS",
    "PYTHON_TAG",
    "ToolFormat",
    "arming_pattern",
    "bare_call_start",
    "tool_format",
]

MISTRAL_CALLS = "[TOOL_CALLS]"
"""Mistral's marker: a JSON list of calls follows."""
PYTHON_TAG = "<|python_tag|>"
"""Llama 3.1+'s marker: a JSON call follows (for custom tools, with "parameters")."""
ARGUMENT_KEYS = ("arguments", "parameters")
"""The key of a call's arguments: Hermes/Qwen/Mistral write "arguments", Llama 3.x
"parameters"; the grammar takes the one the model starts."""

JSON_WHITESPACE = r"[ \t]{1,2}|\r?\n[ \t]{0,32}"
"""Whitespace the JSON grammars allow between tokens: one or two blanks, or one line break and
an indentation of at most 32 (as json.dumps(indent=...) and models trained on it write), so a
model writes its own layout but cannot loop on blanks or newlines inside an object."""

_BLANKS = r"(?:[ \t]{1,2}|\r?\n[ \t]{0,32})?"
_BARE_START = re.compile(r"(?:^|\n)[ \t]*(\[" + _BLANKS + r")?\{" + _BLANKS + r'"name"')


@dataclass(frozen=True)
class ToolFormat:
    """Which call syntaxes a model writes (bare JSON calls are always read in auto mode).

    `tagged`: `<tool_call>` blocks (the package's own format, also the fallback prompt's);
    `python_tag`: Llama's `<|python_tag|>` prefix; `mistral`: Mistral's `[TOOL_CALLS]` list."""

    tagged: bool = True
    python_tag: bool = False
    mistral: bool = False

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The markers after which calls follow as JSON (no closing tag)."""
        return tuple(
            marker
            for marker, used in ((PYTHON_TAG, self.python_tag), (MISTRAL_CALLS, self.mistral))
            if used
        )


def tool_format(tokenizer: Any, template: str | None = None) -> ToolFormat:
    """The syntaxes of a model whose chat template is `template` (default: the tokenizer's):
    a marker the template writes, or that the tokenizer has as an added token, is used. The
    Hermes tags stay on for every model: the fallback prompt asks for them, and a
    template that names no other syntax gets them."""
    if template is None:
        template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = "\n".join(str(t) for t in template.values())
    added = set(getattr(tokenizer, "get_added_vocab", dict)())
    uses = {m: m in template or m in added for m in (PYTHON_TAG, MISTRAL_CALLS)}
    return ToolFormat(tagged=True, python_tag=uses[PYTHON_TAG], mistral=uses[MISTRAL_CALLS])


def bare_call_start(text: str) -> re.Match[str] | None:
    """Where a bare JSON call (or list of calls) starts in `text`: at its start or a line's,
    `{` (or `[{`) and then the key "name"."""
    return _BARE_START.search(text)


def arming_pattern(fmt: ToolFormat) -> str:
    """A regex that matches decoded text once a call has opened in one of `fmt`'s syntaxes
    (closing mode waits for it: free text before a call is not cut short)."""
    markers = [re.escape(m) for m in ("<tool_call>", *fmt.prefixes)]
    return "|".join([*markers, _BARE_START.pattern])
