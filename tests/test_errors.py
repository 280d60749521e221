"""Bad input gets a clear ValueError naming the problem, and the decoder stays usable."""

from __future__ import annotations

import math

import pytest
import torch

from eft_integrations import Behavior, EFTDecoder

PROMPT = "The capital of Veloria"


@pytest.fixture(scope="module")
def baseline(decoder):
    return decoder.generate(PROMPT, temperature=0, max_new_tokens=6).token_ids


BAD_CALLS = [
    (
        {"weights": {"chatty": 1.0}},
        "unknown behavior 'chatty'.*known behaviors: \\['chat', 'safe'\\]",
    ),
    ({"weights": {"chat": math.nan}}, "must be a finite number.*known behaviors"),
    ({"weights": {"chat": math.inf}}, "must be a finite number"),
    ({"weights": {"chat": "1.0"}}, "must be a float.*known behaviors"),
    ({"weights": [{"chat": 1.0}]}, "list of weight dicts needs a list of prompts"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
    ({"top_p": 1.5}, "top_p must be in \\(0, 1\\]"),
    ({"top_k": -1}, "top_k must be an int >= 0"),
    ({"conservative_top_p": 2.0}, "conservative_top_p must be in"),
    ({"stop": [""]}, "stop must be non-empty strings"),
    # finite in Python, overflows where torch meets them
    ({"weights": {"chat": 1e38}}, "finite number in \\[-1e6, 1e6\\]"),
    ({"seed": 2**64}, "seed must be in \\[-2\\*\\*63, 2\\*\\*64 - 1\\]"),
    ({"seed": -(2**63) - 1}, "seed must be in"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CALLS)
def test_bad_options_are_clear_errors_and_decoder_stays_usable(decoder, baseline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        decoder.generate(PROMPT, **kwargs)
    assert decoder.generate(PROMPT, temperature=0, max_new_tokens=6).token_ids == baseline


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(decoder, baseline, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        decoder.generate(prompt)
    assert decoder.generate(PROMPT, temperature=0, max_new_tokens=6).token_ids == baseline


def test_prompt_longer_than_smallest_context_window(decoder, baseline):
    # the GPT-2 reference has the smallest window (96 positions)
    assert decoder.context_window == 96
    with pytest.raises(ValueError, match="smallest context window is 96; shorten the prompt"):
        decoder.generate([7] * 97)
    with pytest.raises(ValueError, match="no room to generate"):
        decoder.generate([7] * 96)
    assert decoder.generate(PROMPT, temperature=0, max_new_tokens=6).token_ids == baseline


def test_out_of_vocabulary_token_and_mismatched_batch_weights(decoder, baseline):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decoder.generate([1, 10_000])
    with pytest.raises(ValueError, match="2 weight dicts for 3 prompts"):
        decoder.generate(["a", "b", "c"], weights=[{}, {}])
    assert decoder.generate(PROMPT, temperature=0, max_new_tokens=6).token_ids == baseline


def test_a_failure_mid_decode_releases_the_decoder(decoder, baseline):
    class Broken:
        def allowed_mask(self, vocab_size):
            raise RuntimeError("grammar engine failed")

        def advance(self, token_id):
            pass

        def is_finished(self):
            return False

    with pytest.raises(RuntimeError, match="grammar engine failed"):
        decoder.generate(PROMPT, constraints=[Broken()])
    assert decoder.generate(PROMPT, temperature=0, max_new_tokens=6).token_ids == baseline


def test_mismatched_tokenizers_name_both_models_and_the_token(tiny_paths):
    with pytest.raises(ValueError) as error:
        EFTDecoder.from_pretrained(
            base=tiny_paths["base"],
            behaviors={
                "chat": Behavior(finetuned=tiny_paths["other"], reference=tiny_paths["ref"])
            },
            dtype=torch.float32,
        )
    message = str(error.value)
    assert str(tiny_paths["base"]) in message and str(tiny_paths["other"]) in message
    assert "disagree at token id" in message


def test_bad_behavior_spec_and_missing_tokenizer(tiny_paths, decoder):
    with pytest.raises(ValueError, match="Behavior\\(finetuned=..., reference=...\\)"):
        EFTDecoder.from_pretrained(base=tiny_paths["base"], behaviors={"chat": "x"})
    with pytest.raises(ValueError, match="needs tokenizer="):
        EFTDecoder(base=decoder._models[0])
    with pytest.raises(ValueError, match="unknown behavior"):
        EFTDecoder(
            base=decoder._models[0], tokenizer=decoder.tokenizer, default_weights={"chat": 1.0}
        )


def test_no_chat_template_is_a_clear_error(tiny_paths, decoder):
    tokenizer = decoder.tokenizer
    plain = EFTDecoder(base=decoder._models[0], tokenizer=tokenizer)
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="no chat template.*chat_template="):
            plain.format_chat([{"role": "user", "content": "hi"}])
    finally:
        tokenizer.chat_template = saved
