"""Speculative EFT decoding: exact against plain decoding, and the accept/resample maths."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from eft_integrations import EFTDecoder
from eft_integrations.speculative import accept_draft

from .test_decoder import _chi_square_critical

PROMPTS = ["The capital of Veloria", "Héllo wörld, café"]


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("weights", [{"chat": 1.0, "safe": 0.0}, {"chat": 0.4, "safe": -0.3}])
def test_greedy_speculative_equals_plain_greedy(decoder, k, weights):
    for prompt in PROMPTS:
        plain = decoder.generate(prompt, weights=weights, temperature=0, max_new_tokens=25)
        fast = decoder.generate(prompt, weights=weights, temperature=0, max_new_tokens=25,
                                speculative_k=k)
        assert fast.token_ids == plain.token_ids
        assert (fast.text, fast.finish_reason, fast.usage) == \
            (plain.text, plain.finish_reason, plain.usage)


def test_speculative_with_prompt_views_stop_strings_and_conservative(decoder):
    chat_view = decoder.format_chat([{"role": "user", "content": "The capital?"}])
    kwargs = dict(base_prompt="The capital is", temperature=0, max_new_tokens=20,
                  conservative_top_p=0.9)
    plain = decoder.generate(chat_view, **kwargs)
    stop = plain.text[6:9]
    plain = decoder.generate(chat_view, stop=stop, **kwargs)
    fast = decoder.generate(chat_view, stop=stop, speculative_k=4, **kwargs)
    assert (fast.token_ids, fast.text) == (plain.token_ids, plain.text)
    streamed = list(decoder.stream(chat_view, stop=stop, speculative_k=4, **kwargs))
    assert "".join(c.text for c in streamed) == plain.text


def test_seeded_speculative_sampling_is_reproducible(decoder):
    kwargs = dict(temperature=0.9, max_new_tokens=20, seed=3, speculative_k=3)
    assert decoder.generate(PROMPTS[0], **kwargs).token_ids == \
        decoder.generate(PROMPTS[0], **kwargs).token_ids


def test_one_base_forward_per_round_when_drafts_agree(tiny_paths):
    # base = a second copy of the reference: EFT then equals the draft, so every draft is
    # accepted and the base runs once per k + 1 tokens
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)  # noqa: E731
    plain = EFTDecoder.from_pretrained(base=tiny_paths["ref"], dtype=torch.float32)
    base, chat, ref = load(tiny_paths["ref"]), load(tiny_paths["chat"]), load(tiny_paths["ref"])
    decoder = EFTDecoder(base=base, behaviors={"chat": (chat, ref)},
                         tokenizer=plain.tokenizer, eos_token_ids=[])
    calls = {"base": 0}
    base.register_forward_hook(lambda *_: calls.__setitem__("base", calls["base"] + 1))
    out = decoder.generate("The capital", temperature=0, max_new_tokens=20, speculative_k=4)
    assert len(out.token_ids) == 20
    assert calls["base"] == 1 + 4  # prefill, then 4 rounds of 4 drafts + 1 bonus (+1 first)
    assert out.token_ids == decoder.generate("The capital", temperature=0,
                                             max_new_tokens=20).token_ids


def test_accept_draft_keeps_the_target_distribution():
    # one drafted token, then the bonus: first and second emitted tokens must follow the target
    g = torch.Generator().manual_seed(0)
    vocab = 8
    target = torch.randn(2, vocab, generator=g).mul(1.5).log_softmax(-1)
    draft = torch.randn(1, vocab, generator=g).mul(1.5).log_softmax(-1)
    n = 12000
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    for _ in range(n):
        token = int(torch.multinomial(draft[0].exp(), 1, generator=g))
        emitted = accept_draft(target, draft, [token], greedy=False, generator=g)
        first[emitted[0]] += 1
        if len(emitted) == 2:
            second[emitted[1]] += 1
    for counts, p in ((first, target[0].exp()), (second, target[1].exp())):
        wanted = p * counts.sum()
        chi2 = (((counts - wanted) ** 2) / wanted).sum().item()
        assert chi2 < _chi_square_critical(vocab - 1), chi2


def test_accept_draft_greedy():
    target = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]).log()
    draft = torch.zeros(2, 2).log_softmax(-1)
    assert accept_draft(target, draft, [1, 0], greedy=True) == [1, 0, 1]  # all + bonus
    assert accept_draft(target, draft, [1, 1], greedy=True) == [1, 0]  # stops at mismatch
    assert accept_draft(target, draft, [0, 0], greedy=True) == [1]


@pytest.mark.parametrize("kwargs,message", [
    ({"prompt": PROMPTS[0], "speculative_k": 0}, "speculative_k must be an int >= 1"),
    ({"prompt": PROMPTS[0], "speculative_k": 2, "constraints": [object()]},
     "does not combine with constraints"),
])
def test_speculative_bad_input(decoder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        decoder.generate(**kwargs)
    # the decoder still works after the refusal: the same tokens as plain greedy decoding
    fast = decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=3, speculative_k=2)
    plain = decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=3)
    assert 1 <= len(fast.token_ids) <= 3
    assert (fast.token_ids, fast.text, fast.finish_reason) == \
        (plain.token_ids, plain.text, plain.finish_reason)
    assert fast.usage.completion_tokens == len(fast.token_ids)


def test_speculative_needs_behaviors(tiny_paths):
    alone = EFTDecoder.from_pretrained(base=tiny_paths["chat"], dtype=torch.float32)
    with pytest.raises(ValueError, match="has none"):
        alone.generate("x", speculative_k=2)
