"""The call layer both adapters share (`options.merge_call_options`, the core's tool_choice,
the engine's stats): ChatEFT and EFTLLM answer one call the same way, on the tiny chat family."""

from __future__ import annotations

import pytest
from langchain_core.tools import tool
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.tools import FunctionTool

from eft_integrations.langchain import ChatEFT
from eft_integrations.llama_index import EFTLLM
from eft_integrations.options import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_CHAT_TEMPERATURE,
    merge_call_options,
)

from ..chat_family import chat_decoder, from_pretrained_args

STATS = {
    "queue_time",
    "time_to_first_token",
    "tokens_per_second",
    "total_time",
    "speculative_rounds",
    "drafted_tokens",
    "accepted_tokens",
    "acceptance_rate",
}
HELLO = "Hello there"


def _both(**fields):
    """A ChatEFT and an EFTLLM over one decoder, with the same fields."""
    langchain_fields = dict(fields)
    if "max_new_tokens" in langchain_fields:
        langchain_fields["max_tokens"] = langchain_fields.pop("max_new_tokens")
    decoder = chat_decoder()
    return ChatEFT(decoder=decoder, **langchain_fields), EFTLLM(decoder=decoder, **fields)


def _chat_eft_weights(chat: ChatEFT, **call) -> dict:
    return chat.invoke(HELLO, **call).response_metadata["weights"]


def _eft_llm_weights(llm: EFTLLM, **call) -> dict:
    message = ChatMessage(role=MessageRole.USER, content=HELLO)
    return llm.chat([message], **call).raw["weights"]


def test_the_adapters_share_their_defaults():
    chat, llm = ChatEFT(**from_pretrained_args()), EFTLLM(**from_pretrained_args())
    assert chat.temperature == llm.temperature == DEFAULT_CHAT_TEMPERATURE
    assert chat.max_tokens == llm.max_new_tokens == DEFAULT_CHAT_MAX_TOKENS
    assert (chat.top_p, chat.top_k) == (llm.top_p, llm.top_k) == (1.0, 0)
    assert chat.max_string_length == llm.max_string_length
    assert not chat.decoder.loaded  # defaults are read without loading a model


def test_per_call_weights_merge_alike_in_both_adapters():
    """Names a call leaves out keep the instance's weight, then the decoder's default."""
    chat, llm = _both(weights={"safe": 0.25}, temperature=0.0, max_new_tokens=2)
    expected = {"chat": 2.0, "safe": 0.25}
    assert _chat_eft_weights(chat, weights={"chat": 2.0}) == expected
    assert _eft_llm_weights(llm, weights={"chat": 2.0}) == expected
    assert _chat_eft_weights(chat) == _eft_llm_weights(llm) == {"chat": 1.0, "safe": 0.25}
    for adapter_call in (
        lambda: chat.invoke(HELLO, weights={"nope": 1.0}),
        lambda: llm.complete(HELLO, weights={"nope": 1.0}),
    ):
        with pytest.raises(ValueError, match=r"unknown behavior 'nope'.*\['chat', 'safe'\]"):
            adapter_call()


def test_unknown_call_options_name_the_key_and_the_accepted_ones():
    chat, llm = _both(temperature=0.0, max_new_tokens=2)
    for owner, adapter_call in (
        ("ChatEFT", lambda: chat.invoke(HELLO, temprature=0.5)),
        ("EFTLLM", lambda: llm.complete(HELLO, temprature=0.5)),
    ):
        with pytest.raises(ValueError) as error:
            adapter_call()
        assert f"unknown {owner} call options ['temprature']; accepted: [" in str(error.value)
        assert "'temperature'" in str(error.value) and "'max_tokens'" in str(error.value)
    # the same budget under either name
    assert chat.invoke(HELLO, max_tokens=1).usage_metadata["output_tokens"] <= 1
    assert llm.complete(HELLO, max_tokens=1).raw["usage"]["completion_tokens"] <= 1


def test_merge_call_options_alone():
    fields = {"weights": {"chat": 0.5}, "temperature": 0.7, "max_new_tokens": None}
    merged = merge_call_options(
        fields,
        {"max_tokens": 9, "weights": {"safe": 0.0}, "tools": []},
        owner="Adapter",
        passthrough=("tools",),
        behaviors=["chat", "safe"],
    )
    assert merged == {
        "weights": {"chat": 0.5, "safe": 0.0},
        "temperature": 0.7,
        "max_new_tokens": 9,
        "tools": [],
    }
    # None max_new_tokens: the decoder's default; no weights anywhere: the defaults (None)
    assert merge_call_options({**fields, "weights": None}, {}, owner="A", behaviors=[]) == {
        "weights": None,
        "temperature": 0.7,
    }
    with pytest.raises(ValueError, match="one dict per call"):
        merge_call_options(fields, {"weights": [{}]}, owner="A", behaviors=["chat"])


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_an_openai_tool_choice_dict_names_the_forced_tool_in_both_adapters():
    chat, llm = _both(temperature=0.0, max_new_tokens=160)
    forced = {"type": "function", "function": {"name": "add"}}
    message = chat.bind_tools([add], tool_choice=forced).invoke("add 2 and 3")
    assert [c["name"] for c in message.tool_calls] == ["add"]
    response = llm.chat_with_tools(
        [FunctionTool.from_defaults(fn=multiply)],
        user_msg="multiply 2 and 3",
        tool_choice={"type": "function", "function": {"name": "multiply"}},
    )
    assert [c.tool_name for c in llm.get_tool_calls_from_response(response)] == ["multiply"]
    with pytest.raises(ValueError, match="tool_choice"):
        chat.bind_tools([add], tool_choice="launch_rocket")


def test_the_engines_stats_reach_both_adapters():
    chat, llm = _both(temperature=0.0, max_new_tokens=8)
    message = ChatMessage(role=MessageRole.USER, content=HELLO)
    finals = {
        "invoke": chat.invoke(HELLO).response_metadata["stats"],
        "stream": list(chat.stream(HELLO))[-1].response_metadata["stats"],
        "complete": llm.complete(HELLO).raw["stats"],
        "stream_complete": list(llm.stream_complete(HELLO))[-1].raw["stats"],
        "chat": llm.chat([message]).raw["stats"],
        "stream_chat": list(llm.stream_chat([message]))[-1].raw["stats"],
    }
    for name, stats in finals.items():
        assert set(stats) == STATS, name
        assert stats["total_time"] >= stats["queue_time"] >= 0.0, name
        assert stats["drafted_tokens"] is None, name  # not a speculative request
    # the engine's figures of a speculative request: drafts, acceptances and their ratio
    speculative = chat.invoke(HELLO, speculative_k=3).response_metadata["stats"]
    assert speculative["drafted_tokens"] > 0
    assert speculative["acceptance_rate"] == (
        speculative["accepted_tokens"] / speculative["drafted_tokens"]
    )
    first = next(iter(llm.stream_complete(HELLO)))
    if first.raw["finish_reason"] is None:
        assert "stats" not in first.raw  # final responses only
