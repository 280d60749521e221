"""What grammar constraints know about a tokenizer's tokens, built once per tokenizer.

llguidance's view of the tokenizer (it costs ~1 s to build), closing mode's tiers of tokens
(those that close a string, brackets, separators, digits; every token's byte length), the plain
tokens it lets a model go on writing (digits, words), every token's first byte, and the shortest
routes of recent grammars. Each table is cached per tokenizer object (weakly: it goes with the
tokenizer) and per vocabulary size; `TABLES_LOCK` guards them across threads.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

__all__ = [
    "TABLES_LOCK",
    "closing_tokens",
    "first_bytes",
    "known_routes",
    "ll_tokenizer",
    "plain_groups",
    "remember_route",
]

TABLES_LOCK = threading.Lock()

_KNOWN_ROUTES = 256  # per tokenizer: the shortest routes of this many recent grammars

_LL_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)
_CLOSING: weakref.WeakKeyDictionary[Any, dict[int, tuple[torch.Tensor, ...]]] = (
    weakref.WeakKeyDictionary()
)
_GROUPS: weakref.WeakKeyDictionary[Any, dict[int, tuple[torch.Tensor, ...]]] = (
    weakref.WeakKeyDictionary()
)
_ROUTES: weakref.WeakKeyDictionary[Any, dict[Any, tuple[int, ...]]] = weakref.WeakKeyDictionary()
_FIRST: weakref.WeakKeyDictionary[Any, dict[int, torch.Tensor]] = weakref.WeakKeyDictionary()
_TEXTS: weakref.WeakKeyDictionary[Any, dict[int, list[str]]] = weakref.WeakKeyDictionary()

_DIGITS = frozenset("0123456789")
_WORDS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos: tuple[int, ...]) -> Any:
    """llguidance's view of a fast HF tokenizer; built once per tokenizer (it costs ~1 s)."""
    import llguidance.hf

    with TABLES_LOCK:
        per_tokenizer = _LL_TOKENIZERS.setdefault(tokenizer, {})
        key = (vocab_size, eos)
        if key not in per_tokenizer:
            per_tokenizer[key] = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=list(eos) or None
            )
        return per_tokenizer[key]


def _token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """Every token's text; computed once per tokenizer (called under `TABLES_LOCK`)."""
    per_tokenizer = _TEXTS.setdefault(tokenizer, {})
    if vocab_size not in per_tokenizer:
        per_tokenizer[vocab_size] = [
            tokenizer.decode([i]) if i < len(tokenizer) else "" for i in range(vocab_size)
        ]
    return per_tokenizer[vocab_size]


def closing_tokens(tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Masks [V] of tokens that close JSON: a string (`"`, `"}`...), brackets, separators,
    digits; then every token's byte length. Computed once per tokenizer."""
    with TABLES_LOCK:
        per_tokenizer = _CLOSING.setdefault(tokenizer, {})
        if vocab_size not in per_tokenizer:
            texts = _token_texts(tokenizer, vocab_size)
            # closing a string first, then brackets, then punctuation and digits; no blanks:
            # the JSON grammars allow optional whitespace, which only lengthens a closing
            tiers = [
                torch.tensor([t.startswith('"') and set(t) <= set('"}]') for t in texts]),
                torch.tensor([bool(t) and set(t) <= set("}]") for t in texts]),
                torch.tensor([bool(t) and set(t) <= set(",:") for t in texts]),
                torch.tensor([bool(t) and set(t) <= set('"}],:0123456789') for t in texts]),
                torch.tensor([len(t.encode()) for t in texts]),  # byte lengths
            ]
            per_tokenizer[vocab_size] = tuple(tiers)
        return per_tokenizer[vocab_size]


def plain_groups(tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Masks [V] of the plain tokens closing mode lets a model go on writing: digits only,
    and ASCII letters and spaces only (not blanks alone). Computed once per tokenizer."""
    with TABLES_LOCK:
        per_tokenizer = _GROUPS.setdefault(tokenizer, {})
        if vocab_size not in per_tokenizer:
            texts = _token_texts(tokenizer, vocab_size)
            per_tokenizer[vocab_size] = (
                torch.tensor([bool(t) and set(t) <= _DIGITS for t in texts]),
                torch.tensor([bool(t.strip()) and set(t) <= _WORDS for t in texts]),
            )
        return per_tokenizer[vocab_size]


def first_bytes(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """The first byte of every token's text [V] (256 for none). Computed once per tokenizer."""
    with TABLES_LOCK:
        per_tokenizer = _FIRST.setdefault(tokenizer, {})
        if vocab_size not in per_tokenizer:
            texts = _token_texts(tokenizer, vocab_size)
            per_tokenizer[vocab_size] = torch.tensor([t.encode()[0] if t else 256 for t in texts])
        return per_tokenizer[vocab_size]


def known_routes(tokenizer: Any) -> dict[Any, tuple[int, ...]]:
    """The shortest routes found for recent grammars of `tokenizer`, by grammar key (read
    freely; add with `remember_route`)."""
    with TABLES_LOCK:
        return _ROUTES.setdefault(tokenizer, {})


def remember_route(known: dict[Any, tuple[int, ...]], key: Any, route: list[int]) -> None:
    """Keep `route` for `key` in `known` (from `known_routes`), forgetting the oldest past
    `_KNOWN_ROUTES` grammars."""
    with TABLES_LOCK:
        if len(known) >= _KNOWN_ROUTES:
            known.pop(next(iter(known)))
        known[key] = tuple(route)
