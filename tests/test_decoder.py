"""The decoder against the brute-force reference: batch, padding, cache, prompt views."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from eft_integrations import EFTDecoder
from eft_integrations.composition import sampling_logprobs

from .reference import BruteForceEFT, tiny_family_reference

PROMPTS = ["The capital of Veloria", "Héllo wörld, café crème — naïve", "Stop"]
WEIGHTS = [{"chat": 1.0, "safe": 0.0}, {"chat": 0.4, "safe": 0.6}, {"chat": 2.0, "safe": -0.5}]


@pytest.fixture(scope="module")
def reference(tiny_paths, decoder) -> BruteForceEFT:
    return tiny_family_reference(tiny_paths, decoder.vocab_size)


def test_next_token_logprobs_match_reference_one_prompt(decoder, reference):
    got = decoder.next_token_logprobs(PROMPTS[0], weights={"chat": 0.7})
    expected = reference.next_logprobs(decoder.encode(PROMPTS[0]), {"chat": 0.7, "safe": 1.0})
    assert got.shape == (decoder.vocab_size,)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=0)


def test_next_token_logprobs_match_reference_padded_batch_per_row_weights(decoder, reference):
    got = decoder.next_token_logprobs(PROMPTS, weights=WEIGHTS)
    assert got.shape == (3, decoder.vocab_size)
    for row, (prompt, w) in enumerate(zip(PROMPTS, WEIGHTS, strict=True)):
        expected = reference.next_logprobs(decoder.encode(prompt), w)
        torch.testing.assert_close(got[row].double(), expected, atol=2e-5, rtol=0)


def test_greedy_generate_matches_reference_one_prompt(decoder, reference):
    out = decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=12)
    expected = reference.greedy(decoder.encode(PROMPTS[0]), {}, 12, eos=decoder.eos_token_ids)
    assert out.token_ids == expected
    assert out.usage.completion_tokens == len(expected)
    assert out.usage.prompt_tokens == len(decoder.encode(PROMPTS[0]))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_greedy_batch_matches_reference_per_row(decoder, reference):
    outs = decoder.generate(PROMPTS, weights=WEIGHTS, temperature=0, max_new_tokens=10)
    assert isinstance(outs, list) and len(outs) == 3
    for out, prompt, w in zip(outs, PROMPTS, WEIGHTS, strict=True):
        expected = reference.greedy(decoder.encode(prompt), w, 10, eos=decoder.eos_token_ids)
        assert out.token_ids == expected, prompt
        assert out.weights == {"chat": 1.0, "safe": 1.0} | w


def test_batched_equals_one_at_a_time(decoder):
    batched = decoder.generate(PROMPTS, weights=WEIGHTS, temperature=0, max_new_tokens=8)
    single = [
        decoder.generate(p, weights=w, temperature=0, max_new_tokens=8)
        for p, w in zip(PROMPTS, WEIGHTS, strict=True)
    ]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]


def test_prompt_views_give_base_models_their_own_prefix(decoder, reference):
    chat_view = decoder.format_chat([{"role": "user", "content": "The capital of Veloria?"}])
    base_view = "The capital of Veloria is"
    got = decoder.generate(chat_view, base_prompt=base_view, temperature=0, max_new_tokens=6)
    expected = reference.greedy(
        decoder.encode(chat_view),
        {},
        6,
        base_ids=decoder.encode(base_view),
        eos=decoder.eos_token_ids,
    )
    assert got.token_ids == expected
    lp = decoder.next_token_logprobs(chat_view, base_prompt=base_view)
    torch.testing.assert_close(
        lp.double(),
        reference.next_logprobs(decoder.encode(chat_view), {}, decoder.encode(base_view)),
        atol=2e-5,
        rtol=0,
    )


def test_token_id_prompts_are_used_as_given(decoder):
    ids = decoder.encode(PROMPTS[1])
    assert (
        decoder.generate(ids, temperature=0, max_new_tokens=5).token_ids
        == decoder.generate(PROMPTS[1], temperature=0, max_new_tokens=5).token_ids
    )
    batch = decoder.generate([ids, ids[:3]], temperature=0, max_new_tokens=3)
    assert len(batch) == 2


def test_shared_reference_is_loaded_once_and_run_once_per_step(decoder):
    # five roles (base, chat, safe, ref, ref) but four distinct models
    assert len(decoder.model_names) == 4
    calls = {name: 0 for name in decoder.model_names}
    hooks = [
        model.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        for name, model in zip(decoder.model_names, decoder._models, strict=True)
    ]
    try:
        before = decoder.forward_calls
        out = decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=6)
    finally:
        for hook in hooks:
            hook.remove()
    steps = len(out.token_ids)  # one prefill + (steps - 1) decode steps
    assert set(calls.values()) == {steps}
    assert decoder.forward_calls - before == 4 * steps


def test_no_behaviors_decodes_the_base_like_transformers_generate(tiny_paths):
    base_only = EFTDecoder.from_pretrained(base=tiny_paths["chat"], dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_paths["chat"], dtype=torch.float32)
    ids = base_only.encode(PROMPTS[0])
    hf = model.generate(
        torch.tensor([ids]),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=list(base_only.eos_token_ids),
        pad_token_id=2,
    )
    ours = base_only.generate(ids, temperature=0, max_new_tokens=10)
    assert ours.token_ids == hf[0, len(ids) :].tolist()
    assert base_only.behavior_names == []


def test_seeded_sampling_is_reproducible(decoder):
    kwargs = dict(temperature=1.0, max_new_tokens=12, seed=11)
    a = decoder.generate(PROMPTS, weights=WEIGHTS, **kwargs)
    b = decoder.generate(PROMPTS, weights=WEIGHTS, **kwargs)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    c = decoder.generate(PROMPTS, weights=WEIGHTS, **{**kwargs, "seed": 12})
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def _chi_square_critical(df: int) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty), so the test fails only on real bias."""
    z = 3.09
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 6, 0.9)])
def test_sampled_frequencies_match_the_composed_distribution(decoder, temperature, top_k, top_p):
    n = 3000
    weights = {"chat": 0.6, "safe": 0.4}
    expected = (
        sampling_logprobs(
            decoder.next_token_logprobs(PROMPTS[0], weights=weights)[None],
            temperature,
            top_k,
            top_p,
        )[0]
        .exp()
        .double()
    )
    # no seed: every row draws from its own fresh generator (a shared seed would repeat one
    # sample n times, since a seeded row samples exactly as it would alone)
    outs = decoder.generate(
        [PROMPTS[0]] * n,
        weights=weights,
        max_new_tokens=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    counts = torch.bincount(
        torch.tensor([o.token_ids[0] for o in outs]), minlength=decoder.vocab_size
    ).double()
    assert counts[expected == 0].sum() == 0  # nothing outside the top-k / top-p set
    big = expected * n >= 5  # pool rare tokens so every cell expects at least 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big].sum()[None]]) * n
    keep = wanted > 0
    chi2 = (((observed - wanted) ** 2)[keep] / wanted[keep]).sum().item()
    df = int(keep.sum()) - 1
    assert df >= 2
    assert chi2 < _chi_square_critical(df), (chi2, df)


def test_stop_string_split_across_tokens_is_found_and_trimmed(decoder):
    script = decoder.encode("The end is near; the end. Numbers")[1:]
    pieces = [decoder.tokenizer.decode([t]) for t in script]
    stop = "ar; th"
    assert not any(stop in piece for piece in pieces)  # it spans several tokens
    got = decoder.generate(
        PROMPTS[0],
        temperature=0,
        max_new_tokens=30,
        stop=["zzz", stop],
        constraints=[ScriptedTokens(script)],
    )
    assert (got.finish_reason, got.text) == ("stop", "The end is ne")
    chunks = list(
        decoder.stream(
            PROMPTS[0],
            temperature=0,
            max_new_tokens=30,
            stop=stop,
            constraint=ScriptedTokens(script),
        )
    )
    assert "".join(c.text for c in chunks) == "The end is ne"


def test_stream_equals_generate(decoder):
    kwargs = dict(weights={"chat": 0.5}, temperature=0.9, max_new_tokens=25, seed=4)
    chunks = list(decoder.stream(PROMPTS[1], **kwargs))
    full = decoder.generate(PROMPTS[1], **kwargs)
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert chunks[-1].finish_reason == full.finish_reason
    # the second call reads the first one's prompt from the prefix cache: same counts
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stream_with_stop_string_never_emits_the_stop(decoder):
    free = decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=30).text
    stop = free[5:8]
    chunks = [
        c.text for c in decoder.stream(PROMPTS[0], temperature=0, max_new_tokens=30, stop=stop)
    ]
    assert "".join(chunks) == free[: free.index(stop)]


