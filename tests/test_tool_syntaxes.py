"""Auto-mode tool calls in every family's syntax (issue 21): a call is constrained from its
first characters, the turn ends when it closes, repeats merge, a valid call survives broken
text after it, and JSON grammars take the model's own (bounded) whitespace.

Tiny random models are forced into each opening (the `_Opening` helper of test_chat writes
the opening, then the auto-mode grammar, which saw the same tokens, takes over): whatever
the random model samples afterwards, the call must come back valid.
"""

from __future__ import annotations

import functools
import json
import threading

import jsonschema
import pytest

from eft_integrations import EFTDecoder
from eft_integrations import chat as core
from eft_integrations.chat import prepare_chat
from eft_integrations.constraints import GrammarConstraint
from eft_integrations.errors import EFTRequestError
from eft_integrations.tool_calls import ToolCallParser, json_grammar, normalize_tools
from eft_integrations.tool_formats import ToolFormat, tool_format

from .chat_family import TOOLS_TEMPLATE, chat_decoder
from .test_chat import ADD, NO_ARGS, TOOLS, USER, WEATHER, _Opening, _scripted
from .tiny_models import build_tokenizer, llama

_HERMES_HINT = 'Call a tool as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>\n'
PYTHON_TAG_TEMPLATE = TOOLS_TEMPLATE.replace(
    _HERMES_HINT, 'Call a tool as <|python_tag|>{"name": ..., "parameters": ...}\n'
)
MISTRAL_TEMPLATE = TOOLS_TEMPLATE.replace(
    _HERMES_HINT, 'Call tools as [TOOL_CALLS][{"name": ..., "arguments": ...}]\n'
)


@functools.lru_cache(maxsize=4)
def _decoder(template: str, special: str | None = None) -> EFTDecoder:
    """A tiny random model with `template`; `special`: a marker the tokenizer has as an
    added special token (as Mistral's has `[TOOL_CALLS]`)."""
    tokenizer = build_tokenizer()
    if special is not None:
        tokenizer.add_tokens([special], special_tokens=True)
    model = llama(len(tokenizer), seed=31, window=4096)
    return EFTDecoder(base=model, behaviors={}, tokenizer=tokenizer, chat_template=template)


def _validate(call) -> None:
    tool = {t["function"]["name"]: t for t in TOOLS}[call.name]
    jsonschema.validate(call.arguments, tool["function"]["parameters"])


def _forced_into(decoder, opening: str, seed: int, budget: int = 200) -> core.ChatResult:
    """The turn when the model writes `opening` and then samples freely (temperature 1)
    under the auto-mode grammar."""
    request = prepare_chat(decoder, USER, tools=TOOLS, tool_choice="auto")
    ids = decoder.tokenizer(opening, add_special_tokens=False)["input_ids"]
    constraint = _Opening(request.constraint(decoder, budget=budget), ids)
    generated = decoder.generate(
        request.prompt, constraints=[constraint], temperature=1.0, seed=seed, max_new_tokens=budget
    )
    result = core._result(decoder, request, generated)
    # the turn ended when the call closed: by the grammar, not the budget
    assert generated.finish_reason == "stop", generated
    return result


OPENINGS = {
    "hermes tag": ("tools", "Let me see. <tool_call>\n", "Let me see."),
    "bare JSON, start of the answer": ("tools", '{"name": ', ""),
    "bare JSON, start of a line": (
        "tools",
        'I will call a tool.\n{"name": "',
        "I will call a tool.",
    ),
    "bare JSON in a fence": ("tools", '```json\n{\n  "name": "', ""),
    "bare list": ("tools", '[{"name": "', ""),
    "llama parameters": ("tools", '{"name": "add", "parameters": {', ""),
    "llama python tag": ("python_tag", "<|python_tag|>", ""),
    "mistral": ("mistral", "[TOOL_CALLS]", ""),
}


def _opening_decoder(kind: str) -> EFTDecoder:
    if kind == "tools":
        return chat_decoder(tools_template=True)
    return _decoder(PYTHON_TAG_TEMPLATE if kind == "python_tag" else MISTRAL_TEMPLATE)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(OPENINGS))
def test_each_syntax_starts_a_constrained_call(name, seed):
    kind, opening, content = OPENINGS[name]
    result = _forced_into(_opening_decoder(kind), opening, seed)
    assert result.tool_calls and not result.invalid_tool_calls, result
    for call in result.tool_calls:
        _validate(call)
    assert result.finish_reason == "tool_calls"
    assert result.content == content


