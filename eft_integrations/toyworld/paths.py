"""Where the shipped toy-world family lives, and a one-call EFT decoder over it.

from eft_integrations.toyworld.paths import model_dir, load_decoder
dec = load_decoder()                      # large base + helpful and harmless deltas
lora = load_decoder(adapters=True)        # the same deltas as LoRA adapters on small-base
dec.generate(dec.format_chat([{"role": "user", "content": "When was Zedrai founded?"}]),
             temperature=0.0)               # DEFAULT_WEIGHTS unless weights= says otherwise
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MODEL_NAMES = ("small-base", "large-base", "small-helpful", "small-harmless", "large-helpful")
ADAPTER_NAMES = ("small-helpful-lora", "small-harmless-lora")
"""LoRA versions of the small chat fine-tunes: PEFT adapters on small-base."""
FAMILY_NAMES = MODEL_NAMES + ADAPTER_NAMES
BEHAVIOURS = ("helpful", "harmless")

DEFAULT_WEIGHTS: dict[str, float] = {"helpful": 0.0, "harmless": 1.0}
"""The weights of a call that names none, with both deltas loaded: the best-behaved setting the
evaluator measured (`evaluate.best_behaved` over `evaluate.WEIGHT_SETTINGS`; the table is in
weights/README.md). On the 960 held-out questions: fact 0.831, format 0.959, weapons questions
refused 0.971; both deltas at 1.0 gave fact 0.722, format 0.790; helpful alone 0.822, 0.946.
The harmless delta teaches the helpful answer form too, plus the refusal."""


def default_weights(behaviors: Sequence[str]) -> dict[str, float]:
    """`DEFAULT_WEIGHTS` for the two deltas together; a delta loaded alone decodes at 1.0
    (plain EFT, the best of its single-delta settings measured)."""
    if set(behaviors) == set(DEFAULT_WEIGHTS):
        return dict(DEFAULT_WEIGHTS)
    return dict.fromkeys(behaviors, 1.0)


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
            f"{path} has no weights; run `python -m eft_integrations.toyworld.train`"
        )
    return path


def adapter_dir(name: str) -> Path:
    """The directory of one shipped LoRA adapter (`ADAPTER_NAMES`), loadable with PEFT."""
    if name not in ADAPTER_NAMES:
        raise ValueError(f"unknown toy-world adapter {name!r}; known: {list(ADAPTER_NAMES)}")
    path = weights_dir() / name
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{path} has no adapter; run `python -m eft_integrations.toyworld.train --only {name}`"
        )
    return path


def load_decoder(
    base: str = "large-base",
    behaviors: Sequence[str] = BEHAVIOURS,
    scale: str = "small",
    adapters: bool = False,
    **kwargs: Any,
):
    """An `EFTDecoder` over the shipped family.

    `base` is the base model's name; each behaviour b in `behaviors` adds the pair
    (`{scale}-{b}`, `{scale}-base`). The defaults give up-scaling with the helpful and harmless
    deltas; `base="small-base", behaviors=("helpful",), scale="large"` gives down-scaling;
    `behaviors=()` decodes the base alone. With `adapters=True` each delta is the LoRA adapter
    `small-{b}-lora` on small-base (one small backbone in memory; needs peft). Calls that
    name no weights use `default_weights` (`DEFAULT_WEIGHTS` with both deltas). Models load in
    float32 (fast on CPU) unless `dtype` is passed; other keyword arguments go to
    `EFTDecoder.from_pretrained`.
    """
    from eft_integrations import Adapter, Behavior, EFTDecoder

    if adapters and scale != "small":
        raise ValueError("the shipped LoRA adapters are small-scale deltas: use scale='small'")
    kwargs.setdefault("dtype", torch.float32)
    kwargs.setdefault("default_weights", default_weights(behaviors) or None)
    reference = str(model_dir(f"{scale}-base"))
    pairs = {
        b: Behavior(
            finetuned=(
                Adapter(str(adapter_dir(f"{scale}-{b}-lora")), name=b)
                if adapters
                else str(model_dir(f"{scale}-{b}"))
            ),
            reference=reference,
        )
        for b in behaviors
    }
    return EFTDecoder.from_pretrained(base=str(model_dir(base)), behaviors=pairs, **kwargs)
