"""The framework-free chat core: parsing, casting, fallback prompt, constraints, streaming."""

from __future__ import annotations

import asyncio
import functools
import json

import jsonschema
import pytest
import torch

from eft_integrations import chat as core
from eft_integrations.chat import (
    FALLBACK_TOOL_PROMPT,
    ChatResult,
    ToolCall,
    prepare_chat,
    template_supports_tools,
)
from eft_integrations.constraints import GrammarConstraint
from eft_integrations.options import StreamChunk, Usage
from eft_integrations.tool_calls import (
    InvalidToolCall,
    ToolCallParser,
    bounded_schema,
    cast_arguments,
    normalize_tools,
    tool_call_grammar,
)

from .chat_family import chat_decoder
from .event_loop import run_beside_ticker

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "detailed": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}},
                "where": {"anyOf": [{"$ref": "#/$defs/Point"}, {"type": "null"}]},
            },
            "required": ["city", "days"],
            "$defs": {
                "Point": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}},
                    "required": ["lat"],
                },
            },
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
NO_ARGS = {
    "type": "function",
    "function": {
        "name": "ping",
        "description": "Ping",
        "parameters": {"type": "object", "properties": {}},
    },
}
TOOLS = [WEATHER, ADD, NO_ARGS]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
JOKE = {
    "type": "object",
    "properties": {
        "setup": {"type": "string"},
        "punchline": {"type": "string"},
        "rating": {"type": "integer"},
    },
    "required": ["setup", "punchline"],
}


def _validate_call(call: ToolCall) -> None:
    tool = {t["function"]["name"]: t for t in TOOLS}[call.name]
    jsonschema.validate(call.arguments, tool["function"]["parameters"])


# ------------------------------------------------------------------------------ parsing


def test_parser_reads_content_calls_and_casts_arguments():
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": "3", '
        '"detailed": "true", "where": {"lat": "48"}}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2.0}"}\n</tool_call>'
    )
    parser = ToolCallParser(TOOLS)
    content, calls = parser.feed(text)
    tail, more = parser.finish()
    calls += more
    assert content + tail == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "add"]
    assert calls[0].arguments == {
        "city": "Paris",
        "days": 3,
        "detailed": True,
        "where": {"lat": 48},
    }
    assert calls[1].arguments == {"a": 1, "b": 2}  # double-encoded arguments, 2.0 -> 2
    assert len({c.id for c in calls}) == 2
    assert all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('{"name": "get_weather", "arguments": {"city": ', "not valid JSON"),
        ('{"name": "nope", "arguments": {}}', "unknown tool"),
        ('["get_weather"]', "a call is"),
        ('{"name": "add", "arguments": [1, 2]}', "must be an object"),
    ],
)
def test_unreadable_calls_become_invalid_tool_calls(body, error):
    parser = ToolCallParser(TOOLS)
    parser.feed(f"<tool_call>\n{body}\n</tool_call>")
    parser.finish()
    (call,) = parser.calls
    assert isinstance(call, InvalidToolCall)
    assert error in call.error


def test_call_cut_inside_its_closing_tag_is_complete():
    parser = ToolCallParser(TOOLS)
    parser.feed('<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_')
    _, calls = parser.finish()
    assert calls == [ToolCall(calls[0].id, "ping", {})]


def test_parser_fed_token_by_token_equals_whole_text():
    text = (
        'Sure <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
        "</tool_call> and then <tool"
    )
    whole = ToolCallParser(TOOLS)
    content = whole.feed(text)[0] + whole.finish()[0]
    pieces = ToolCallParser(TOOLS)
    streamed = "".join(pieces.feed(ch)[0] for ch in text) + pieces.finish()[0]
    assert content == streamed == "Sure and then <tool"
    assert [c.arguments for c in whole.calls] == [c.arguments for c in pieces.calls]


