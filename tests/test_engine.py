"""The engine: concurrent calls batch themselves, rows join and leave, and nothing leaks.

Timing never decides a test: a `Gate` constraint holds the engine thread inside one step
(allowed_mask blocks until released), so a test can submit requests "mid-decode" at an exact
step, and count the steps a row ran by counting its constraint's calls.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from eft_integrations import EFTDecoder
from eft_integrations.constraints import GrammarConstraint
from eft_integrations.tool_calls import json_grammar

from .conftest import tiny_family
from .reference import BruteForceEFT

PROMPTS = ["The capital of Veloria", "Héllo wörld, café crème", "Stop here.", "Numbers: 1 2"]
WAIT = 60  # seconds: only a deadlock would reach it


class Gate:
    """A constraint that allows every token but blocks the engine thread when it records its
    `at`-th token (after that step's sampling, before its forward: a deterministic point of
    the step, since masks are computed on a worker thread)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0
        self.reached = threading.Event()
        self.release = threading.Event()

    def allowed_mask(self, vocab_size: int) -> None:
        return None

    def advance(self, token_id: int) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            assert self.release.wait(WAIT), "gate never released"

    def is_finished(self) -> bool:
        return False


class Broken(Gate):
    """Fails at its `at`-th mask, like a grammar engine error in one request."""

    def allowed_mask(self, vocab_size: int) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("grammar engine failed")
        return None

    def advance(self, token_id: int) -> None:
        pass


@pytest.fixture(scope="module")
def endless(tiny_paths) -> EFTDecoder:
    """The tiny family with no end-of-turn token: every row runs to its budget."""
    return tiny_family(tiny_paths, eos_token_ids=[])


def _wait_idle(decoder: EFTDecoder) -> None:
    deadline = time.monotonic() + WAIT
    while decoder.engine.batch_size or decoder.engine.queued:
        assert time.monotonic() < deadline, "engine never went idle"
        time.sleep(0.005)


