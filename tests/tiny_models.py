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


WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Contractions and spaced marks, which BERT's pre-tokenizer splits into pieces ("isn", "'",
# "t") that the WordPiece decoder joins with spaces for transformers' clean-up to remove.
CONTRACTIONS = [
    "Isn't it? I'm sure it's fine, we've seen they're here! Don't stop. 'quoted' text.",
    "She said: 'no' , and he didn't ... Why ? Because ! Well , ok .",
]
WORDPIECE_CORPUS = CORPUS + CONTRACTIONS * 20


def build_wordpiece_tokenizer(
    vocab_size: int = 200, pieces: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer: WordPiece over `pieces` (by default the corpus' characters,
    their continuations and its most frequent words, at most `vocab_size` tokens in all, built
    deterministically, unlike WordPieceTrainer's ties), BERT's pre-tokenizer, and a WordPiece
    decoder that cleans up per token, loaded with `clean_up_tokenization_spaces=True` as
    BERT's is. "[SEP]" ends a turn."""
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if pieces is None:
        pieces = _wordpiece_vocabulary(pre_tokenizer, vocab_size - len(WORDPIECE_SPECIALS))
    vocab = {piece: i for i, piece in enumerate([*WORDPIECE_SPECIALS, *pieces])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="[SEP]",
        clean_up_tokenization_spaces=True,
    )


def _wordpiece_vocabulary(pre_tokenizer, size: int) -> list[str]:
    """Every character of the corpus, as a word start and as a continuation ("##c"), then its
    most frequent words (ties in alphabetical order) up to `size` pieces."""
    counts: dict[str, int] = {}
    for text in WORDPIECE_CORPUS:
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for word in counts for c in word})
    pieces = [*chars, *(f"##{c}" for c in chars)]
    words = sorted((w for w in counts if w not in pieces), key=lambda w: (-counts[w], w))
    return pieces + words[: max(0, size - len(pieces))]