def test_cast_arguments_follows_the_schema():
    schema = WEATHER["function"]["parameters"]
    assert cast_arguments({"days": 2.0, "city": 7, "tags": [1, "x"]}, schema) == {
        "days": 2,
        "city": "7",
        "tags": ["1", "x"],
    }
    assert cast_arguments({"where": None}, schema) == {"where": None}
    assert cast_arguments({"days": "two"}, schema) == {"days": "two"}  # left as it is


def test_bounded_schema_only_narrows():
    bounded = bounded_schema(WEATHER["function"]["parameters"], max_string_length=16)
    assert bounded["additionalProperties"] is False
    assert bounded["properties"]["city"]["maxLength"] == 16
    assert bounded["properties"]["tags"]["items"]["maxLength"] == 8  # kept
    assert bounded["$defs"]["Point"]["additionalProperties"] is False
    assert "maxLength" not in bounded["properties"]["unit"]


def test_tool_choice_is_validated():
    decoder = chat_decoder()
    with pytest.raises(ValueError, match="tool_choice"):
        prepare_chat(decoder, USER, tools=TOOLS, tool_choice="nope")
    with pytest.raises(ValueError, match="needs tools"):
        prepare_chat(decoder, USER, tool_choice="any")
    with pytest.raises(ValueError, match="a tool is a dict"):
        normalize_tools([{"type": "function"}])


# ------------------------------------------------------------------------------ rendering

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 1 and 2"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
            }
        ],
    },
    {"role": "tool", "content": "3", "tool_call_id": "call_1", "name": "add"},
]


def test_template_without_tools_gets_the_fallback_prompt():
    decoder = chat_decoder()
    assert not template_supports_tools(decoder)
    prompt = prepare_chat(decoder, HISTORY, tools=TOOLS).prompt
    assert FALLBACK_TOOL_PROMPT.splitlines()[0] in prompt
    assert '"name": "get_weather"' in prompt
    assert prompt.index("Be brief.") < prompt.index("You can call")  # one system message
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in prompt
    assert "<tool_response>\n3\n</tool_response>" in prompt


def test_template_with_tools_renders_them_natively():
    decoder = chat_decoder(tools_template=True)
    assert template_supports_tools(decoder)
    prompt = prepare_chat(decoder, HISTORY, tools=TOOLS).prompt
    assert "# Tools" in prompt
    assert "You can call" not in prompt
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in prompt
    assert "<tool_response>\n3\n</tool_response>" in prompt


def test_tool_choice_none_renders_no_tools_and_parses_none():
    request = prepare_chat(chat_decoder(), USER, tools=TOOLS, tool_choice="none")
    assert "get_weather" not in request.prompt
    assert request.grammar is None and not request.parse_tools


# ------------------------------------------------------------------------------ constraints


def test_grammar_mask_is_a_bool_vector_over_the_vocabulary():
    decoder = chat_decoder()
    grammar = tool_call_grammar(normalize_tools(TOOLS), forced=False)
    constraint = GrammarConstraint.from_lark(
        decoder.tokenizer, grammar, eos_token_ids=sorted(decoder.eos_token_ids)
    )
    mask = constraint.allowed_mask(decoder.vocab_size)
    assert mask.dtype.is_floating_point is False and mask.shape == (decoder.vocab_size,)
    eos = min(decoder.eos_token_ids)
    assert mask[eos]  # free text may end
    for token in decoder.tokenizer("Hi <tool_call>\n", add_special_tokens=False)["input_ids"]:
        assert constraint.allowed_mask(decoder.vocab_size)[token]
        constraint.advance(token)
    allowed = constraint.allowed_mask(decoder.vocab_size).nonzero().flatten().tolist()
    # the call's JSON, or the bounded whitespace a model may write before it
    texts = [decoder.tokenizer.decode([t]) for t in allowed]
    assert allowed and all(t.startswith("{") or not t.strip() for t in texts)
    assert any(t.startswith("{") for t in texts)


