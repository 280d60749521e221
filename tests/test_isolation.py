"""Fault injection: a poison request beside live ones fails alone, with a clear error.

Each test sends one poison (a value that passes validation but overflows in torch, a
constraint that allows nothing or answers a malformed mask, a model forward that raises on
one row's tokens, a crash of the engine loop itself) while other requests decode in the same
batch, and checks the contract: the poison gets its own error, every other request equals the
same call made alone, the engine serves the next call, and no cache rows are left behind.

The engine is held between two steps (`engine_held`) while the requests queue, so they are
admitted into one batch: no timing decides a test.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from eft_integrations import EFTDecoder
from eft_integrations.engine import MAX_CONSECUTIVE_CRASHES
from eft_integrations.errors import EFTRequestError, EngineError, EngineUnavailableError

from .conftest import tiny_family
from .tiny_models import build_tokenizer, llama

WAIT = 60  # seconds: only a deadlock would reach it
PROMPTS = ["The capital of Veloria", "Numbers: 1 2", "Stop here."]
GREEDY = dict(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def endless(tiny_paths) -> EFTDecoder:
    """The tiny family with no end-of-turn token: every row runs to its budget."""
    return tiny_family(tiny_paths, eos_token_ids=[])


# ---------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def engine_held(decoder: EFTDecoder) -> Iterator[None]:
    """Hold the engine thread between two steps; requests submitted meanwhile are admitted
    together when the block ends."""
    held, release = threading.Event(), threading.Event()

    def block() -> None:
        held.set()
        assert release.wait(WAIT), "engine never released"

    holder = threading.Thread(target=decoder.engine.call, args=(block,))
    holder.start()
    assert held.wait(WAIT)
    try:
        yield
    finally:
        release.set()
        holder.join(WAIT)


class Call:
    """One call running in its own thread; `result()` returns its output or raises."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self._box: dict = {}

        def target() -> None:
            try:
                self._box["out"] = fn(*args, **kwargs)
            except BaseException as error:
                self._box["error"] = error

        self._thread = threading.Thread(target=target)
        self._thread.start()

    def result(self):
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "call never returned"
        if "error" in self._box:
            raise self._box["error"]
        return self._box["out"]


def together(decoder: EFTDecoder, calls: list[tuple]) -> list[Call]:
    """Start every (fn, args, kwargs) call while the engine is held, so they share a batch."""
    with engine_held(decoder):
        started = [Call(fn, *args, **kwargs) for fn, args, kwargs in calls]
        deadline = time.monotonic() + WAIT
        while decoder.engine.queued < len(calls):
            assert time.monotonic() < deadline, "calls never queued"
            time.sleep(0.002)
    return started


def assert_clean(decoder: EFTDecoder) -> None:
    """The batch is empty, no cache is held, and the next call is served."""
    deadline = time.monotonic() + WAIT
    while decoder.engine.batch_size or decoder.engine.queued:
        assert time.monotonic() < deadline, "engine never went idle"
        time.sleep(0.005)
    assert decoder.engine.cached_tokens() == 0
    assert decoder.engine.failure is None
    assert len(decoder.generate(PROMPTS[0], temperature=0, max_new_tokens=3).token_ids) == 3


def innocent_calls(decoder: EFTDecoder, **extra) -> tuple[list[tuple], list[list[int]]]:
    """Greedy and seeded calls with their solo outputs."""
    kwargs = [
        {**GREEDY, **extra},
        {"temperature": 0.9, "seed": 3, "max_new_tokens": 12, **extra},
    ]
    calls = [(decoder.generate, (PROMPTS[i],), kw) for i, kw in enumerate(kwargs)]
    solo = [decoder.generate(PROMPTS[i], **kw).token_ids for i, kw in enumerate(kwargs)]
    return calls, solo


class Nothing:
    """A constraint that allows no token at its `at`-th step."""

    def __init__(self, at: int = 1, mask_size: int | None = None) -> None:
        self.at, self.calls, self.mask_size = at, 0, mask_size

    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        self.calls += 1
        if self.calls < self.at:
            return None
        return torch.zeros(self.mask_size or vocab_size, dtype=torch.bool)

    def advance(self, token_id: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


class Forcing(Nothing):
    """A constraint that forces `token` at its `at`-th step and allows anything else."""

    def __init__(self, token: int, at: int) -> None:
        super().__init__(at)
        self.token = token

    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        self.calls += 1
        if self.calls != self.at:
            return None
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.token] = True
        return mask


