"""ChatEFT with real LangChain objects on the tiny random EFT family (no mocks)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, TypedDict

import pytest
import torch
from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from transformers import AutoModelForCausalLM

from eft_integrations import chat as core
from eft_integrations.langchain import ChatEFT, _to_core_messages

from .chat_family import chat_decoder, chat_family_paths, from_pretrained_args
from .event_loop import run_beside_ticker

HELLO = [HumanMessage("Hello there")]


def _chat(**kwargs) -> ChatEFT:
    return ChatEFT(decoder=chat_decoder(), **{"temperature": 0.0, "max_tokens": 16, **kwargs})


def test_lcel_chain_with_per_call_weights():
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("user", "{question}")])
    chat = _chat().configurable_fields(weights=ConfigurableField(id="weights"))
    chain = prompt | chat | StrOutputParser()
    texts = {}
    for w in (0.0, 1.0, 3.0):
        weights = {"chat": w, "safe": 0.0}
        texts[w] = chain.invoke({"question": "Hi"}, config={"configurable": {"weights": weights}})
        expected = core.chat(
            chat_decoder(),
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            weights=weights,
            temperature=0.0,
            max_new_tokens=16,
        )
        assert texts[w] == expected.content
    assert len(set(texts.values())) > 1  # the weights change the greedy answer
    bound = prompt | _chat().bind(weights={"chat": 3.0, "safe": 0.0}) | StrOutputParser()
    assert bound.invoke({"question": "Hi"}) == texts[3.0]


def test_invoke_reports_weights_usage_and_finish_reason():
    message = _chat(weights={"safe": 0.25}).invoke(HELLO, weights={"chat": 2.0})
    assert message.response_metadata["weights"] == {"chat": 2.0, "safe": 0.25}
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    assert message.response_metadata["model_name"] == chat_decoder().model_name
    usage = message.usage_metadata
    assert usage["output_tokens"] <= 16
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    with pytest.raises(ValueError, match="unknown behavior"):
        _chat().invoke(HELLO, weights={"nope": 1.0})
    with pytest.raises(ValueError, match="unknown ChatEFT call options"):
        _chat().invoke(HELLO, temprature=0.5)


def test_greedy_first_token_follows_the_eft_formula():
    """argmax of log p_base + w (log p_chat - log p_ref), computed here from the models."""
    paths = chat_family_paths()
    decoder = chat_decoder()
    prompt = decoder.format_chat(_to_core_messages(HELLO))
    ids = torch.tensor([decoder.encode(prompt)])
    with torch.no_grad():
        logp = {
            name: torch.log_softmax(
                AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32)(ids).logits[
                    0, -1, : decoder.vocab_size
                ],
                -1,
            )
            for name in ("base", "chat", "ref")
        }
    answers = set()
    for w in (-1.0, 0.0, 0.5, 1.0, 4.0):
        expected = logp["base"] + w * (logp["chat"] - logp["ref"])
        token = int(expected.argmax())
        got = _chat(max_tokens=1).invoke(HELLO, weights={"chat": w, "safe": 0.0})
        assert got.content == decoder.tokenizer.decode([token], skip_special_tokens=True)
        answers.add(token)
    assert len(answers) > 1


def test_batch_is_one_batched_decode_equal_to_invokes():
    decoder = chat_decoder()
    chat = _chat()
    inputs = ["Hi", "Hello there", [SystemMessage("Be brief."), HumanMessage("Yo")]]
    weights = [{"chat": 0.0}, {"chat": 1.0}, {"chat": 2.0}]
    before = decoder.forward_calls
    batched = chat.batch(inputs, weights=weights)
    forwards = decoder.forward_calls - before
    assert forwards <= 4 * 16  # 4 distinct models x (prefill + 15 steps), shared by all rows
    singles = [chat.invoke(i, weights=w) for i, w in zip(inputs, weights, strict=True)]
    assert [m.content for m in batched] == [m.content for m in singles]
    assert [m.response_metadata["weights"]["chat"] for m in batched] == [0.0, 1.0, 2.0]


async def test_abatch_and_ainvoke_do_not_block_the_loop():
    chat = _chat(max_tokens=24)

    async def calls():
        single = await chat.ainvoke(HELLO)
        several = await chat.abatch(["Hi", "Hello there"])
        chunks = [c async for c in chat.astream(HELLO)]
        return single, several, chunks

    probe = await run_beside_ticker(calls)
    single, several, chunks = probe.result
    assert single.content == chat.invoke(HELLO).content
    assert len(several) == 2
    assert "".join(c.content for c in chunks) == single.content
    assert probe.ticks >= max(3, int(probe.elapsed / 0.005 * 0.2))


def test_concurrent_invokes_equal_serial_invokes():
    chat = _chat(max_tokens=12)
    jobs = [("Hi", {"chat": w}) for w in (0.0, 0.5, 1.0, 2.0)] * 2
    serial = [chat.invoke(q, weights=w).content for q, w in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda job: chat.invoke(job[0], weights=job[1]).content, jobs))
    assert threaded == serial


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    CALLS.append((a, b))
    return a + b


CALLS: list[tuple[int, int]] = []


def test_agent_loop_calls_a_real_tool_and_finishes():
    """The first model call is forced to use a tool (the constraint makes the call valid);
    once a tool result is in the history the model must answer in text."""

    @wrap_model_call
    def call_then_answer(request, handler):
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if answered else "any"))

    CALLS.clear()
    agent = create_agent(_chat(max_tokens=120), tools=[add], middleware=[call_then_answer])
    state = agent.invoke({"messages": [HumanMessage("What is 2 + 3? Use the add tool.")]})
    messages = state["messages"]
    assert len(CALLS) == 1  # the Python tool really ran
    assert isinstance(messages[1], AIMessage) and messages[1].tool_calls[0]["name"] == "add"
    assert isinstance(messages[2], ToolMessage) and messages[2].content == str(sum(CALLS[0]))
    assert isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls


def test_tool_histories_render_through_the_template():
    history = [
        HumanMessage("add 1 and 2"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}]),
        ToolMessage([{"type": "text", "text": "3"}], tool_call_id="c1"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": "x", "b": 2}, "id": "c2"}]),
        ToolMessage("bad input", tool_call_id="c2", status="error"),
    ]
    prompt = core.prepare_chat(
        chat_decoder(tools_template=True),
        _to_core_messages(history),
        tools=[convert_to_openai_tool(add)],
    ).prompt
    assert '{"name": "add", "arguments": {"a": 1, "b": 2}}' in prompt
    assert "<tool_response>\n3\n</tool_response>" in prompt
    assert "Error: bad input" in prompt


def test_streamed_tool_calls_arrive_as_chunks():
    chat = _chat(max_tokens=120).bind_tools([add], tool_choice="add")
    chunks = list(chat.stream("add 2 and 3"))
    assert any(c.tool_call_chunks for c in chunks)
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert full.tool_calls[0]["name"] == "add"
    assert set(full.tool_calls[0]["args"]) == {"a", "b"}
    assert full.response_metadata["finish_reason"] == "tool_calls"


def test_a_call_the_core_could_not_read_stays_invalid():
    """Cut by max_tokens, a forced call is an InvalidToolCall in the core; LangChain's lenient
    parse of the streamed arguments must not turn it into a call with guessed arguments."""
    options = {
        "tools": [convert_to_openai_tool(add)],
        "tool_choice": "add",
        "temperature": 0.0,
        "max_new_tokens": 12,
    }
    expected = core.chat(chat_decoder(), [{"role": "user", "content": "add 2 and 3"}], **options)
    assert expected.invalid_tool_calls and not expected.tool_calls
    message = _chat(max_tokens=12).bind_tools([add], tool_choice="add").invoke("add 2 and 3")
    assert not message.tool_calls
    assert [c["error"] for c in message.invalid_tool_calls] == [
        c.error for c in expected.invalid_tool_calls
    ]


def test_lazy_loading_shares_one_decoder():
    first = ChatEFT(**from_pretrained_args(), temperature=0.0, max_tokens=4)
    second = ChatEFT(**from_pretrained_args(), temperature=0.0, max_tokens=4)
    assert first._loaded is None  # building is cheap: nothing loaded yet
    assert first.invoke("Hi").content == second.invoke("Hi").content
    assert first._loaded is second._loaded is not None


def test_speculative_decoding_gives_the_same_greedy_answer():
    plain = _chat(max_tokens=12).invoke(HELLO)
    fast = _chat(max_tokens=12, speculative_k=3).invoke(HELLO)
    assert fast.content == plain.content
    # constrained turns decode token by token even with speculative_k set
    forced = _chat(max_tokens=120, speculative_k=3).bind_tools([add], tool_choice="any")
    assert forced.invoke("add 1 and 2").tool_calls[0]["name"] == "add"


async def test_closing_astream_stops_decoding():
    decoder = chat_decoder()
    chat = _chat(max_tokens=400, temperature=1.0, seed=0)
    stream = chat.astream(HELLO)
    async for _ in stream:
        break
    await stream.aclose()
    before = decoder.forward_calls
    await asyncio.sleep(0.3)
    assert decoder.forward_calls - before <= 8  # at most a step or two finish after closing


class Joke(TypedDict):
    """Joke to tell user."""

    setup: Annotated[str, ..., "question to set up a joke"]
    punchline: Annotated[str, ..., "answer to resolve the joke"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_include_raw_and_streaming(method):
    structured = _chat(max_tokens=120).with_structured_output(Joke, method=method, include_raw=True)
    out = structured.invoke("Tell me a joke")
    assert out["parsing_error"] is None
    assert set(out["parsed"]) == {"setup", "punchline"}
    assert isinstance(out["raw"], AIMessage)
    partials = list(
        _chat(max_tokens=120).with_structured_output(Joke, method=method).stream("Tell me a joke")
    )
    assert partials and set(partials[-1]) == {"setup", "punchline"}
