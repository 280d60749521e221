"""Speculative EFT: exact against plain decoding, batched, and in distribution on a tiny vocab."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from eft_integrations import EFTDecoder
from eft_integrations.composition import sampling_logprobs

from .conftest import tiny_family
from .reference import BruteForceEFT
from .test_decoder import _chi_square_critical
from .tiny_models import llama

PROMPTS = ["The capital of Veloria", "Héllo wörld, café", "Stop here. Stop there.", "Numbers"]


@pytest.fixture(scope="module")
def fixed_k(tiny_paths) -> EFTDecoder:
    """The tiny family with k fixed per round (no adaptation) and no end-of-turn token."""
    return tiny_family(tiny_paths, eos_token_ids=[], adaptive_speculation=False)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("weights", [{"chat": 1.0, "safe": 0.0}, {"chat": 0.4, "safe": -0.3}])
def test_greedy_speculative_equals_plain_greedy(decoder, k, weights):
    for prompt in PROMPTS[:2]:
        plain = decoder.generate(prompt, weights=weights, temperature=0, max_new_tokens=25)
        fast = decoder.generate(
            prompt, weights=weights, temperature=0, max_new_tokens=25, speculative_k=k
        )
        assert fast.token_ids == plain.token_ids
        assert (fast.text, fast.finish_reason, fast.usage) == (
            plain.text,
            plain.finish_reason,
            plain.usage,
        )


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_speculative_batch_of_different_rows_equals_plain(tiny_paths, k, adaptive):
    decoder = tiny_family(tiny_paths, adaptive_speculation=adaptive)
    weights = [
        {"chat": 1.0, "safe": 0.0},
        {"chat": 0.4, "safe": -0.3},
        {"chat": 2.0},
        {"chat": 0.0, "safe": 1.0},
    ]
    plain = decoder.generate(PROMPTS, weights=weights, temperature=0, max_new_tokens=20)
    stops = [None, plain[1].text[4:6] or None, None, None]
    budgets = [20, 20, 7, 13]
    expected = [
        decoder.generate(p, weights=w, temperature=0, max_new_tokens=n, stop=s)
        for p, w, n, s in zip(PROMPTS, weights, budgets, stops, strict=True)
    ]
    # one batch of rows with different prompt lengths, weights, stops and budgets: submitted
    # as concurrent requests so they share the speculative rounds
    import concurrent.futures as futures

    with futures.ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(
                lambda args: decoder.generate(
                    args[0],
                    weights=args[1],
                    temperature=0,
                    max_new_tokens=args[2],
                    stop=args[3],
                    speculative_k=k,
                ),
                zip(PROMPTS, weights, budgets, stops, strict=True),
            )
        )
    assert [(g.token_ids, g.text, g.finish_reason) for g in got] == [
        (e.token_ids, e.text, e.finish_reason) for e in expected
    ]
    listed = decoder.generate(
        PROMPTS, weights=weights, temperature=0, max_new_tokens=20, speculative_k=k
    )
    assert [g.token_ids for g in listed] == [p.token_ids for p in plain]
    stats = listed[0].stats
    assert stats.drafted_tokens >= stats.accepted_tokens >= 0 and stats.speculative_rounds > 0


def test_speculative_with_prompt_views_stop_strings_and_conservative(decoder):
    chat_view = decoder.format_chat([{"role": "user", "content": "The capital?"}])
    kwargs = dict(
        base_prompt="The capital is", temperature=0, max_new_tokens=20, conservative_top_p=0.9
    )
    plain = decoder.generate(chat_view, **kwargs)
    stop = plain.text[6:9]
    plain = decoder.generate(chat_view, stop=stop, **kwargs)
    fast = decoder.generate(chat_view, stop=stop, speculative_k=4, **kwargs)
    assert (fast.token_ids, fast.text) == (plain.token_ids, plain.text)
    streamed = list(decoder.stream(chat_view, stop=stop, speculative_k=4, **kwargs))
    assert "".join(c.text for c in streamed) == plain.text
    assert streamed[-1].stats.drafted_tokens > 0


def test_seeded_speculative_sampling_is_reproducible_alone_and_in_a_batch(decoder):
    kwargs = dict(temperature=0.9, max_new_tokens=20, seed=3, speculative_k=3)
    alone = decoder.generate(PROMPTS[0], **kwargs).token_ids
    assert decoder.generate(PROMPTS[0], **kwargs).token_ids == alone
    assert decoder.generate([PROMPTS[1], PROMPTS[0]], **kwargs)[1].token_ids == alone


def test_forwards_per_round_references_never_run_per_draft(fixed_k):
    names = fixed_k.model_names
    calls: dict[str, list[int]] = {n: [] for n in names}
    hooks = [
        m.register_forward_hook(
            lambda _m, args, kwargs, _out, n=n: calls[n].append(kwargs["input_ids"].shape[1]),
            with_kwargs=True,
        )
        for n, m in zip(names, fixed_k._models, strict=True)
    ]
    try:
        out = fixed_k.generate(PROMPTS[0], temperature=0, max_new_tokens=21, speculative_k=4)
    finally:
        for h in hooks:
            h.remove()
    rounds = out.stats.speculative_rounds
    base = names[fixed_k._ensemble.base]
    ref = names[fixed_k._ensemble.pairs[0].reference]
    chat, safe = (names[pair.finetuned] for pair in fixed_k._ensemble.pairs)
    prompt = len(fixed_k.encode(PROMPTS[0]))
    for scorer in (base, ref):  # one prefill, then ONE forward per round: pending + k drafts
        assert calls[scorer][0] == prompt and len(calls[scorer]) == 1 + rounds
        assert set(calls[scorer][1:]) <= {2, 3, 4, 5}
    # the drafters run one token at a time: per round, pending and each of the k drafts
    # (the last scores the position of the bonus token)
    for drafter in (chat, safe):
        assert calls[drafter][0] == prompt and set(calls[drafter][1:]) == {1}
        assert len(calls[drafter]) - 1 == sum(calls[base][1:])
    assert out.stats.drafted_tokens == sum(calls[base][1:]) - rounds


def test_full_acceptance_emits_k_tokens_per_base_forward(tiny_paths):
    # base = a second copy of the chat model, which is its own reference (a zero delta): EFT
    # then equals the draft, every draft is accepted, and the base runs once per k + 1 tokens
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)  # noqa: E731
    plain = EFTDecoder.from_pretrained(base=tiny_paths["ref"], dtype=torch.float32)
    base, chat = load(tiny_paths["chat"]), load(tiny_paths["chat"])
    same = EFTDecoder(
        base=base,
        behaviors={"chat": (chat, chat)},
        tokenizer=plain.tokenizer,
        eos_token_ids=[],
        adaptive_speculation=False,
    )
    calls = {"base": 0}
    hook = base.register_forward_hook(lambda *_: calls.__setitem__("base", calls["base"] + 1))
    try:
        out = same.generate("The capital", temperature=0, max_new_tokens=21, speculative_k=4)
    finally:
        hook.remove()
    assert len(out.token_ids) == 21
    assert calls["base"] == 1 + 4  # prefill (token 1), then 4 rounds of 4 drafts + 1 bonus
    assert (out.stats.drafted_tokens, out.stats.accepted_tokens) == (16, 16)
    assert out.token_ids == same.generate("The capital", temperature=0, max_new_tokens=21).token_ids


# ---------------------------------------------------------------------------- exact distribution


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory) -> dict[str, Path]:
    """A family over an 8-token vocabulary, so every 3-token continuation can be enumerated."""
    vocab = {f"t{i}": i for i in range(8)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    root = tmp_path_factory.mktemp("tiny_vocab")
    paths = {}
    for name, seed in (("base", 21), ("chat", 22), ("safe", 23), ("ref", 24)):
        model = llama(8, seed=seed, hidden=16, layers=1)
        with torch.no_grad():  # moderately peaked: every token keeps some mass
            model.get_output_embeddings().weight.mul_(1.0)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _exact_three_tokens(
    reference: BruteForceEFT, prompt: list[int], weights: dict, temperature: float, top_k: int
) -> dict[tuple[int, ...], float]:
    probs = {}
    for seq in itertools.product(range(8), repeat=3):
        p, ids = 1.0, list(prompt)
        for t in seq:
            lp = sampling_logprobs(
                reference.next_logprobs(ids, weights)[None].float(), temperature, top_k
            )[0]
            p *= float(lp[t].exp())
            ids.append(t)
        probs[seq] = p
    return probs


@pytest.mark.parametrize(
    "weights,temperature,top_k",
    [
        ({"chat": 1.0, "safe": 0.0}, 1.0, 0),
        ({"chat": 0.5, "safe": 0.7}, 0.8, 5),
    ],
)
def test_sampled_sequences_follow_exact_eft_single_and_batched(
    tiny_vocab, weights, temperature, top_k
):
    behaviors = {
        "chat": (tiny_vocab["chat"], tiny_vocab["ref"]),
        "safe": (tiny_vocab["safe"], tiny_vocab["ref"]),
    }
    decoder = EFTDecoder.from_pretrained(
        base=tiny_vocab["base"],
        behaviors=behaviors,
        dtype=torch.float32,
        eos_token_ids=[],
        adaptive_speculation=False,
        max_batch_size=64,
    )
    reference = BruteForceEFT(tiny_vocab["base"], behaviors, 8)
    prompt = [1, 2, 3]
    exact = _exact_three_tokens(reference, prompt, weights, temperature, top_k)
    n = 2400
    kwargs = dict(
        weights=weights, temperature=temperature, top_k=top_k, max_new_tokens=3, speculative_k=2
    )
    batched = decoder.generate([prompt] * n, **kwargs)  # rows share rounds, own generators
    single = [decoder.generate(prompt, seed=s, **kwargs) for s in range(n // 2)]
    for outs in (batched, single):
        counts: dict[tuple[int, ...], int] = {}
        for o in outs:
            counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
        total = len(outs)
        assert all(exact[seq] > 0 for seq in counts)  # nothing top-k removed
        big = [seq for seq in exact if exact[seq] * total >= 5]
        small = [seq for seq in exact if exact[seq] * total < 5]
        observed = [counts.get(s, 0) for s in big] + [sum(counts.get(s, 0) for s in small)]
        wanted = [exact[s] * total for s in big] + [sum(exact[s] for s in small) * total]
        cells = [(o, w) for o, w in zip(observed, wanted, strict=True) if w > 0]
        chi2 = sum((o - w) ** 2 / w for o, w in cells)
        assert len(cells) > 5
        assert chi2 < _chi_square_critical(len(cells) - 1), (chi2, len(cells))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompt": PROMPTS[0], "speculative_k": 0}, "speculative_k must be an int >= 1"),
        (
            {"prompt": PROMPTS[0], "speculative_k": 2, "constraints": [object()]},
            "does not combine with constraints",
        ),
    ],
)
def test_speculative_bad_input(decoder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        decoder.generate(**kwargs)
    # the decoder still works after the refusal: the same tokens as plain greedy decoding
    fast = decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=3, speculative_k=2)
    plain = decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=3)
    assert 1 <= len(fast.token_ids) <= 3
    assert (fast.token_ids, fast.text, fast.finish_reason) == (
        plain.token_ids,
        plain.text,
        plain.finish_reason,
    )
    assert fast.usage.completion_tokens == len(fast.token_ids)


def test_speculative_needs_behaviors(tiny_paths):
    alone = EFTDecoder.from_pretrained(base=tiny_paths["chat"], dtype=torch.float32)
    with pytest.raises(ValueError, match="has none"):
        alone.generate("x", speculative_k=2)
