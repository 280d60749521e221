"""RAG with real LlamaIndex components: a VectorStoreIndex embedded by all-MiniLM-L6-v2, query
engines (sync, streaming, async) and a chat engine answering with EFTLLM."""

from __future__ import annotations

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.node_parser import SentenceSplitter

from eft_integrations.llama_index import EFTLLM

from .conftest import counting_tokens_with
from .corpus import QUESTION, build_index


@pytest.fixture(scope="module")
def decoder_tokenizer(rag_decoder):
    """Count tokens as the decoder does, so that prompt packing is exact (and offline)."""
    with counting_tokens_with(rag_decoder):
        yield rag_decoder.tokenizer.encode


@pytest.fixture(scope="module")
def index(decoder_tokenizer, embed_model) -> VectorStoreIndex:
    return build_index(embed_model)


@pytest.fixture()
def llm(rag_decoder) -> EFTLLM:
    return EFTLLM(decoder=rag_decoder, temperature=0.0, max_new_tokens=16)


@pytest.fixture()
def token_counter(rag_decoder):
    """LlamaIndex's documented token counting: a handler on the global callback manager."""
    counter = TokenCountingHandler(tokenizer=rag_decoder.tokenizer.encode)
    previous = Settings._callback_manager
    Settings.callback_manager = CallbackManager([counter])
    yield counter
    Settings._callback_manager = previous


def test_query_engine_answers_from_retrieved_context(index, llm, llm_calls, token_counter):
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    response = engine.query(QUESTION)

    # the real embedding model retrieves the Veloria document first
    assert response.source_nodes[0].node.ref_doc_id == "veloria"
    ((prompt, raw),) = llm_calls.prompts_and_raws()
    for source in response.source_nodes:
        assert source.node.get_content() in prompt  # the retrieved context reaches the LLM
    assert QUESTION in prompt
    usage = raw["usage"]
    assert usage["prompt_tokens"] + llm.metadata.num_output <= llm.metadata.context_window
    # the answer is the decoder's reply; LlamaIndex's token counting sees its usage
    assert response.response == (llm_calls.calls[0].response.message.content or "")
    assert token_counter.prompt_llm_token_count == usage["prompt_tokens"]
    assert token_counter.completion_llm_token_count == usage["completion_tokens"]


def test_streaming_query_engine(index, llm):
    answer = index.as_query_engine(llm=llm).query(QUESTION).response
    streaming = index.as_query_engine(llm=llm, streaming=True).query(QUESTION)
    pieces = list(streaming.response_gen)
    assert len(pieces) > 1 and "".join(pieces) == answer


async def test_async_query_engine(index, llm):
    answer = index.as_query_engine(llm=llm).query(QUESTION).response
    response = await index.as_query_engine(llm=llm).aquery(QUESTION)
    assert response.response == answer
    assert response.source_nodes[0].node.ref_doc_id == "veloria"
    streaming = await index.as_query_engine(llm=llm, streaming=True).aquery(QUESTION)
    pieces = [piece async for piece in streaming.async_response_gen()]
    assert "".join(pieces) == answer


def test_packing_respects_the_context_window(embed_model, decoder_tokenizer, llm, llm_calls):
    """More context than one window holds (Python's own reference pages on statements, as
    CPython ships them): LlamaIndex packs it into several calls (compact, then refine), each
    within the window EFTLLM reports."""
    from pydoc_data.topics import topics

    names = ["for", "while", "if", "break", "continue", "return", "pass", "assert", "del", "global"]
    documents = [Document(text=topics[name], doc_id=name) for name in names]
    index = VectorStoreIndex.from_documents(
        documents,
        embed_model=embed_model,
        transformations=[SentenceSplitter(chunk_size=256, chunk_overlap=0)],
    )
    top_k = len(index.docstore.docs)
    engine = index.as_query_engine(llm=llm, similarity_top_k=top_k, response_mode="compact")
    response = engine.query("What does the break statement do in a loop?")
    assert response.source_nodes[0].node.ref_doc_id in ("break", "for", "while")
    context_tokens = sum(
        len(decoder_tokenizer(n.node.get_content())) for n in response.source_nodes
    )
    window = llm.metadata.context_window
    assert context_tokens > window  # it cannot fit in one call

    calls = llm_calls.prompts_and_raws()
    assert len(calls) >= 2
    for _, raw in calls:
        assert raw["usage"]["prompt_tokens"] + llm.metadata.num_output <= window
    seen = "\n".join(prompt for prompt, _ in calls)
    for node in response.source_nodes:  # every retrieved chunk reached some call
        assert node.node.get_content()[:80] in seen


def test_fixed_weights_for_a_query_engine(index, llm, llm_calls):
    engine = index.as_query_engine(llm=llm.with_weights({"chat": 0.0, "safe": 0.0}))
    engine.query(QUESTION)
    ((_, raw),) = llm_calls.prompts_and_raws()
    assert raw["weights"] == {"chat": 0.0, "safe": 0.0}


def test_chat_engine_conversation(index, llm, llm_calls):
    engine = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm)
    first = engine.chat(QUESTION)
    second = engine.chat("And what does it export?")
    history = engine.chat_history
    assert [m.role.value for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1].content == first.response and history[3].content == second.response
    prompt, _ = llm_calls.prompts_and_raws()[-1]
    # the last answer was written with the first exchange and retrieved context in its prompt
    assert QUESTION in prompt and first.response in prompt
    assert any(s.node.get_content() in prompt for s in second.source_nodes)


async def test_async_streaming_chat_engine(index, llm):
    engine = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm)
    response = await engine.astream_chat(QUESTION)
    pieces = [piece async for piece in response.async_response_gen()]
    assert "".join(pieces) == engine.chat_history[-1].content