@pytest.mark.parametrize("tools_template", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_forced_calls_validate_on_random_models(tools_template, seed):
    decoder = chat_decoder(tools_template)
    for choice in ("any", "get_weather", "ping"):
        result = core.chat(
            decoder,
            USER,
            tools=TOOLS,
            tool_choice=choice,
            temperature=1.0,
            seed=seed,
            max_new_tokens=160,
        )
        assert result.finish_reason == "tool_calls", result
        assert not result.invalid_tool_calls
        (call,) = result.tool_calls if choice != "any" else result.tool_calls[:1]
        if choice != "any":
            assert call.name == choice
        for call in result.tool_calls:
            _validate_call(call)


def test_a_tight_budget_still_closes_the_call():
    # the shortest call is ~70 tokens in this tiny vocabulary; closing mode starts at once
    result = core.chat(
        chat_decoder(),
        USER,
        tools=[ADD],
        tool_choice="add",
        temperature=1.0,
        seed=3,
        max_new_tokens=90,
    )
    assert result.finish_reason == "tool_calls", result
    _validate_call(result.tool_calls[0])


def test_closing_mode_lets_the_model_finish_the_number_it_is_writing():
    # after `{"a": 1` the answer closes with `}` alone (nothing may follow it: the decoder
    # stops). Closing mode starts at 5 tokens left (the closing plus the margin of 4), yet the
    # model's own digits stay allowed while a digit and the `}` still fit: `born=1900` used
    # to become `born=19` there.
    decoder = chat_decoder()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    request = prepare_chat(decoder, USER, response_format={"type": "json_schema", "schema": schema})
    written = decoder.tokenizer('{"a": 1', add_special_tokens=False)["input_ids"]
    digits = decoder.tokenizer("2", add_special_tokens=False)["input_ids"]
    close = decoder.tokenizer("}", add_special_tokens=False)["input_ids"]
    assert len(digits) == len(close) == 1
    for left, digit_allowed in ((6, True), (5, True), (3, True), (2, True), (1, False)):
        constraint = GrammarConstraint.from_lark(  # no minimum check: the case of 1 left
            decoder.tokenizer,
            request.grammar,
            eos_token_ids=request.eos_token_ids,
            vocab_size=decoder.vocab_size,
            budget=len(written) + left,
        )
        for token in written:
            constraint.advance(token)
        mask = constraint.allowed_mask(decoder.vocab_size)
        assert bool(mask[close[0]])
        assert bool(mask[digits[0]]) is digit_allowed, left


def test_closing_mode_at_the_smallest_budget_leaves_a_string_to_the_model():
    # at the smallest budget closing mode is on from the first token; where a string must hold
    # a character, the model's own letters are allowed (not only `}`: title='}')
    decoder = chat_decoder()
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    request = prepare_chat(decoder, USER, response_format={"type": "json_schema", "schema": schema})
    smallest = request.constraint(decoder, budget=400).minimum_budget()
    constraint = request.constraint(decoder, budget=smallest)
    # the shortest layout: closing mode writes no optional whitespace at this budget
    for token in decoder.tokenizer('{"title":"', add_special_tokens=False)["input_ids"]:
        assert bool(constraint.allowed_mask(decoder.vocab_size)[token])
        constraint.advance(token)
    mask = constraint.allowed_mask(decoder.vocab_size)
    letter = decoder.tokenizer("T", add_special_tokens=False)["input_ids"]
    assert len(letter) == 1 and bool(mask[letter[0]])


@pytest.mark.parametrize(
    ("options", "kind"),
    [
        ({"tools": [ADD], "tool_choice": "add"}, "a forced tool call"),
        ({"response_format": {"type": "json_schema", "schema": JOKE}}, "the structured output"),
    ],
)
def test_a_budget_below_the_shortest_answer_is_an_error_naming_it(options, kind):
    decoder = chat_decoder()
    with pytest.raises(ValueError, match=rf"{kind} needs at least (\d+) new tokens") as error:
        core.chat(decoder, USER, max_new_tokens=12, temperature=1.0, seed=0, **options)
    assert "max_new_tokens=12" in str(error.value)
    with pytest.raises(ValueError, match="needs at least"):
        next(core.stream_chat(decoder, USER, max_new_tokens=12, **options))
    needed = int(str(error.value).split("at least ")[1].split()[0])
    result = core.chat(decoder, USER, max_new_tokens=needed, temperature=1.0, seed=0, **options)
    assert result.finish_reason in ("stop", "tool_calls"), result  # complete at the minimum
    assert result.tool_calls or json.loads(result.content)


def _user_leaving(decoder, room: int, **options) -> list[dict]:
    """A user turn whose rendered prompt leaves `room` (or room + 1) tokens of the window."""
    filler = "Numbers: 1 2 3 4 5 6 7 8 9 10, and more numbers. " * 400

    def room_left(chars: int) -> int:
        messages = [{"role": "user", "content": filler[:chars] + " Add 1 and 2."}]
        prompt = prepare_chat(decoder, messages, **options).prompt
        try:
            return decoder.context_window - len(decoder.encode(prompt))
        except ValueError:  # longer than the window
            return -1

    low, high = 0, len(filler)  # room_left(low) > room >= room_left(high)
    assert room_left(high) < room < room_left(low)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if room_left(middle) > room else (low, middle)
    chars = high if room_left(high) == room else low
    assert room <= room_left(chars) <= room + 1
    return [{"role": "user", "content": filler[:chars] + " Add 1 and 2."}]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closing_plans_against_what_the_context_window_leaves(seed):
    # max_new_tokens=400, but the window leaves ~100: closing mode must plan for those 100
    decoder = chat_decoder()
    options = {"tools": [ADD], "tool_choice": "add"}
    messages = _user_leaving(decoder, 100, **options)
    result = core.chat(decoder, messages, temperature=1.0, seed=seed, max_new_tokens=400, **options)
    assert result.finish_reason == "tool_calls" and not result.invalid_tool_calls, result
    _validate_call(result.tool_calls[0])
    with pytest.raises(ValueError, match="context window of 4096 tokens leaves"):
        core.chat(decoder, _user_leaving(decoder, 30, **options), max_new_tokens=400, **options)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_response_format_constrains_the_whole_answer(seed):
    decoder = chat_decoder()
    result = core.chat(
        decoder,
        USER,
        response_format={"type": "json_schema", "schema": JOKE},
        temperature=1.0,
        seed=seed,
        max_new_tokens=160,
    )
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.content), JOKE)
    anything = core.chat(
        decoder,
        USER,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=seed,
        max_new_tokens=120,
    )
    assert isinstance(json.loads(anything.content), dict)


