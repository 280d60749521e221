"""langchain-tests' standard integration suite for ChatEFT on real (tiny, random) models.

The models are the tiny random EFT family of `tests/chat_family.py` (base + two behaviors
over a shared reference, real transformers models loaded through from_pretrained), with a
Hermes-style chat template. Tool calls and structured output pass because the EFT-composed
distribution is constrained by llguidance grammars; the tests that need a model that
understands the question are xfailed with the reason.
"""

from __future__ import annotations

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from ..chat_family import chat_decoder
from ..langchain_standard_params import ChatEFTStandardParams

NEEDS_UNDERSTANDING = (
    "a tiny random model cannot read the question: the call is forced and schema-valid, but "
    "the argument values it must copy from the prompt are random"
)


class TestChatEFTIntegration(ChatEFTStandardParams, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict:
        return {
            "decoder": chat_decoder(tools_template=True),
            "temperature": 0.0,
            "max_tokens": 80,
            "weights": {"chat": 1.0, "safe": 0.5},
        }

    @pytest.mark.xfail(reason=NEEDS_UNDERSTANDING)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=NEEDS_UNDERSTANDING)
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    @pytest.mark.xfail(
        reason="with tool_choice auto a tiny random model never decides to open "
        "<tool_call>: calling is the model's choice there"
    )
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(
        reason="the shortest valid call of this two-string tool is ~100 tokens in "
        "the tiny byte-level vocabulary, more than max_tokens=80, so it is cut "
        "(an InvalidToolCall); and a random model could not copy the name anyway"
    )
    def test_unicode_tool_call_integration(self, model: BaseChatModel) -> None:
        super().test_unicode_tool_call_integration(model)
