"""Behaviors from PEFT LoRA adapters on their reference, against the brute force: the same
EFT with each adapter merged into a full copy of the reference (`merge_and_unload`). Same
greedy tokens, the same log-probs within float tolerance, for one and two adapters, batched
with per-row weights, plain and speculative, scored; one backbone in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from eft_integrations import Behavior, EFTDecoder  # noqa: E402
from eft_integrations.adapters import (  # noqa: E402
    Adapter,
    AdapterView,
    merged_copy,
    small_side_bytes,
)

from .test_isolation import assert_clean, hooked, raises_on, together  # noqa: E402
from .tiny_models import build_tokenizer, llama  # noqa: E402

PROMPTS = ["The capital of", "Once upon a time", "Tell me about cats and"]
ATOL = 2e-4


def _lora(reference: torch.nn.Module, seed: int, targets: list[str]) -> peft.PeftModel:
    """A random LoRA adapter (B not zero, so it changes the outputs) on a copy of
    `reference`."""
    import copy

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(copy.deepcopy(reference), config)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A base, a small reference, two LoRA adapters on it (saved as adapters), the same
    adapters merged into full copies, and an adapter trained on another model."""
    root = tmp_path_factory.mktemp("lora-family")
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    models = {"base": llama(vocab, seed=21, hidden=48, layers=3), "ref": llama(vocab, seed=22)}
    paths = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    for name, seed, targets in (
        ("helpful", 31, ["q_proj", "v_proj"]),
        ("harmless", 32, ["o_proj", "gate_proj", "down_proj"]),
    ):
        adapted = _lora(models["ref"], seed, targets)
        adapted.save_pretrained(root / f"{name}-lora")
        paths[f"{name}-lora"] = root / f"{name}-lora"
        merged = merged_copy(adapted, "default")
        merged.save_pretrained(root / f"{name}-merged")
        tokenizer.save_pretrained(root / f"{name}-merged")
        paths[f"{name}-merged"] = root / f"{name}-merged"
    other = llama(vocab, seed=23, hidden=40)
    _lora(other, 33, ["q_proj"]).save_pretrained(root / "other-lora")
    paths["other-lora"] = root / "other-lora"
    return paths


def _decoders(family, names: list[str], **options) -> tuple[EFTDecoder, EFTDecoder]:
    """(adapters, merged): the same EFT, the behaviors as adapters or as merged models."""
    adapters = EFTDecoder.from_pretrained(
        base=family["base"],
        behaviors={
            n: Behavior(finetuned=Adapter(family[f"{n}-lora"], name=n), reference=family["ref"])
            for n in names
        },
        dtype=torch.float32,
        **options,
    )
    merged = EFTDecoder.from_pretrained(
        base=family["base"],
        behaviors={n: (family[f"{n}-merged"], family["ref"]) for n in names},
        dtype=torch.float32,
        **options,
    )
    return adapters, merged


@pytest.fixture(scope="module")
def two(family) -> tuple[EFTDecoder, EFTDecoder]:
    return _decoders(family, ["helpful", "harmless"])


def test_one_adapter_equals_its_merged_model(family):
    adapters, merged = _decoders(family, ["helpful"])
    for weights in ({"helpful": 1.0}, {"helpful": 2.5}):
        got = adapters.next_token_logprobs(PROMPTS, weights=weights)
        want = merged.next_token_logprobs(PROMPTS, weights=weights)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    greedy = {"temperature": 0, "max_new_tokens": 12}
    assert adapters.generate(PROMPTS[0], **greedy).token_ids == (
        merged.generate(PROMPTS[0], **greedy).token_ids
    )


def _assert_batch_equals_merged(adapters: EFTDecoder, merged: EFTDecoder, **extra) -> None:
    """One batch with per-row weights: the merged models' greedy tokens and log-probs."""
    weights = [{"helpful": 1.0, "harmless": 0.0}, {"helpful": -0.5, "harmless": 2.0}, {}]
    kwargs = {"temperature": 0, "max_new_tokens": 10, "logprobs": 0}
    got = adapters.generate(PROMPTS, weights=weights, **kwargs, **extra)
    want = merged.generate(PROMPTS, weights=weights, **kwargs)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for g, w in zip(got, want, strict=True):
        assert [e.logprob for e in g.logprobs] == pytest.approx(
            [e.logprob for e in w.logprobs], abs=ATOL
        )
    # the adapters change the outputs (the test would pass with adapters off otherwise)
    bare = adapters.generate(PROMPTS, weights={"helpful": 0, "harmless": 0}, **kwargs)
    assert [r.token_ids for r in bare] != [r.token_ids for r in got]


