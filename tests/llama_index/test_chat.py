"""EFTLLM chat side: chat/stream/async through the core, tools, structured output."""

from typing import Literal

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.bridge.pydantic import BaseModel, Field
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool

from eft_integrations import chat as core_chat
from eft_integrations.llama_index import EFTLLM

MESSAGES = [
    ChatMessage(role=MessageRole.SYSTEM, content="You answer briefly."),
    ChatMessage(role=MessageRole.USER, content="The capital of Veloria is"),
]
CORE_MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "The capital of Veloria is"},
]


def get_weather(city: Literal["Paris", "Rome", "Markan"], unit: Literal["C", "F"] = "C") -> str:
    """Current weather of a city."""
    return f"Sunny in {city}, 21 {unit}"


WEATHER = FunctionTool.from_defaults(fn=get_weather)


@pytest.fixture()
def llm(rag_decoder) -> EFTLLM:
    return EFTLLM(decoder=rag_decoder, temperature=0.0, max_new_tokens=160)


def test_chat_is_the_core_chat_with_usage(llm, rag_decoder):
    response = llm.chat(MESSAGES, max_new_tokens=12)
    expected = core_chat.chat(rag_decoder, CORE_MESSAGES, temperature=0.0, max_new_tokens=12)
    assert response.message.role == MessageRole.ASSISTANT
    assert (response.message.content or "") == expected.content
    assert response.raw["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    assert response.additional_kwargs["completion_tokens"] == expected.usage.completion_tokens
    # the prompt is the decoder's chat template of both messages
    rendered = rag_decoder.format_chat(CORE_MESSAGES)
    assert expected.usage.prompt_tokens == len(rag_decoder.encode(rendered))


def test_chat_per_call_weights(llm, rag_decoder):
    for weights in ({"chat": 0.0, "safe": 0.0}, {"chat": 2.0, "safe": -1.0}):
        response = llm.chat(MESSAGES, weights=weights, max_new_tokens=12)
        expected = core_chat.chat(
            rag_decoder, CORE_MESSAGES, weights=weights, temperature=0.0, max_new_tokens=12
        )
        assert response.raw["weights"] == weights
        assert (response.message.content or "") == expected.content
    fixed = llm.with_weights({"chat": 0.0, "safe": 0.0})
    assert (
        fixed.chat(MESSAGES, max_new_tokens=12).message.content
        == llm.chat(MESSAGES, weights={"chat": 0.0, "safe": 0.0}, max_new_tokens=12).message.content
    )


def test_stream_chat_deltas_and_cumulative_message(llm):
    full = llm.chat(MESSAGES, max_new_tokens=16)
    chunks = list(llm.stream_chat(MESSAGES, max_new_tokens=16))
    assert "".join(c.delta for c in chunks) == (full.message.content or "")
    running = ""
    for chunk in chunks:
        running += chunk.delta
        assert (chunk.message.content or "") == running
    assert chunks[-1].raw["usage"] == full.raw["usage"]


async def test_async_chat_and_stream_match_sync(llm):
    full = llm.chat(MESSAGES, max_new_tokens=16)
    assert (await llm.achat(MESSAGES, max_new_tokens=16)).message.content == full.message.content
    stream = await llm.astream_chat(MESSAGES, max_new_tokens=16)
    chunks = [c async for c in stream]
    assert chunks[-1].message.content == full.message.content
    assert chunks[-1].raw["usage"] == full.raw["usage"]


def _check_weather_call(selection) -> None:
    assert selection.tool_name == "get_weather"
    assert selection.tool_id
    # schema-valid: the tool's own pydantic schema accepts the arguments, and the tool runs
    WEATHER.metadata.fn_schema.model_validate(selection.tool_kwargs)
    assert WEATHER(**selection.tool_kwargs).content.startswith("Sunny in ")


def test_tool_required_forces_a_schema_valid_call(llm):
    response = llm.chat_with_tools([WEATHER], user_msg="Weather in Markan?", tool_required=True)
    assert response.raw["finish_reason"] == "tool_calls"
    calls = llm.get_tool_calls_from_response(response)
    assert len(calls) == 1
    _check_weather_call(calls[0])


async def test_forced_call_streamed_and_async(llm):
    response = await llm.achat_with_tools([WEATHER], user_msg="Weather?", tool_required=True)
    _check_weather_call(llm.get_tool_calls_from_response(response)[0])
    stream = await llm.astream_chat_with_tools(
        [WEATHER], user_msg="Weather?", tool_choice="get_weather"
    )
    last = [r async for r in stream][-1]
    _check_weather_call(llm.get_tool_calls_from_response(last)[0])


def test_parallel_calls_honoured(llm):
    sequential = llm.chat_with_tools(
        [WEATHER],
        user_msg="Weather in Paris and Rome?",
        tool_required=True,
        allow_parallel_tool_calls=False,
    )
    assert len(llm.get_tool_calls_from_response(sequential)) == 1
    # with parallel calls allowed the grammar lets the model add more calls; each is valid
    parallel = llm.chat_with_tools(
        [WEATHER],
        user_msg="Weather in Paris and Rome?",
        tool_required=True,
        allow_parallel_tool_calls=True,
        max_new_tokens=320,
    )
    calls = llm.get_tool_calls_from_response(parallel)
    assert len(calls) >= 1
    for call in calls:
        _check_weather_call(call)


def test_no_tool_call_is_reported(llm):
    response = llm.chat(MESSAGES, max_new_tokens=8)
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="tool call"):
        llm.get_tool_calls_from_response(response)


