"""Incremental detokenization: stop strings across token boundaries and safe stream deltas.

The text of a completion is `tokenizer.decode(ids, skip_special_tokens=True)`. Decoding the
whole completion again after every token costs O(length) per token. Instead, as in TGI's and
vLLM's incremental detokenizers, only a short window of trailing tokens is decoded:

    ids:   [ .......... committed .......... | window: prefix | new tokens ]
                                              ^ prefix_offset  ^ read_offset

    raw(ids[:n]) = raw(ids[:read_offset]) + (raw(ids[prefix_offset:n])
                                              minus its first len(raw(prefix)) characters)

where `raw` is the tokenizer's own (Rust or Python) decoder. The prefix tokens give the new
tokens their left context (SentencePiece and Metaspace drop the leading space of a decode's
first token, WordPiece joins a decode's first token without a space, so the window never
starts at the new tokens themselves); a decoder that cleans up per token (WordPiece's
`cleanup`) stays local. The window moves forward (is committed) only once its text is
complete: it extends the prefix's text, is not empty, and does not end in U+FFFD (an
incomplete UTF-8 character) nor in a byte-fallback token (`<0xNN>`, whose run of bytes a
SentencePiece decoder decodes as one unit). Where a decoder is not local (the window's text
does not extend its prefix's), the text is rebuilt from a full decode.

transformers then "cleans up tokenization spaces" on the whole decoded string when the
tokenizer asks for it (`clean_up_tokenization_spaces=True`, mostly WordPiece): a chain of
`str.replace` calls (" ." -> ".", " ' " -> "'", ...) that can join text across any window.
That chain is applied here as a stream (`_CleanUp`): each replacement scans the committed raw
text once, left to right as `str.replace` does, and holds back only a tail that could still
start a match. So the text always equals `tokenizer.decode(ids, skip_special_tokens=True)`,
at a cost per token independent of the length so far: one window decode, and a few
characters through the clean-up. The window only grows across runs of tokens that decode to
nothing, to an incomplete character or to byte-fallback bytes. A tokenizer whose clean-up is
not that chain (remote code) is decoded in full after every token, exactly but in O(length).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Sequence
from typing import Literal

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

__all__ = ["CompletionText"]

# What a byte-level tokenizer decodes an incomplete UTF-8 sequence to.
_REPLACEMENT = "\ufffd"
# SentencePiece byte-fallback tokens (Llama, Mistral, Gemma): one byte each.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# transformers' `clean_up_tokenization`: these replacements, in this order, each over the
# whole string (tokenization_utils_base.PreTrainedTokenizerBase.clean_up_tokenization).
_CLEAN_UP_RULES: tuple[tuple[str, str], ...] = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
# Texts whose decode shows whether, and how, a tokenizer cleans up: spaced punctuation and
# contractions in the forms BPE, SentencePiece and WordPiece (which splits "n't") decode to.
_PROBES = (
    "a . b , c ? d ! e",
    "isn ' t , I ' m , it ' s , we ' ve , they ' re , do n't",
    "x ' ' ' y  ' s",
)

# How a tokenizer's `decode` is followed incrementally (see the module docstring):
# "plain": windows of the decode; "clean_up": windows of the decode without transformers'
# clean-up, then `_CleanUp`; "opaque": a clean-up that is not `_CLEAN_UP_RULES`, full decodes.
_DecodeKind = Literal["plain", "clean_up", "opaque"]
_kinds: weakref.WeakKeyDictionary[object, _DecodeKind] = weakref.WeakKeyDictionary()
_TRANSFORMERS_CLEAN_UP = PreTrainedTokenizerBase.clean_up_tokenization


def _clean_up(text: str) -> str:
    """transformers' clean-up of a whole string (the reference `_CleanUp` streams)."""
    for old, new in _CLEAN_UP_RULES:
        text = text.replace(old, new)
    return text


