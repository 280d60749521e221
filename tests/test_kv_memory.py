"""KV memory: block pools, prefix caching, chunked prefill, the budget.

Every cache path is checked against the brute-force reference (`reference.py`: every model
recomputes every full sequence each step, no cache) or against a decoder with the path off:
greedy outputs token for token, seeded draws identical.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from eft_integrations import EFTDecoder, EFTRequestError

from .conftest import tiny_family
from .reference import BruteForceEFT
from .test_engine import sliding_decoder, sliding_paths  # noqa: F401  (a fixture)
from .test_isolation import Call, base_model, engine_held, hooked, raises_on, together

WAIT = 60
DOCUMENT = "The capital of Veloria is Markan. The river runs north. Stop here. "
TURN_1 = DOCUMENT + "Question: where is the capital?"
TURN_2 = TURN_1 + " Markan. Question: the river?"
GREEDY = dict(temperature=0, max_new_tokens=10)
SEEDED = dict(temperature=0.9, seed=7, max_new_tokens=10)


def family(tiny_paths, **options) -> EFTDecoder:
    """The tiny family with no end-of-turn token (rows run to their budget), small blocks so
    prompts span many, and the given engine options."""
    return tiny_family(tiny_paths, eos_token_ids=[], kv_block_size=4, **options)


@pytest.fixture(scope="module")
def cached(tiny_paths) -> EFTDecoder:
    return family(tiny_paths)


@pytest.fixture(scope="module")
def uncached(tiny_paths) -> EFTDecoder:
    return family(tiny_paths, prefix_caching=False, prefill_chunk=None)


@pytest.fixture(scope="module")
def reference(tiny_paths, cached) -> BruteForceEFT:
    p = tiny_paths
    behaviors = {"chat": (p["chat"], p["ref"]), "safe": (p["safe"], p["ref"])}
    return BruteForceEFT(p["base"], behaviors, cached.vocab_size)


def idle(decoder: EFTDecoder) -> None:
    deadline = time.monotonic() + WAIT
    while decoder.engine.batch_size or decoder.engine.queued:
        assert time.monotonic() < deadline, "engine never went idle"
        time.sleep(0.005)


def test_a_second_turn_reads_the_first_from_the_cache_and_equals_the_reference(
    cached, uncached, reference
):
    first = cached.generate(TURN_1, **GREEDY)
    assert first.usage.cached_tokens == 0
    second = cached.generate(TURN_2, **GREEDY)
    prompt = cached.encode(TURN_2)
    # every whole block of the shared prefix, in every model
    shared = len(cached.encode(TURN_1)) - 1
    assert second.usage.cached_tokens >= shared - shared % 4 - 4 > 0
    assert second.token_ids == reference.greedy(prompt, {}, 10)
    assert second.token_ids == uncached.generate(TURN_2, **GREEDY).token_ids
    assert uncached.generate(TURN_2, **GREEDY).usage.cached_tokens == 0


def test_seeded_draws_are_identical_with_and_without_a_cache_hit(cached, uncached):
    cached.generate(TURN_1, **SEEDED)
    hit = cached.generate(TURN_2, **SEEDED)
    assert hit.usage.cached_tokens > 0
    assert hit.token_ids == uncached.generate(TURN_2, **SEEDED).token_ids


def test_a_partial_hit_reuses_only_whole_blocks_of_the_common_prefix(cached, reference):
    cached.generate(DOCUMENT + "Alpha beta gamma", **GREEDY)
    other = DOCUMENT + "Numbers: 9 8 7"
    common = 0
    for a, b in zip(
        cached.encode(DOCUMENT + "Alpha beta gamma"), cached.encode(other), strict=False
    ):
        if a != b:
            break
        common += 1
    out = cached.generate(other, **GREEDY)
    assert out.usage.cached_tokens == common - common % 4
    assert out.token_ids == reference.greedy(cached.encode(other), {}, 10)


def test_prompt_views_hit_per_model(cached, uncached):
    """The fine-tuned models read the chat view, the base and reference the base view: each
    model finds its own view's prefix."""
    base_1, base_2 = DOCUMENT + "Q1:", DOCUMENT + "Q1: A. Q2:"
    chat_1 = cached.format_chat([{"role": "user", "content": base_1}])
    chat_2 = cached.format_chat([{"role": "user", "content": base_2}])
    cached.generate(chat_1, base_prompt=base_1, **GREEDY)
    hit = cached.generate(chat_2, base_prompt=base_2, **GREEDY)
    assert hit.usage.cached_tokens > 0
    assert hit.token_ids == uncached.generate(chat_2, base_prompt=base_2, **GREEDY).token_ids


