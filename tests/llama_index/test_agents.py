"""LlamaIndex agents on EFTLLM: a FunctionAgent calling a real Python tool, and a ReActAgent.

The tiny models are random, so the function agent's first step forces the call
(`initial_tool_choice`): the core's constrained decoding makes it a schema-valid call, the
tool runs, its result goes back through the chat template, and the model answers freely.
"""

from typing import Literal

import pytest
from llama_index.core.agent.workflow import (
    AgentOutput,
    AgentStream,
    FunctionAgent,
    ReActAgent,
    ToolCallResult,
)
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.tools import FunctionTool

from eft_integrations.llama_index import EFTLLM


class WeatherStation:
    """A real tool with state: it records every call it serves."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def get_weather(
        self, city: Literal["Paris", "Rome", "Markan"], unit: Literal["C", "F"] = "C"
    ) -> str:
        """Current weather of a city."""
        self.calls.append((city, unit))
        return f"Sunny in {city}, {21 if unit == 'C' else 70} degrees {unit}"


@pytest.fixture()
def station() -> WeatherStation:
    return WeatherStation()


@pytest.fixture()
def weather_tool(station) -> FunctionTool:
    return FunctionTool.from_defaults(fn=station.get_weather, name="get_weather")


@pytest.fixture()
def llm(rag_decoder) -> EFTLLM:
    return EFTLLM(decoder=rag_decoder, temperature=0.0, max_new_tokens=96)


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_calls_a_tool_and_finishes(
    llm, station, weather_tool, llm_calls, streaming
):
    agent = FunctionAgent(
        tools=[weather_tool],
        llm=llm,
        streaming=streaming,
        initial_tool_choice="get_weather",
        system_prompt="You report the weather.",
    )
    handler = agent.run("What is the weather in Markan?")
    events = [event async for event in handler.stream_events()]
    result = await handler

    # the tool ran once, with arguments valid for its schema
    assert len(station.calls) == 1
    city, unit = station.calls[0]
    assert city in ("Paris", "Rome", "Markan") and unit in ("C", "F")
    tool_results = [e for e in events if isinstance(e, ToolCallResult)]
    assert [r.tool_name for r in tool_results] == ["get_weather"]
    assert not tool_results[0].tool_output.is_error

    # the agent finished with the model's second turn, whose prompt held the tool result
    assert isinstance(result, AgentOutput)
    outputs = [e for e in events if isinstance(e, AgentOutput)]
    assert len(outputs) == 2
    assert not any(isinstance(b, ToolCallBlock) for b in outputs[-1].response.blocks)
    assert [t.tool_name for t in result.tool_calls] == ["get_weather"]  # the run's calls
    assert str(result.response.content or "") == str(outputs[-1].response.content or "")
    last_prompt, last_raw = llm_calls.prompts_and_raws()[-1]
    assert tool_results[0].tool_output.content in last_prompt
    assert last_raw["finish_reason"] in ("stop", "length")
    if streaming:  # tokens reached the agent's event stream as they were decoded
        assert sum(1 for e in events if isinstance(e, AgentStream) and e.delta) > 1


async def test_function_agent_with_fixed_weights(llm, station, weather_tool, llm_calls):
    agent = FunctionAgent(
        tools=[weather_tool], llm=llm.with_weights({"safe": 0.0}), initial_tool_choice="get_weather"
    )
    await agent.run("Weather in Rome?")
    assert len(station.calls) == 1
    assert all(
        raw["weights"] == {"chat": 1.0, "safe": 0.0} for _, raw in llm_calls.prompts_and_raws()
    )


async def test_react_agent_run(llm, weather_tool, llm_calls):
    """The ReAct prompt (tool descriptions and format) reaches the model through the chat
    template, and the run finishes with the model's reply as the answer."""
    agent = ReActAgent(
        tools=[weather_tool],
        llm=llm.with_options(max_new_tokens=24),
        early_stopping_method="generate",
    )
    handler = agent.run("What is the weather in Markan?", max_iterations=3)
    events = [event async for event in handler.stream_events()]
    result = await handler
    assert isinstance(result, AgentOutput)
    prompt, _ = llm_calls.prompts_and_raws()[0]
    assert "get_weather" in prompt and "Thought" in prompt
    assert "What is the weather in Markan?" in prompt
    window = llm.metadata.context_window
    assert all(r["usage"]["total_tokens"] <= window for _, r in llm_calls.prompts_and_raws())
    assert any(isinstance(e, AgentStream) for e in events)
    assert result.response.content is not None