class ScriptedTokens:
    """A TokenConstraint that allows exactly one scripted token at each step."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.position = 0

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.token_ids[self.position]] = True
        return mask

    def advance(self, token_id: int) -> None:
        assert token_id == self.token_ids[self.position]
        self.position += 1

    def is_finished(self) -> bool:
        return self.position == len(self.token_ids)


def _byte_tokens(decoder, text: str) -> list[int]:
    """One token per byte of `text` (byte-level BPE has a token for every byte)."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=_byte_of), strict=True)}
    vocab = decoder.tokenizer.get_vocab()
    return [vocab[byte_to_char[b]] for b in text.encode("utf-8")]


def _byte_of(char: str) -> int:
    # GPT-2 byte-to-unicode table: printable bytes map to themselves, the rest to 256+
    code = ord(char)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def test_stream_never_splits_a_multibyte_character(decoder):
    script = _byte_tokens(decoder, "é日本x")  # 2 + 3 + 3 + 1 bytes, one token each
    chunks = list(
        decoder.stream(
            PROMPTS[0], temperature=0, max_new_tokens=20, constraint=ScriptedTokens(script)
        )
    )
    assert "".join(c.text for c in chunks) == "é日本x"
    assert all("\ufffd" not in c.text for c in chunks)
    assert [c.text for c in chunks if c.text] == ["é", "日", "本", "x"]
    assert chunks[-1].finish_reason == "stop"  # the constraint finished