def _run(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["out"] = fn(*args, **kwargs)
        except BaseException as error:
            box["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


# ---------------------------------------------------------------------------- batch membership


def test_a_prompt_near_the_context_window_batched_with_a_short_one_ends_as_alone(endless):
    # the GPT-2 reference has 96 positions: a 90-token prompt has 6 tokens of room
    long_prompt = (endless.encode("Numbers: 1 2 3 4 5 6 7 8 9 10, and more numbers. ") * 20)[:90]
    short_prompt = endless.encode("Stop")[:2]
    alone = [
        endless.generate(p, temperature=0, max_new_tokens=30) for p in (long_prompt, short_prompt)
    ]
    together = endless.generate([long_prompt, short_prompt], temperature=0, max_new_tokens=30)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [len(o.token_ids) for o in together] == [6, 30]
    assert together[0].finish_reason == "length"


def test_a_request_arriving_mid_decode_joins_the_batch_and_a_finished_row_leaves(endless):
    alone_a = endless.generate(PROMPTS[0], temperature=0, max_new_tokens=30)
    alone_b = endless.generate(PROMPTS[1], temperature=0, max_new_tokens=8, weights={"chat": 2})
    before = endless.forward_calls
    endless.generate(PROMPTS[1], temperature=0, max_new_tokens=8, weights={"chat": 2})
    forwards_b_alone = endless.forward_calls - before
    steps_before = endless.engine.stats.steps

    gate = Gate(at=10)
    thread_a, box_a = _run(
        endless.generate, PROMPTS[0], temperature=0, max_new_tokens=30, constraints=[gate]
    )
    assert gate.reached.wait(WAIT)
    before = endless.forward_calls
    thread_b, box_b = _run(
        endless.generate, PROMPTS[1], temperature=0, max_new_tokens=8, weights={"chat": 2}
    )
    while endless.engine.queued == 0:
        time.sleep(0.001)
    gate.release.set()
    thread_a.join(WAIT)
    thread_b.join(WAIT)
    assert box_a["out"].token_ids == alone_a.token_ids
    assert box_b["out"].token_ids == alone_b.token_ids
    # after the gated step A feeds tokens 10..29 (20 forwards per model); B joined them: its
    # prefill is its only forward of its own, its decode steps ride on A's
    n_models = len(endless.model_names)
    assert endless.forward_calls - before == n_models * (20 + 1)
    assert endless.forward_calls - before < n_models * 20 + forwards_b_alone
    sizes = list(endless.engine.stats.batch_sizes)[-(endless.engine.stats.steps - steps_before) :]
    assert sizes == [1] * 10 + [2] * 8 + [1] * 12  # B joins after step 10, leaves after 8
    _wait_idle(endless)
    assert endless.engine.cached_tokens() == 0


def test_seeded_rows_do_not_depend_on_their_batch_mates(decoder):
    kwargs = dict(temperature=1.0, max_new_tokens=12, seed=7)
    alone = [decoder.generate(p, **kwargs) for p in PROMPTS[:2]]
    batched = decoder.generate(PROMPTS[:2], **kwargs)
    reversed_batch = decoder.generate(PROMPTS[1::-1], **kwargs)
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert [o.token_ids for o in reversed_batch] == [o.token_ids for o in alone[::-1]]


def test_diagnostics_on_results_and_stream_chunks(decoder):
    out = decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=5)
    assert out.stats is not None and out.stats.queue_time >= 0
    assert out.stats.time_to_first_token is not None and out.stats.tokens_per_second > 0
    last = list(decoder.stream(PROMPTS[0], temperature=0, max_new_tokens=5))[-1]
    assert last.finish_reason is not None and last.stats is not None
    assert last.stats.speculative_rounds is None


# ---------------------------------------------------------------------------- many callers


def _mixed_call(decoder: EFTDecoder, i: int):
    """Call i of a deterministic mix: weights, stops, budgets, seeds, JSON, streamed or not."""
    rnd = random.Random(i)
    prompt = rnd.choice(PROMPTS)
    kwargs = dict(
        weights={"chat": rnd.choice([0.0, 0.5, 1.0, 2.0]), "safe": rnd.choice([-0.5, 0.0, 1.0])},
        max_new_tokens=rnd.randint(1, 10),
        temperature=rnd.choice([0.0, 0.8, 1.0]),
        top_k=rnd.choice([0, 5]),
        seed=rnd.randint(0, 3),
        stop=rnd.choice([None, "e", ["a", "o"]]),
    )
    kind = i % 5
    if kind == 0:  # forced JSON arguments of a tool, as a grammar constraint
        constraint = GrammarConstraint.from_lark(
            decoder.tokenizer,
            json_grammar(_ARGS, max_string_length=6),
            eos_token_ids=sorted(decoder.eos_token_ids),
            budget=30,
        )
        out = decoder.generate(
            prompt, constraints=[constraint], **{**kwargs, "max_new_tokens": 30, "stop": None}
        )
        return ("json", json.loads(out.text), out.finish_reason)
    if kind == 1:
        chunks = list(decoder.stream(prompt, **kwargs))
        return ("stream", "".join(c.text for c in chunks), chunks[-1].finish_reason)
    out = decoder.generate(prompt, **kwargs)
    return ("generate", out.token_ids, out.text, out.finish_reason)


_ARGS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_eight_threads_of_mixed_calls_equal_the_same_calls_made_alone(decoder):
    calls = range(8 * 25)
    alone = {i: _mixed_call(decoder, i) for i in calls}
    got: dict[int, object] = {}
    errors: list[BaseException] = []
    steps_before = decoder.engine.stats.steps

    def worker(w: int) -> None:
        try:
            for i in calls[w::8]:
                got[i] = _mixed_call(decoder, i)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 5)
    assert not errors
    mismatched = [i for i in calls if got.get(i) != alone[i]]
    assert not mismatched, [(i, got.get(i), alone[i]) for i in mismatched[:3]]
    recent = list(decoder.engine.stats.batch_sizes)[-(decoder.engine.stats.steps - steps_before) :]
    assert max(recent) > 1  # the calls were batched together
    _wait_idle(decoder)
    assert decoder.engine.cached_tokens() == 0


async def test_asyncio_gather_of_agenerate_batches_and_equals_alone(decoder):
    kwargs = [dict(weights={"chat": w}, temperature=0, max_new_tokens=6) for w in (0, 1, 2)]
    alone = [decoder.generate(p, **k).token_ids for p in PROMPTS for k in kwargs]
    got = await asyncio.gather(*(decoder.agenerate(p, **k) for p in PROMPTS for k in kwargs))
    assert [o.token_ids for o in got] == alone


# ---------------------------------------------------------------------------- streams are handles


def test_one_stream_read_from_different_threads_in_turn(decoder):
    expected = decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=20).text
    stream = decoder.stream(PROMPTS[0], temperature=0, max_new_tokens=20)
    pieces: list[str] = []
    while True:  # each next() on a fresh thread, as Starlette's iterate_in_threadpool does
        thread, box = _run(next, stream, None)
        thread.join(WAIT)
        if box.get("out") is None:
            break
        pieces.append(box["out"].text)
    assert "".join(pieces) == expected
    assert decoder.generate(PROMPTS[1], temperature=0, max_new_tokens=3).token_ids


