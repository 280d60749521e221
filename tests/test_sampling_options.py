"""min_p, repetition / presence / frequency penalties and logit_bias, end to end.

Each option acts on the EFT-composed distribution. The checks: the batched transforms equal
transformers' own processors on composed scores; greedy decoding with an option equals a
brute-force loop (`next_token_logprobs` of the whole text so far, then the transformers
processor, then the argmax); the option reaches the core unchanged through ChatEFT, EFTLLM and
the OpenAI-compatible server; speculative decoding is exact with the history-free options and
refuses the penalties.
"""

from __future__ import annotations

from dataclasses import dataclass

import openai
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from eft_integrations import EFTDecoder, GenerationOptions
from eft_integrations.errors import EFTRequestError
from eft_integrations.sampling import SamplingMetadata, sampling_transform, score_processors

from .conftest import tiny_family

PROMPT = "The capital of Veloria"
VOCAB = 20


@pytest.fixture(scope="module")
def endless(tiny_paths) -> EFTDecoder:
    return tiny_family(tiny_paths, eos_token_ids=[])


@dataclass
class Row:
    options: GenerationOptions
    generator: None = None


def meta_of(*options: GenerationOptions) -> SamplingMetadata:
    return SamplingMetadata.of([Row(o) for o in options], VOCAB, torch.device("cpu"))


def scores(batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(batch, VOCAB, generator=generator) * 3, dim=-1)


# ---------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("min_p,temperature", [(0.05, 1.0), (0.3, 0.7), (0.9, 1.5)])
def test_min_p_equals_transformers_warper(min_p, temperature):
    lp = scores(seed=1)
    ours = sampling_transform(lp, meta_of(GenerationOptions(temperature=temperature, min_p=min_p)))
    theirs = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(temperature)(None, lp))
    assert torch.equal(ours.isinf(), theirs.isinf())


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_transformers_processor(penalty):
    lp = scores(seed=2)
    ids = torch.tensor([[3, 7, 7, 11]])
    seen = torch.zeros(1, VOCAB, dtype=torch.bool)
    seen[0, ids[0]] = True
    ours = score_processors(
        lp, meta_of(GenerationOptions(repetition_penalty=penalty)), (seen, torch.zeros(1, VOCAB))
    )
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, lp.clone())
    torch.testing.assert_close(ours, theirs)


def test_logit_bias_equals_transformers_sequence_bias():
    lp = scores(seed=3)
    bias = {4: 2.5, 9: -100.0, 0: 0.75}
    ours = score_processors(lp, meta_of(GenerationOptions(logit_bias=bias)))
    theirs = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})(
        torch.tensor([[1, 2]]), lp.clone()
    )
    torch.testing.assert_close(ours, theirs)


def test_presence_and_frequency_penalties_follow_openais_formula():
    lp = scores(seed=4)
    counts = torch.zeros(1, VOCAB)
    counts[0, 5], counts[0, 6] = 3, 1
    options = GenerationOptions(presence_penalty=0.5, frequency_penalty=-0.25)
    ours = score_processors(lp, meta_of(options), (counts > 0, counts))
    expected = lp - (-0.25) * counts - 0.5 * (counts > 0)
    torch.testing.assert_close(ours, expected)


# ---------------------------------------------------------------------------- end to end, greedy


def brute_force(decoder: EFTDecoder, steps: int, process) -> list[int]:
    """Greedy EFT with a transformers-style processor `process(ids, completion, lp)`."""
    prompt, completion = decoder.encode(PROMPT), []
    for _ in range(steps):
        lp = decoder.next_token_logprobs(prompt + completion)[None]
        completion.append(int(process(prompt, completion, lp).argmax()))
    return completion


def test_greedy_repetition_penalty_equals_the_brute_force_loop(endless):
    processor = RepetitionPenaltyLogitsProcessor(1.8)

    def process(prompt, completion, lp):
        return processor(torch.tensor([prompt + completion]), lp.clone())

    got = endless.generate(PROMPT, temperature=0, max_new_tokens=10, repetition_penalty=1.8)
    assert got.token_ids == brute_force(endless, 10, process)
    plain = endless.generate(PROMPT, temperature=0, max_new_tokens=10)
    assert got.token_ids != plain.token_ids  # the option did something here


def test_greedy_presence_and_frequency_penalties_equal_the_brute_force_loop(endless):
    def process(prompt, completion, lp):
        counts = torch.bincount(torch.tensor(completion, dtype=torch.long), minlength=lp.shape[-1])
        return lp - 1.5 * counts[: lp.shape[-1]] - 0.5 * (counts[: lp.shape[-1]] > 0)

    got = endless.generate(
        PROMPT, temperature=0, max_new_tokens=10, frequency_penalty=1.5, presence_penalty=0.5
    )
    assert got.token_ids == brute_force(endless, 10, process)


