"""langchain-tests' standard unit suite for ChatEFT (lazy loading: no model is loaded)."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from ..chat_family import from_pretrained_args
from ..langchain_standard_params import ChatEFTStandardParams


class TestChatEFTUnit(ChatEFTStandardParams, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {**from_pretrained_args(), "weights": {"chat": 1.0, "safe": 0.5}}