def test_a_half_read_stream_blocks_nobody(decoder):
    stream = decoder.stream(PROMPTS[0], temperature=0, max_new_tokens=20)
    next(stream)
    thread, box = _run(decoder.generate, PROMPTS[1], temperature=0, max_new_tokens=5)
    thread.join(WAIT)
    assert not thread.is_alive() and "out" in box
    rest = "".join(c.text for c in stream)  # and the half-read stream still completes
    assert rest is not None


def test_two_streams_read_alternately_in_one_thread_leave_torch_state_alone(decoder):
    settings = [{"chat": 1.0, "safe": 0.0}, {"chat": 0.0, "safe": 1.0}]
    expected = [
        decoder.generate(PROMPTS[0], weights=w, temperature=0, max_new_tokens=12).text
        for w in settings
    ]
    streams = [
        decoder.stream(PROMPTS[0], weights=w, temperature=0, max_new_tokens=12) for w in settings
    ]
    texts = ["", ""]
    live = [True, True]
    while any(live):
        for i, s in enumerate(streams):
            if not live[i]:
                continue
            chunk = next(s, None)
            # the caller's thread never sees inference mode or disabled grad
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            if chunk is None:
                live[i] = False
            else:
                texts[i] += chunk.text
    assert texts == expected
    x = torch.ones(2, requires_grad=True)
    (x * 3).sum().backward()  # the user's own training code still works
    assert x.grad is not None


# ---------------------------------------------------------------------------- cancellation


def test_an_abandoned_sync_stream_leaves_the_batch_at_the_next_step(endless):
    cancelled = endless.engine.stats.cancelled
    gate = Gate(at=4)
    stream = endless.stream(PROMPTS[0], temperature=0, max_new_tokens=40, constraint=gate)
    next(stream)
    assert gate.reached.wait(WAIT)
    del stream  # dropped half-read: its row must go
    gate.release.set()
    _wait_idle(endless)
    assert gate.calls == 4  # no step after the one in flight
    assert endless.engine.stats.cancelled == cancelled + 1
    assert endless.engine.cached_tokens() == 0