def _measure_kind(tokenizer: PreTrainedTokenizerBase) -> _DecodeKind:
    """Compare `decode` with and without transformers' clean-up on the probe texts.

    Measured rather than read from `clean_up_tokenization_spaces`: transformers ignores the
    setting for BPE tokenizers unless told otherwise. A tokenizer that overrides the clean-up
    (remote code) and asks for it may clean up its own way, which no probe can rule out.
    """
    method = getattr(tokenizer, "clean_up_tokenization", None)
    overridden = getattr(method, "__func__", None) is not _TRANSFORMERS_CLEAN_UP
    if overridden and getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return "opaque"
    cleans, chain_matches = False, True
    for probe in _PROBES:
        ids = tokenizer.encode(probe, add_special_tokens=False)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        try:
            raw = tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        except TypeError:  # a decode without the option: followed by full decodes, exactly
            return "opaque"
        cleans = cleans or text != raw
        chain_matches = chain_matches and text == _clean_up(raw)
    if not cleans:
        return "plain"
    return "clean_up" if chain_matches else "opaque"


def _decode_kind(tokenizer: PreTrainedTokenizerBase) -> _DecodeKind:
    """`_measure_kind`, once per tokenizer."""
    try:
        return _kinds[tokenizer]
    except (KeyError, TypeError):
        pass
    kind = _measure_kind(tokenizer)
    with contextlib.suppress(TypeError):  # not weakly referenceable: measured each time
        _kinds[tokenizer] = kind
    return kind


def _last(text: str, count: int) -> str:
    """The last `count` characters of `text` ("" for count 0, unlike text[-0:])."""
    return text[max(0, len(text) - count) :]


class _Replace:
    """`str.replace(old, new)` over a text that arrives in pieces.

    `str.replace` scans left to right and resumes after each match, so a character is final
    once no match can start at or before it: only a tail that is a proper prefix of `old`
    (a match that later characters may complete) is held back.
    """

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new
        self.held = ""  # the input from where the scan resumes

    def feed(self, piece: str) -> str:
        """Take `piece`; return the output that later pieces can no longer change."""
        text = self.held + piece
        out: list[str] = []
        start = 0
        while (i := text.find(self.old, start)) >= 0:
            out += (text[start:i], self.new)
            start = i + len(self.old)
        # no match starts before len - len(old) + 1; after it, only where `old` could begin
        keep = max(start, len(text) - len(self.old) + 1)
        while keep < len(text) and not self.old.startswith(text[keep:]):
            keep += 1
        out.append(text[start:keep])
        self.held = text[keep:]
        return "".join(out)


class _CleanUp:
    """transformers' clean-up (`_CLEAN_UP_RULES`) as a stream: each rule's output feeds the
    next, so `feed` of the pieces followed by `peek("")` equals `_clean_up` of their join."""

    def __init__(self) -> None:
        self._rules = [_Replace(old, new) for old, new in _CLEAN_UP_RULES]

    def feed(self, raw: str) -> str:
        """Take final raw text; return the cleaned text that is final now."""
        for rule in self._rules:
            raw = rule.feed(raw)
        return raw

    def peek(self, raw: str) -> str:
        """The cleaned text after `feed`'s output if the text ended with `raw` (no state
        change): the held tails, and `raw`, through the rest of the chain."""
        for rule in self._rules:
            raw = (rule.held + raw).replace(rule.old, rule.new)
        return raw