def test_end_of_turn_token_stops_with_reason_stop(decoder):
    eos = min(decoder.eos_token_ids)
    script = [*decoder.encode("Stop")[1:], eos]
    out = decoder.generate(
        PROMPTS[0], temperature=0, max_new_tokens=20, constraints=[ScriptedTokens([*script, eos])]
    )
    assert out.finish_reason == "stop"
    assert out.token_ids == script
    assert out.text == "Stop"


def test_length_finish_and_context_window(decoder):
    out = decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=3, stop=["\x00"])
    assert (out.finish_reason, len(out.token_ids)) == ("length", 3)
    window = decoder.context_window
    near_full = [7] * (window - 2)
    out = decoder.generate(near_full, temperature=0, max_new_tokens=50)
    assert out.finish_reason == "length" and len(out.token_ids) <= 2


async def test_astream_equals_stream_and_agenerate_equals_generate(decoder):
    kwargs = dict(temperature=0.8, max_new_tokens=10, seed=9)
    chunks = [c async for c in decoder.astream(PROMPTS[0], **kwargs)]
    assert "".join(c.text for c in chunks) == decoder.generate(PROMPTS[0], **kwargs).text
    result = await decoder.agenerate(PROMPTS, **kwargs)
    assert [r.token_ids for r in result] == [
        r.token_ids for r in decoder.generate(PROMPTS, **kwargs)
    ]


async def test_abandoning_an_async_stream_stops_decoding(decoder):
    stream = decoder.astream(PROMPTS[0], temperature=0, max_new_tokens=60, stop=["\x00"])
    async for _ in stream:
        break
    await stream.aclose()
    # the worker released the decoder: a new call runs at once and gives the same answer
    assert (
        decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=4).token_ids
        == decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=4).token_ids
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_models_on_different_devices_match_reference(tiny_paths, reference):
    from eft_integrations import ModelSpec

    gpu = EFTDecoder.from_pretrained(
        base=ModelSpec(tiny_paths["base"], device_map="cuda:0"),
        behaviors={
            "chat": (tiny_paths["chat"], tiny_paths["ref"]),
            "safe": (tiny_paths["safe"], tiny_paths["ref"]),
        },
        dtype=torch.float32,
    )
    out = gpu.generate(PROMPTS, weights=WEIGHTS, temperature=0, max_new_tokens=8)
    for o, prompt, w in zip(out, PROMPTS, WEIGHTS, strict=True):
        assert o.token_ids == reference.greedy(gpu.encode(prompt), w, 8, eos=gpu.eos_token_ids)
