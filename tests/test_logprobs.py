"""Log-probs of generated tokens and scores of given continuations, against the brute-force
reference: chosen and top-k, plain and speculative rows, batched, streamed, and a poison
request beside live ones."""

from __future__ import annotations

import pytest
import torch

from eft_integrations import ContinuationScore, EFTDecoder, EFTRequestError

from .conftest import tiny_family
from .reference import BruteForceEFT, tiny_family_reference
from .test_isolation import (
    assert_clean,
    base_model,
    hooked,
    nan_rows_on,
    poison_token,
    raises_on,
    together,
)

PROMPTS = ["The capital of Veloria", "Numbers: 1 2", "Stop here."]
WEIGHTS = [{"chat": 1.0, "safe": 0.0}, {"chat": 0.4, "safe": 0.6}, {"chat": 2.0, "safe": -0.5}]
ATOL = 5e-5


@pytest.fixture(scope="module")
def endless(tiny_paths) -> EFTDecoder:
    """The tiny family with no end-of-turn token: every row runs to its budget."""
    return tiny_family(tiny_paths, eos_token_ids=[])


@pytest.fixture(scope="module")
def reference(tiny_paths, endless) -> BruteForceEFT:
    return tiny_family_reference(tiny_paths, endless.vocab_size)


def expected_steps(
    reference: BruteForceEFT,
    prompt: list[int],
    tokens: list[int],
    weights: dict[str, float],
    base_prompt: list[int] | None = None,
) -> list[torch.Tensor]:
    """The reference's composed log-probs [V] before each of `tokens`."""
    chat, base = list(prompt), list(base_prompt if base_prompt is not None else prompt)
    steps = []
    for token in tokens:
        steps.append(reference.next_logprobs(chat, weights, base))
        chat.append(token)
        base.append(token)
    return steps


def assert_matches(entries, tokens, steps, top: int) -> None:
    assert [e.token_id for e in entries] == tokens
    for entry, token, step in zip(entries, tokens, steps, strict=True):
        assert entry.logprob == pytest.approx(float(step[token]), abs=ATOL)
        assert len(entry.top_logprobs) == top
        values, indices = torch.topk(step, top)
        assert list(entry.top_logprobs.values()) == pytest.approx(values.tolist(), abs=ATOL)
        # the alternatives are the reference's top tokens (a near-tie may swap two of them)
        assert (
            set(entry.top_logprobs) == set(indices.tolist())
            or values[-1] - step.sort(descending=True).values[top].item() < ATOL
        )


# ---------------------------------------------------------------------------- generation


@pytest.mark.parametrize("speculative_k", [None, 3])
def test_greedy_logprobs_match_the_reference_per_row_of_a_batch(endless, reference, speculative_k):
    outs = endless.generate(
        PROMPTS,
        weights=WEIGHTS,
        temperature=0,
        max_new_tokens=8,
        logprobs=4,
        speculative_k=speculative_k,
    )
    for out, prompt, w in zip(outs, PROMPTS, WEIGHTS, strict=True):
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 8
        steps = expected_steps(reference, endless.encode(prompt), out.token_ids, w)
        assert_matches(out.logprobs, out.token_ids, steps, top=4)
        # greedy: the chosen token is the most likely one
        assert all(e.token_id == next(iter(e.top_logprobs)) for e in out.logprobs)


@pytest.mark.parametrize("speculative_k", [None, 2])
def test_sampled_logprobs_are_the_composed_distribution_before_temperature(
    endless, reference, speculative_k
):
    out = endless.generate(
        PROMPTS[1],
        weights={"chat": 1.5},
        temperature=1.7,
        top_k=20,
        top_p=0.9,
        seed=11,
        max_new_tokens=10,
        logprobs=0,
        speculative_k=speculative_k,
    )
    steps = expected_steps(
        reference, endless.encode(PROMPTS[1]), out.token_ids, {"chat": 1.5, "safe": 1.0}
    )
    assert_matches(out.logprobs, out.token_ids, steps, top=0)


def test_logprobs_ignore_logit_bias_and_constraints_as_vllm_does(endless, reference):
    greedy = endless.generate(PROMPTS[0], temperature=0, max_new_tokens=3).token_ids
    forced = next(t for t in range(5, endless.vocab_size) if t != greedy[0])
    out = endless.generate(
        PROMPTS[0], temperature=0, max_new_tokens=3, logprobs=1, logit_bias={forced: 100}
    )
    assert out.token_ids == [forced] * 3
    steps = expected_steps(reference, endless.encode(PROMPTS[0]), out.token_ids, {})
    assert_matches(out.logprobs, out.token_ids, steps, top=1)
    assert out.logprobs[0].logprob < out.logprobs[0].top_logprobs[greedy[0]]