class CompletionText:
    """The text of one completion as tokens arrive.

    `text` is `tokenizer.decode(ids, skip_special_tokens=True)` of the completion's tokens
    (an end-of-turn token is not part of it). With stop strings it is the decoded text of all
    the tokens appended, cut before the first occurrence of any stop string in it; the tokens
    end with the first one after which that decoded text contains a stop string (`stopped`
    is then set, and later tokens are kept in `token_ids` but not in the text). A stop string
    is looked for in that same decoded text after every token, so it is found even when it
    spans several tokens, or appears only once a clean-up joined two tokens.

    `delta()` yields stream pieces that later tokens cannot change: never the inside of a
    multi-byte character, never a tail that could still grow into a stop string or be
    cleaned up, so the concatenated deltas (with `delta(final=True)`) equal `text`. Without
    stop strings, tokens are decoded lazily, when the text or a delta is asked for.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        kind = _decode_kind(tokenizer)
        self._local = kind != "opaque"
        # the raw decode: transformers' clean-up is applied here, as a stream, when it is known
        self._clean_up = _CleanUp() if kind == "clean_up" else None
        self._decode_options = {"skip_special_tokens": True}
        if self._clean_up is not None:
            self._decode_options["clean_up_tokenization_spaces"] = False
        # tails a stream holds back: possible stop strings (and, for an unknown clean-up, what
        # transformers' would change: a guess, the best a full decode allows)
        self._hold = self._stop
        if kind == "opaque":
            self._hold += tuple(old for old, _ in _CLEAN_UP_RULES)
        self._longest_hold = max((len(s) for s in self._hold), default=0)
        self.token_ids: list[int] = []  # the completion, end-of-turn token included
        self._ids: list[int] = []  # the tokens of the text (no end-of-turn token)
        self._decoded = 0  # how many of `_ids` the text reflects
        # the window: `_prefix_text` is the raw decode of _ids[_prefix_offset:_read_offset]
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        # the text = "".join(_chunks) (final: later tokens never change it) + _pending (may)
        self._chunks: list[str] = []
        self._committed_length = 0
        self._pending = ""
        self._recent = ""  # the committed text's last len(longest stop) - 1 characters
        self._unsent: list[str] = []  # committed text from index `_unsent_start` on
        self._unsent_start = 0
        self._final: str | None = None  # the trimmed text, once a stop string matched
        self._byte_tokens: dict[int, bool] = {}
        self._special: frozenset[int] | None = None
        self.emitted = 0
        self.stopped = False

    # ------------------------------------------------------------------ public

    @property
    def text(self) -> str:
        """The completion so far (without special tokens; trimmed at a stop string)."""
        if self._final is not None:
            return self._final
        self._catch_up()
        return self._visible()

    def append_end_token(self, token_id: int) -> None:
        """Record an end-of-turn token: part of the completion, not of its text."""
        self.token_ids.append(token_id)

    def append(self, token_id: int) -> None:
        """Add one token; sets `stopped` and trims `text` when a stop string completes."""
        self.token_ids.append(token_id)
        if self.stopped:
            return
        self._ids.append(token_id)
        if not self._stop:
            return  # nothing to look for: decode lazily, when the text is asked for
        # a new match ends after the committed text, so it starts at most len(stop) - 1 before
        start = self._committed_length - len(self._recent)
        region = self._recent
        committed = self._catch_up()
        if committed is None:  # rebuilt from a full decode: search all of it
            start, region = 0, self._visible()
        else:
            region += committed + self._pending
        hits = [i for s in self._stop if (i := region.find(s)) >= 0]
        if hits:
            self._final = self._visible()[: start + min(hits)]
            self.stopped = True

    def delta(self, final: bool = False) -> str:
        """Text not yet emitted that is safe to emit (everything, once `final`)."""
        if self._final is None:
            self._catch_up()
        unsent = self._unemitted()
        if final or self.stopped:
            end = len(unsent)
        elif self._pending_may_change():
            end = self._safe_end(unsent[: max(0, self._committed_length - self.emitted)])
        else:
            end = self._safe_end(unsent)
        if end <= 0:
            return ""
        self._mark_emitted(end)
        return unsent[:end]

    # ------------------------------------------------------------------ decoding

    def _decode(self, start: int, end: int) -> str:
        """The raw decode of _ids[start:end] (before transformers' clean-up, if streamed)."""
        return self._tokenizer.decode(self._ids[start:end], **self._decode_options)

    def _is_byte_token(self, token_id: int) -> bool:
        known = self._byte_tokens.get(token_id)
        if known is None:
            token = self._tokenizer.convert_ids_to_tokens(token_id)
            known = isinstance(token, str) and _BYTE_TOKEN.fullmatch(token) is not None
            self._byte_tokens[token_id] = known
        return known

    def _in_byte_run(self) -> bool:
        """Whether the text ends in byte-fallback tokens that later bytes may still join.

        A SentencePiece byte-fallback decoder turns a whole run of `<0xNN>` tokens into text at
        once, and into one U+FFFD per byte if the run is not valid UTF-8 as a whole, so the
        run's text is final only once a token that is not a byte ends it. Special tokens are
        skipped by the decode and do not end a run.
        """
        if self._special is None:
            self._special = frozenset(self._tokenizer.all_special_ids)
        for token_id in reversed(self._ids):
            if token_id not in self._special:
                return self._is_byte_token(token_id)
        return False

    def _pending_may_change(self) -> bool:
        """Whether `_pending` may change beyond its trailing U+FFFD: in a byte run (its bytes
        may still turn into U+FFFD), or held by the clean-up (a space it may still remove)."""
        return self._clean_up is not None or self._in_byte_run()

    def _catch_up(self) -> str | None:
        """Reflect every token in the text: decode the window once.

        Returns the text committed now ("" if none), or None when the text was rebuilt from a
        full decode (it may then differ anywhere).
        """
        n = len(self._ids)
        if self._decoded == n:
            return ""
        self._decoded = n
        if not self._local:
            self._rebuild(n)
            return None
        window = self._decode(self._prefix_offset, n)
        if not window.startswith(self._prefix_text):
            self._rebuild(n)  # the decoder is not local at the window's split
            return None
        tail = window[len(self._prefix_text) :]
        if not tail or tail.endswith(_REPLACEMENT) or self._in_byte_run():
            # may still change: keep the window where it is
            self._pending = tail if self._clean_up is None else self._clean_up.peek(tail)
            return ""
        return self._commit(tail, n)

    def _commit(self, tail: str, n: int) -> str:
        """Make `tail` (the raw text of _ids[_read_offset:n]) final, move the window on, and
        return the text it adds for good (less, while the clean-up holds a tail back)."""
        if self._clean_up is None:
            self._pending = ""
        else:
            tail = self._clean_up.feed(tail)
            self._pending = self._clean_up.peek("")
        self._add_committed(tail)
        self._prefix_offset, self._read_offset = self._read_offset, n
        self._prefix_text = self._decode(self._prefix_offset, n)
        return tail

    def _add_committed(self, text: str) -> None:
        self._chunks.append(text)
        self._unsent.append(text)
        self._committed_length += len(text)
        self._recent = _last(self._recent + text, self._longest_stop - 1)

    def _rebuild(self, n: int) -> None:
        """Take the text from a full decode (rare: only where the decoder is not local)."""
        full = self._decode(0, n)
        self._pending = ""
        if self._clean_up is not None:  # clean the whole raw text again
            self._clean_up = _CleanUp()
            full = self._clean_up.feed(full)
            self._pending = self._clean_up.peek("")
        self._chunks = [full]
        self._committed_length = len(full)
        self._recent = _last(full, self._longest_stop - 1)
        self._unsent_start = min(self.emitted, len(full))
        self._unsent = [full[self._unsent_start :]]
        if self._local:  # the window goes on from here
            self._prefix_offset, self._read_offset = self._read_offset, n
            self._prefix_text = self._decode(self._prefix_offset, n)

    def _visible(self) -> str:
        """The whole text (O(length): for the final text, not for every token)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return (self._chunks[0] if self._chunks else "") + self._pending

    # ------------------------------------------------------------------ stream deltas

    def _unemitted(self) -> str:
        """text[emitted:], built from the text added since the last delta only."""
        if self._final is not None:
            return self._final[self.emitted :]
        since = "".join(self._unsent) + self._pending  # text[_unsent_start:]
        return since[self.emitted - self._unsent_start :]

    def _mark_emitted(self, count: int) -> None:
        self.emitted += count
        if self._final is not None:
            return
        cut = min(self.emitted, self._committed_length)
        committed = "".join(self._unsent)
        self._unsent = [committed[cut - self._unsent_start :]]
        self._unsent_start = cut

    def _safe_end(self, unsent: str) -> int:
        """Length of the prefix of `unsent` that later tokens cannot change."""
        end = len(unsent)
        while end > 0 and unsent[end - 1] == _REPLACEMENT:
            end -= 1
        # hold back a tail that could still grow into a stop string (or be cleaned up)
        for n in range(min(self._longest_hold - 1, end), 0, -1):
            tail = unsent[end - n : end]
            if any(s.startswith(tail) for s in self._hold):
                end -= n
                break
        return end