def test_a_request_reuses_the_prefix_of_a_request_still_running(tiny_paths, uncached):
    decoder = family(tiny_paths)
    budget = 90 - len(decoder.encode(TURN_1))
    running = Call(decoder.generate, TURN_1, temperature=0, max_new_tokens=budget)
    deadline = time.monotonic() + WAIT
    while not decoder.engine.runner.plain.rows:
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    with engine_held(decoder):  # the first request is decoding, its prompt registered
        assert decoder.engine.runner.plain.rows
        second = Call(decoder.generate, TURN_2, **GREEDY)
        while not decoder.engine.queued:
            time.sleep(0.001)
    out = second.result()
    assert out.usage.cached_tokens > 0
    assert out.token_ids == uncached.generate(TURN_2, **GREEDY).token_ids
    first = running.result()
    assert (
        first.token_ids == uncached.generate(TURN_1, temperature=0, max_new_tokens=budget).token_ids
    )


def test_speculative_rows_with_a_cache_hit_equal_the_reference(cached, reference):
    cached.generate(TURN_1, **GREEDY)
    for k in (1, 3):
        out = cached.generate(TURN_2, speculative_k=k, **GREEDY)
        assert out.usage.cached_tokens > 0
        assert out.token_ids == reference.greedy(cached.encode(TURN_2), {}, 10), k


def test_sliding_window_models_read_cached_prefixes_exactly(sliding_paths):  # noqa: F811
    p = sliding_paths
    decoder = sliding_decoder(p, kv_block_size=4, prefill_chunk=7)
    reference = BruteForceEFT(p["sliding"], {"chat": (p["chat"], p["ref"])}, decoder.vocab_size)
    decoder.generate(TURN_1, **GREEDY)
    out = decoder.generate(TURN_2, **GREEDY)
    assert out.usage.cached_tokens > 0
    assert out.token_ids == reference.greedy(decoder.encode(TURN_2), {}, 10)


def test_eviction_under_a_tiny_budget_keeps_outputs_exact(tiny_paths, uncached):
    # room for two rows at once: every prompt evicts earlier prefixes
    decoder = family(tiny_paths, kv_cache_tokens=160)
    prompts = [f"{i} {DOCUMENT[: 40 + 7 * i]}" for i in range(6)] + [TURN_1[:100]]
    outs = [Call(decoder.generate, q, **GREEDY) for q in prompts]
    again = [decoder.generate(q, **GREEDY) for q in prompts]
    expected = [uncached.generate(q, **GREEDY).token_ids for q in prompts]
    assert [c.result().token_ids for c in outs] == expected
    assert [o.token_ids for o in again] == expected
    pools = decoder.engine.memory.pools
    idle(decoder)
    assert decoder.engine.memory.used_blocks() == 0
    assert all(p.cached_blocks <= p.capacity_blocks for p in pools)


def test_memory_returns_to_the_budget_after_a_burst(tiny_paths):
    decoder = family(tiny_paths, kv_cache_tokens=2_000)
    calls = [Call(decoder.generate, f"{i}: {TURN_1}", **GREEDY) for i in range(12)]
    for call in calls:
        call.result()
    idle(decoder)
    memory = decoder.engine.memory
    assert decoder.engine.cached_tokens() == 0
    assert memory.used_blocks() == 0
    assert memory.cached_blocks() > 0  # the prefixes stay cached until their slots are needed
    for pool in memory.pools:
        assert pool.used_blocks + pool.cached_blocks <= pool.capacity_blocks - 1


def test_a_request_larger_than_the_budget_is_refused_and_the_decoder_goes_on(tiny_paths):
    decoder = family(tiny_paths, kv_cache_tokens=64)
    with pytest.raises(EFTRequestError, match="kv_cache_tokens") as error:
        decoder.generate(TURN_1, temperature=0, max_new_tokens=60)
    assert error.value.code == "kv_cache_budget" and error.value.param == "max_tokens"
    assert len(decoder.generate("Stop", temperature=0, max_new_tokens=5).token_ids) == 5


def test_chunked_prefill_equals_whole_prefill_beside_running_rows(tiny_paths, uncached):
    decoder = family(tiny_paths, prefill_chunk=8, prefix_caching=False)
    runner = decoder.engine.runner
    solo = [uncached.generate(q, **kw).token_ids for q, kw in ((TURN_1, GREEDY), (TURN_2, SEEDED))]
    chunks = decoder.engine.stats.prefill_chunks
    running = Call(decoder.generate, "Stop here.", temperature=0, max_new_tokens=80)
    while not runner.plain.rows:
        time.sleep(0.001)
    long_ones = [Call(decoder.generate, TURN_1, **GREEDY), Call(decoder.generate, TURN_2, **SEEDED)]
    assert [c.result().token_ids for c in long_ones] == solo
    expected_run = uncached.generate("Stop here.", temperature=0, max_new_tokens=80).token_ids
    assert running.result().token_ids == expected_run
    # the long prompts were read 8 tokens per model per step, between decode steps
    prompt_tokens = len(decoder.encode(TURN_1)) + len(decoder.encode(TURN_2))
    assert decoder.engine.stats.prefill_chunks - chunks >= prompt_tokens // 8