# ------------------------------------------------------------------------------ streaming


def _reassemble(deltas: list[core.ChatDelta]) -> tuple[str, dict[int, dict]]:
    content = "".join(d.content for d in deltas)
    calls: dict[int, dict] = {}
    for delta in deltas:
        for chunk in delta.tool_call_chunks:
            call = calls.setdefault(chunk.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or chunk.id
            call["name"] += chunk.name or ""
            call["arguments"] += chunk.arguments or ""
    return content, calls


def test_stream_chunks_reassemble_to_the_chat_result():
    decoder = chat_decoder()
    options = {
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 1.0,
        "seed": 5,
        "max_new_tokens": 160,
    }
    result = core.chat(decoder, USER, **options)
    deltas = list(core.stream_chat(decoder, USER, **options))
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == result.finish_reason == "tool_calls"
    # the stream reads the first call's prompt from the prefix cache: the same counts
    assert deltas[-1].usage.prompt_tokens == result.usage.prompt_tokens
    assert deltas[-1].usage.completion_tokens == result.usage.completion_tokens
    content, calls = _reassemble(deltas)
    assert content == result.content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.name, c.arguments) for c in result.tool_calls
    ]


def test_plain_stream_equals_plain_chat():
    decoder = chat_decoder()
    result = core.chat(decoder, USER, temperature=0.0, max_new_tokens=24)
    deltas = list(core.stream_chat(decoder, USER, temperature=0.0, max_new_tokens=24))
    assert "".join(d.content for d in deltas) == result.content
    assert deltas[-1].finish_reason == result.finish_reason
    assert result.weights == {"chat": 1.0, "safe": 1.0}


