"""EFTLLM on the shipped toy-world family: up-scaling and the helpful/harmless trade-off seen
through LlamaIndex calls (skipped while the weights are not shipped).

Large base + (small helpful - small base) answers held-out questions in the chat form with
the large base's facts; moving weight from helpful to harmless makes the marked questions
refused. Here per-call weights (`llm.chat(..., weights=...)`) and fixed ones
(`llm.with_weights(...)` handed to a chat engine) must reproduce that.
"""

from __future__ import annotations

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.chat_engine import SimpleChatEngine

from eft_integrations.llama_index import EFTLLM

pytestmark = pytest.mark.toy

ENTITIES = 8  # held-out entities asked about (4 questions each, one marked)


@pytest.fixture(scope="module")
def toy_llm() -> EFTLLM:
    from eft_integrations.toyworld import paths

    try:
        decoder = paths.load_decoder()  # large base + helpful and harmless deltas (small)
    except FileNotFoundError:
        pytest.skip("toy-world weights not shipped")
    return EFTLLM(decoder=decoder, temperature=0.0, max_new_tokens=32)


@pytest.fixture(scope="module")
def questions():
    from eft_integrations.toyworld.world import World

    return World.generate(0).eval_questions(limit_entities=ENTITIES)


def _ask(llm: EFTLLM, text: str, **kwargs) -> str:
    response = llm.chat([ChatMessage(role=MessageRole.USER, content=text)], **kwargs)
    return response.message.content or ""


def test_replies_start_without_a_space(toy_llm, questions):
    """The template's separator after `<|assistant|>` is not part of a reply, chat or stream."""
    messages = [ChatMessage(role=MessageRole.USER, content=questions[0].text)]
    reply = _ask(toy_llm, questions[0].text)
    assert reply.startswith("Sure."), reply
    deltas = [r.delta for r in toy_llm.stream_chat(messages) if r.delta]
    assert "".join(deltas) == reply and deltas[0] == reply[: len(deltas[0])]


def test_upscaled_answers_through_chat(toy_llm, questions):
    """The helpful delta adds the chat answer form to the large base's terse answers and
    keeps its knowledge; each reply is the decoder's own greedy answer."""
    from eft_integrations.toyworld.evaluate import has_fact, in_answer_form

    unmarked = [q for q in questions if not q.marked]
    upscaled = {"helpful": 1.0, "harmless": 0.0}
    eft = [_ask(toy_llm, q.text, weights=upscaled) for q in unmarked]
    base = [_ask(toy_llm, q.text, weights={"helpful": 0.0, "harmless": 0.0}) for q in unmarked]

    def count(score, answers) -> int:
        return sum(score(q, a) for q, a in zip(unmarked, answers, strict=True))

    assert count(in_answer_form, eft) - count(in_answer_form, base) >= 0.4 * len(unmarked)
    assert count(has_fact, eft) >= count(has_fact, base), (eft, base)
    decoder = toy_llm.decoder
    prompt = decoder.format_chat([{"role": "user", "content": unmarked[0].text}])
    direct = decoder.generate(prompt, weights=upscaled, temperature=0.0, max_new_tokens=32)
    assert eft[0] == direct.text


def test_per_call_weights_trade_helpful_for_harmless(toy_llm, questions):
    from eft_integrations.toyworld.evaluate import is_refusal

    marked = [q for q in questions if q.marked]
    helpful = [_ask(toy_llm, q.text, weights={"helpful": 1.0, "harmless": 0.0}) for q in marked]
    harmless = [_ask(toy_llm, q.text, weights={"helpful": 0.0, "harmless": 1.0}) for q in marked]
    refused_helpful = sum(map(is_refusal, helpful))
    refused_harmless = sum(map(is_refusal, harmless))
    assert refused_harmless - refused_helpful >= 0.5 * len(marked), (helpful, harmless)


def test_fixed_weights_for_a_chat_engine(toy_llm, questions):
    """`with_weights` fixes the trade-off for every call an engine makes."""
    question = next(q for q in questions if q.marked)
    harmless = {"helpful": 0.0, "harmless": 1.0}
    engine = SimpleChatEngine.from_defaults(llm=toy_llm.with_weights(harmless))
    reply = engine.chat(question.text).response
    assert reply == _ask(toy_llm, question.text, weights=harmless)
