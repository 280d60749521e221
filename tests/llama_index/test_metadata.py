"""EFTLLM.metadata before the models load (LlamaIndex reads it while packing prompts), and the
raw-text completion entry points, which are not derived from chat (no chat template)."""

from __future__ import annotations

import pytest
import torch
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW

from eft_integrations import Behavior, ModelSpec
from eft_integrations.lazy import LazyDecoder
from eft_integrations.llama_index import EFTLLM

PROMPT = "The capital of Veloria is"


def _lazy_args(tiny_paths) -> dict:
    """The tiny family by path: a `Behavior` with a `ModelSpec`, a reference shared by two
    behaviors (GPT-2, the smallest window: 96), `Path` objects."""
    return {
        "base": tiny_paths["base"],
        "behaviors": {
            "chat": (str(tiny_paths["chat"]), tiny_paths["ref"]),
            "safe": Behavior(finetuned=ModelSpec(tiny_paths["safe"]), reference=tiny_paths["ref"]),
        },
    }


def test_metadata_loads_nothing_and_equals_the_loaded_metadata(tiny_paths):
    llm = EFTLLM(**_lazy_args(tiny_paths), load_kwargs={"dtype": torch.float32}, max_new_tokens=7)
    copy = llm.with_weights({"chat": 0.5})
    before = llm.metadata
    assert copy.metadata == before
    assert not llm._holder.loaded  # neither the models ...
    assert llm._holder._tokenizer is None  # ... nor the tokenizer
    assert before.context_window == 96  # the GPT-2 reference's n_positions
    assert before.model_name == "base + chat(chat - ref) + safe(safe - ref)"
    assert before.num_output == 7
    assert before.is_chat_model and before.is_function_calling_model

    decoder = llm.decoder  # loads
    assert llm.metadata == copy.metadata == before
    assert (decoder.context_window, decoder.model_name) == (96, before.model_name)


def test_a_shared_lazy_decoder_and_a_named_llm(tiny_paths):
    lazy = LazyDecoder(**_lazy_args(tiny_paths), dtype=torch.float32)
    named = EFTLLM(decoder=lazy, model_name="tiny-eft")
    plain = EFTLLM(decoder=lazy)
    assert named.metadata.model_name == "tiny-eft"
    unloaded = plain.metadata
    assert not lazy.loaded
    lazy.get()
    assert plain.metadata == unloaded
    assert named.metadata.context_window == unloaded.context_window == 96


def test_unreadable_configs_give_the_default_window_without_failing(tmp_path):
    """A model that is not there: metadata falls back (the load will say what is wrong)."""
    llm = EFTLLM(base=str(tmp_path / "missing"), behaviors={})
    meta = llm.metadata
    assert meta.context_window == DEFAULT_CONTEXT_WINDOW
    assert meta.model_name == "missing"
    assert not llm._holder.loaded
    with pytest.raises((OSError, ValueError)):  # not a folder, nor a hub id
        _ = llm.decoder


@pytest.fixture()
def llm(decoder) -> EFTLLM:
    """The tiny family, greedy, with a `completion_to_prompt` that marks the prompt."""
    return EFTLLM(
        decoder=decoder,
        temperature=0.0,
        max_new_tokens=6,
        completion_to_prompt=lambda prompt: f"Stop here. {prompt}",
    )


async def test_completion_continues_raw_text_in_all_four_ways(llm, decoder):
    """`complete` continues `completion_to_prompt(prompt)` as raw text, no chat template (so
    it is not chat through llama-index-core's chat_to_completion_decorator); `formatted=True`
    takes the prompt as given. The streamed and async variants give the same text."""
    expected = decoder.generate(f"Stop here. {PROMPT}", temperature=0.0, max_new_tokens=6)
    assert llm.complete(PROMPT).raw["token_ids"] == expected.token_ids
    assert llm.complete(PROMPT).text == expected.text
    assert "".join(c.delta for c in llm.stream_complete(PROMPT)) == expected.text
    assert (await llm.acomplete(PROMPT)).text == expected.text
    chunks = [c async for c in await llm.astream_complete(PROMPT)]
    assert chunks[-1].text == expected.text
    assert chunks[-1].raw["usage"] == llm.complete(PROMPT).raw["usage"]
    as_given = decoder.generate(PROMPT, temperature=0.0, max_new_tokens=6)
    assert llm.complete(PROMPT, formatted=True).text == as_given.text