def test_greedy_logit_bias_equals_the_brute_force_loop_plain_and_speculative(endless):
    favoured = endless.encode(" river")[-1]
    bias = {favoured: 6.0}

    def process(prompt, completion, lp):
        return lp + torch.nn.functional.one_hot(torch.tensor(favoured), lp.shape[-1]) * 6.0

    expected = brute_force(endless, 10, process)
    assert favoured in expected
    for speculative_k in (None, 3):
        got = endless.generate(
            PROMPT, temperature=0, max_new_tokens=10, logit_bias=bias, speculative_k=speculative_k
        )
        assert got.token_ids == expected


def test_seeded_min_p_draws_only_tokens_min_p_keeps(endless):
    out = endless.generate(PROMPT, temperature=1.0, min_p=0.5, seed=3, max_new_tokens=12)
    prompt, completion = endless.encode(PROMPT), out.token_ids
    for t, token in enumerate(completion):
        lp = endless.next_token_logprobs(prompt + completion[:t])
        assert lp[token] >= lp.max() + torch.log(torch.tensor(0.5)) - 1e-5


def test_penalties_refuse_speculative_decoding_and_bad_values_are_typed(endless):
    with pytest.raises(ValueError, match="leave speculative_k=None"):
        endless.generate(PROMPT, repetition_penalty=1.2, speculative_k=2)
    for kwargs, param in [
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {5: 500}}, "logit_bias"),
        ({"logit_bias": {10**7: 1.0}}, None),
        ({"min_q": 0.1}, "min_q"),
    ]:
        with pytest.raises(EFTRequestError) as caught:
            endless.generate(PROMPT, max_new_tokens=2, **kwargs)
        if param is not None:
            assert caught.value.param == param


def test_one_options_object_equals_the_keywords(endless):
    options = GenerationOptions(temperature=0, max_new_tokens=6, logit_bias={7: 3.0})
    by_object = endless.generate(PROMPT, options=options)
    assert (
        by_object.token_ids
        == endless.generate(PROMPT, temperature=0, max_new_tokens=6, logit_bias={7: 3.0}).token_ids
    )
    # keywords override the object
    assert len(endless.generate(PROMPT, options=options, max_new_tokens=2).token_ids) == 2


# ---------------------------------------------------------------------------- through the adapters


def test_chateft_and_eftllm_pass_new_options_to_the_core(endless):
    from eft_integrations.langchain import ChatEFT
    from eft_integrations.llama_index import EFTLLM

    favoured = endless.encode(" river")[-1]
    text = endless.tokenizer.decode([favoured])
    chat = ChatEFT(decoder=endless, temperature=0, max_tokens=3)
    reply = chat.invoke("Hello", logit_bias={favoured: 100.0})
    assert reply.content == text * 3
    llm = EFTLLM(decoder=endless, temperature=0, max_new_tokens=3)
    assert llm.complete("Hello", logit_bias={favoured: 100.0}).text == text * 3
    # penalties reach the core unchanged: the same text as the core's own call, and a
    # different one from the unpenalised call (the options are not dropped on the way)
    penalties = {"frequency_penalty": 2.0, "presence_penalty": 2.0, "max_new_tokens": 12}
    penalised = llm.complete(PROMPT, formatted=True, **penalties).text
    assert penalised == endless.generate(PROMPT, temperature=0, **penalties).text
    assert penalised != llm.complete(PROMPT, formatted=True, max_new_tokens=12).text


def test_the_server_takes_openais_sampling_fields(endless):
    from eft_integrations.serve import BackgroundServer, build_app

    favoured = endless.encode(" river")[-1]
    text = endless.tokenizer.decode([favoured])
    with BackgroundServer(build_app(endless, served_model_name="eft")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        biased = client.completions.create(
            model="eft",
            prompt=PROMPT,
            max_tokens=3,
            temperature=0,
            logit_bias={str(favoured): 100},
        )
        assert biased.choices[0].text == text * 3
        penalised = client.completions.create(
            model="eft",
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            frequency_penalty=1.5,
            presence_penalty=0.5,
        )
        expected = endless.generate(
            PROMPT, temperature=0, max_new_tokens=10, frequency_penalty=1.5, presence_penalty=0.5
        )
        assert penalised.choices[0].text == expected.text
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(
                model="eft", prompt=PROMPT, max_tokens=2, extra_body={"min_p": 2.0}
            )
        assert caught.value.body["param"] == "min_p"
