"""Where the shipped toy-world family lives, and a one-call EFT decoder over it.

    from eft_integrations.toyworld.paths import model_dir, load_decoder
    dec = load_decoder()                      # large base + helpful and harmless deltas
    dec.generate(dec.format_chat([{"role": "user", "content": "When was Zedrai founded?"}]),
                 weights={"helpful": 1.0, "harmless": 0.0}, temperature=0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MODEL_NAMES = ("small-base", "large-base", "small-helpful", "small-harmless", "large-helpful")
BEHAVIOURS = ("helpful", "harmless")


def weights_dir() -> Path:
    """The directory holding the five shipped model directories."""
    return Path(__file__).resolve().parent / "weights"


def model_dir(name: str) -> Path:
    """The directory of one shipped model, loadable with `from_pretrained`."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown toy-world model {name!r}; known: {list(MODEL_NAMES)}")
    path = weights_dir() / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} has no weights; run `python -m eft_integrations.toyworld.train`")
    return path


def load_decoder(base: str = "large-base", behaviors: Sequence[str] = BEHAVIOURS,
                 scale: str = "small", **kwargs: Any):
    """An `EFTDecoder` over the shipped family.

    `base` is the base model's name; each behaviour b in `behaviors` adds the pair
    (`{scale}-{b}`, `{scale}-base`). The defaults give up-scaling with the helpful and harmless
    deltas; `base="small-base", behaviors=("helpful",), scale="large"` gives down-scaling;
    `behaviors=()` decodes the base alone. Models load in float32 (fast on CPU) unless `dtype`
    is passed; other keyword arguments go to `EFTDecoder.from_pretrained`.
    """
    from eft_integrations import Behavior, EFTDecoder

    kwargs.setdefault("dtype", torch.float32)
    pairs = {b: Behavior(finetuned=str(model_dir(f"{scale}-{b}")),
                         reference=str(model_dir(f"{scale}-base"))) for b in behaviors}
    return EFTDecoder.from_pretrained(base=str(model_dir(base)), behaviors=pairs, **kwargs)