def test_the_option_does_not_change_the_tokens_and_rows_without_it_get_none(endless):
    plain = endless.generate(PROMPTS, temperature=0.8, seed=5, max_new_tokens=8)
    with_lp = endless.generate(PROMPTS, temperature=0.8, seed=5, max_new_tokens=8, logprobs=2)
    assert [o.token_ids for o in with_lp] == [o.token_ids for o in plain]
    assert all(o.logprobs is None for o in plain)


def test_streamed_logprobs_join_to_the_results(endless):
    kwargs = dict(temperature=0, max_new_tokens=9, logprobs=2, stop=["zzz"])
    result = endless.generate(PROMPTS[2], **kwargs)
    chunks = list(endless.stream(PROMPTS[2], **kwargs))
    streamed = [e for c in chunks for e in (c.logprobs or [])]
    assert [len(c.logprobs or []) for c in chunks] == [len(c.token_ids) for c in chunks]
    assert streamed == result.logprobs


@pytest.mark.parametrize("bad", [21, -1, True, 1.5, "2"])
def test_a_bad_logprobs_value_is_refused_naming_the_option(endless, bad):
    with pytest.raises(EFTRequestError, match="logprobs must be None or an int") as caught:
        endless.generate(PROMPTS[0], max_new_tokens=2, logprobs=bad)
    assert caught.value.param == "logprobs"
    assert_clean(endless)


@pytest.mark.parametrize("speculative_k", [None, 3])
def test_a_poison_row_fails_alone_beside_rows_that_ask_for_logprobs(endless, speculative_k):
    kwargs = dict(temperature=0, max_new_tokens=10, logprobs=3, speculative_k=speculative_k)
    sampled = dict(kwargs, temperature=0.9, seed=4)
    solo = [endless.generate(PROMPTS[0], **kwargs), endless.generate(PROMPTS[1], **sampled)]
    token = poison_token(endless, [s.token_ids for s in solo])
    poison = [*endless.encode(PROMPTS[2]), token]
    calls = [
        (endless.generate, (PROMPTS[0],), kwargs),
        (endless.generate, (poison,), kwargs),
        (endless.generate, (PROMPTS[1],), sampled),
    ]
    with hooked(base_model(endless), nan_rows_on(token)):
        started = together(endless, calls)
        with pytest.raises(EFTRequestError, match="not finite"):
            started[1].result()
        got = [started[0].result(), started[2].result()]
    for out, alone in zip(got, solo, strict=True):
        assert out.token_ids == alone.token_ids
        assert [e.logprob for e in out.logprobs] == pytest.approx(
            [e.logprob for e in alone.logprobs], abs=ATOL
        )
    assert_clean(endless)


# ---------------------------------------------------------------------------- scoring


def test_score_equals_the_step_logprobs_of_greedy_decoding(endless):
    out = endless.generate(
        PROMPTS[0], weights=WEIGHTS[1], temperature=0, max_new_tokens=10, logprobs=0
    )
    score = endless.score(PROMPTS[0], out.token_ids, weights=WEIGHTS[1])
    assert isinstance(score, ContinuationScore)
    assert score.token_ids == out.token_ids
    assert score.logprobs == pytest.approx([e.logprob for e in out.logprobs], abs=ATOL)
    assert score.total == pytest.approx(sum(e.logprob for e in out.logprobs), abs=1e-3)
    assert score.is_greedy == [True] * 10 and score.greedy


def test_batched_scores_match_the_reference_with_any_weights_and_views(endless, reference):
    prompts = [endless.encode(p) for p in PROMPTS]
    continuations = [[40, 41, 42], [7], [300, 12, 12, 99, 5]]
    base_prompts = [endless.encode("Plain: " + p) for p in PROMPTS]
    scores = endless.score(
        prompts, continuations, weights=WEIGHTS, base_prompt=base_prompts, top_logprobs=3
    )
    assert isinstance(scores, list) and len(scores) == 3
    for score, prompt, base, cont, w in zip(
        scores, prompts, base_prompts, continuations, WEIGHTS, strict=True
    ):
        steps = expected_steps(reference, prompt, cont, w, base)
        pairs = list(zip(steps, cont, strict=True))
        assert score.logprobs == pytest.approx([float(s[t]) for s, t in pairs], abs=ATOL)
        assert score.is_greedy == [int(s.argmax()) == t for s, t in pairs]
        assert score.top_logprobs is not None
        for top, step in zip(score.top_logprobs, steps, strict=True):
            assert list(top.values()) == pytest.approx(
                torch.topk(step, 3).values.tolist(), abs=ATOL
            )
    # the batch equals each row scored alone
    alone = endless.score(
        prompts[2], continuations[2], weights=WEIGHTS[2], base_prompt=base_prompts[2]
    )
    assert alone.logprobs == pytest.approx(scores[2].logprobs, abs=ATOL)