def test_a_poison_prompt_beside_cache_hits_fails_alone_and_leaves_the_cache_valid(
    tiny_paths, uncached
):
    decoder = family(tiny_paths, prefill_chunk=16)
    decoder.generate(TURN_1, **GREEDY)  # TURN_2's prefix is cached
    poison_token = next(
        t for t in range(10, decoder.vocab_size) if t not in set(decoder.encode(TURN_2))
    )
    poison = [*decoder.encode(TURN_1), poison_token, *decoder.encode(" and more")]
    with hooked(base_model(decoder), raises_on(poison_token), pre=True):
        started = together(
            decoder,
            [
                (decoder.generate, (TURN_2,), GREEDY),
                (decoder.generate, (poison,), GREEDY),
                (decoder.generate, (TURN_2,), SEEDED),
            ],
        )
        with pytest.raises(RuntimeError, match=f"cannot read token {poison_token}"):
            started[1].result()
        innocent = [started[0].result(), started[2].result()]
    expected = [uncached.generate(TURN_2, **kw).token_ids for kw in (GREEDY, SEEDED)]
    assert [o.token_ids for o in innocent] == expected
    idle(decoder)
    assert decoder.engine.cached_tokens() == 0 and decoder.engine.memory.used_blocks() == 0
    # the poison's own blocks were never registered: the cache still answers exactly
    again = decoder.generate(TURN_2, **GREEDY)
    assert again.usage.cached_tokens > 0 and again.token_ids == expected[0]


def test_concurrent_turns_sharing_one_document_equal_their_solo_outputs(cached, uncached):
    questions = [f"{DOCUMENT}Question {i}: what is {i}?" for i in range(5)]
    calls = [Call(cached.generate, q, **GREEDY) for q in questions]
    got = [c.result().token_ids for c in calls]
    assert got == [uncached.generate(q, **GREEDY).token_ids for q in questions]


def test_two_threads_never_share_a_block_being_written(cached):
    """Rows with the same prompt admitted together each compute it (the first copy is the
    one registered); both answer as alone."""
    barrier = threading.Barrier(2)
    results: list[list[int]] = []

    def run() -> None:
        barrier.wait()
        results.append(cached.generate(TURN_1 + " twin", **GREEDY).token_ids)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(results) == 2 and results[0] == results[1]


# ---------------------------------------------------------------------------- compiled step


def test_a_compiled_decode_step_equals_eager(tiny_paths):
    """torch.compile (inductor on CPU) over bucketed decode shapes: greedy tokens and seeded
    draws identical to eager, step log-probs within 1e-4."""
    options = dict(behaviors={}, eos_token_ids=[], prefill_chunk=None)
    eager = EFTDecoder.from_pretrained(base=tiny_paths["chat"], dtype=torch.float32, **options)
    compiled = EFTDecoder.from_pretrained(
        base=tiny_paths["chat"], dtype=torch.float32, compile=True, **options
    )
    prompts = ["The capital of Veloria", "Numbers: 1 2 3"]
    for kwargs in (dict(temperature=0), dict(temperature=0.8, seed=3)):
        want = [o.token_ids for o in eager.generate(prompts, max_new_tokens=12, **kwargs)]
        got = [o.token_ids for o in compiled.generate(prompts, max_new_tokens=12, **kwargs)]
        assert got == want, kwargs
    # one decode step's logits, compiled vs eager, on the same cache
    ensemble, memory = compiled._ensemble, compiled.engine.memory

    def step_logits(model) -> torch.Tensor:
        prompt = [compiled.encode(prompts[0])] * 3
        (state,), _ = ensemble.prefill(memory, prompt, prompt, [4] * 3)
        try:
            positions = state.append(1)
            ids = torch.tensor([[7]] * 3)
            plan = state.cache.plan
            padded = torch.cat([ids, ids.new_full((plan.batch - 3, 1), ensemble.pad_id)])
            with torch.inference_mode():
                out = model(
                    input_ids=padded,
                    attention_mask=state.attention_mask,
                    position_ids=positions,
                    **{ensemble._cache_kwarg[0]: state.cache},
                    use_cache=True,
                ).logits[:3, -1]
            return torch.log_softmax(out.float(), -1)
        finally:
            state.release()

    compiled_lp = compiled.engine.call(lambda: step_logits(ensemble._compiled[0]))
    eager_lp = compiled.engine.call(lambda: step_logits(ensemble.models[0]))
    assert ensemble._compiled[0] is not ensemble.models[0]
    torch.testing.assert_close(compiled_lp, eager_lp, atol=1e-4, rtol=0)
