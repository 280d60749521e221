"""Incremental detokenization: stop strings across token boundaries and safe stream deltas.

Decoding the whole completion again after every token costs O(length) per token. Instead, as
in TGI's and vLLM's incremental detokenizers, only a short window of trailing tokens is decoded:

    ids:   [ .......... committed .......... | window: prefix | new tokens ]
                                              ^ prefix_offset  ^ read_offset

    text(ids[:n]) = text(ids[:read_offset]) + (decode(ids[prefix_offset:n])
                                               minus its first len(decode(prefix)) characters)

The prefix tokens give the new tokens their left context (SentencePiece drops the leading space
of a decode's first token, so the window never starts at the new tokens themselves). The window
moves forward (is committed) only once its text is complete: it extends the prefix's text, is
not empty, and does not end in U+FFFD (an incomplete UTF-8 character) nor in a byte-fallback
token (`<0xNN>`, whose run of bytes a SentencePiece decoder decodes as one unit). Where a
decoder is not local (the window's text does not extend its prefix's), the text is rebuilt
from a full decode. A tokenizer that cleans up tokenization spaces (" ." -> ".", mostly
WordPiece) can change text before any window, so its text is always fully decoded, as before.
So the text always equals `tokenizer.decode(ids, skip_special_tokens=True)`, at a cost per
token independent of the length so far; the window only grows across runs of tokens that
decode to nothing, to an incomplete character or to byte-fallback bytes.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Sequence

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

__all__ = ["CompletionText"]

# What a byte-level tokenizer decodes an incomplete UTF-8 sequence to.
_REPLACEMENT = "\ufffd"
# SentencePiece byte-fallback tokens (Llama, Mistral, Gemma): one byte each.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# What transformers' clean_up_tokenization replaces (a space goes): a stream holds back a
# tail that could still become one of these.
_CLEAN_UP = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
_cleans_up: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()


def _cleans_up_spaces(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `decode` cleans up tokenization spaces (measured: transformers applies the
    setting to some tokenizer kinds only)."""
    try:
        return _cleans_up[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = tokenizer.encode("a . b , c", add_special_tokens=False)
    cleans = tokenizer.decode(ids, skip_special_tokens=True) != tokenizer.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    with contextlib.suppress(TypeError):  # not weakly referenceable: measured each time
        _cleans_up[tokenizer] = cleans
    return cleans


def _last(text: str, count: int) -> str:
    """The last `count` characters of `text` ("" for count 0, unlike text[-0:])."""
    return text[max(0, len(text) - count) :]


class CompletionText:
    """The text of one completion as tokens arrive.

    It finds stop strings even when they span several tokens, trims them, and yields stream
    deltas that never end inside a multi-byte character or inside a possible stop string, so
    the concatenated deltas equal the final text. Without stop strings, tokens are decoded
    lazily, when the text or a delta is asked for.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._local = not _cleans_up_spaces(tokenizer)
        # tails a stream holds back: possible stop strings, and possible clean-ups
        self._hold = self._stop if self._local else self._stop + _CLEAN_UP
        self._longest_hold = max((len(s) for s in self._hold), default=0)
        self.token_ids: list[int] = []  # the completion, end-of-turn token included
        self._ids: list[int] = []  # the tokens of the text (no end-of-turn token)
        self._decoded = 0  # how many of `_ids` the text reflects
        # the window: `_prefix_text` is decode(_ids[_prefix_offset:_read_offset])
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        # the text = "".join(_chunks) (of _ids[:_read_offset], final) + _pending (may change)
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
        # a new match ends in the text added now, so it starts at most len(stop) - 1 before it
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
        elif self._in_byte_run():
            # the run's text may still turn into U+FFFD: emit only the committed text
            end = self._safe_end(unsent[: max(0, self._committed_length - self.emitted)])
        else:
            end = self._safe_end(unsent)
        if end <= 0:
            return ""
        self._mark_emitted(end)
        return unsent[:end]

    # ------------------------------------------------------------------ decoding

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)

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
            self._pending = tail  # may still change: keep the window where it is
            return ""
        self._commit(tail, n)
        return tail

    def _commit(self, tail: str, n: int) -> None:
        """Make `tail` (the text of _ids[_read_offset:n]) final and move the window on."""
        self._chunks.append(tail)
        self._unsent.append(tail)
        self._committed_length += len(tail)
        self._recent = _last(self._recent + tail, self._longest_stop - 1)
        self._pending = ""
        self._prefix_offset, self._read_offset = self._read_offset, n
        self._prefix_text = self._decode(self._prefix_offset, n)

    def _rebuild(self, n: int) -> None:
        """Take the text from a full decode (rare: only where the decoder is not local)."""
        full = self._decode(0, n)
        self._chunks = [full]
        self._committed_length = len(full)
        self._pending = ""
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