@contextlib.contextmanager
def hooked(model: torch.nn.Module, hook, *, pre: bool = False) -> Iterator[None]:
    """A forward hook on one model for the duration of a test (fault injection: the only way
    to make a model fail or overflow on one row's input)."""
    register = model.register_forward_pre_hook if pre else model.register_forward_hook
    handle = register(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def raises_on(token: int):
    """A pre-hook that raises when any row of the forward reads `token`."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and bool((ids == token).any()):
            raise RuntimeError(f"model cannot read token {token}")

    return hook


def nan_rows_on(token: int):
    """A hook that turns the logits of rows reading `token` to nan (an fp16 overflow)."""

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is None:
            return output
        rows = (ids == token).any(-1)
        output.logits[rows] = float("nan")
        return output

    return hook


def base_model(decoder: EFTDecoder) -> torch.nn.Module:
    return decoder._models[decoder._ensemble.base]


def poison_token(decoder: EFTDecoder, clean: list[list[int]]) -> int:
    """A token id that no innocent prompt or solo output contains."""
    seen = {t for ids in clean for t in ids}
    for prompt in PROMPTS:
        seen |= set(decoder.encode(prompt))
    return next(t for t in range(10, decoder.vocab_size) if t not in seen)


# ---------------------------------------------------------------------------- edge validation


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"seed": 2**64}, "seed must be in"),
        ({"seed": -(2**63) - 1}, "seed must be in"),
        ({"weights": {"chat": 1e38}}, "finite number in"),
        ({"weights": {"chat": -1e7}}, "finite number in"),
    ],
)
def test_values_that_overflow_in_torch_are_refused_at_the_edge(endless, kwargs, message):
    with pytest.raises(ValueError, match=message):
        endless.generate(PROMPTS[0], **kwargs)
    assert_clean(endless)


def test_the_extreme_seeds_torch_accepts_work(endless):
    for seed in (2**64 - 1, -(2**63)):
        assert len(endless.generate(PROMPTS[0], seed=seed, max_new_tokens=3).token_ids) == 3


@pytest.mark.parametrize("speculative_k", [None, 2])
def test_a_temperature_below_the_floor_decodes_greedily(endless, speculative_k):
    greedy = endless.generate(PROMPTS[0], temperature=0, max_new_tokens=8).token_ids
    tiny = endless.generate(
        PROMPTS[0], temperature=1e-300, max_new_tokens=8, speculative_k=speculative_k
    )
    assert tiny.token_ids == greedy


def test_a_seed_past_validation_fails_its_request_alone(endless):
    # defence in depth: a request that reaches admission with a seed torch refuses
    calls, solo = innocent_calls(endless)
    from eft_integrations.options import GenerationOptions

    original = GenerationOptions.__post_init__

    def lenient(self) -> None:
        seed = self.seed
        object.__setattr__(self, "seed", None)
        original(self)
        object.__setattr__(self, "seed", seed)

    GenerationOptions.__post_init__ = lenient
    try:
        poison = (endless.generate, (PROMPTS[2],), {"seed": 2**64, "max_new_tokens": 4})
        started = together(endless, [calls[0], poison, calls[1]])
    finally:
        GenerationOptions.__post_init__ = original
    with pytest.raises((OverflowError, ValueError, RuntimeError)):
        started[1].result()
    assert [started[0].result().token_ids, started[2].result().token_ids] == solo
    assert_clean(endless)


# ---------------------------------------------------------------------------- one row's failure


@pytest.mark.parametrize("speculative_k", [None, 3])
def test_a_row_whose_distribution_is_not_finite_fails_alone(endless, speculative_k):
    calls, solo = innocent_calls(endless, speculative_k=speculative_k)
    token = poison_token(endless, solo)
    prompt = [*endless.encode(PROMPTS[2]), token]
    poison = (endless.generate, (prompt,), {**GREEDY, "speculative_k": speculative_k})
    with hooked(base_model(endless), nan_rows_on(token)):
        started = together(endless, [calls[0], poison, calls[1]])
        with pytest.raises(EFTRequestError, match="not finite") as caught:
            started[1].result()
        assert caught.value.param == "weights"
        assert [started[0].result().token_ids, started[2].result().token_ids] == solo
    assert_clean(endless)


@pytest.mark.parametrize(
    "constraint,message",
    [
        (lambda: Nothing(at=3), "constraint allows no token"),
        (lambda: Nothing(at=2, mask_size=7), "must be \\[\\d+\\]"),
    ],
    ids=["allows-nothing", "wrong-mask-length"],
)
def test_a_constraint_that_allows_nothing_or_answers_a_bad_mask_fails_alone(
    endless, constraint, message
):
    calls, solo = innocent_calls(endless)
    poison = (endless.generate, (PROMPTS[2],), {**GREEDY, "constraints": [constraint()]})
    started = together(endless, [calls[0], poison, calls[1]])
    with pytest.raises(EFTRequestError, match=message) as caught:
        started[1].result()
    assert caught.value.param == "constraints"
    assert [started[0].result().token_ids, started[2].result().token_ids] == solo
    assert_clean(endless)


def test_a_greedy_row_that_overflows_never_returns_an_empty_success(endless):
    token = poison_token(endless, [])
    with (
        hooked(base_model(endless), nan_rows_on(token)),
        pytest.raises(EFTRequestError, match="not finite"),
    ):
        endless.generate([*endless.encode(PROMPTS[0]), token], **GREEDY)
    assert_clean(endless)


# ---------------------------------------------------------------------------- model failures


def test_a_prefill_that_raises_on_one_prompt_fails_that_request_alone(endless):
    calls, solo = innocent_calls(endless)
    token = poison_token(endless, solo)
    poison = (endless.generate, ([*endless.encode(PROMPTS[2]), token],), GREEDY)
    with hooked(base_model(endless), raises_on(token), pre=True):
        started = together(endless, [calls[0], poison, calls[1]])
        with pytest.raises(RuntimeError, match=f"cannot read token {token}"):
            started[1].result()
        assert [started[0].result().token_ids, started[2].result().token_ids] == solo
    assert_clean(endless)


def test_a_decode_forward_that_raises_on_one_rows_token_fails_that_row_alone(endless):
    calls, solo = innocent_calls(endless)
    token = poison_token(endless, solo)
    # the poison row is forced to write the token at its 4th step; feeding it raises
    poison = (endless.generate, (PROMPTS[2],), {**GREEDY, "constraints": [Forcing(token, 4)]})
    with hooked(base_model(endless), raises_on(token), pre=True):
        started = together(endless, [calls[0], poison, calls[1]])
        with pytest.raises(RuntimeError, match=f"cannot read token {token}"):
            started[1].result()
        assert [started[0].result().token_ids, started[2].result().token_ids] == solo
    assert_clean(endless)


def test_a_speculative_round_that_raises_on_one_rows_drafts_fails_that_row_alone(endless):
    kwargs = {**GREEDY, "speculative_k": 3}
    read: set[int] = set()  # every token the base reads for the other rows, drafts included

    def record(module, args, kwargs):
        read.update(kwargs["input_ids"].flatten().tolist())

    with hooked(base_model(endless), record, pre=True):
        solo = [endless.generate(p, **kwargs).token_ids for p in PROMPTS[:2]]
    # the poison: a token the last prompt's row emits, and no other row reads
    poison = endless.generate(PROMPTS[2], **kwargs).token_ids
    token = next(t for t in poison[1:] if t not in read)
    calls = [(endless.generate, (p,), kwargs) for p in PROMPTS]
    with hooked(base_model(endless), raises_on(token), pre=True):
        started = together(endless, calls)
        with pytest.raises(RuntimeError, match=f"cannot read token {token}"):
            started[2].result()
        assert [started[i].result().token_ids for i in (0, 1)] == solo
    assert_clean(endless)


def test_a_speculative_row_near_the_window_is_never_fed_past_it(endless):
    # the GPT-2 reference has 96 positions: a 90-token prompt leaves 6; its batch-mate drafts
    # 8 per round, so the round feeds every row 9 tokens
    long_prompt = (endless.encode("Numbers: 1 2 3 4 5 6 7 8 9 10, and more numbers. ") * 20)[:90]
    short = dict(temperature=0, max_new_tokens=20, speculative_k=8)
    near = dict(temperature=0, max_new_tokens=20, speculative_k=1)
    solo = [
        endless.generate(long_prompt, **near).token_ids,
        endless.generate(PROMPTS[1], **short).token_ids,
    ]
    started = together(
        endless,
        [(endless.generate, (long_prompt,), near), (endless.generate, (PROMPTS[1],), short)],
    )
    assert [c.result().token_ids for c in started] == solo
    assert len(solo[0]) == 6
    assert_clean(endless)


# ---------------------------------------------------------------------------- the loop itself


def test_a_crash_in_the_engine_loop_fails_the_rows_in_flight_and_the_engine_goes_on(tiny_paths):
    decoder = tiny_family(tiny_paths, eos_token_ids=[])
    engine = decoder.engine
    crash = threading.Event()
    original = engine.outputs.cancelled

    def cancelled(requests) -> None:
        if crash.is_set():
            crash.clear()
            raise RuntimeError("injected engine bug")
        original(requests)

    engine.outputs.cancelled = cancelled
    calls = [(decoder.generate, (p,), {"temperature": 0, "max_new_tokens": 40}) for p in PROMPTS]
    started = together(decoder, calls)
    crash.set()
    for call in started:
        with pytest.raises(EngineError, match="injected engine bug.*retry"):
            call.result()
    assert engine.failure is None
    assert_clean(decoder)


def test_an_engine_that_keeps_crashing_refuses_every_call_at_once(tiny_paths):
    decoder = tiny_family(tiny_paths)
    engine = decoder.engine

    def broken(requests) -> None:
        raise RuntimeError("injected engine bug")

    engine.outputs.cancelled = broken
    # each call is in flight when a step fails: it gets the error at once, not a hang
    for _ in range(MAX_CONSECUTIVE_CRASHES - 1):
        with pytest.raises(EngineError, match="injected engine bug.*retry"):
            decoder.generate(PROMPTS[0], max_new_tokens=3)
        assert engine.failure is None
    with pytest.raises(EngineUnavailableError, match="injected engine bug"):
        decoder.generate(PROMPTS[0], max_new_tokens=3)
    assert engine.failure is not None and "injected engine bug" in engine.failure
    assert f"{MAX_CONSECUTIVE_CRASHES} times in a row" in engine.failure
    # every later call, sync or streamed or a model call, is refused at once
    with pytest.raises(EngineUnavailableError, match="cannot serve"):
        decoder.generate(PROMPTS[0], max_new_tokens=3)
    with pytest.raises(EngineUnavailableError):
        list(decoder.stream(PROMPTS[0], max_new_tokens=3))
    with pytest.raises(EngineUnavailableError):
        decoder.next_token_logprobs(PROMPTS[0])


# ---------------------------------------------------------------------------- the caller's objects


def test_the_callers_cancel_event_is_only_read(endless):
    event = threading.Event()
    first = endless.generate(PROMPTS[0], cancel=event, **GREEDY)
    assert not event.is_set()
    list(endless.stream(PROMPTS[0], cancel=event, **GREEDY))
    assert not event.is_set()
    again = endless.generate(PROMPTS[0], cancel=event, **GREEDY)
    assert again.token_ids == first.token_ids and len(again.token_ids) == 12


def test_two_calls_sharing_one_cancel_event_do_not_cut_each_other_short(endless):
    event = threading.Event()
    short = dict(GREEDY, max_new_tokens=2)
    long = dict(GREEDY, max_new_tokens=20)
    started = together(
        endless,
        [
            (endless.generate, (PROMPTS[0],), {**short, "cancel": event}),
            (endless.generate, (PROMPTS[1],), {**long, "cancel": event}),
        ],
    )
    assert [len(c.result().token_ids) for c in started] == [2, 20]
    event.set()
    assert endless.generate(PROMPTS[0], cancel=event, **GREEDY).token_ids == []


# ---------------------------------------------------------------------------- batch independence


@pytest.fixture(scope="module")
def longrope_decoder(tmp_path_factory) -> EFTDecoder:
    """A Phi-3-style model whose longrope factors switch past 32 positions."""
    root = tmp_path_factory.mktemp("longrope")
    tokenizer = build_tokenizer()
    torch.manual_seed(11)
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=32,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0, 1.0, 1.0, 1.0],
            "long_factor": [4.0, 8.0, 16.0, 32.0],
            "original_max_position_embeddings": 32,
        },
        pad_token_id=2,
        bos_token_id=0,
        eos_token_id=5,
    )
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(root / "phi3")
    tokenizer.save_pretrained(root / "phi3")
    chat = llama(len(tokenizer), seed=12)
    chat.save_pretrained(root / "chat")
    tokenizer.save_pretrained(root / "chat")
    return EFTDecoder.from_pretrained(
        base=root / "phi3",
        behaviors={"chat": (root / "chat", root / "chat")},
        dtype=torch.float32,
        eos_token_ids=[],
    )


@contextlib.contextmanager
def forwards_past_the_threshold(decoder: EFTDecoder) -> Iterator[list[tuple[int, ...]]]:
    """The shapes of the base's forwards that hold several rows and reach past the longrope
    threshold (32): transformers picks the RoPE factors from the largest position id of the
    whole forward, so such a forward must hold no other row (the tiny model's greedy tokens
    are too robust to show the changed factors, so the forwards are checked)."""
    shared: list[tuple[int, ...]] = []

    def record(module, args, kwargs):
        positions = kwargs["position_ids"]
        if positions.shape[0] > 1 and int(positions.max()) + 1 > 32:
            shared.append(tuple(positions.shape))

    with hooked(decoder._models[decoder._ensemble.base], record, pre=True):
        yield shared


def test_a_short_row_never_shares_a_forward_with_a_row_past_the_longrope_threshold(
    longrope_decoder,
):
    decoder = longrope_decoder
    short = dict(temperature=0, max_new_tokens=20)  # 11 + 20 positions: below 32 throughout
    long = dict(temperature=0, max_new_tokens=40)  # crosses 32 while the short row decodes
    long_prompt = decoder.encode("The capital of Veloria is Markan. The river runs north.")
    assert len(decoder.encode(PROMPTS[0])) + 20 <= 32 < len(long_prompt) + 10
    solo = [
        decoder.generate(PROMPTS[0], **short).token_ids,
        decoder.generate(long_prompt, **long).token_ids,
    ]
    with forwards_past_the_threshold(decoder) as shared_past_threshold:
        started = together(
            decoder,
            [(decoder.generate, (PROMPTS[0],), short), (decoder.generate, (long_prompt,), long)],
        )
        assert [c.result().token_ids for c in started] == solo
        batched = decoder.generate([PROMPTS[0], long_prompt, PROMPTS[1]], temperature=0)
    assert batched[0].token_ids[:20] == solo[0]
    assert shared_past_threshold == []
    assert_clean(decoder)


def test_a_speculative_row_past_the_longrope_threshold_prefills_apart_from_plain_rows(
    longrope_decoder,
):
    """Plain and speculative rows decode in batches of their own but prefill together: a
    solo row's prompt is read in forwards of its own."""
    decoder = longrope_decoder
    short = dict(temperature=0, max_new_tokens=8)
    long = dict(temperature=0, max_new_tokens=8, speculative_k=2)
    long_prompt = decoder.encode("The capital of Veloria is Markan. The river runs north. " * 2)
    assert len(long_prompt) > 32
    solo = [
        decoder.generate(PROMPTS[0], **short).token_ids,
        decoder.generate(long_prompt, **long).token_ids,
    ]
    with forwards_past_the_threshold(decoder) as shared_past_threshold:
        started = together(
            decoder,
            [(decoder.generate, (PROMPTS[0],), short), (decoder.generate, (long_prompt,), long)],
        )
        assert [c.result().token_ids for c in started] == solo
    assert shared_past_threshold == []
    assert_clean(decoder)


def test_a_model_in_two_roles_refuses_a_second_prompt_view(tiny_paths):
    # chat's fine-tuned model is safe's reference: it would read one view for both roles
    decoder = EFTDecoder.from_pretrained(
        base=tiny_paths["base"],
        behaviors={
            "chat": (tiny_paths["chat"], tiny_paths["ref"]),
            "safe": (tiny_paths["safe"], tiny_paths["chat"]),
        },
        dtype=torch.float32,
    )
    with pytest.raises(ValueError, match="fine-tuned model and a base or reference at once"):
        decoder.generate("Hello", base_prompt="Plain hello", max_new_tokens=2)
    # the same prompt for both views is fine
    assert decoder.generate("Hello", base_prompt="Hello", max_new_tokens=2).token_ids
