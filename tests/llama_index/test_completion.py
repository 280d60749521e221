"""EFTLLM completion side: options, metadata, streaming, async, usage and per-call weights."""

from __future__ import annotations

import asyncio

import pytest
import torch
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler

from eft_integrations import EFTDecoder
from eft_integrations.llama_index import EFTLLM

from ..event_loop import run_beside_ticker
from .conftest import WINDOW

PROMPT = "The capital of Veloria is"


@pytest.fixture()
def llm(rag_decoder) -> EFTLLM:
    return EFTLLM(decoder=rag_decoder, temperature=0.0, max_new_tokens=12)


def test_metadata_is_honest(llm, rag_decoder):
    meta = llm.metadata
    assert meta.context_window == rag_decoder.context_window == WINDOW
    assert meta.num_output == 12
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == rag_decoder.model_name
    assert "chat(" in meta.model_name and "safe(" in meta.model_name


def test_complete_matches_the_decoder_and_reports_usage(llm, rag_decoder):
    response = llm.complete(PROMPT)
    expected = rag_decoder.generate(PROMPT, temperature=0.0, max_new_tokens=12)
    assert response.text == expected.text
    usage = response.raw["usage"]
    assert usage == {
        "prompt_tokens": expected.usage.prompt_tokens,
        "completion_tokens": expected.usage.completion_tokens,
        "total_tokens": expected.usage.total_tokens,
    }
    assert response.additional_kwargs == usage
    assert response.raw["weights"] == {"chat": 1.0, "safe": 1.0}
    assert response.raw["finish_reason"] in ("stop", "length")


def test_stream_complete_deltas_and_cumulative_text(llm):
    full = llm.complete(PROMPT)
    chunks = list(llm.stream_complete(PROMPT))
    assert "".join(c.delta for c in chunks) == full.text
    running = ""
    for chunk in chunks:
        running += chunk.delta
        assert chunk.text == running
    assert chunks[-1].raw["usage"] == full.raw["usage"]
    assert chunks[-1].raw["finish_reason"] == full.raw["finish_reason"]


async def test_async_complete_and_stream_match_sync(llm):
    full = llm.complete(PROMPT)
    assert (await llm.acomplete(PROMPT)).text == full.text
    stream = await llm.astream_complete(PROMPT)
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].text == full.text
    assert chunks[-1].raw["usage"] == full.raw["usage"]


def test_call_options_override_fields_and_unknown_ones_fail(llm):
    assert llm.complete(PROMPT, max_new_tokens=3).raw["usage"]["completion_tokens"] <= 3
    assert llm.complete(PROMPT, max_tokens=2).raw["usage"]["completion_tokens"] <= 2
    sampled = [llm.complete(PROMPT, temperature=1.0, seed=7).text for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded sampling is deterministic
    # a ValueError naming the keyword and the accepted ones, as in ChatEFT
    with pytest.raises(ValueError, match=r"options \['temprature'\]; accepted: .*'temperature'"):
        llm.complete(PROMPT, temprature=0.5)
    with pytest.raises(ValueError, match="known behaviors"):
        llm.complete(PROMPT, weights={"helpful": 1.0})


def _logprobs_alone(path) -> torch.Tensor:
    """log p of one model by itself (an EFT decoder without behaviors)."""
    return EFTDecoder.from_pretrained(base=path, dtype=torch.float32).next_token_logprobs(PROMPT)


def test_per_call_weights_follow_the_eft_formula(llm, rag_paths):
    """The greedy next token under per-call weights is the argmax of
    log p_base + w_chat (log p_chat - log p_ref) + w_safe (log p_safe - log p_ref)."""
    base, chat, safe, ref = (_logprobs_alone(rag_paths[n]) for n in ("base", "chat", "safe", "ref"))
    first_tokens = set()
    for w_chat, w_safe in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (2.0, -1.0), (0.5, 0.5)]:
        expected = torch.log_softmax(base + w_chat * (chat - ref) + w_safe * (safe - ref), dim=-1)
        response = llm.complete(PROMPT, weights={"chat": w_chat, "safe": w_safe}, max_new_tokens=1)
        assert response.raw["weights"] == {"chat": w_chat, "safe": w_safe}
        # the decoder's own composed log-probs agree with the formula computed here
        composed = llm.decoder.next_token_logprobs(PROMPT, weights={"chat": w_chat, "safe": w_safe})
        torch.testing.assert_close(composed, expected, atol=1e-4, rtol=1e-4)
        best = int(expected.argmax())
        assert response.raw["token_ids"] == [best]
        first_tokens.add(best)
    # different weights pick different tokens: the weights reach the decoder
    assert len(first_tokens) > 1


