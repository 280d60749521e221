"""Tiny random models and a byte-level BPE tokenizer, saved and loaded back like real ones.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on a few sentences, and the
models are random transformers architectures saved with `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "The capital of Veloria is Markan. The river runs north.",
    "Héllo wörld, café crème — naïve façade. 日本語のテキスト。",
    "Stop here. Stop there. The end is near; the end.",
    "Numbers: 1 2 3 4 5 6 7 8 9 10, and more numbers.",
] * 20


def build_tokenizer(
    vocab_size: int = 320, extra_token: str | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with chat markers and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if extra_token is not None:
        tok.add_tokens([extra_token])
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def llama(vocab: int, seed: int, hidden: int = 32, layers: int = 2, window: int = 128):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=window,
        bos_token_id=0,
        eos_token_id=5,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    _sharpen(model)
    return model


def gpt2(vocab: int, seed: int, window: int = 96):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=window,
        bos_token_id=0,
        eos_token_id=5,
    )
    model = GPT2LMHeadModel(config)
    _sharpen(model)
    return model


def _sharpen(model: torch.nn.Module) -> None:
    # random init gives near-uniform logits; scale the head so distributions have a shape
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(8.0)


def save_family(root: Path) -> dict[str, Path]:
    """base (Llama, padded embeddings), two fine-tuned Llamas, a shared GPT-2 reference."""
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    made = {
        "base": llama(vocab + 3, seed=1, hidden=48, layers=3),  # rows padded past the vocab
        "chat": llama(vocab, seed=2),
        "safe": llama(vocab, seed=3),
        "ref": gpt2(vocab, seed=4),
    }
    paths = {}
    for name, model in made.items():
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    other = root / "other"
    llama(vocab + 1, seed=5).save_pretrained(other)
    build_tokenizer(extra_token="<|odd|>", vocab_size=300).save_pretrained(other)
    paths["other"] = other
    return paths
