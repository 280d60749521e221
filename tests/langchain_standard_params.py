"""What ChatEFT declares to langchain-tests' standard suites (unit, integration, real): one
mixin, so the three suites cannot disagree about the model's capabilities."""

from __future__ import annotations

from eft_integrations.langchain import ChatEFT


class ChatEFTStandardParams:
    """Mixed in before `ChatModelUnitTests` / `ChatModelIntegrationTests`."""

    @property
    def chat_model_class(self) -> type[ChatEFT]:
        return ChatEFT

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