async def test_a_cancelled_task_and_a_closed_async_stream_leave_the_batch(endless):
    other_expected = endless.generate(PROMPTS[2], temperature=0, max_new_tokens=30).token_ids
    gate_task, gate_stream = Gate(at=3), Gate(at=3)
    task = asyncio.create_task(
        endless.agenerate(PROMPTS[0], temperature=0, max_new_tokens=40, constraints=[gate_task])
    )
    other = asyncio.create_task(endless.agenerate(PROMPTS[2], temperature=0, max_new_tokens=30))
    assert await asyncio.to_thread(gate_task.reached.wait, WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate_task.release.set()

    agen = endless.astream(PROMPTS[1], temperature=0, max_new_tokens=40, constraint=gate_stream)
    await agen.__anext__()
    assert await asyncio.to_thread(gate_stream.reached.wait, WAIT)
    await agen.aclose()
    gate_stream.release.set()

    assert (await other).token_ids == other_expected  # the rest continue untouched
    await asyncio.to_thread(_wait_idle, endless)
    assert (gate_task.calls, gate_stream.calls) == (3, 3)
    assert endless.engine.cached_tokens() == 0


def test_a_request_whose_constraint_fails_fails_alone(endless):
    expected = [
        endless.generate(p, temperature=0, max_new_tokens=12).token_ids for p in PROMPTS[:2]
    ]
    gate = Gate(at=1)
    thread_b, box_b = _run(
        endless.generate, PROMPTS[0], temperature=0, max_new_tokens=12, constraints=[gate]
    )
    assert gate.reached.wait(WAIT)
    thread_a, box_a = _run(
        endless.generate, PROMPTS[3], temperature=0, max_new_tokens=12, constraints=[Broken(at=3)]
    )
    thread_c, box_c = _run(endless.generate, PROMPTS[1], temperature=0, max_new_tokens=12)
    while endless.engine.queued < 2:
        time.sleep(0.001)
    gate.release.set()
    for t in (thread_a, thread_b, thread_c):
        t.join(WAIT)
    assert isinstance(box_a.get("error"), RuntimeError)
    assert [box_b["out"].token_ids, box_c["out"].token_ids] == expected
    assert endless.engine.stats.max_batch_size_seen >= 3


# ---------------------------------------------------------------------------- sliding windows


@pytest.fixture(scope="module")
def sliding_paths(tiny_paths, tmp_path_factory):
    """A Mistral base with an 8-token sliding window, beside the tiny family's small models."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["chat"])
    torch.manual_seed(11)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=8,
        bos_token_id=0,
        eos_token_id=5,
        pad_token_id=2,
    )
    model = MistralForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    path = tmp_path_factory.mktemp("sliding") / "base"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {**tiny_paths, "sliding": path}


def sliding_decoder(paths, **options) -> EFTDecoder:
    """The sliding-window base + chat(chat - ref), no end-of-turn token; `options` go to
    `EFTDecoder.from_pretrained`."""
    return EFTDecoder.from_pretrained(
        base=paths["sliding"],
        behaviors={"chat": (paths["chat"], paths["ref"])},
        dtype=torch.float32,
        eos_token_ids=[],
        **options,
    )


def test_sliding_window_base_plain_batched_and_speculative_match_the_reference(sliding_paths):
    p = sliding_paths
    decoder = sliding_decoder(p)
    assert AutoModelForCausalLM.from_pretrained(p["sliding"]).config.sliding_window == 8
    reference = BruteForceEFT(p["sliding"], {"chat": (p["chat"], p["ref"])}, decoder.vocab_size)
    expected = [reference.greedy(decoder.encode(q), {}, 20) for q in PROMPTS[:2]]
    plain = decoder.generate(PROMPTS[:2], temperature=0, max_new_tokens=20)
    assert [o.token_ids for o in plain] == expected
    for k in (1, 2, 4, 8):
        fast = decoder.generate(PROMPTS[:2], temperature=0, max_new_tokens=20, speculative_k=k)
        assert [o.token_ids for o in fast] == expected, k


class _SlowMask:
    """A constraint allowing every token but the first few ids, whose mask takes 50 ms (a
    large grammar) and records when and on which thread it was computed."""

    def __init__(self) -> None:
        self.intervals: list[tuple[float, float, str]] = []
        self.begun = threading.Event()  # a computation has started since the last forward

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        self.begun.set()
        start = time.perf_counter()
        time.sleep(0.05)
        mask = torch.ones(vocab_size, dtype=torch.bool)
        mask[:4] = False
        self.intervals.append((start, time.perf_counter(), threading.current_thread().name))
        return mask

    def advance(self, token_id: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


def test_grammar_masks_are_computed_while_the_models_run(tiny_paths):
    """The next step's masks are computed on the sampler's worker thread while the models'
    forward runs (not after it, on the engine thread), and the output is unchanged: equal to
    the same constraint applied the slow way, by the brute-force reference loop."""
    decoder = tiny_family(tiny_paths, eos_token_ids=[])
    base = decoder._models[decoder._ensemble.base]
    forwards: list[tuple[float, float]] = []
    constraint = _SlowMask()

    def forward_starts(*_: object) -> None:
        # a prefetching engine has started the step's mask by now; waiting for it (bounded)
        # keeps the check causal on a loaded machine, where the worker thread may be slow to
        # run: an engine that computes masks after the forward makes this wait time out
        constraint.begun.wait(2.0)
        constraint.begun.clear()
        forwards.append((time.perf_counter(), 0.0))

    handle_pre = base.register_forward_pre_hook(forward_starts)
    handle = base.register_forward_hook(
        lambda *_: forwards.__setitem__(-1, (forwards[-1][0], time.perf_counter()))
    )
    try:
        out = decoder.generate(
            "The capital", temperature=0, max_new_tokens=5, constraints=[constraint]
        )
    finally:
        handle_pre.remove()
        handle.remove()
    assert all(t >= 4 for t in out.token_ids)
    assert {name for *_, name in constraint.intervals} == {"eft-masks_0"}
    # every forward overlaps a mask computation (prefill and the decode steps)
    overlapping = [
        any(m0 < f1 and f0 < m1 for m0, m1, _ in constraint.intervals) for f0, f1 in forwards
    ]
    assert sum(overlapping) >= len(out.token_ids) - 1
    # the same tokens as the brute-force loop under the same mask
    behaviors = {"chat": (tiny_paths["chat"], tiny_paths["ref"])}
    behaviors["safe"] = (tiny_paths["safe"], tiny_paths["ref"])
    reference = BruteForceEFT(tiny_paths["base"], behaviors, decoder.vocab_size)
    ids = decoder.encode("The capital")
    for expected in out.token_ids:
        lp = reference.next_logprobs(ids, {})
        lp[:4] = float("-inf")
        assert int(lp.argmax()) == expected
        ids.append(expected)
