"""The family's one tokenizer: byte-level BPE fitted on the toy-world corpora.

It is wrapped as a transformers fast tokenizer with the chat template, `<|end|>` as the
end-of-turn (eos) token and `<|pad|>` for padding, and saved into every model directory.
The tokenizer adds no special tokens itself: the chat template writes `<|bos|>`, and raw
pre-training-form prompts carry it in their text.

Decoding drops one leading space, as Llama's tokenizers do. Byte-level BPE writes a word's
leading space into the word's token: the template's `<|assistant|> {content}` encodes as
`<|assistant|>`, `ĠSure`..., so a model answering after the generation prompt `<|assistant|>`
emits the template's separator inside its first token. Without the strip every chat reply
would start with that space, and a reply fed back as history would render with two spaces
(one more token than the model wrote). The cost, as with Llama: a raw continuation decoded on
its own loses its first space ("...is" -> "Bozi.", not " Bozi.").
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .corpora import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    END,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
    tokenizer_training_text,
)
from .world import World

DECODER = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
"""Byte-level decoding, then one leading space stripped (the template's separator)."""


def build_tokenizer(world: World, vocab_size: int = 2048, seed: int = 0) -> PreTrainedTokenizerFast:
    """Fit a byte-level BPE of `vocab_size` on the world's text and wrap it for transformers."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = DECODER
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..6, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_training_text(world, seed=seed), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=END,  # end of turn: what a chat answer ends with
        pad_token=PAD,
        additional_special_tokens=[EOS, SYSTEM, USER, ASSISTANT],
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def stop_token_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    """Tokens that end a generation: end of turn first, then end of document."""
    return [tok.convert_tokens_to_ids(END), tok.convert_tokens_to_ids(EOS)]
