"""ChatEFT with real LangChain objects on the tiny random EFT family (no mocks)."""

from __future__ import annotations

import asyncio
import copy
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, TypedDict

import pytest
import torch
from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import (
    AIMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    trim_messages,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM

from eft_integrations import EFTDecoder, loading
from eft_integrations import chat as core
from eft_integrations.langchain import ChatEFT, _to_core_messages
from eft_integrations.lazy import LazyDecoder, get_decoder
from eft_integrations.options import Usage

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


def test_a_next_turn_reports_prompt_tokens_read_from_the_cache():
    history = [("user", "The capital of Veloria? Tell me about the river, too.")]
    first = _chat().invoke(history)
    history += [("assistant", first.content), ("user", "And the numbers?")]
    second = _chat().invoke(history).usage_metadata
    assert 0 < second["input_token_details"]["cache_read"] < second["input_tokens"]


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


def test_batch_equals_invokes_with_weights_per_input_by_config():
    chat = _chat().configurable_fields(weights=ConfigurableField(id="weights"))
    inputs = ["Hi", "Hello there", [SystemMessage("Be brief."), HumanMessage("Yo")]]
    weights = [{"chat": 0.0}, {"chat": 1.0}, {"chat": 2.0}]
    configs = [{"configurable": {"weights": w}} for w in weights]
    batched = chat.batch(inputs, config=configs)
    singles = [_chat().invoke(i, weights=w) for i, w in zip(inputs, weights, strict=True)]
    assert [m.content for m in batched] == [m.content for m in singles]
    assert [m.response_metadata["weights"]["chat"] for m in batched] == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="one dict per call"):
        _chat().invoke("Hi", weights=weights)


def test_batch_fails_only_the_input_that_is_bad():
    chat = _chat(max_tokens=8)
    bad = [HumanMessage([{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}])]
    results = chat.batch(["Hi", bad, "Hello there"], return_exceptions=True)
    assert isinstance(results[1], ValueError) and "text only" in str(results[1])
    assert [r.content for r in (results[0], results[2])] == [
        chat.invoke("Hi").content,
        chat.invoke("Hello there").content,
    ]
    with pytest.raises(ValueError, match="text only"):
        chat.batch(["Hi", bad])


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


def test_a_forced_call_below_its_shortest_form_fails_up_front_in_core_and_adapter():
    """Cut by max_tokens, a forced call could only be truncated: the core refuses the budget
    before decoding, naming the minimum, and ChatEFT passes that error on."""
    options = {"tools": [convert_to_openai_tool(add)], "tool_choice": "add", "temperature": 0.0}
    with pytest.raises(ValueError, match=r"needs at least (\d+) new tokens") as core_error:
        core.chat(
            chat_decoder(),
            [{"role": "user", "content": "add 2 and 3"}],
            max_new_tokens=3,
            **options,
        )
    with pytest.raises(ValueError, match=r"needs at least \d+ new tokens") as adapter_error:
        _chat(max_tokens=3).bind_tools([add], tool_choice="add").invoke("add 2 and 3")
    assert str(adapter_error.value) == str(core_error.value)
    needed = int(re.search(r"needs at least (\d+)", str(core_error.value)).group(1))
    message = _chat(max_tokens=needed).bind_tools([add], tool_choice="add").invoke("add 2 and 3")
    assert [c["name"] for c in message.tool_calls] == ["add"]  # the minimum is enough


