"""The EFT maths on hand-built logits over a 20-token vocabulary (no models)."""

from __future__ import annotations

import math

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

V = 20


def logits(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def brute_force_eft(base, fts, refs, weights):
    """The paper's formula written out token by token, in float64."""
    out = torch.empty(base.shape, dtype=torch.float64)
    for b in range(base.shape[0]):
        def lsm(x):
            x = x.double()
            return x - math.log(sum(math.exp(v) for v in x.tolist()))
        score = lsm(base[b])
        for i, (ft, ref) in enumerate(zip(fts, refs, strict=True)):
            score = score + float(weights[b, i]) * (lsm(ft[b]) - lsm(ref[b]))
        out[b] = lsm(score)
    return out


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
    torch.testing.assert_close(compose_logprobs(base, [], [], torch.zeros(2, 0)),
                               base.log_softmax(-1))


def test_weight_amplifies_and_reverses_the_delta():
    base, ft, ref = logits(10, 1), logits(11, 1), logits(12, 1)
    token = int((ft.log_softmax(-1) - ref.log_softmax(-1)).argmax())  # the delta favours it
    p = {w: compose_logprobs(base, [ft], [ref], torch.tensor([[w]]))[0, token].item()
         for w in (-1.0, 0.0, 1.0, 2.0)}
    assert p[-1.0] < p[0.0] < p[1.0] < p[2.0]


def test_finetuning_scale_is_the_chat_model_for_one_behavior_at_weight_one():
    ft, ref = logits(13).log_softmax(-1), logits(14).log_softmax(-1)
    small = finetuning_scale_logprobs([ft], [ref], torch.ones(2, 1))
    torch.testing.assert_close(small, ft, atol=1e-6, rtol=0)


def test_conservative_decoding_keeps_small_logprob_outside_top_p():
    # the fine-tuning-scale (chat) distribution over 4 tokens: 0.5, 0.3, 0.15, 0.05
    chat = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    ref = torch.tensor([[0.25, 0.25, 0.25, 0.25]]).log()
    base = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    w = torch.ones(1, 1)
    eft = (base + chat - ref).log_softmax(-1)
    got = compose_logprobs(base, [chat], [ref], w, conservative_top_p=0.7)
    # top-0.7 set of the chat model is {0, 1}: those take EFT, tokens 2 and 3 keep chat's
    expected = torch.cat([eft[:, :2], chat[:, 2:]], dim=-1).log_softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    got_wide = compose_logprobs(base, [chat], [ref], w, conservative_top_p=0.81)
    expected_wide = torch.cat([eft[:, :3], chat[:, 3:]], dim=-1).log_softmax(-1)
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


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5)])
def test_samples_never_leave_the_kept_set(top_k, top_p):
    lp = logits(16, 1).log_softmax(-1).expand(500, V)
    tokens = sample_tokens(lp, 1.0, top_k, top_p, torch.Generator().manual_seed(0))
    allowed = torch.isfinite(sampling_logprobs(lp[:1], 1.0, top_k, top_p))[0]
    assert allowed[tokens].all()