def test_with_weights_fixes_weights_and_shares_the_decoder(llm):
    amplified = llm.with_weights({"chat": 2.0})
    assert amplified.decoder is llm.decoder
    assert amplified.weights == {"chat": 2.0} and llm.weights is None
    assert amplified.complete(PROMPT).raw["weights"] == {"chat": 2.0, "safe": 1.0}
    # per-call weights merge over the fixed ones
    assert amplified.complete(PROMPT, weights={"safe": 0.0}).raw["weights"] == {
        "chat": 2.0,
        "safe": 0.0,
    }
    assert amplified.complete(PROMPT).text == llm.complete(PROMPT, weights={"chat": 2.0}).text
    sampled = llm.with_options(temperature=0.5, seed=3)
    assert sampled.temperature == 0.5 and sampled.decoder is llm.decoder
    with pytest.raises(ValueError):
        llm.with_options(temperature=-1.0)
    with pytest.raises(ValueError, match="unknown EFTLLM options"):
        llm.with_options(temprature=0.5)


def test_unknown_behaviors_fail_when_the_llm_is_made(llm, rag_decoder):
    """Weights fixed on an LLM are checked when it is made, not at its first call: inside a
    query engine a failing call only shows as an "Empty Response"."""
    known = r"known behaviors: \['chat', 'safe'\]"
    with pytest.raises(ValueError, match=rf"unknown behavior 'unknown'.*{known}"):
        llm.with_weights({"unknown": 1.0})
    with pytest.raises(ValueError, match=known):
        llm.with_options(weights={"chat": 1.0, "unknown": 1.0})
    with pytest.raises(ValueError, match=known):
        EFTLLM(decoder=rag_decoder, weights={"unknown": 1.0})
    with pytest.raises(ValueError, match=r"finite.*" + known):
        llm.with_weights({"chat": float("nan")})
    assert llm.with_weights({"safe": 0.0}).weights == {"safe": 0.0}


def test_unknown_behaviors_fail_before_a_lazy_llm_loads(rag_paths):
    """A lazily built LLM checks its weights against the behaviors it was given, unloaded."""
    lazy = {
        "base": str(rag_paths["base"]),
        "behaviors": {"chat": (str(rag_paths["chat"]), str(rag_paths["ref"]))},
    }
    with pytest.raises(ValueError, match=r"known behaviors: \['chat'\]"):
        EFTLLM(**lazy, weights={"safe": 1.0})
    llm = EFTLLM(**lazy, weights={"chat": 0.5})
    with pytest.raises(ValueError, match=r"unknown behavior 'safe'"):
        llm.with_weights({"safe": 1.0})
    with pytest.raises(ValueError, match=r"known behaviors: \[\]"):
        EFTLLM(base=lazy["base"], behaviors={}, weights={"chat": 1.0})
    assert llm.with_weights({"chat": 2.0}).weights == {"chat": 2.0}
    assert not llm._holder.loaded


def test_llms_sharing_a_lazy_decoder_load_it_once(rag_paths):
    """`decoder=LazyDecoder(...)` (the loader ChatEFT takes too): weights are checked against
    its behaviors unloaded; the first call loads the models for every LLM holding it."""
    from eft_integrations.lazy import LazyDecoder

    lazy = LazyDecoder(
        base=str(rag_paths["base"]),
        dtype=torch.float32,
        behaviors={"chat": (str(rag_paths["chat"]), str(rag_paths["ref"]))},
    )
    first = EFTLLM(decoder=lazy, temperature=0.0, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"known behaviors: \['chat'\]"):
        EFTLLM(decoder=lazy, weights={"safe": 1.0})
    second = first.with_weights({"chat": 0.5})
    assert not lazy.loaded
    assert second.complete(PROMPT).raw["weights"] == {"chat": 0.5}
    assert lazy.loaded and first.decoder is second.decoder is lazy.get()
    with pytest.raises(ValueError, match="EFTDecoder or a LazyDecoder"):
        EFTLLM(decoder="not a decoder")


def test_lazy_loading_from_model_paths(rag_paths):
    llm = EFTLLM(
        base=str(rag_paths["base"]),
        behaviors={"chat": (str(rag_paths["chat"]), str(rag_paths["ref"]))},
        load_kwargs={"dtype": torch.float32},
        temperature=0.0,
        max_new_tokens=4,
    )
    assert not llm._holder.loaded  # nothing loaded at construction
    copy = llm.with_weights({"chat": 0.5})
    assert copy.complete(PROMPT).raw["weights"] == {"chat": 0.5}
    assert llm._holder.loaded and llm.decoder is copy.decoder  # loaded once, shared
    assert llm.metadata.context_window == WINDOW
    with pytest.raises(ValueError, match="exactly one of"):
        EFTLLM()


def test_token_counting_handler_sees_the_decoder_usage(rag_decoder):
    counter = TokenCountingHandler(tokenizer=rag_decoder.tokenizer.encode)
    llm = EFTLLM(
        decoder=rag_decoder,
        temperature=0.0,
        max_new_tokens=5,
        callback_manager=CallbackManager([counter]),
    )
    response = llm.complete(PROMPT)
    assert counter.prompt_llm_token_count == response.raw["usage"]["prompt_tokens"]
    assert counter.completion_llm_token_count == response.raw["usage"]["completion_tokens"]
    for _ in llm.stream_complete(PROMPT):
        pass
    assert counter.prompt_llm_token_count == 2 * response.raw["usage"]["prompt_tokens"]


