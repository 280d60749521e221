"""langchain-tests' standard unit suite for ChatEFT (lazy loading: no model is loaded)."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from eft_integrations.langchain import ChatEFT

from ..chat_family import from_pretrained_args


class TestChatEFTUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatEFT]:
        return ChatEFT

    @property
    def chat_model_params(self) -> dict:
        return {**from_pretrained_args(), "weights": {"chat": 1.0, "safe": 0.5}}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # the models are fixed when the decoder is built