def test_tool_results_go_back_through_the_chat_template(llm, rag_decoder):
    """An agent-style history: the assistant's call and the tool's result reach the prompt."""
    first = llm.chat_with_tools([WEATHER], user_msg="Weather in Markan?", tool_required=True)
    call = llm.get_tool_calls_from_response(first)[0]
    result = WEATHER(**call.tool_kwargs)
    history = [
        ChatMessage(role=MessageRole.USER, content="Weather in Markan?"),
        first.message,
        ChatMessage(
            role=MessageRole.TOOL,
            content=result.content,
            additional_kwargs={"tool_call_id": call.tool_id},
        ),
    ]
    assert any(isinstance(b, ToolCallBlock) for b in first.message.blocks)
    response = llm.chat_with_tools([WEATHER], chat_history=history, max_new_tokens=8)
    request = core_chat.prepare_chat(
        rag_decoder,
        [
            {"role": "user", "content": "Weather in Markan?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call.tool_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": call.tool_kwargs},
                    }
                ],
            },
            {
                "role": "tool",
                "content": result.content,
                "tool_call_id": call.tool_id,
                "name": "get_weather",
            },
        ],
        tools=[WEATHER.metadata.to_openai_tool()],
        tool_choice="auto",
    )
    assert result.content in request.prompt and '"get_weather"' in request.prompt
    assert response.raw["usage"]["prompt_tokens"] == len(rag_decoder.encode(request.prompt))


class Place(BaseModel):
    """A place of the toy world."""

    name: str = Field(max_length=12, description="The place's name")
    kind: Literal["city", "village", "river"]
    visited: bool


def test_structured_predict_and_structured_llm_are_schema_valid(llm):
    prompt = PromptTemplate("Describe the place {place}.")
    place = llm.structured_predict(Place, prompt, place="Markan")
    assert isinstance(place, Place) and len(place.name) <= 12
    structured = llm.as_structured_llm(Place)
    response = structured.chat([ChatMessage(role=MessageRole.USER, content="Describe Markan.")])
    assert isinstance(response.raw, Place)
    assert Place.model_validate_json(response.message.content) == response.raw


def _core_place(decoder, weights: dict[str, float]) -> Place:
    """The object the core decodes for the structured prompt below, with these weights."""
    result = core_chat.chat(
        decoder,
        [{"role": "user", "content": "Describe the place Markan."}],
        weights=weights,
        response_format={"type": "json_schema", "schema": Place.model_json_schema()},
        temperature=0.0,
        max_new_tokens=160,
    )
    return Place.model_validate_json(result.content)


async def test_astructured_predict_decodes_with_the_given_weights(llm, rag_decoder):
    """Per-call weights (llm_kwargs) and fixed ones (with_weights) give the object the core
    decodes with those weights; two settings give two different objects here, so weights
    lost on the way would show."""
    prompt = PromptTemplate("Describe the place {place}.")
    places = []
    for weights in ({"chat": 0.5, "safe": 1.0}, {"chat": 0.0, "safe": 0.0}):
        place = await llm.astructured_predict(
            Place, prompt, place="Markan", llm_kwargs={"weights": weights}
        )
        assert place == _core_place(rag_decoder, weights)
        assert llm.with_weights(weights).structured_predict(Place, prompt, place="Markan") == place
        places.append(place)
    assert places[0] != places[1]
    assert places[0] != _core_place(rag_decoder, {"chat": 1.0, "safe": 1.0})  # the defaults