def test_calls_the_core_found_invalid_stay_invalid_in_the_aggregated_message():
    """The core streams each call whole, an unreadable one with its `error` set: LangChain's
    lenient parse of chunk arguments must not make it a call, even when its text is JSON."""
    from langchain_core.language_models.chat_models import generate_from_stream

    from eft_integrations.langchain import _chunk, _mark_invalid

    read = core.ToolCall("call_1", "add", {"a": 1, "b": 2})
    deltas = [
        core.ChatDelta("", [core.ToolCallChunk(0, "call_1", "add", '{"a": 1, "b": 2}')], [read]),
        core.ChatDelta(
            "",
            [
                core.ToolCallChunk(1, "call_2", "add", '{"a": 1, "b": ', "cut by max_tokens"),
                core.ToolCallChunk(2, "call_3", "add", '{"a": "x", "b": 2}', "a is no integer"),
            ],
            invalid_tool_calls=[
                core.InvalidToolCall("call_2", "add", '{"a": 1, "b": ', "cut by max_tokens"),
                core.InvalidToolCall("call_3", "add", '{"a": "x", "b": 2}', "a is no integer"),
            ],
            finish_reason="tool_calls",
            usage=Usage(3, 4),
        ),
    ]
    result = _mark_invalid(
        generate_from_stream(_chunk(d, {"weights": {}}, tokenizer=None) for d in deltas)
    )
    message = result.generations[0].message
    assert [(c["id"], c["args"]) for c in message.tool_calls] == [("call_1", {"a": 1, "b": 2})]
    assert [(c["id"], c["args"], c["error"]) for c in message.invalid_tool_calls] == [
        ("call_2", '{"a": 1, "b": ', "cut by max_tokens"),
        ("call_3", '{"a": "x", "b": 2}', "a is no integer"),
    ]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.usage_metadata["total_tokens"] == 7


def test_lazy_loading_loads_once_and_copies_share_it():
    chat = ChatEFT(**from_pretrained_args(), temperature=0.0, max_tokens=4)
    assert isinstance(chat.decoder, LazyDecoder) and not chat.decoder.loaded  # cheap to build
    configurable = chat.configurable_fields(weights=ConfigurableField(id="weights"))
    copies = [chat.bind(weights={"chat": 2.0}), configurable, copy.deepcopy(chat)]
    answers = [c.invoke("Hi", config={"configurable": {"weights": {"chat": 0.5}}}) for c in copies]
    assert chat.decoder.loaded
    assert copy.deepcopy(chat).decoder is chat.decoder
    assert answers[0].content == _chat(max_tokens=4).invoke("Hi", weights={"chat": 2.0}).content
    assert answers[1].content == _chat(max_tokens=4).invoke("Hi", weights={"chat": 0.5}).content
    # a LazyDecoder given to several chat models is one set of models
    lazy = LazyDecoder(**from_pretrained_args())
    first, second = ChatEFT(decoder=lazy), ChatEFT(decoder=lazy, weights={"chat": 0.0})
    assert get_decoder(first.decoder) is get_decoder(second.decoder) is lazy.get()


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


def test_a_stop_string_is_one_stop_sequence():
    chat = _chat()
    full = chat.invoke(HELLO).content
    never = full.strip()[-1] + "\u2603"  # its first character occurs, the pair does not
    assert chat.invoke(HELLO, stop=never).content == full
    assert chat.bind(stop=never).invoke(HELLO).content == full
    cut = full[4:6]
    assert chat.invoke(HELLO, stop=cut).content == full[: full.index(cut)]
    assert ChatEFT(decoder=chat_decoder(), stop_sequences=never).stop == [never]
    assert chat._get_ls_params(stop=never)["ls_stop"] == [never]


def test_token_counts_use_the_decoders_tokenizer_without_loading_models(monkeypatch):
    decoder = chat_decoder()
    history = [
        SystemMessage("Be brief."),
        HumanMessage("Hello there"),
        AIMessage("Hi!"),
        HumanMessage("How are you today?"),
    ]
    expected = _chat(max_tokens=1).invoke(history).usage_metadata["input_tokens"]
    expected_text = len(decoder.tokenizer("Hello there", add_special_tokens=False)["input_ids"])

    def no_models(*args, **kwargs):
        raise AssertionError("counting tokens must not load a model")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", no_models)
    lazy = ChatEFT(**from_pretrained_args())
    for chat in (lazy, _chat()):
        assert chat.get_num_tokens("Hello there") == expected_text
        assert chat.get_num_tokens_from_messages(history) == expected  # what a call reads
        trimmed = trim_messages(
            history,
            max_tokens=expected - 1,
            token_counter=chat,
            strategy="last",
            include_system=True,
        )
        assert 0 < len(trimmed) < len(history)
    assert not lazy.decoder.loaded


class Answer(BaseModel):
    """The final answer."""

    value: int = Field(description="the result")


