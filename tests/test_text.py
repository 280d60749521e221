"""CompletionText: incremental detokenization, exact against full decoding, bounded per token.

Tokenizers built offline: the byte-level BPE of tests/tiny_models.py (GPT-2 / Llama-3 / Qwen
style, with an added token), a SentencePiece-style Unigram with byte fallback and a Metaspace
decoder that drops the first leading space (Llama-2 / Gemma style), and a byte-level BPE whose
decode cleans up tokenization spaces (WordPiece, Metaspace and more random sequences are in
tests/test_text_tokenizers.py). Token sequences
are random ids (invalid UTF-8, lone bytes, special tokens) and encoded texts with accents, CJK
and emoji split over several byte tokens.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eft_integrations.text import CompletionText

from .tiny_models import build_tokenizer

TEXTS = [
    "Héllo wörld, café crème — naïve façade. 日本語のテキスト。",
    "Emoji 😀😀 and 👍🏽 then 🇫🇷, math ∑ x² ≤ 10; the end is near; the end.",
    "Stop here. Stop there. The capital of Veloria is Markan 🏰.",
    "Numbers: 1 2 3 4 5 6 7 8 9 10, and more numbers… ½ ¾ €5",
    "Spaces before marks : isn 't it ? I 'm ok , fine . We 've ' quoted ' it !",
]


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer: Unigram pieces, byte fallback, Metaspace ('▁') decoding."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁"]
    pieces += [*string.ascii_letters, *string.digits, *".,;:!?'-()", "é", "ö", "ü", "ç"]
    pieces += ["▁the", "▁The", "▁end", "▁Stop", "▁is", "▁and", "he", "er", "re", "ll"]
    scores = [(p, -1.0 if len(p) > 1 and not p.startswith("<") else -5.0) for p in pieces]
    tok = Tokenizer(models.Unigram(scores, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def clean_up_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose decode cleans up tokenization spaces (" ." -> "."), a change that
    can reach back before any window: the clean-up runs as a stream over the windows' text."""
    tokenizer = build_tokenizer()
    tokenizer.clean_up_tokenization_spaces = True
    # transformers ignores the setting for BPE unless told this
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    return tokenizer


TOKENIZERS = {
    "byte_level": build_tokenizer(extra_token="<|odd|>", vocab_size=300),
    "sentencepiece": sentencepiece_tokenizer(),
    "clean_up": clean_up_tokenizer(),
}


class FullDecodeText:
    """The reference: re-decode the whole completion after every token (O(length) each)."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.final: str | None = None
        self.emitted = 0

    @property
    def text(self) -> str:
        if self.final is not None:
            return self.final
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def append(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.text
        hits = [i for s in self.stop if (i := text.find(s)) >= 0]
        if hits and self.final is None:
            self.final = text[: min(hits)]

    def delta(self, final: bool = False) -> str:
        text = self.text
        end = len(text)
        if not final and self.final is None:
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
            longest = max((len(s) for s in self.stop), default=0)
            for n in range(min(longest - 1, end - self.emitted), 0, -1):
                if any(s.startswith(text[end - n : end]) for s in self.stop):
                    end -= n
                    break
        piece = text[self.emitted : max(end, self.emitted)]
        self.emitted += len(piece)
        return piece


def sequences(tokenizer, seed: int) -> list[list[int]]:
    """Random ids over the whole vocabulary, and encoded texts with some special tokens."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    out = [[rng.randrange(vocab) for _ in range(rng.randint(1, 60))] for _ in range(12)]
    specials = tokenizer.all_special_ids
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(2):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        out.append(ids)
    return out


def stops_for(tokenizer, ids: list[int], seed: int) -> list[str]:
    """Stop strings taken from the decoded text, so they span token boundaries, and one absent."""
    rng = random.Random(seed)
    text = tokenizer.decode(ids, skip_special_tokens=True).replace("\ufffd", "")
    stops = ["never-in-the-text"]
    for _ in range(2):
        if len(text) > 4:
            start = rng.randrange(len(text) - 3)
            stops.append(text[start : start + rng.randint(2, 6)])
    return stops