def test_a_marker_that_is_a_special_token_opens_a_call():
    # Mistral's tokenizer has [TOOL_CALLS] as a special token: the grammar takes the token,
    # and the list after it (the marker decodes to nothing) is read as the calls
    decoder = _decoder(MISTRAL_TEMPLATE, special="[TOOL_CALLS]")
    (marker,) = decoder.tokenizer("[TOOL_CALLS]", add_special_tokens=False)["input_ids"]
    request = prepare_chat(decoder, USER, tools=TOOLS)
    constraint = _Opening(request.constraint(decoder, budget=200), [marker])
    generated = decoder.generate(
        request.prompt, constraints=[constraint], temperature=1.0, seed=3, max_new_tokens=200
    )
    result = core._result(decoder, request, generated)
    assert result.tool_calls and not result.invalid_tool_calls, result
    assert generated.finish_reason == "stop"


def test_a_special_marker_opens_a_call_only_where_the_answer_starts():
    # the marker decodes to nothing: after free text it would leave the call's JSON in the
    # content, so the grammar takes it first or not at all
    decoder = _decoder(MISTRAL_TEMPLATE, special="[TOOL_CALLS]")
    (marker,) = decoder.tokenizer("[TOOL_CALLS]", add_special_tokens=False)["input_ids"]
    request = prepare_chat(decoder, USER, tools=TOOLS)
    first = request.constraint(decoder, budget=200)
    assert bool(first.allowed_mask(decoder.vocab_size)[marker])
    after_text = request.constraint(decoder, budget=200)
    for token in decoder.tokenizer("Sure.", add_special_tokens=False)["input_ids"]:
        after_text.advance(token)
    assert not bool(after_text.allowed_mask(decoder.vocab_size)[marker])


@pytest.mark.parametrize(
    "written",
    [
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]',
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}',
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
    ],
)
def test_where_calls_may_not_be_read_no_syntax_yields_one(written):
    # tool_choice="none" in a conversation with tool markup: the markup is dropped, no call
    parser = ToolCallParser(TOOLS, read_calls=False, bare_calls=True)
    text, found = parser.feed(written)
    tail, more = parser.finish()
    assert found + more == [] and "name" not in text + tail


def test_the_format_is_read_from_the_template():
    assert tool_format(chat_decoder().tokenizer, TOOLS_TEMPLATE) == ToolFormat()
    assert tool_format(chat_decoder().tokenizer, PYTHON_TAG_TEMPLATE).python_tag
    assert tool_format(chat_decoder().tokenizer, MISTRAL_TEMPLATE).mistral
    # a marker that is only a token of the tokenizer counts as well
    special = _decoder(TOOLS_TEMPLATE, special="[TOOL_CALLS]")
    assert tool_format(special.tokenizer).mistral


def _allowed_after(decoder, text: str) -> list[str]:
    """The texts of the tokens the auto-mode grammar allows after the model wrote `text`."""
    request = prepare_chat(decoder, USER, tools=[ADD, NO_ARGS])
    constraint = request.constraint(decoder, budget=400)
    for token in decoder.tokenizer(text, add_special_tokens=False)["input_ids"]:
        assert bool(constraint.allowed_mask(decoder.vocab_size)[token]), (text, token)
        constraint.advance(token)
    allowed = constraint.allowed_mask(decoder.vocab_size).nonzero().flatten().tolist()
    return [decoder.tokenizer.decode([t]) for t in allowed]


@pytest.mark.parametrize(
    "opening",
    [
        '{"name": "add", "arguments": {"a": ',
        'Sure.\n{"name": "add", "parameters": {"a": ',
        '<tool_call>\n{"name": "add", "arguments": {"a": ',
    ],
)
def test_once_a_call_opens_its_arguments_follow_the_schema(opening):
    # "a" is an integer: a digit, a sign or a blank may come, never a letter or a quote
    texts = _allowed_after(chat_decoder(tools_template=True), opening)
    assert texts and all(t and (t.strip() == "" or t.strip()[0] in "-0123456789") for t in texts)
    assert any(t.strip()[:1].isdigit() for t in texts)