def test_chat_batch_is_one_batched_decode():
    decoder = chat_decoder()
    conversations = [USER, [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]
    weights = [{"chat": 0.0}, {"chat": 1.0}, {"chat": 2.0}]
    before = decoder.forward_calls
    results = core.chat_batch(
        decoder, conversations, weights=weights, temperature=0.0, max_new_tokens=12
    )
    forwards = decoder.forward_calls - before
    assert [r.weights["chat"] for r in results] == [0.0, 1.0, 2.0]
    assert all(isinstance(r, ChatResult) for r in results)
    # 4 distinct models, one prefill and at most 11 decode steps for the whole batch
    assert forwards <= 4 * 12
    forced = core.chat_batch(
        decoder,
        conversations,
        tools=TOOLS,
        tool_choice="ping",
        temperature=1.0,
        seed=0,
        max_new_tokens=80,
    )
    assert [r.tool_calls[0].name for r in forced] == ["ping"] * 3


async def test_async_chat_does_not_block_the_event_loop():
    decoder = chat_decoder()

    async def turns():
        result = await core.achat(
            decoder, USER, tools=TOOLS, tool_choice="ping", temperature=0.0, max_new_tokens=60
        )
        deltas = [
            d async for d in core.astream_chat(decoder, USER, temperature=0.0, max_new_tokens=30)
        ]
        return result, deltas

    probe = await run_beside_ticker(turns)
    result, deltas = probe.result
    assert result.tool_calls[0].name == "ping"
    assert deltas[-1].finish_reason is not None
    # the loop kept running meanwhile
    assert probe.ticks >= max(3, int(probe.elapsed / 0.005 * 0.2))


async def test_closing_the_async_stream_stops_decoding():
    decoder = chat_decoder()
    stream = core.astream_chat(decoder, USER, temperature=1.0, seed=0, max_new_tokens=400)
    async for _ in stream:
        break
    await stream.aclose()
    before = decoder.forward_calls
    await asyncio.sleep(0.3)
    assert decoder.forward_calls - before <= 8  # at most a step or two finish after closing


def test_the_tokenizers_own_response_parser_is_used_when_it_has_one():
    from eft_integrations import EFTDecoder

    from .chat_family import from_pretrained_args

    decoder = EFTDecoder.from_pretrained(**from_pretrained_args())  # its own tokenizer object
    tokenizer = decoder.tokenizer
    tokenizer.response_template = {
        "version": 1,
        "start_anchor": "<|assistant|>",
        "fields": {
            "content": {},
            "tool_calls": {
                "open": "<tool_call>",
                "close": "</tool_call>",
                "content": "json",
                "repeats": True,
            },
        },
    }
    parsed = []
    original = tokenizer.parse_response

    def counting_parse(*args, **kwargs):
        parsed.append(args[0])
        return original(*args, **kwargs)

    tokenizer.parse_response = counting_parse
    options = {
        "tools": [ADD],
        "tool_choice": "add",
        "temperature": 1.0,
        "seed": 0,
        "max_new_tokens": 120,
    }
    result = core.chat(decoder, USER, **options)
    assert parsed and result.finish_reason == "tool_calls"
    _validate_call(result.tool_calls[0])  # cast by the schema after the tokenizer parsed it
    deltas = list(core.stream_chat(decoder, USER, **options))
    assert len(parsed) == 2 and deltas[-1].finish_reason == "tool_calls"
    (chunk,) = deltas[-1].tool_call_chunks
    assert (chunk.name, json.loads(chunk.arguments)) == ("add", result.tool_calls[0].arguments)


class _Opening:
    """Test helper: writes `text` first (as a model deciding to call a tool would), then
    hands over to the auto-mode grammar, which has seen the same tokens."""

    def __init__(self, inner, token_ids):
        self.inner, self.pending = inner, list(token_ids)

    def allowed_mask(self, vocab_size):
        if not self.pending:
            return self.inner.allowed_mask(vocab_size)
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.pending[0]] = True
        return mask

    def advance(self, token_id):
        if self.pending:
            self.pending.pop(0)
        self.inner.advance(token_id)

    def is_finished(self):
        return self.inner.is_finished()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_mode_constrains_the_call_once_the_model_opens_one(seed):
    decoder = chat_decoder()
    request = prepare_chat(
        decoder, USER, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False
    )
    opening = decoder.tokenizer("Let me see. <tool_call>", add_special_tokens=False)["input_ids"]
    constraint = _Opening(request.constraint(decoder, budget=160), opening)
    generated = decoder.generate(
        request.prompt, constraints=[constraint], temperature=1.0, seed=seed, max_new_tokens=160
    )
    result = core._result(decoder, request, generated)
    assert result.content == "Let me see."
    assert result.finish_reason == "tool_calls" and not result.invalid_tool_calls
    _validate_call(result.tool_calls[0])