def same_pieces_as_reference(name: str) -> bool:
    # a byte-fallback run's text can still turn into U+FFFD when a later byte makes the run
    # invalid: CompletionText holds such a run back, re-decoding everything does not
    return name == "byte_level"


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_text_and_stream_equal_full_decoding_at_every_step(name):
    tokenizer = TOKENIZERS[name]
    for seed, ids in enumerate(sequences(tokenizer, seed=1)):
        got, reference = CompletionText(tokenizer, ()), FullDecodeText(tokenizer, ())
        streamed = []
        for k, token in enumerate(ids, start=1):
            got.append(token)
            reference.append(token)
            assert got.text == tokenizer.decode(ids[:k], skip_special_tokens=True), (seed, k)
            piece = got.delta()
            if same_pieces_as_reference(name):
                assert piece == reference.delta(), (seed, k)
            streamed.append(piece)
            # what was emitted never changes afterwards
            assert got.text.startswith("".join(streamed)), (seed, k)
        streamed.append(got.delta(final=True))
        assert got.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(streamed) == got.text


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_lazy_text_equals_full_decoding(name):
    # without stop strings nothing is decoded until asked: then the whole backlog at once
    tokenizer = TOKENIZERS[name]
    for ids in sequences(tokenizer, seed=2):
        got = CompletionText(tokenizer, ())
        for token in ids[: len(ids) // 2]:
            got.append(token)
        assert got.text == tokenizer.decode(ids[: len(ids) // 2], skip_special_tokens=True)
        for token in ids[len(ids) // 2 :]:
            got.append(token)
        assert got.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert got.delta(final=True) == got.text


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_stop_strings_across_tokens_trim_and_hold_back_like_full_decoding(name):
    tokenizer = TOKENIZERS[name]
    for seed, ids in enumerate(sequences(tokenizer, seed=3)):
        stop = stops_for(tokenizer, ids, seed)
        got, reference = CompletionText(tokenizer, stop), FullDecodeText(tokenizer, stop)
        streamed = []
        for k, token in enumerate(ids, start=1):
            got.append(token)
            reference.append(token)
            assert got.stopped == (reference.final is not None), (seed, k, stop)
            piece = got.delta()
            if same_pieces_as_reference(name):
                assert piece == reference.delta(), (seed, k, stop)
            streamed.append(piece)
            assert got.text.startswith("".join(streamed)), (seed, k, stop)
            if got.stopped:
                break
        streamed.append(got.delta(final=True))
        assert got.text == reference.text, (seed, stop)
        assert "".join(streamed) == got.text
        if got.stopped:
            assert not any(s in got.text for s in stop)


def test_emoji_runs_of_byte_fallback_tokens_decode_exactly_when_cut_anywhere():
    # consecutive emoji are runs of <0xNN> tokens that the decoder turns into text as one unit
    tokenizer = TOKENIZERS["sentencepiece"]
    ids = tokenizer.encode("a😀😀b 👍🏽👍🏽", add_special_tokens=False)
    assert sum(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids) >= 16
    for cut in range(1, len(ids) + 1):
        got = CompletionText(tokenizer, ["zz"])
        for token in ids[:cut]:
            got.append(token)
        assert got.text == tokenizer.decode(ids[:cut], skip_special_tokens=True), cut


def test_end_token_is_in_the_tokens_not_the_text():
    tokenizer = TOKENIZERS["byte_level"]
    ids = tokenizer.encode("Stop here.", add_special_tokens=False)
    got = CompletionText(tokenizer, ["never"])
    for token in ids:
        got.append(token)
    got.append_end_token(tokenizer.eos_token_id)
    assert got.token_ids == [*ids, tokenizer.eos_token_id]
    assert got.text == "Stop here."


class CountingTokenizer:
    """Counts the tokens passed to `decode`; everything else goes to the tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded_tokens = 0

    def decode(self, ids, **kwargs):
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def streamed_decoding_work(tokenizer, ids: list[int], stop) -> tuple[str, list[int]]:
    """Stream `ids` through a `CompletionText` (append + delta per token): the final text and
    the tokens `tokenizer.decode` was passed at each token."""
    counting = CountingTokenizer(tokenizer)
    got = CompletionText(counting, stop)
    per_token = []
    for token in ids:
        before = counting.decoded_tokens
        got.append(token)
        got.delta()
        per_token.append(counting.decoded_tokens - before)
    got.delta(final=True)
    return got.text, per_token


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("stop", [(), ("never-in-the-text", "\n\n")])
def test_decoding_work_per_token_does_not_grow_with_the_length(name, stop):
    # a long streamed completion: each token (append + delta) decodes a bounded window,
    # however long the text already is (full re-decoding would pass ~k tokens at token k)
    ids = TOKENIZERS[name].encode(" ".join(TEXTS * 12), add_special_tokens=False)
    assert len(ids) > 1000
    text, per_token = streamed_decoding_work(TOKENIZERS[name], ids, stop)
    assert text == TOKENIZERS[name].decode(ids, skip_special_tokens=True)
    # the same texts repeat: the work per token later on is no more than in the first quarter
    # (the window spans at most a run of byte-fallback tokens, 27 for "日本語のテキスト。")
    quarter = len(ids) // 4
    assert max(per_token[quarter:]) <= max(per_token[:quarter]) <= 64, per_token
    assert sum(per_token) <= 8 * len(ids)
