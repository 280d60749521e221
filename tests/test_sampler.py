"""The batched sampler against the per-row reference (`composition.sampling_logprobs`).

No models: hand-built log-probs over a small vocabulary, as transformers' logits-processor
tests do, and `Request`-like rows carrying options and generators.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from eft_integrations.composition import sampling_logprobs
from eft_integrations.options import GenerationOptions
from eft_integrations.sampling import SamplingMetadata, sampling_transform

VOCAB = 20


@dataclass
class Row:
    options: GenerationOptions
    generator: torch.Generator | None = None


OPTIONS = [
    GenerationOptions(temperature=0),
    GenerationOptions(temperature=1.0),
    GenerationOptions(temperature=0.7, top_k=5),
    GenerationOptions(temperature=1.3, top_p=0.8),
    GenerationOptions(temperature=0.5, top_k=7, top_p=0.6),
    GenerationOptions(temperature=2.0, top_k=1),
    GenerationOptions(temperature=1.0, top_k=VOCAB + 5, top_p=0.95),
]


def logprobs(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(batch, VOCAB, generator=generator) * 3, dim=-1)


@pytest.mark.parametrize("seed", range(5))
def test_the_batched_transform_equals_the_per_row_reference(seed):
    rows = [Row(o) for o in OPTIONS]
    lp = logprobs(len(rows), seed)
    batched = sampling_transform(lp, SamplingMetadata.of(rows, VOCAB, lp.device))
    for b, row in enumerate(rows):
        o = row.options
        if o.temperature == 0:  # greedy rows are left as they are (their argmax is taken)
            torch.testing.assert_close(batched[b], torch.log_softmax(lp[b], -1))
            continue
        expected = sampling_logprobs(lp[b : b + 1], o.temperature, o.top_k, o.top_p)[0]
        assert torch.equal(batched[b].isinf(), expected.isinf()), o
        finite = ~expected.isinf()
        torch.testing.assert_close(batched[b][finite], expected[finite])


def test_the_transform_over_several_positions_repeats_each_rows_options():
    rows = [Row(o) for o in OPTIONS[1:4]]
    lp = logprobs(len(rows) * 3).reshape(len(rows), 3, VOCAB)
    meta = SamplingMetadata.of(rows, VOCAB, lp.device)
    flat = sampling_transform(lp.reshape(-1, VOCAB), meta.repeat(3)).reshape(lp.shape)
    for j in range(3):
        torch.testing.assert_close(flat[:, j], sampling_transform(lp[:, j], meta))


def test_seeded_rows_draw_exactly_what_they_draw_alone():
    from eft_integrations.sampler import Sampler

    class _Ensemble:
        device = torch.device("cpu")
        vocab_size = VOCAB

    sampler = Sampler(_Ensemble())  # type: ignore[arg-type]

    def seeded(options: GenerationOptions, seed: int) -> Row:
        return Row(options, torch.Generator().manual_seed(seed))

    lp = logprobs(len(OPTIONS), seed=3)
    batch = [seeded(o, 100 + b) for b, o in enumerate(OPTIONS)]
    together = [
        sampler.draw(lp, SamplingMetadata.of(batch, VOCAB, lp.device), {}).tolist()
        for _ in range(10)
    ]
    for b, o in enumerate(OPTIONS):
        alone_row = [seeded(o, 100 + b)]
        meta = SamplingMetadata.of(alone_row, VOCAB, lp.device)
        alone = [sampler.draw(lp[b : b + 1], meta, {}).item() for _ in range(10)]
        assert [draw[b] for draw in together] == alone


def test_unseeded_rows_draw_from_the_transformed_distribution():
    from eft_integrations.sampler import Sampler

    class _Ensemble:
        device = torch.device("cpu")
        vocab_size = VOCAB

    sampler = Sampler(_Ensemble())  # type: ignore[arg-type]
    rows = [Row(GenerationOptions(temperature=1.0, top_k=3)) for _ in range(4000)]
    lp = logprobs(1, seed=4).expand(len(rows), -1)
    drawn = sampler.draw(lp, SamplingMetadata.of(rows, VOCAB, lp.device), {})
    allowed = set(torch.topk(lp[0], 3).indices.tolist())
    assert set(drawn.tolist()) == allowed
    expected = sampling_logprobs(lp[:1], 1.0, 3)[0].exp()
    counts = torch.bincount(drawn, minlength=VOCAB).float() / len(rows)
    assert (counts - expected).abs().max() < 0.05  # 4,000 draws: ~6 standard errors