# ------------------------------------------------------------------------------ model formats


class _Scripted:
    """Test helper: the model writes exactly `token_ids`, then ends its turn."""

    def __init__(self, token_ids: list[int], eos: int) -> None:
        self.pending, self.eos = list(token_ids), eos

    def allowed_mask(self, vocab_size):
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.pending[0] if self.pending else self.eos] = True
        return mask

    def advance(self, token_id):
        if self.pending:
            self.pending.pop(0)

    def is_finished(self):
        return False


def _scripted(decoder, request, text: str) -> core.ChatResult:
    """The turn `request` gives when the model writes `text`; streaming must agree."""
    ids = decoder.tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = min(decoder.eos_token_ids)
    generated = decoder.generate(
        request.prompt,
        constraints=[_Scripted(ids, eos)],
        temperature=0.0,
        max_new_tokens=len(ids) + 2,
    )
    result = core._result(decoder, request, generated)
    builder = core._DeltaBuilder(decoder, request)
    deltas = [
        d
        for chunk in decoder.stream(
            request.prompt,
            constraint=_Scripted(ids, eos),
            temperature=0.0,
            max_new_tokens=len(ids) + 2,
        )
        for d in builder.push(chunk)
    ]
    content, calls = _reassemble(deltas)
    assert content == result.content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.name, c.arguments) for c in result.tool_calls
    ]
    return result


TOOL_HISTORY = [
    {"role": "user", "content": "Add 1 and 2"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
            }
        ],
    },
    {"role": "tool", "content": "3", "tool_call_id": "call_1", "name": "add"},
]


@pytest.mark.parametrize(
    ("tool_choice", "written", "content"),
    [
        ("auto", "<tool_response>\n3\n</tool_response>\nThe sum is 3.", "The sum is 3."),
        ("auto", "<tool_response>The sum is 3.</tool_response>", "The sum is 3."),
        ("auto", "The sum is 3.\n</tool_response>", "The sum is 3."),
        (
            "none",
            'The sum is 3. <tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 0}}\n'
            "</tool_call>",
            "The sum is 3.",
        ),
        ("none", "<tool_response>\n3\n</tool_response> The sum is 3.", "The sum is 3."),
        ("auto", "<tool_response>\n3\n</tool_response>", "3"),  # the echo is the answer
        ("none", "<tool_response>\n3\n</tool_response>\n", "3"),
    ],
)
def test_final_content_never_carries_the_packages_markup(tool_choice, written, content):
    # the fallback format shows results as <tool_response> blocks and calls as <tool_call>
    # blocks; a model that echoes them (or calls anyway under tool_choice="none") does not
    # leak them into the answer: an echoed result is dropped (it is the answer when the model
    # wrote nothing else), other text keeps its words
    decoder = chat_decoder()
    request = prepare_chat(decoder, TOOL_HISTORY, tools=[ADD], tool_choice=tool_choice)
    assert "<tool_response>\n3\n</tool_response>" in request.prompt
    result = _scripted(decoder, request, written)
    assert result.content == content
    assert not result.tool_calls and not result.invalid_tool_calls