def test_a_bound_tools_name_is_all_a_bare_call_may_name():
    texts = _allowed_after(chat_decoder(tools_template=True), '{"name": "')
    # the first token of "add" or "ping", nothing else (no other tool, no free text)
    assert texts and all("add".startswith(t) or "ping".startswith(t) for t in texts), texts


def test_free_text_stays_free():
    # text that opens no call is the model's: letters, digits, braces mid-line
    texts = _allowed_after(chat_decoder(tools_template=True), "The answer is {not a call}")
    assert len(texts) > 100


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "written",
    [
        # the 0.5B model's loop: the right call, then more calls until the budget ends
        '{"name": "add", "arguments": {"a": 7, "b": 5}}\n{"name": "ping", "arguments": {}}\n'
        '{"name": "add", "arguments": {"a": 7, "b": 5}}\n{"name": "ping", "argu',
        '{"name": "add", "arguments": {"a": 7, "b": 5}}\n{"name": "add", "arguments": {"a',
        '{"name": "add", "arguments": {"a": 7, "b": 5}}}}}}]]',
        '<tool_call>\n{"name": "add", "arguments": {"a": 7, "b": 5}}\n</tool_call>\n{"na',
    ],
)
def test_a_call_followed_by_degenerate_text_is_returned_as_the_call(written):
    decoder = chat_decoder(tools_template=True)
    request = prepare_chat(decoder, USER, tools=TOOLS)
    result = _scripted(decoder, request, written)
    assert [(c.name, c.arguments) for c in result.tool_calls][:1] == [("add", {"a": 7, "b": 5})]
    assert not result.invalid_tool_calls and result.finish_reason == "tool_calls"
    assert "{" not in result.content


@pytest.mark.parametrize(
    "written",
    [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"b": 2, "a": 1}}\n</tool_call>',
        '{"name": "add", "arguments": {"a": 1, "b": 2}}\n{"name": "add", "arguments": {"a": 1, '
        '"b": 2}}',
        '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "parameters": '
        '{"a": 1, "b": 2}}]',
    ],
)
def test_repeated_calls_merge(written):
    decoder = chat_decoder(tools_template=True)
    request = prepare_chat(decoder, USER, tools=TOOLS)
    result = _scripted(decoder, request, written)
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("add", {"a": 1, "b": 2})]


def test_different_parallel_calls_stay_apart():
    written = (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
    )
    parser = ToolCallParser(TOOLS, bare_calls=True)
    _, calls = parser.feed(written)
    calls += parser.finish()[1]
    assert [c.arguments for c in calls] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]


@pytest.mark.parametrize(
    ("written", "content", "calls"),
    [
        (
            'Let me add.\n```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```',
            "Let me add.",
            1,
        ),
        ("Braces {in text} and\n{a set}\nstay.", "Braces {in text} and\n{a set}\nstay.", 0),
        ('Here:\n{"name": "Ada", "born": 1815}', 'Here:\n{"name": "Ada", "born": 1815}', 0),
        ('Here:\n```json\n{"name": "Ada"}\n```', 'Here:\n```json\n{"name": "Ada"}\n```', 0),
        ('[TOOL_CALLS][{"name": "ping", "arguments": {}}]', "", 1),
        ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "", 1),
    ],
)
def test_the_parser_reads_every_syntax_token_by_token(written, content, calls):
    whole = ToolCallParser(TOOLS, bare_calls=True)
    text, found = whole.feed(written)
    tail, more = whole.finish()
    assert (text + tail, len(found + more)) == (content, calls)
    streamed = ToolCallParser(TOOLS, bare_calls=True)
    pieces, streamed_calls = [], []
    for character in written:
        piece, new = streamed.feed(character)
        pieces.append(piece)
        streamed_calls += new
    piece, new = streamed.finish()
    assert ("".join(pieces) + piece, len(streamed_calls + new)) == (content, calls)


# ------------------------------------------------------------------------------ whitespace


def _json_constraint(decoder, schema=None) -> GrammarConstraint:
    return GrammarConstraint.from_lark(
        decoder.tokenizer, json_grammar(schema), eos_token_ids=sorted(decoder.eos_token_ids)
    )


def _accepts(decoder, constraint: GrammarConstraint, text: str) -> bool:
    for token in decoder.tokenizer(text, add_special_tokens=False)["input_ids"]:
        if not bool(constraint.allowed_mask(decoder.vocab_size)[token]):
            return False
        constraint.advance(token)
    return constraint.is_accepting