def test_two_adapters_batched_with_per_row_weights_equal_the_merged_models(two):
    _assert_batch_equals_merged(*two)


def test_speculative_rows_draft_with_the_adapter_views(two):
    adapters, merged = two
    kwargs = {"temperature": 0, "max_new_tokens": 14, "speculative_k": 3}
    weights = {"helpful": 1.5, "harmless": 0.5}
    got = adapters.generate(PROMPTS, weights=weights, **kwargs)
    want = merged.generate(PROMPTS, weights=weights, **kwargs)
    plain = adapters.generate(PROMPTS, weights=weights, temperature=0, max_new_tokens=14)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]


def test_the_adapter_drafters_draft_in_one_forward(two):
    """Speculative rounds draft with both adapter views in one backbone forward per draft
    position (the verification forward holds the reference's rows)."""
    adapters, _ = two
    backbone = next(m for m in adapters._models if isinstance(m, AdapterView)).peft_model
    calls: list[frozenset[str]] = []

    def record(module, args, kwargs):
        calls.append(frozenset(kwargs["adapter_names"]))

    rounds = adapters.engine.stats.speculative_rounds
    with hooked(backbone, record, pre=True):
        adapters.generate(PROMPTS[0], temperature=0, max_new_tokens=14, speculative_k=3)
    assert adapters.engine.stats.speculative_rounds > rounds
    both, every = frozenset({"helpful", "harmless"}), frozenset({"helpful", "harmless", "__base__"})
    assert calls[0] == every  # the three views prefill the same prompt in one forward
    assert calls.count(both) >= 4  # at least one round of k + 1 = 4 draft positions
    assert set(calls) == {every, both, frozenset({"__base__"})}  # the reference verifies


def test_score_equals_the_merged_models(two):
    adapters, merged = two
    weights = {"helpful": 1.0, "harmless": 1.0}
    counts = [adapters.forward_calls, merged.forward_calls]
    got = adapters.score(PROMPTS[1], [40, 41, 42, 43], weights=weights)
    want = merged.score(PROMPTS[1], [40, 41, 42, 43], weights=weights)
    assert got.logprobs == pytest.approx(want.logprobs, abs=ATOL)
    # the three views read the sequence in one forward, the base in another
    assert [adapters.forward_calls - counts[0], merged.forward_calls - counts[1]] == [2, 4]
    # several prompts and continuations of different lengths in one batch
    prompts = [PROMPTS[0], [*adapters.encode(PROMPTS[2]), 40]]
    continuations = [[41, 42], [43, 44, 45]]
    got = adapters.score(prompts, continuations, weights=weights)
    want = merged.score(prompts, continuations, weights=weights)
    for g, w in zip(got, want, strict=True):
        assert g.logprobs == pytest.approx(w.logprobs, abs=ATOL)


def test_the_small_side_is_one_backbone(two):
    adapters, merged = two
    views = [m for m in adapters._models if isinstance(m, AdapterView)]
    assert len(views) == 3  # the reference (adapters off) and one view per adapter
    assert len({id(v.peft_model) for v in views}) == 1
    assert {v.adapter for v in views} == {None, "helpful", "harmless"}

    assert small_side_bytes(adapters) < 0.5 * small_side_bytes(merged)


def test_an_adapter_trained_on_another_model_names_both(family):
    with pytest.raises(ValueError, match="does not fit its reference") as caught:
        EFTDecoder.from_pretrained(
            base=family["base"],
            behaviors={"x": Behavior(Adapter(family["other-lora"]), family["ref"])},
            dtype=torch.float32,
        )
    assert str(family["ref"]) in str(caught.value)


def test_a_folder_without_an_adapter_is_a_clear_error(family):
    with pytest.raises(ValueError, match="cannot read the adapter"):
        EFTDecoder.from_pretrained(
            base=family["base"],
            behaviors={"x": Behavior(Adapter(family["base"]), family["ref"])},
            dtype=torch.float32,
        )