def test_tools_and_a_response_format_allow_a_call_or_the_schema():
    # LangChain's create_agent(model, tools, response_format=...): each turn either calls a
    # tool or gives the final answer in the schema
    decoder = chat_decoder()
    fmt = {"type": "json_schema", "schema": JOKE}
    request = prepare_chat(decoder, USER, tools=[ADD], response_format=fmt)
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    answer = '{"setup": "Why?", "punchline": "Because."}'
    for text in (call, answer, "Sure."):
        ids = decoder.tokenizer(text, add_special_tokens=False)["input_ids"]
        constraint = request.constraint(decoder, budget=200)
        accepted = []
        for token in ids:
            accepted.append(bool(constraint.allowed_mask(decoder.vocab_size)[token]))
            constraint.advance(token)
        assert all(accepted) is (text != "Sure."), text  # prose is neither
    called = _scripted(decoder, request, call)
    assert [(c.name, c.arguments) for c in called.tool_calls] == [("add", {"a": 1, "b": 2})]
    assert called.content == "" and called.finish_reason == "tool_calls"
    answered = _scripted(decoder, request, answer)
    assert json.loads(answered.content) == json.loads(answer) and not answered.tool_calls
    for seed in range(3):  # whatever the model picks, it is one of the two, complete
        result = core.chat(
            decoder,
            USER,
            tools=[ADD],
            response_format=fmt,
            temperature=1.0,
            seed=seed,
            max_new_tokens=200,
        )
        if result.tool_calls:
            _validate_call(result.tool_calls[0])
        else:
            jsonschema.validate(json.loads(result.content), JOKE)


@pytest.mark.parametrize(
    ("written", "calls"),
    [
        ('{"name": "add", "arguments": {"a": 1, "b": 2}}', [("add", {"a": 1, "b": 2})]),
        (
            '  {"name": "add", "parameters": {"a": "4", "b": 2}}\n'
            '{"name": "ping", "arguments": {}}',
            [("add", {"a": 4, "b": 2}), ("ping", {})],
        ),
        ('[{"name": "ping", "arguments": {}}]', [("ping", {})]),
        ('```json\n{\n  "name": "ping",\n  "arguments": {}\n}\n```', [("ping", {})]),
        ("```python\nprint(1 + 2)\n```", []),
        ('{"name": "add", "arguments": {"a": "one", "b": 2}}', []),  # not schema-valid
        ('{"name": "divide", "arguments": {"a": 1, "b": 2}}', []),  # no such tool
        ('{"a": 1, "b": 2}', []),
    ],
)
def test_auto_mode_reads_calls_written_as_bare_json(written, calls):
    # many tool-trained models (Qwen 2.5, Llama 3) write a call as a bare JSON object (Qwen's
    # coder models in a ```json fence); read it as vLLM's and Ollama's parsers do: it names a
    # bound tool and its arguments are valid
    decoder = chat_decoder(tools_template=True)
    request = prepare_chat(decoder, USER, tools=TOOLS)
    result = _scripted(decoder, request, written)
    assert [(c.name, c.arguments) for c in result.tool_calls] == calls
    assert result.content == ("" if calls else written.strip())
    assert result.finish_reason == ("tool_calls" if calls else "stop")


