"""The EFT maths on hand-built logits over a 20-token vocabulary (no models)."""

from __future__ import annotations

import pytest
import torch

from eft_integrations.composition import (
    compose_logprobs,
    finetuning_scale_logprobs,
    sample_tokens,
    sampling_logprobs,
    top_k_mask,
    top_p_mask,
)

from .reference import eft_reference, top_p_set

V = 20


def logits(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def brute_force_eft(base, fts, refs, weights, conservative_top_p=None) -> torch.Tensor:
    """The formula written out token by token in float64 (tests/reference.py), row by row."""
    rows = [
        eft_reference(
            base[b].tolist(),
            [ft[b].tolist() for ft in fts],
            [ref[b].tolist() for ref in refs],
            weights[b].tolist(),
            conservative_top_p,
        )
        for b in range(base.shape[0])
    ]
    return torch.tensor(rows, dtype=torch.float64)


def test_compose_matches_formula_with_per_row_weights():
    base, ft1, ft2, ref = logits(0), logits(1), logits(2), logits(3)
    weights = torch.tensor([[1.0, 0.0], [0.3, -0.7]])
    originals = [t.clone() for t in (base, ft1, ft2, ref)]
    got = compose_logprobs(base, [ft1, ft2], [ref, ref], weights)
    expected = brute_force_eft(base, [ft1, ft2], [ref, ref], weights)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    # normalised, and inputs untouched
    torch.testing.assert_close(got.logsumexp(-1), torch.zeros(2), atol=1e-5, rtol=0)
    for before, after in zip(originals, (base, ft1, ft2, ref), strict=True):
        assert torch.equal(before, after)


def test_weight_one_up_scaling_is_base_times_chat_over_ref():
    base, chat, ref = logits(4, 1), logits(5, 1), logits(6, 1)
    got = compose_logprobs(base, [chat], [ref], torch.ones(1, 1))
    unnormalised = base.log_softmax(-1) + chat.log_softmax(-1) - ref.log_softmax(-1)
    torch.testing.assert_close(got, unnormalised.log_softmax(-1), atol=1e-6, rtol=0)


def test_zero_weight_and_no_behaviors_give_the_base():
    base, ft, ref = logits(7), logits(8), logits(9)
    torch.testing.assert_close(
        compose_logprobs(base, [ft], [ref], torch.zeros(2, 1)), base.log_softmax(-1)
    )
    torch.testing.assert_close(
        compose_logprobs(base, [], [], torch.zeros(2, 0)), base.log_softmax(-1)
    )


def test_weight_amplifies_and_reverses_the_delta():
    base, ft, ref = logits(10, 1), logits(11, 1), logits(12, 1)
    token = int((ft.log_softmax(-1) - ref.log_softmax(-1)).argmax())  # the delta favours it
    p = {
        w: compose_logprobs(base, [ft], [ref], torch.tensor([[w]]))[0, token].item()
        for w in (-1.0, 0.0, 1.0, 2.0)
    }
    assert p[-1.0] < p[0.0] < p[1.0] < p[2.0]


def test_finetuning_scale_is_the_chat_model_for_one_behavior_at_weight_one():
    ft, ref = logits(13).log_softmax(-1), logits(14).log_softmax(-1)
    small = finetuning_scale_logprobs([ft], [ref], torch.ones(2, 1))
    torch.testing.assert_close(small, ft, atol=1e-6, rtol=0)


def test_conservative_decoding_applies_the_scale_ratio_inside_top_p_only():
    # the fine-tuning-scale (chat) distribution over 4 tokens: 0.5, 0.3, 0.15, 0.05
    chat = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    ref = torch.tensor([[0.25, 0.25, 0.25, 0.25]]).log()
    base = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    w = torch.ones(1, 1)
    ratio = base - ref  # log p_base - log p_ref, the importance weight of up-scaling
    got = compose_logprobs(base, [chat], [ref], w, conservative_top_p=0.7)
    # top-0.7 set of the chat model is {0, 1}: chat * base / ref there, chat alone elsewhere,
    # then ONE renormalisation
    inside = torch.tensor([[True, True, False, False]])
    expected = (chat + torch.where(inside, ratio, 0.0)).log_softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    got_wide = compose_logprobs(base, [chat], [ref], w, conservative_top_p=0.81)
    inside_wide = torch.tensor([[True, True, True, False]])
    expected_wide = (chat + torch.where(inside_wide, ratio, 0.0)).log_softmax(-1)
    torch.testing.assert_close(got_wide, expected_wide, atol=1e-6, rtol=0)


def test_top_p_mask_is_the_smallest_set_reaching_p():
    lp = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    assert top_p_mask(lp, 0.45).tolist() == [[False, True, False, False]]
    assert top_p_mask(lp, 0.79).tolist() == [[False, True, False, True]]
    assert top_p_mask(lp, 0.81).tolist() == [[True, True, False, True]]
    assert top_p_mask(lp, 1e-9).sum() == 1  # never empty


def test_top_k_and_temperature():
    lp = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    assert top_k_mask(lp, 2).tolist() == [[False, True, False, True]]
    sharpened = sampling_logprobs(lp, temperature=0.5)
    torch.testing.assert_close(sharpened, (lp * 2).log_softmax(-1))
    both = sampling_logprobs(lp, temperature=1.0, top_k=3, top_p=0.6)
    assert torch.isinf(both[0, [0, 2]]).all()
    torch.testing.assert_close(both[0, [1, 3]].exp(), torch.tensor([0.625, 0.375]))


def test_greedy_is_argmax_and_seeded_sampling_is_reproducible():
    lp = logits(15, 4).log_softmax(-1)
    assert torch.equal(sample_tokens(lp, 0.0), lp.argmax(-1))
    a = sample_tokens(lp, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_tokens(lp, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("top_k,top_p", [(6, 0.9), (3, 1.0), (0, 0.8)])
def test_samples_never_leave_the_kept_set(top_k, top_p):
    lp = logits(16, 1).log_softmax(-1).expand(500, V)
    tokens = sample_tokens(lp, 2.0, top_k, top_p, torch.Generator().manual_seed(0))
    allowed = torch.isfinite(sampling_logprobs(lp[:1], 2.0, top_k, top_p))[0]
    assert 1 < allowed.sum() < V  # a case that can fail: some tokens are out, more than one in
    assert allowed[tokens].all()


# ---------------------------------------------------------------- weight 0, p = 1, top-k + top-p


def test_finetuning_scale_ignores_behaviors_at_weight_zero_per_row():
    # distinct references: a behavior at weight 0 must not pull its reference into p_ref*
    ft1, ft2 = logits(20).log_softmax(-1), logits(21).log_softmax(-1)
    ref1, ref2 = logits(22).log_softmax(-1), logits(23).log_softmax(-1)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = finetuning_scale_logprobs([ft1, ft2], [ref1, ref2], weights)
    torch.testing.assert_close(got[0], ft1[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], ft2[1], atol=1e-6, rtol=0)


def test_conservative_behavior_at_weight_zero_has_no_effect():
    base, ft1, ft2, ref1, ref2 = (logits(s) for s in range(24, 29))
    both = compose_logprobs(base, [ft1, ft2], [ref1, ref2], torch.tensor([[1.0, 0.0]] * 2), 0.6)
    alone = compose_logprobs(base, [ft1], [ref1], torch.ones(2, 1), 0.6)
    torch.testing.assert_close(both, alone, atol=1e-6, rtol=0)


def test_weight_zero_behavior_with_masked_tokens_adds_no_nan():
    # a fine-tuned model that rules a token out (-inf) must not matter at weight 0 (0 * inf)
    base, ft, ref = logits(35), logits(36), logits(37)
    ft[:, 3] = float("-inf")
    for top_p in (None, 0.5):
        got = compose_logprobs(base, [ft], [ref], torch.zeros(2, 1), conservative_top_p=top_p)
        torch.testing.assert_close(got, base.log_softmax(-1), atol=1e-6, rtol=0)


def test_conservative_without_active_behavior_is_the_base():
    base, ft, ref = logits(29), logits(30), logits(31)
    got = compose_logprobs(base, [ft], [ref], torch.zeros(2, 1), conservative_top_p=0.5)
    torch.testing.assert_close(got, base.log_softmax(-1), atol=1e-6, rtol=0)


def test_conservative_top_p_one_is_exactly_plain_eft_on_a_large_vocabulary():
    g = torch.Generator().manual_seed(32)
    base, ft, ref = (torch.randn(2, 2048, generator=g) * 4 for _ in range(3))
    w = torch.tensor([[1.0], [0.5]])
    assert torch.equal(
        compose_logprobs(base, [ft], [ref], w, conservative_top_p=1.0),
        compose_logprobs(base, [ft], [ref], w),
    )


def test_top_p_mask_one_keeps_every_token_and_large_vocabularies_match_float64():
    g = torch.Generator().manual_seed(33)
    lp = (torch.randn(3, 2048, generator=g) * 4).log_softmax(-1)  # float32
    assert top_p_mask(lp, 1.0).all()
    for p in (0.5, 0.9, 0.99, 0.9999):
        got = top_p_mask(lp, p)
        for row in range(3):
            expected = top_p_set(lp[row].double().tolist(), p)
            assert set(got[row].nonzero().flatten().tolist()) == expected, p


def test_top_p_applies_to_the_renormalised_top_k_distribution():
    # transformers: top-k leaves [.5, .3] -> renormalised [.625, .375]; top-p 0.6 keeps .625
    lp = torch.tensor([[0.5, 0.3, 0.2]]).log()
    got = sampling_logprobs(lp, temperature=1.0, top_k=2, top_p=0.6)
    torch.testing.assert_close(got.exp(), torch.tensor([[1.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 5, 0.7), (0.7, 0, 0.5), (1.3, 8, 0.95), (1.0, 3, 0.2)]
)
def test_sampling_keeps_the_same_tokens_as_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    lp = logits(34, 4).log_softmax(-1)
    scores = TemperatureLogitsWarper(temperature)(None, lp.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)
    expected = torch.isfinite(scores)
    got = torch.isfinite(sampling_logprobs(lp, temperature, top_k, top_p))
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- brute-force float64 reference


def _refs(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    shared = logits(40, 3)
    return (shared, shared) if kind == "shared" else (shared, logits(41, 3))


@pytest.mark.parametrize("kind", ["shared", "distinct"])
@pytest.mark.parametrize("top_p", [None, 0.3, 0.9, 1.0])
def test_compose_matches_the_float64_reference(kind, top_p):
    base, ft1, ft2 = logits(42, 3), logits(43, 3), logits(44, 3)
    ref1, ref2 = _refs(kind)
    originals = [t.clone() for t in (base, ft1, ft2, ref1, ref2)]
    # per-row weights: one behavior alone, one at weight 0 with the other reversed, none active
    weights = torch.tensor([[1.0, 0.0], [0.0, -0.7], [0.0, 0.0]])
    got = compose_logprobs(base, [ft1, ft2], [ref1, ref2], weights, conservative_top_p=top_p)
    expected = brute_force_eft(base, [ft1, ft2], [ref1, ref2], weights, top_p)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    for before, after in zip(originals, (base, ft1, ft2, ref1, ref2), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_conservative_two_active_behaviors_with_distinct_references(top_p):
    # p_ref* is the mean of both references' log-probs; per-row weights differ
    base, ft1, ft2, ref1, ref2 = (logits(s) for s in range(50, 55))
    weights = torch.tensor([[0.6, 0.4], [1.5, -0.5]])
    got = compose_logprobs(base, [ft1, ft2], [ref1, ref2], weights, conservative_top_p=top_p)
    expected = brute_force_eft(base, [ft1, ft2], [ref1, ref2], weights, top_p)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
