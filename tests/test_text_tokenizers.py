"""The completion text equals the tokenizer's own decode for every kind of decoder.

Property tests over tokenizers built offline with `tokenizers`: WordPiece with BERT's
pre-tokenizer, a WordPiece decoder that cleans up per token and transformers' clean-up of
tokenization spaces on the whole string (`clean_up_tokenization_spaces=True`, as BERT's);
byte-level BPE, plain and forced to clean up; Metaspace; and a SentencePiece-style Unigram
with byte fallback. For many seeded random token sequences, rich in the marks a clean-up
joins (" ' " -> "'", " ." -> "."), CompletionText must give, after every token:

    text == tokenizer.decode(ids, skip_special_tokens=True)
    "".join(deltas) == text                      (what was emitted never changes)
    with stop strings: text == decode(ids[:k]) cut before its first stop string, where k is
    the first token whose decode contains one

and decode a bounded number of tokens per token. One test runs EFTDecoder.generate and
.stream end to end with a tiny model over the WordPiece tokenizer.
"""

from __future__ import annotations

import random
import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from eft_integrations import EFTDecoder
from eft_integrations.text import CompletionText

from .test_text import TEXTS, clean_up_tokenizer, sentencepiece_tokenizer, streamed_decoding_work
from .tiny_models import WORDPIECE_CORPUS, build_tokenizer, build_wordpiece_tokenizer, llama