def test_agent_with_response_format_reaches_a_structured_response():
    """With a profile that declares native structured output, create_agent constrains the
    answer to the schema (ProviderStrategy) instead of forcing a tool call every turn."""
    chat = _chat(max_tokens=48)
    assert chat.profile["structured_output"] and chat.profile["tool_calling"]
    assert chat.profile["max_input_tokens"] == chat_decoder().context_window
    assert ChatEFT(**from_pretrained_args()).profile["structured_output"]
    for tools in ([], [add]):
        agent = create_agent(chat, tools=tools, response_format=Answer)
        state = agent.invoke(
            {"messages": [HumanMessage("What is 2 + 3?")]}, config={"recursion_limit": 6}
        )
        assert isinstance(state["structured_response"], Answer)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_below_its_shortest_answer_says_so(method):
    """A budget below the shortest valid answer fails up front, naming the minimum, instead
    of returning truncated JSON or schema-valid junk (with include_raw too)."""
    short = _chat(max_tokens=3)
    needed = r"needs at least \d+ new tokens .* raise max_new_tokens \(max_tokens\)"
    with pytest.raises(ValueError, match=needed):
        short.with_structured_output(Joke, method=method, include_raw=True).invoke("A joke")
    with pytest.raises(ValueError, match=needed):
        short.with_structured_output(Joke, method=method).invoke("A joke")
    with pytest.raises(ValueError, match=needed):
        list(short.with_structured_output(Joke, method=method).stream("A joke"))


async def test_structured_output_below_its_shortest_answer_says_so_async():
    short = _chat(max_tokens=3).with_structured_output(Joke, include_raw=True)
    with pytest.raises(ValueError, match="raise max_new_tokens"):
        await short.ainvoke("A joke")


def test_deepcopy_and_pickle_share_or_reload_the_decoder():
    chat = _chat(weights={"chat": 0.5})
    clone = copy.deepcopy(chat)
    assert clone.decoder is chat.decoder  # the models are never copied
    assert clone.weights == chat.weights and clone.weights is not chat.weights
    assert clone.invoke(HELLO).content == chat.invoke(HELLO).content
    lazy = ChatEFT(**from_pretrained_args(), temperature=0.0, max_tokens=6)
    expected = lazy.invoke(HELLO).content  # loaded: a pickle keeps only the arguments
    restored = pickle.loads(pickle.dumps(lazy))
    assert isinstance(restored.decoder, LazyDecoder) and not restored.decoder.loaded
    assert restored.invoke(HELLO).content == expected


@pytest.mark.skipif(
    "__getstate__" not in vars(EFTDecoder),
    reason="EFTDecoder does not define its pickled state yet",
)
def test_pickle_round_trips_a_chat_model_with_a_loaded_decoder():
    chat = _chat()
    restored = pickle.loads(pickle.dumps(chat))
    assert restored.invoke(HELLO).content == chat.invoke(HELLO).content


def test_a_lazy_decoder_loads_once_for_concurrent_first_calls(monkeypatch):
    loads = []
    load = EFTDecoder.from_pretrained.__func__

    def counted(cls, **kwargs):
        loads.append(kwargs)
        return load(cls, **kwargs)

    monkeypatch.setattr(EFTDecoder, "from_pretrained", classmethod(counted))
    chat = ChatEFT(**from_pretrained_args(), temperature=0.0, max_tokens=3)
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: chat.invoke("Hi").content, range(4)))
    assert len(loads) == 1 and len(set(answers)) == 1


def test_logprobs_go_where_chat_openai_puts_them():
    expected = core.chat(
        chat_decoder(),
        [{"role": "user", "content": "Hi"}],
        temperature=0.0,
        max_new_tokens=8,
        logprobs=2,
    )
    model = _chat(logprobs=True, top_logprobs=2, max_tokens=8)
    message = model.invoke("Hi")
    content = message.response_metadata["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(
        [e.logprob for e in expected.logprobs], abs=1e-5
    )
    assert len(content) == message.usage_metadata["output_tokens"]
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    # streamed, the chunks' log-probs concatenate to the same list
    chunks = list(model.stream("Hi"))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    assert joined.response_metadata["logprobs"]["content"] == content
    # per call, as ChatOpenAI takes them; off by default
    bound = _chat(max_tokens=8).bind(logprobs=True)
    assert len(bound.invoke("Hi").response_metadata["logprobs"]["content"]) == len(content)
    assert "logprobs" not in _chat(max_tokens=4).invoke("Hi").response_metadata
    with pytest.raises(ValueError, match="top_logprobs=3 needs logprobs=True"):
        _chat().invoke("Hi", top_logprobs=3)