def test_a_score_in_chunks_equals_one_task_and_lets_decoding_run_between(endless, monkeypatch):
    from eft_integrations import decoder as decoder_module

    prompts = [endless.encode(p) for p in PROMPTS]
    continuations = [[40, 41, 42], [7], [300, 12, 12, 99, 5]]
    whole = endless.score(prompts, continuations, weights=WEIGHTS, top_logprobs=2)
    tasks = []
    call = endless.engine.call
    monkeypatch.setattr(endless.engine, "call", lambda fn: tasks.append(fn) or call(fn))
    monkeypatch.setattr(decoder_module, "SCORE_CHUNK_TOKENS", 1)  # one continuation a task
    chunked = endless.score(prompts, continuations, weights=WEIGHTS, top_logprobs=2)
    assert len(tasks) == 3
    for c, w in zip(chunked, whole, strict=True):
        assert c.logprobs == pytest.approx(w.logprobs, abs=ATOL)
        for ct, wt in zip(c.top_logprobs, w.top_logprobs, strict=True):
            assert list(ct.values()) == pytest.approx(list(wt.values()), abs=ATOL)
    assert [c.is_greedy for c in chunked] == [w.is_greedy for w in whole]


def test_token_chunks_group_consecutive_items_up_to_the_limit():
    from eft_integrations.decoder import token_chunks

    assert token_chunks([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]
    assert token_chunks([], 6) == []
    assert token_chunks([1, 1, 1], 100) == [[0, 1, 2]]


def test_a_continuation_that_is_not_greedy_is_flagged(endless):
    greedy = endless.generate(PROMPTS[1], temperature=0, max_new_tokens=4).token_ids
    other = [greedy[0], next(t for t in range(5, 500) if t != greedy[1]), greedy[2]]
    score = endless.score(PROMPTS[1], other)
    assert score.is_greedy[:2] == [True, False] and not score.greedy


def test_a_string_continuation_is_tokenized_without_special_tokens(endless):
    ids = endless.tokenizer(" the capital", add_special_tokens=False)["input_ids"]
    assert endless.score(PROMPTS[0], " the capital").token_ids == ids


@pytest.mark.parametrize(
    "args,kwargs,message,param",
    [
        ((PROMPTS[0], ""), {}, "continuation 0 is empty", "continuation"),
        ((PROMPTS[0], [10**7]), {}, "outside the vocabulary", "continuation"),
        ((PROMPTS, ["a", "b"]), {}, "2 continuation\\(s\\) for 3 prompt", "continuation"),
        ((PROMPTS[0], "a"), {"top_logprobs": 50}, "logprobs must be", "logprobs"),
        ((PROMPTS[0], [5] * 5000), {}, "context window", "continuation"),
        ((PROMPTS[0], "a"), {"weights": {"nope": 1.0}}, "nope", "weights"),
    ],
)
def test_bad_score_calls_are_refused_naming_the_problem(endless, args, kwargs, message, param):
    with pytest.raises(EFTRequestError, match=message) as caught:
        endless.score(*args, **kwargs)
    assert caught.value.param == param
    assert_clean(endless)


def test_a_score_whose_forward_raises_fails_alone_beside_live_requests(endless):
    kwargs = dict(temperature=0, max_new_tokens=12)
    solo = [endless.generate(p, **kwargs).token_ids for p in PROMPTS[:2]]
    token = poison_token(endless, solo)
    with hooked(base_model(endless), raises_on(token), pre=True):
        started = together(
            endless,
            [(endless.generate, (PROMPTS[0],), kwargs), (endless.generate, (PROMPTS[1],), kwargs)],
        )
        with pytest.raises(RuntimeError, match=f"cannot read token {token}"):
            endless.score(PROMPTS[2], [token, 5])
        assert [s.result().token_ids for s in started] == solo
    assert_clean(endless)
    assert endless.score(PROMPTS[2], [5, 6]).token_ids == [5, 6]


def test_a_score_whose_distribution_overflows_names_the_weights(endless):
    token = poison_token(endless, [])
    overflow = pytest.raises(EFTRequestError, match="not finite along continuation 0")
    with hooked(base_model(endless), nan_rows_on(token)), overflow as caught:
        endless.score([*endless.encode(PROMPTS[0]), token], [5, 6])
    assert caught.value.param == "weights"
    assert_clean(endless)