# What transformers' clean-up and the decoders join or split: drawn often in random sequences.
MARKS = {"", ".", ",", "?", "!", "'", "n", "t", "s", "m", "ve", "re", "n't", "'s", "'m"}
# Contractions and spaced marks, for the decoding-cost test.
SPACED = "Isn 't it ? I 'm sure it ' s fine , we ' ve seen they ' re here ! Don 't stop ."


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """BPE over Metaspace pieces ('▁' marks a space), decoded by the Metaspace decoder, which
    drops the leading space of a decode's first token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(WORDPIECE_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


TOKENIZERS = {
    "wordpiece": build_wordpiece_tokenizer(),
    "byte_level": build_tokenizer(extra_token="<|odd|>", vocab_size=300),
    "byte_level_clean_up": clean_up_tokenizer(),
    "metaspace": metaspace_tokenizer(),
    "sentencepiece": sentencepiece_tokenizer(),
}


def decode(tokenizer, ids: list[int]) -> str:
    """The text the repository promises: the tokenizer's decode without special tokens."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def random_sequences(tokenizer, seed: int, count: int = 40) -> list[list[int]]:
    """Seeded random ids: half drawn from the marks, half from the whole vocabulary (special
    tokens, byte tokens and continuation pieces included)."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    marks = [i for i in range(vocab) if decode(tokenizer, [i]).strip() in MARKS]
    return [
        [
            rng.choice(marks) if rng.random() < 0.5 else rng.randrange(vocab)
            for _ in range(rng.randint(1, 50))
        ]
        for _ in range(count)
    ]


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[CompletionText, str]:
    """Append `ids` as a stream does (a delta after each token) until a stop string; returns
    the text object and the joined deltas, the final one included."""
    got = CompletionText(tokenizer, stop)
    pieces = []
    for token in ids:
        got.append(token)
        pieces.append(got.delta())
        if got.stopped:
            break
    pieces.append(got.delta(final=True))
    return got, "".join(pieces)


def first_stop(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[int, str]:
    """The reference: k, the first token count whose decode contains a stop string, and that
    decode cut before its first stop string (all of `ids` and their decode if none)."""
    for k in range(1, len(ids) + 1):
        text = decode(tokenizer, ids[:k])
        hits = [i for s in stop if (i := text.find(s)) >= 0]
        if hits:
            return k, text[: min(hits)]
    return len(ids), decode(tokenizer, ids)


def stops_from(text: str, rng: random.Random) -> tuple[str, ...]:
    """Two stop strings cut from the decoded text (so they span tokens and clean-ups), one
    that never occurs."""
    text = text.replace("\ufffd", "")
    stops = ["never-in-the-text"]
    for _ in range(2):
        if len(text) > 3:
            start = rng.randrange(len(text) - 2)
            stops.append(text[start : start + rng.randint(2, 5)])
    return tuple(stops)


def test_the_wordpiece_tokenizer_cleans_up_across_tokens():
    # the premise: transformers' clean-up joins tokens that the Rust decoder keeps apart
    tokenizer = TOKENIZERS["wordpiece"]
    ids = tokenizer.encode("Isn't it? 'quoted'", add_special_tokens=False)
    assert decode(tokenizer, ids) == "Isn't it?'quoted '"
    raw = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert raw == "Isn ' t it? ' quoted '"


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_text_after_every_token_and_the_joined_deltas_equal_decode(name):
    tokenizer = TOKENIZERS[name]
    for seed, ids in enumerate(random_sequences(tokenizer, seed=11)):
        got = CompletionText(tokenizer, ())
        streamed = ""
        for k, token in enumerate(ids, start=1):
            got.append(token)
            assert got.text == decode(tokenizer, ids[:k]), (seed, k, ids[:k])
            streamed += got.delta()
            # what was emitted never changes afterwards
            assert got.text.startswith(streamed), (seed, k, ids[:k])
        streamed += got.delta(final=True)
        assert streamed == got.text == decode(tokenizer, ids), (seed, ids)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_text_read_once_at_the_end_equals_decode(name):
    # no stop strings and no stream: the whole completion is decoded when the text is read
    tokenizer = TOKENIZERS[name]
    for ids in random_sequences(tokenizer, seed=12):
        got = CompletionText(tokenizer, ())
        for token in ids:
            got.append(token)
        assert got.text == decode(tokenizer, ids), ids
        assert got.delta(final=True) == got.text


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_stop_strings_cut_the_decoded_text_before_the_first_stop(name):
    tokenizer = TOKENIZERS[name]
    rng = random.Random(13)
    stopped = 0
    for seed, ids in enumerate(random_sequences(tokenizer, seed=13, count=60)):
        stop = stops_from(decode(tokenizer, ids), rng)
        k, expected = first_stop(tokenizer, ids, stop)
        got, streamed = stream(tokenizer, ids, stop)
        assert got.stopped == any(s in decode(tokenizer, ids[:k]) for s in stop), (seed, stop)
        assert len(got.token_ids) == k, (seed, stop, ids)
        assert got.text == expected, (seed, stop, ids)
        assert streamed == got.text, (seed, stop, ids)
        stopped += got.stopped
    assert stopped >= 30  # most sequences do meet one of their stop strings


@pytest.mark.parametrize("name", ["wordpiece", "byte_level_clean_up"])
def test_a_stop_string_is_found_in_the_cleaned_up_text(name):
    # "t'" exists only once the clean-up joined "it", "'" and "s": a search in the raw text,
    # or in windows of it, never sees it
    tokenizer = TOKENIZERS[name]
    ids = tokenizer.encode("it ' s here . ' s it", add_special_tokens=False)
    assert decode(tokenizer, ids) == "it's here.'s it"
    got, streamed = stream(tokenizer, ids, ("t's", ".'"))
    assert got.stopped
    assert got.text == streamed == "i"


def test_clean_up_as_a_stream_equals_transformers_clean_up_of_the_whole_text():
    # random texts over the clean-up's alphabet, fed in random pieces: after every piece the
    # final output plus what the held tails give equals the clean-up of everything so far
    from eft_integrations.text import _CleanUp

    tokenizer = TOKENIZERS["wordpiece"]
    rng = random.Random(14)
    alphabet = [" ", " ", " ", "'", ".", ",", "?", "!", "n", "t", "s", "m", "ve", "re", "x"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        clean_up, cleaned, fed = _CleanUp(), "", 0
        while fed < len(text):
            piece = text[fed : fed + rng.randint(1, 4)]
            fed += len(piece)
            cleaned += clean_up.feed(piece)
            assert cleaned + clean_up.peek("") == tokenizer.clean_up_tokenization(text[:fed])
        assert cleaned + clean_up.peek("") == tokenizer.clean_up_tokenization(text)


class OwnCleanUp(PreTrainedTokenizerFast):
    """A tokenizer whose clean-up is its own (as remote code may have): not streamable."""

    def clean_up_tokenization(self, text: str) -> str:
        return super().clean_up_tokenization(text).replace(" :", ":")


def test_an_unknown_clean_up_still_gives_the_decoded_text():
    tokenizer = OwnCleanUp(
        tokenizer_object=TOKENIZERS["wordpiece"].backend_tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        clean_up_tokenization_spaces=True,
    )
    ids = tokenizer.encode("She said : 'no' , and he didn't", add_special_tokens=False)
    assert decode(tokenizer, ids) == "She said:'no ', and he didn't"
    for cut in range(1, len(ids) + 1):
        got, streamed = stream(tokenizer, ids[:cut])
        assert got.text == streamed == decode(tokenizer, ids[:cut]), cut


def long_completion(tokenizer) -> list[int]:
    """Four times one block: a text with many clean-ups, and random marks-rich ids (so the
    work per token can be compared between the first and the last quarter)."""
    block = tokenizer.encode(" ".join([SPACED, *TEXTS]), add_special_tokens=False)
    for sequence in random_sequences(tokenizer, seed=15, count=12):
        block += sequence
    return block * 4


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("stop", [(), ("never-in-the-text", "qqqq")])
def test_decoding_work_per_token_is_bounded_for_every_tokenizer(name, stop):
    # each token (append + delta) decodes a bounded window, clean-up tokenizers included:
    # re-decoding the whole completion would pass ~k tokens at token k
    ids = long_completion(TOKENIZERS[name])
    assert len(ids) > 1000
    text, per_token = streamed_decoding_work(TOKENIZERS[name], ids, stop)
    assert text == decode(TOKENIZERS[name], ids)
    quarter = len(ids) // 4
    # no growth with the length; the window spans at most a run of byte-fallback tokens
    assert max(per_token[3 * quarter :]) <= max(per_token[:quarter]) <= 64, per_token
    assert sum(per_token) <= 8 * len(ids)


# ---------------------------------------------------------------------------- end to end

# A small WordPiece vocabulary, mostly marks and contraction pieces, so that random models
# write text that transformers' clean-up changes.
E2E_PIECES = [*"'.,?!", "n", "t", "s", "m", "ve", "re", "it", "isn", "we", "I", "a", "b"]
E2E_PIECES += ["do", "##s", "##t", "##n", ":", *string.digits[:3]]


@pytest.fixture(scope="module")
def wordpiece_decoder() -> EFTDecoder:
    """A tiny EFT over the WordPiece tokenizer: base + chat(ft - ref), near-uniform heads (so
    sampled text is rich in marks); "[SEP]" ends the turn."""
    tokenizer = build_wordpiece_tokenizer(pieces=E2E_PIECES)
    vocab = len(tokenizer)
    base, ft, ref = (llama(vocab, seed=s) for s in (31, 32, 33))
    with torch.no_grad():
        for model in (base, ft, ref):
            model.get_output_embeddings().weight.mul_(0.05)
    return EFTDecoder(
        base=base,
        behaviors={"chat": (ft, ref)},
        tokenizer=tokenizer,
        eos_token_ids=[tokenizer.sep_token_id],
    )


def test_generate_and_stream_give_the_decoded_text_with_a_wordpiece_tokenizer(
    wordpiece_decoder,
):
    decoder, tokenizer = wordpiece_decoder, wordpiece_decoder.tokenizer
    options = {"max_new_tokens": 48, "temperature": 1.0}
    cleaned_somewhere = False
    for seed in range(8):
        out = decoder.generate("it ' s", seed=seed, **options)
        completion = [t for t in out.token_ids if t not in decoder.eos_token_ids]
        assert out.text == decode(tokenizer, completion), seed
        raw = tokenizer.decode(
            completion, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        cleaned_somewhere |= raw != out.text
        chunks = list(decoder.stream("it ' s", seed=seed, **options))
        assert "".join(c.text for c in chunks) == out.text, seed
        assert [t for c in chunks for t in c.token_ids] == out.token_ids, seed

        # a stop string cut from the text: the same tokens up to the first one whose decode
        # contains it, and the decode of those cut before it
        stop = stops_from(out.text, random.Random(seed))
        k, expected = first_stop(tokenizer, completion, stop)
        stopped = decoder.generate("it ' s", seed=seed, stop=list(stop), **options)
        assert stopped.token_ids[:k] == out.token_ids[:k], (seed, stop)
        assert stopped.text == expected, (seed, stop)
        chunks = list(decoder.stream("it ' s", seed=seed, stop=list(stop), **options))
        assert "".join(c.text for c in chunks) == expected, (seed, stop)
    assert cleaned_somewhere  # the clean-up did join tokens in these completions