@functools.lru_cache(maxsize=2)
def _markup_token_decoder(special: bool = False):
    """A tiny model whose tokenizer has `<tool_call>` and `</tool_call>` as added tokens: not
    special, as Qwen's and Hermes' tokenizers have them, or special (decoded to nothing)."""
    from eft_integrations import EFTDecoder

    from .chat_family import TOOLS_TEMPLATE
    from .tiny_models import build_tokenizer, llama

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=special)
    model = llama(len(tokenizer), seed=21, window=4096)
    return EFTDecoder(base=model, behaviors={}, tokenizer=tokenizer, chat_template=TOOLS_TEMPLATE)


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_forced_calls_validate_where_the_markup_is_an_added_token(seed, special):
    decoder = _markup_token_decoder(special)
    opening = decoder.tokenizer("<tool_call>", add_special_tokens=False)["input_ids"]
    assert len(opening) == 1  # the model writes the tag as one token
    for choice in ("any", "add", "ping"):
        result = core.chat(
            decoder,
            USER,
            tools=TOOLS,
            tool_choice=choice,
            temperature=1.0,
            seed=seed,
            max_new_tokens=160,
        )
        assert result.finish_reason == "tool_calls" and not result.invalid_tool_calls, result
        for call in result.tool_calls:
            _validate_call(call)
    # in auto mode the model opens a call with the token: the rest is constrained too
    request = prepare_chat(decoder, USER, tools=TOOLS, parallel_tool_calls=False)
    constraint = _Opening(request.constraint(decoder, budget=160), opening)
    generated = decoder.generate(
        request.prompt, constraints=[constraint], temperature=1.0, seed=seed, max_new_tokens=160
    )
    result = core._result(decoder, request, generated)
    assert result.finish_reason == "tool_calls" and not result.invalid_tool_calls, result
    _validate_call(result.tool_calls[0])


# ------------------------------------------------------------------------------ the adapters' layer


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, None),
        ("auto", "auto"),
        ("none", "none"),
        ("any", "any"),
        ("required", "required"),
        (True, "any"),
        (False, None),
        ("add", "add"),
        ({"type": "function", "function": {"name": "add"}}, "add"),
        ({"name": "get_weather"}, "get_weather"),
    ],
)
def test_every_tool_choice_spelling_becomes_the_cores(given, expected):
    """One normalisation for the adapters and the core: OpenAI's dict, LangChain's bools."""
    assert core.normalize_tool_choice(given, ["get_weather", "add"]) == expected


def test_prepare_chat_takes_a_tool_choice_dict_and_names_the_choices():
    decoder = chat_decoder()
    named = {"type": "function", "function": {"name": "add"}}
    assert prepare_chat(decoder, USER, tools=TOOLS, tool_choice=named).kind == "a forced tool call"
    with pytest.raises(
        ValueError, match=r"or a tool name \['get_weather', 'add', 'ping'\], got 'x'"
    ):
        prepare_chat(decoder, USER, tools=TOOLS, tool_choice={"function": {"name": "x"}})


def test_results_and_the_last_delta_carry_the_engines_stats():
    decoder = chat_decoder()
    result = core.chat(decoder, USER, temperature=0.0, max_new_tokens=8)
    deltas = list(core.stream_chat(decoder, USER, temperature=0.0, max_new_tokens=8))
    for stats in (result.stats, deltas[-1].stats):
        assert stats is not None and stats.total_time >= stats.queue_time >= 0.0
        assert stats.drafted_tokens is None  # not speculative
    assert all(d.stats is None for d in deltas[:-1])


def test_deltas_carry_the_calls_they_complete_read_or_not():
    """Each call arrives whole in one delta, as a chunk and as the call the core read (or
    could not read), with one id: an adapter needs neither to merge nor to parse."""
    decoder = chat_decoder()
    request = prepare_chat(decoder, USER, tools=TOOLS, tool_choice="auto")
    builder = core._DeltaBuilder(decoder, request)
    text = (
        'Checking.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": "2"}}\n</tool_call>'
        '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>'
    )
    chunk = StreamChunk(text, [], finish_reason="stop", usage=Usage(3, 4))
    [delta] = builder.push(chunk)
    assert delta.content == "Checking."
    assert [(c.name, c.arguments) for c in delta.tool_calls] == [("add", {"a": 1, "b": 2})]
    [invalid] = delta.invalid_tool_calls
    assert invalid.name == "launch_rocket" and invalid.error
    pieces = delta.tool_call_chunks
    assert [p.id for p in pieces] == [delta.tool_calls[0].id, invalid.id]
    assert [p.error for p in pieces] == [None, invalid.error]
    assert delta.finish_reason == "tool_calls" and delta.usage == Usage(3, 4)