@pytest.mark.parametrize(
    ("parallel", "written", "accepted"),
    [
        (False, 'Sure.\n{"name": "add", "arguments": {"a": 1, "b": 2}}', True),
        (False, 'Sure.\n[{"name": "add", "arguments": {"a": 1, "b": 2}}]', False),
        (True, 'Sure.\n[{"name": "add", "arguments": {"a": 1, "b": 2}}]', True),
    ],
)
def test_without_parallel_calls_no_list_of_calls_gets_through(parallel, written, accepted):
    decoder = chat_decoder()
    request = prepare_chat(decoder, USER, tools=TOOLS, parallel_tool_calls=parallel)
    assert _accepts(decoder, request.constraint(decoder, budget=400), written) is accepted


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ('{"a": 1, "b": [1, 2]}', True),
        ('{"a":1,"b":[1,2]}', True),
        (json.dumps({"setup": "x", "punchline": "y"}, indent=2), True),
        (json.dumps({"a": {"b": {"c": [1, 2]}}}, indent=4), True),
        ('{\n\t"a": 1\n}', True),
        ('{\n\n  "a": 1}', False),  # two line breaks in one gap
        ('{"a":' + " " * 3 + "1}", False),  # a run of blanks
        ("{\n" + " " * 33 + '"a": 1}', False),  # deeper than the indentation bound
    ],
)
def test_json_grammars_take_bounded_flexible_whitespace(text, accepted):
    decoder = chat_decoder()
    assert _accepts(decoder, _json_constraint(decoder), text) is accepted


def test_a_model_cannot_loop_on_newlines():
    # after `{` and one line break only the indentation (up to the bound) or the content
    # may come: the newline token is refused until something else is written
    decoder = chat_decoder()
    constraint = _json_constraint(decoder)
    assert _accepts(decoder, constraint, "{\n") is False  # not complete, but consumed
    newline = decoder.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    assert not bool(constraint.allowed_mask(decoder.vocab_size)[newline[0]])


def test_forced_and_tool_arguments_take_the_models_layout():
    decoder = chat_decoder(tools_template=True)
    request = prepare_chat(decoder, USER, tools=[ADD], tool_choice="add")
    constraint = request.constraint(decoder, budget=200)
    text = '<tool_call>\n{\n  "name": "add",\n  "arguments": {\n    "a": 1,\n    "b": 2\n  }\n}'
    assert _accepts(decoder, constraint, text)


# ------------------------------------------------------------------------------ isolation


def test_a_bad_request_fails_alone_beside_auto_mode_calls():
    # fault injection on the new path: a tool whose schema no call can satisfy, sent while
    # auto-mode turns decode, fails with an error naming it; the others give their solo output
    decoder = chat_decoder(tools_template=True)
    broken = {
        "type": "function",
        "function": {
            "name": "broken",
            "parameters": {
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}},
                "required": ["n"],
            },
        },
    }
    options = {"temperature": 1.0, "max_new_tokens": 48}
    solo = [core.chat(decoder, USER, tools=TOOLS, seed=s, **options) for s in range(3)]
    results: dict[int, object] = {}

    def run(index: int) -> None:
        try:
            tools = [*TOOLS, broken] if index == 3 else TOOLS
            results[index] = core.chat(decoder, USER, tools=tools, seed=index, **options)
        except Exception as error:  # recorded: the test asserts on it
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(results[3], EFTRequestError) and "broken" in str(results[3])
    for index in range(3):
        assert results[index].content == solo[index].content
        assert [c.arguments for c in results[index].tool_calls] == [
            c.arguments for c in solo[index].tool_calls
        ]


def test_auto_grammar_compiles_for_every_tool_shape():
    # names that need escaping, no parameters, nested $defs: the hand-written call object
    # quotes each name as JSON and embeds each schema
    odd = {"name": 'we"ird\\name', "parameters": {"type": "object", "properties": {}}}
    tools = normalize_tools([WEATHER, ADD, NO_ARGS, odd])
    decoder = chat_decoder(tools_template=True)
    request = prepare_chat(decoder, USER, tools=tools)
    constraint = request.constraint(decoder, budget=200)
    assert _accepts(decoder, constraint, '{"name": "we\\"ird\\\\name", "arguments": {}}')
    assert constraint.is_finished()