def test_a_loaded_peft_model_gives_its_named_adapters(family, two):
    _, merged = two
    tokenizer = build_tokenizer()
    reference = peft.PeftModel.from_pretrained(
        llama_from(family["ref"]), family["helpful-lora"], adapter_name="helpful"
    )
    reference.load_adapter(family["harmless-lora"], adapter_name="harmless")
    base = llama_from(family["base"])
    decoder = EFTDecoder(
        base,
        {
            "helpful": (Adapter(reference, name="helpful"), reference),
            "harmless": (Adapter(reference, name="harmless"), reference),
        },
        tokenizer,
    )
    weights = {"helpful": 1.0, "harmless": -1.0}
    torch.testing.assert_close(
        decoder.next_token_logprobs(PROMPTS, weights=weights),
        merged.next_token_logprobs(PROMPTS, weights=weights),
        atol=ATOL,
        rtol=0,
    )


def _adapter_name_hooks(backbone: torch.nn.Module) -> list:
    """PEFT's per-call `adapter_names` hooks still registered on the backbone's layers."""
    import functools

    return [
        hook
        for module in backbone.modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, functools.partial) and "adapter_names" in hook.keywords
    ]


def llama_from(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_a_poison_row_beside_adapter_rows_fails_alone(two):
    _poison_row_fails_alone(two[0])


def test_a_poison_row_beside_switched_adapter_rows_fails_alone(unmixed):
    _poison_row_fails_alone(unmixed[0])


def _poison_row_fails_alone(adapters: EFTDecoder) -> None:
    """The backbone raises on one row's token: that row fails alone (the runner retries its
    batch-mates' forward without it); the adapter rows beside it equal their solo output, in
    mixed forwards and in forwards that switch the backbone to one adapter."""
    kwargs = {"temperature": 0, "max_new_tokens": 8, "weights": {"helpful": 1, "harmless": 1}}
    solo = [adapters.generate(p, **kwargs).token_ids for p in PROMPTS[:2]]
    seen = {t for ids in solo for t in ids} | {t for p in PROMPTS for t in adapters.encode(p)}
    token = next(t for t in range(10, adapters.vocab_size) if t not in seen)
    poisoned = [*adapters.encode(PROMPTS[2]), token]
    backbone = next(m for m in adapters._models if isinstance(m, AdapterView)).peft_model
    with hooked(backbone.get_base_model(), raises_on(token), pre=True):
        calls = together(
            adapters,
            [(adapters.generate, (p,), kwargs) for p in (PROMPTS[0], PROMPTS[1], poisoned)],
        )
        with pytest.raises(RuntimeError, match=f"cannot read token {token}"):
            calls[2].result()
        assert [c.result().token_ids for c in calls[:2]] == solo
    assert_clean(adapters)
    assert not _adapter_name_hooks(backbone)  # PEFT's per-call hooks did not outlive the failure
    assert [adapters.generate(p, **kwargs).token_ids for p in PROMPTS[:2]] == solo


def test_eft_serve_config_and_chat_eft_take_adapter_behaviors(family, two):
    """`adapter:PATH` in a config (and `--behavior NAME=adapter:PATH,REF`), and ChatEFT's
    lazy loading from paths, give the same EFT as the merged models."""
    from fastapi.testclient import TestClient
    from langchain_core.messages import HumanMessage

    from eft_integrations.langchain import ChatEFT
    from eft_integrations.serve import ServeConfig

    _, merged = two
    weights = {"helpful": 1.0, "harmless": 0.5}
    config = ServeConfig(
        base=str(family["base"]),
        behaviors=[
            f"helpful=adapter:{family['helpful-lora']},{family['ref']}",
            f"harmless=adapter:{family['harmless-lora']},{family['ref']}",
        ],
        dtype="float32",
        served_model_name="lora",
    )
    specs = config.behavior_specs()
    assert all(isinstance(b.finetuned, Adapter) for b in specs.values())
    with TestClient(config.build_app()) as client:
        body = {"model": "lora", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
        reply = client.post("/v1/completions", json={**body, "eft_weights": weights})
        metrics = client.get("/metrics").text
    assert reply.status_code == 200, reply.text
    assert f'eft_adapter_backbone_info{{backbone="{family["ref"]}",batching="mixed"}} 1.0' in (
        metrics
    )
    want = merged.generate(PROMPTS[0], weights=weights, max_new_tokens=8, temperature=0)
    assert reply.json()["choices"][0]["text"] == want.text

    chat = ChatEFT(
        base=str(family["base"]),
        behaviors={
            "helpful": Behavior(Adapter(family["helpful-lora"], name="helpful"), family["ref"])
        },
        dtype=torch.float32,
        temperature=0,
        max_tokens=6,
    )
    assert "helpful-lora" in chat.decoder.model_name  # named before loading
    answer = chat.invoke([HumanMessage("Hello")], weights={"helpful": 1.0})
    alone = EFTDecoder.from_pretrained(
        base=family["base"],
        behaviors={"helpful": (family["helpful-merged"], family["ref"])},
        dtype=torch.float32,
    )
    assert (
        answer.content
        == ChatEFT(decoder=alone, temperature=0, max_tokens=6)
        .invoke([HumanMessage("Hello")], weights={"helpful": 1.0})
        .content
    )


def test_one_backbone_forward_per_decode_step_for_all_its_views(two):
    """The reference and both adapters run as one mixed-adapter forward per prefill and
    decode step (PEFT's adapter_names per row), the base as another: 2 forwards a step where
    the merged models take 4."""
    adapters, merged = two
    assert adapters._ensemble.view_groups and len(adapters._ensemble.view_groups[0]) == 3
    steps = 9
    counts = []
    for decoder in (adapters, merged):
        before = decoder.forward_calls
        result = decoder.generate(PROMPTS[0], max_new_tokens=steps + 1, temperature=0)
        assert len(result.token_ids) == steps + 1
        counts.append(decoder.forward_calls - before)
    prefill_adapters, prefill_merged = 1 + 1, 4  # the views prefill one prompt together
    assert counts[0] - prefill_adapters == 2 * steps
    assert counts[1] - prefill_merged == 4 * steps


def test_chunked_prefills_of_the_views_share_forwards_and_equal_the_merged(family):
    """A prompt prefilled in chunks of 8 tokens: each chunk is one forward for the three
    views; the outputs equal the merged models prefilled the same way."""
    adapters, merged = _decoders(family, ["helpful", "harmless"], prefill_chunk=8)
    prompt = " ".join(PROMPTS * 2)
    assert len(adapters.encode(prompt)) > 3 * 8
    kwargs = {"temperature": 0, "max_new_tokens": 6, "logprobs": 0}
    weights = {"helpful": 1.0, "harmless": -0.5}
    chunks = adapters.engine.stats.prefill_chunks
    before = adapters.forward_calls
    got = adapters.generate(prompt, weights=weights, **kwargs)
    chunks = adapters.engine.stats.prefill_chunks - chunks
    assert chunks >= 4
    assert adapters.forward_calls - before == 2 * chunks + 2 * 5  # + 5 decode steps
    want = merged.generate(prompt, weights=weights, **kwargs)
    assert got.token_ids == want.token_ids
    assert [e.logprob for e in got.logprobs] == pytest.approx(
        [e.logprob for e in want.logprobs], abs=ATOL
    )


def test_views_reading_different_prompt_views_share_one_forward(two):
    """The reference reads the base view of a prompt, the adapters the chat view: rows of
    different lengths in one forward (contexts left-padded, prefill chunks widened) still
    equal the merged models."""
    adapters, merged = two
    base_prompts = ["Plain: " + p + " and more words here" for p in PROMPTS]
    kwargs = {"temperature": 0, "max_new_tokens": 10, "logprobs": 0}
    weights = {"helpful": 1.0, "harmless": -0.5}
    stats = adapters.engine.stats
    failures, chunks, before = (
        stats.failed_decode_forwards,
        stats.prefill_chunks,
        adapters.forward_calls,
    )
    got = adapters.generate(PROMPTS, weights=weights, base_prompt=base_prompts, **kwargs)
    assert stats.failed_decode_forwards == failures  # no forward recovered
    # the three views prefill together too (the narrower chat-view chunks padded to the
    # base view's width): 2 forwards per prefill chunk and per decode step
    chunks = stats.prefill_chunks - chunks
    assert adapters.forward_calls - before == 2 * (chunks + 9)
    want = merged.generate(PROMPTS, weights=weights, base_prompt=base_prompts, **kwargs)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for g, w in zip(got, want, strict=True):
        assert [e.logprob for e in g.logprobs] == pytest.approx(
            [e.logprob for e in w.logprobs], abs=ATOL
        )


# --- PEFT methods that cannot mix adapters in one forward --------------------------------------


def _norm_lora(reference: torch.nn.Module, seed: int) -> peft.PeftModel:
    """A LoRA adapter that also trains the norms (`modules_to_save`): PEFT cannot name such an
    adapter per row (it mixes only Linear, Embedding and Conv layers)."""
    import copy

    from peft.utils import ModulesToSaveWrapper

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["norm"],
        init_lora_weights=False,
    )
    adapted = peft.get_peft_model(copy.deepcopy(reference), config)
    wrapped = [m for m in adapted.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert wrapped
    for module in wrapped:  # the adapter's own norm gains
        torch.nn.init.uniform_(module.modules_to_save["default"].weight, 0.5, 1.5)
    return adapted


def _ia3(reference: torch.nn.Module, seed: int) -> peft.PeftModel:
    """An IA3 adapter: PEFT drops `adapter_names` for it without a word (not a LoRA tuner)."""
    import copy

    torch.manual_seed(seed)
    config = peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    )
    adapted = peft.get_peft_model(copy.deepcopy(reference), config)
    for name, param in adapted.named_parameters():
        if "ia3_l" in name:  # identity at init; scale the activations for real
            torch.nn.init.uniform_(param, 0.5, 1.5)
    return adapted


UNMIXED = {"norm": (_norm_lora, "TypeError: Mixed batching"), "ia3": (_ia3, "no adapter names")}
"""Adapters PEFT cannot mix per row, and what the stats say about them."""


@pytest.fixture(scope="module", params=sorted(UNMIXED))
def unmixed_paths(request, family, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    """(kind, paths): two adapters PEFT cannot mix on the reference, saved with their merged
    models."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"{kind}-adapters")
    reference = llama_from(family["ref"])
    paths = dict(family)
    for name, seed in (("helpful", 41), ("harmless", 42)):
        adapted = UNMIXED[kind][0](reference, seed)
        adapted.save_pretrained(root / f"{name}-lora")
        merged = merged_copy(adapted, "default")
        merged.save_pretrained(root / f"{name}-merged")
        build_tokenizer().save_pretrained(root / f"{name}-merged")
        paths[f"{name}-lora"], paths[f"{name}-merged"] = (
            root / f"{name}-lora",
            root / f"{name}-merged",
        )
    return kind, paths


@pytest.fixture(scope="module")
def unmixed(unmixed_paths) -> tuple[EFTDecoder, EFTDecoder]:
    """(adapters, merged) for two adapters PEFT cannot mix in one forward."""
    return _decoders(unmixed_paths[1], ["helpful", "harmless"])


def test_adapters_that_cannot_share_a_forward_run_one_forward_each(unmixed, unmixed_paths, two):
    """The fallback: each view switches the backbone to its adapter for its own forward; the
    stats say so, and the outputs still equal the merged models (batched, per-row weights,
    speculative)."""
    adapters, merged = unmixed
    (how,) = adapters.engine.stats.adapter_batching.values()
    assert how.startswith("one forward per adapter: ") and UNMIXED[unmixed_paths[0]][1] in how
    assert list(two[0].engine.stats.adapter_batching.values()) == ["mixed"]
    assert merged.engine.stats.adapter_batching == {}
    assert not adapters._ensemble.view_groups
    _assert_batch_equals_merged(adapters, merged)
    _assert_batch_equals_merged(adapters, merged, speculative_k=3)
    # one forward per view and step, as the merged models take
    before = adapters.forward_calls
    adapters.generate(PROMPTS[0], max_new_tokens=10, temperature=0)
    assert adapters.forward_calls - before == 4 * 10
    assert adapters.engine.stats.failed_decode_forwards == 0


def _assert_composes_in_float32(decoder: EFTDecoder, weights: dict[str, float]) -> None:
    """The decoder's next-token log-probs are float32 and the EFT formula over each model's
    own logits, upcast (low-precision forwards through the paged cache round a little
    differently from a plain forward, hence the tolerance, on the likeliest tokens)."""
    got = decoder.next_token_logprobs([PROMPTS[0]], weights=weights)[0]
    assert got.dtype == torch.float32
    ensemble = decoder._ensemble
    with torch.inference_mode():
        logits = []
        for model, device in zip(decoder._models, ensemble.devices, strict=True):
            ids = torch.tensor([decoder.encode(PROMPTS[0])], device=device)
            logits.append(model(input_ids=ids).logits[0, -1].to(ensemble.device))

    def logprobs(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x.float(), -1)

    composed = logprobs(logits[ensemble.base])
    for pair, weight in zip(ensemble.pairs, weights.values(), strict=True):
        composed = composed + weight * (
            logprobs(logits[pair.finetuned]) - logprobs(logits[pair.reference])
        )
    want = torch.log_softmax(composed, -1)
    top = want.topk(20).indices
    torch.testing.assert_close(got[top], want[top], atol=0.05, rtol=0)


def test_composition_runs_in_float32_over_bfloat16_models(family):
    decoder = EFTDecoder.from_pretrained(
        base=family["base"],
        behaviors={
            "helpful": Behavior(Adapter(family["helpful-lora"], name="helpful"), family["ref"])
        },
        dtype=torch.bfloat16,
    )
    dtypes = {
        ("lora_" in name, p.dtype) for m in decoder._models for name, p in m.named_parameters()
    }
    # PEFT keeps adapter weights in float32 (its autocast_adapter_dtype) over a bfloat16 model
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    _assert_composes_in_float32(decoder, {"helpful": 2.0})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adapters_on_a_bitsandbytes_4bit_reference_under_an_8bit_base(family):
    """QLoRA-style: both adapters on a 4-bit reference, the base in 8-bit (bitsandbytes,
    CUDA only); one mixed forward per step, composition in float32."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from eft_integrations import ModelSpec

    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)
    reference = ModelSpec(family["ref"], device_map="cuda:0", quantization_config=four_bit)
    decoder = EFTDecoder.from_pretrained(
        base=ModelSpec(
            family["base"],
            device_map="cuda:0",
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        ),
        behaviors={
            n: Behavior(Adapter(family[f"{n}-lora"], name=n), reference)
            for n in ("helpful", "harmless")
        },
        dtype=torch.float16,
    )
    assert list(decoder.engine.stats.adapter_batching.values()) == ["mixed"]
    _assert_composes_in_float32(decoder, {"helpful": 1.0, "harmless": 0.5})
    out = decoder.generate(PROMPTS, weights={"helpful": 1.0, "harmless": 0.5}, max_new_tokens=8)
    assert all(len(o.token_ids) == 8 for o in out)
    assert decoder.engine.stats.failed_decode_forwards == 0


def _shared_backbone_decoders(paths: dict[str, Path]) -> list[EFTDecoder]:
    """Two decoders over ONE loaded PeftModel (one behavior each): their engine threads run
    forwards of the same backbone at the same time."""
    backbone = peft.PeftModel.from_pretrained(
        llama_from(paths["ref"]), paths["helpful-lora"], adapter_name="helpful"
    )
    backbone.load_adapter(paths["harmless-lora"], adapter_name="harmless")
    base, tokenizer = llama_from(paths["base"]), build_tokenizer()
    return [
        EFTDecoder(
            base=base,
            behaviors={name: Behavior(Adapter(backbone, name=name), backbone)},
            tokenizer=tokenizer,
        )
        for name in ("helpful", "harmless")
    ]


def _concurrent_calls_equal_their_solo_outputs(decoders: list[EFTDecoder]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    kwargs = {"temperature": 0, "max_new_tokens": 10}
    solo = [[d.generate(p, **kwargs).token_ids for p in PROMPTS] for d in decoders]
    assert solo[0] != solo[1]  # the two adapters answer differently
    with ThreadPoolExecutor(8) as pool:
        futures = [
            (k, i, pool.submit(decoders[k].generate, PROMPTS[i], **kwargs))
            for _ in range(4)
            for k in range(2)
            for i in range(len(PROMPTS))
        ]
        for k, i, future in futures:
            assert future.result(timeout=60).token_ids == solo[k][i], (k, i)


def test_decoders_sharing_a_backbone_never_read_each_others_adapters(family):
    """PEFT passes per-row adapter names through hooks on the shared layers: forwards from
    two engine threads take the backbone's lock, or they would read each other's names."""
    _concurrent_calls_equal_their_solo_outputs(_shared_backbone_decoders(family))


def test_decoders_sharing_a_switched_backbone_never_read_each_others_adapters(unmixed_paths):
    _concurrent_calls_equal_their_solo_outputs(_shared_backbone_decoders(unmixed_paths[1]))


def test_prompt_learning_adapters_are_a_clear_error(family):
    prompt_tuned = peft.get_peft_model(
        llama_from(family["ref"]),
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    )
    with pytest.raises(ValueError, match=r"prompt learning .*virtual tokens.*LoRA"):
        EFTDecoder(
            base=llama_from(family["base"]),
            behaviors={"chat": Behavior(Adapter(prompt_tuned, name="default"), prompt_tuned)},
            tokenizer=build_tokenizer(),
        )