async def test_async_methods_keep_the_event_loop_responsive(rag_decoder):
    llm = EFTLLM(decoder=rag_decoder, temperature=0.0, max_new_tokens=64, stop=["never-appears"])
    prompt = "Numbers: 1 2 3 4 5 6 7 8 9 10, and more numbers. " * 4
    messages = [ChatMessage(role=MessageRole.USER, content=prompt)]

    async def blocking():  # the anti-pattern: the sync call inside a coroutine
        return llm.complete(prompt)

    blocked_probe = await run_beside_ticker(blocking, tick=0.002)
    blocked_gap, blocked = blocked_probe.max_gap, blocked_probe.result
    assert blocked.raw["usage"]["completion_tokens"] > 8

    async def streamed_completion():
        return [chunk async for chunk in await llm.astream_complete(prompt)]

    async def streamed_chat():
        return [chunk async for chunk in await llm.astream_chat(messages)]

    calls = {
        "acomplete": lambda: llm.acomplete(prompt),
        "astream_complete": streamed_completion,
        "achat": lambda: llm.achat(messages),
        "astream_chat": streamed_chat,
    }
    for name, call in calls.items():
        probe = await run_beside_ticker(call, tick=0.002)
        gap, ticks = probe.max_gap, probe.ticks
        print(
            f"{name}: longest event-loop stall {gap * 1000:.1f} ms over {ticks} ticks "
            f"(sync complete inside a coroutine: {blocked_gap * 1000:.1f} ms)"
        )
        assert ticks >= 5
        # decoding took about blocked_gap; the loop was never held for a large part of it
        assert gap < max(0.1, blocked_gap / 3)


async def test_closing_an_async_stream_stops_decoding(rag_decoder):
    llm = EFTLLM(decoder=rag_decoder, temperature=0.0, max_new_tokens=400, stop=["never-appears"])
    stream = await llm.astream_complete(PROMPT)
    before = rag_decoder.forward_calls
    async for _ in stream:
        break
    await stream.aclose()
    await asyncio.sleep(0.3)  # the worker notices the cancel between tokens
    stopped_at = rag_decoder.forward_calls
    await asyncio.sleep(0.3)
    assert rag_decoder.forward_calls == stopped_at
    assert stopped_at - before < 100 * 4  # far fewer than 400 tokens x 4 models


def test_speculative_decoding_is_exact_through_the_llm(llm):
    """Greedy speculative decoding (drafts by the fine-tuning-scale models, verified by the
    base) gives the same tokens as token-by-token EFT decoding."""
    plain = llm.complete(PROMPT, max_new_tokens=24)
    fast = llm.with_options(speculative_k=4).complete(PROMPT, max_new_tokens=24)
    assert fast.raw["token_ids"] == plain.raw["token_ids"]


async def test_lazy_loading_in_async_code_and_base_alone(rag_paths):
    """A lazily built LLM loads on a worker thread on its first async call; a decoder with
    no behaviors (the base model alone) is a plain local LLM."""
    llm = EFTLLM(
        base=str(rag_paths["base"]),
        behaviors={},
        load_kwargs={"dtype": torch.float32},
        temperature=0.0,
        max_new_tokens=4,
    )
    response = await llm.acomplete(PROMPT)
    assert response.raw["weights"] == {}
    alone = EFTDecoder.from_pretrained(base=rag_paths["base"], dtype=torch.float32)
    assert response.text == alone.generate(PROMPT, temperature=0.0, max_new_tokens=4).text


def test_logprobs_come_as_llama_index_openai_gives_them(rag_decoder):
    llm = EFTLLM(decoder=rag_decoder, temperature=0.0, max_new_tokens=6, logprobs=True)
    expected = rag_decoder.generate("The capital", temperature=0, max_new_tokens=6, logprobs=0)
    response = llm.complete("The capital")
    assert [[lp.logprob for lp in token] for token in response.logprobs] == [
        [pytest.approx(e.logprob, abs=1e-5)] for e in expected.logprobs
    ]
    top = llm.complete("The capital", top_logprobs=3)
    assert [len(token) for token in top.logprobs] == [3] * len(expected.logprobs)
    assert top.logprobs[0][0].token == rag_decoder.tokenizer.decode(
        [
            next(
                iter(
                    rag_decoder.generate("The capital", temperature=0, max_new_tokens=1, logprobs=3)
                    .logprobs[0]
                    .top_logprobs
                )
            )
        ]
    )
    streamed = [t for r in llm.stream_complete("The capital") for t in (r.logprobs or [])]
    assert [t[0].logprob for t in streamed] == [t[0].logprob for t in response.logprobs]
    chat = llm.chat([ChatMessage(role=MessageRole.USER, content="Hello")])
    assert chat.logprobs and len(chat.logprobs) == chat.raw["usage"]["completion_tokens"]
    assert EFTLLM(decoder=rag_decoder, max_new_tokens=2).complete("x").logprobs is None