def test_structured_llm_streams_a_schema_valid_object(llm):
    structured = llm.as_structured_llm(Place)
    chunks = list(
        structured.stream_chat([ChatMessage(role=MessageRole.USER, content="Describe Markan.")])
    )
    assert isinstance(chunks[-1].raw, Place)


async def test_structured_llm_astream(llm):
    structured = llm.as_structured_llm(Place)
    stream = await structured.astream_chat(
        [ChatMessage(role=MessageRole.USER, content="Describe Markan.")]
    )
    chunks = [c async for c in stream]
    assert isinstance(chunks[-1].raw, Place)
    partial = [c.raw for c in chunks[:-1]]
    assert all(not isinstance(p, Place) for p in partial)  # partial objects precede it


def test_streamed_calls_the_core_could_not_read_are_reported_invalid():
    """The core streams each call whole, read (`tool_calls`) or not (`invalid_tool_calls`,
    with its error): the adapter reports what the core decided and parses nothing."""
    from eft_integrations.llama_index_responses import StreamedReply

    reply = StreamedReply({"chat": 1.0}, tokenizer=None)
    rome = '{"city": "Rome"}'
    reply.add(
        core_chat.ChatDelta(
            "Checking.",
            [core_chat.ToolCallChunk(0, "call_1", "get_weather", rome)],
            tool_calls=[core_chat.ToolCall("call_1", "get_weather", {"city": "Rome"})],
        )
    )
    invalid = [
        core_chat.InvalidToolCall("call_2", "get_weather", '{"city": ', "not valid JSON"),
        core_chat.InvalidToolCall("call_3", "launch_rocket", "{}", "unknown tool"),
        # readable JSON, yet the core found the call invalid: it stays invalid
        core_chat.InvalidToolCall("call_4", "get_weather", rome, "bad call"),
    ]
    last = reply.add(
        core_chat.ChatDelta(
            "",
            [
                core_chat.ToolCallChunk(i, c.id, c.name, c.arguments, c.error)
                for i, c in enumerate(invalid, start=1)
            ],
            invalid_tool_calls=invalid,
            finish_reason="tool_calls",
        )
    )
    assert last.message.content == "Checking."
    calls = [b for b in last.message.blocks if isinstance(b, ToolCallBlock)]
    assert [(c.tool_call_id, c.tool_kwargs) for c in calls] == [("call_1", {"city": "Rome"})]
    reported = last.message.additional_kwargs["invalid_tool_calls"]
    assert [(c["id"], c["error"]) for c in reported] == [
        ("call_2", "not valid JSON"),
        ("call_3", "unknown tool"),
        ("call_4", "bad call"),
    ]
    assert last.raw["finish_reason"] == "tool_calls" and "stats" not in last.raw


def test_speculative_llm_chats_and_calls_tools(llm):
    """With speculative_k fixed on the LLM, free chat speculates (same greedy reply) and a
    constrained reply (a forced call) decodes token by token instead of failing."""
    speculative = llm.with_options(speculative_k=3)
    assert (
        speculative.chat(MESSAGES, max_new_tokens=16).message.content
        == llm.chat(MESSAGES, max_new_tokens=16).message.content
    )
    response = speculative.chat_with_tools([WEATHER], user_msg="Weather?", tool_required=True)
    _check_weather_call(speculative.get_tool_calls_from_response(response)[0])


def test_function_program_mode_forces_a_schema_valid_tool_call(llm):
    """LlamaIndex's own FunctionCallingProgram (tool_required=True) also yields valid objects."""
    from llama_index.core.types import PydanticProgramMode

    program_llm = llm.with_options(pydantic_program_mode=PydanticProgramMode.FUNCTION)
    place = program_llm.structured_predict(
        Place, PromptTemplate("Describe the place {place}."), place="Markan"
    )
    assert isinstance(place, Place)


def test_bad_options_fail_at_call_time(llm):
    with pytest.raises(ValueError, match="known behaviors"):
        llm.stream_chat(MESSAGES, weights={"helpful": 1.0})
    with pytest.raises(ValueError, match=r"options \['temprature'\]; accepted: .*'tools'"):
        llm.chat(MESSAGES, temprature=0.2)
    with pytest.raises(ValueError, match="tool_choice"):
        llm.chat_with_tools([WEATHER], user_msg="Weather?", tool_choice="launch_rocket")
