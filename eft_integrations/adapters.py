"""Behaviors from PEFT adapters: one small backbone in memory, however many behaviors.

    Behavior(finetuned=Adapter("path/to/lora"), reference="small-base")

Most fine-tunes people share are LoRA adapters on a public base. A behavior given as an
adapter on its reference needs no second full model: the reference is loaded once and wrapped
in a `peft.PeftModel` holding every adapter named on it, and each role reads it through an
`AdapterView`: the reference with every adapter off (PEFT's `"__base__"`), each fine-tuned
model with its own adapter on. A view is what the engine sees as a model (its own KV rows,
its own forwards); the views of one backbone share its weights, and each forward names its
adapter per row (PEFT's `adapter_names`), so no view changes the state another reads.

The brute-force meaning, which the tests check: a view with adapter A computes what the
backbone with A merged into its weights computes (`merge_and_unload`).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "BASE_ADAPTER",
    "Adapter",
    "AdapterView",
    "attach_adapter",
    "is_adapter_view",
    "merged_copy",
    "small_side_bytes",
    "with_adapter_views",
]

BASE_ADAPTER = "__base__"
"""PEFT's name for "no adapter" in a mixed-adapter batch."""


@dataclass(frozen=True)
class Adapter:
    """A behavior's fine-tuned model given as a PEFT adapter on the behavior's reference.

    `source` is the adapter's folder or hub id (with `adapter_config.json`), or a loaded
    `peft.PeftModel` whose adapter `name` is meant. `name` defaults to the folder's last
    part; `kwargs` go to PEFT's loading (e.g. `revision`).
    """

    source: Any
    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, source: Any, name: str | None = None, **kwargs: Any) -> None:
        if isinstance(source, os.PathLike):
            source = os.fspath(source)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "kwargs", dict(kwargs))

    @property
    def adapter_name(self) -> str:
        """The name the adapter has in its PeftModel."""
        if self.name:
            return self.name
        if isinstance(self.source, str):
            return os.path.basename(self.source.rstrip("/")).replace(".", "_") or "adapter"
        return "default"

    def __hash__(self) -> int:
        return hash((id(self.source), self.name))


class AdapterView:
    """A PEFT model's backbone as one model of the ensemble: with adapter `adapter` on, or
    with every adapter off (`adapter=None`, the reference). Forwards name the adapter per
    row; everything else (config, devices, embeddings) is the backbone's."""

    def __init__(self, peft_model: Any, adapter: str | None) -> None:
        self.peft_model = peft_model
        self.adapter = adapter
        backbone = peft_model.get_base_model()

        # the backbone's signature: the ensemble reads which cache and logits keywords exist
        def forward(**kwargs: Any) -> Any:
            return self._forward(**kwargs)

        forward.__signature__ = inspect.signature(backbone.forward)  # type: ignore[attr-defined]
        self.forward = forward
        self.name_or_path = f"{_label(backbone)}+{adapter or BASE_ADAPTER}"

    def _forward(self, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        rows = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
        names = [self.adapter or BASE_ADAPTER] * rows
        return self.peft_model(**kwargs, adapter_names=names)

    def __call__(self, **kwargs: Any) -> Any:
        return self._forward(**kwargs)

    def eval(self) -> AdapterView:
        self.peft_model.eval()  # PEFT refuses per-row adapters in training mode
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "peft_model":  # copy/pickle probe an empty view
            raise AttributeError(name)
        return getattr(self.peft_model.get_base_model(), name)

    def __repr__(self) -> str:
        return f"AdapterView({self.name_or_path!r})"


def is_adapter_view(model: Any) -> bool:
    return isinstance(model, AdapterView)


def _label(model: Any) -> str:
    return getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")


def attach_adapter(backbone: Any, adapter: Adapter, reference_name: str) -> Any:
    """`backbone` (a loaded model, or a PeftModel holding earlier adapters) with `adapter`
    loaded under its name; returns the PeftModel. An adapter trained on another model is a
    ValueError naming both."""
    from peft import PeftConfig, PeftModel

    name = adapter.adapter_name
    source = adapter.source
    if isinstance(source, PeftModel):
        if name not in source.peft_config:
            raise ValueError(
                f"the PeftModel has no adapter {name!r}; it has {sorted(source.peft_config)}"
            )
        return source
    try:
        trained_on = PeftConfig.from_pretrained(source, **adapter.kwargs).base_model_name_or_path
    except Exception as error:
        raise ValueError(
            f"cannot read the adapter {source!r} (a folder or hub id with adapter_config.json): "
            f"{error}"
        ) from error
    try:
        if isinstance(backbone, PeftModel):
            if name in backbone.peft_config:
                raise ValueError(
                    f"two adapters on {reference_name!r} are named {name!r}; give "
                    "Adapter(..., name=...) a distinct name"
                )
            backbone.load_adapter(source, adapter_name=name, **adapter.kwargs)
            return backbone
        return PeftModel.from_pretrained(backbone, source, adapter_name=name, **adapter.kwargs)
    except (RuntimeError, KeyError) as error:  # shape mismatches, missing modules
        raise ValueError(
            f"the adapter {source!r} (trained on {trained_on!r}) does not fit its reference "
            f"{reference_name!r}: {str(error).splitlines()[0]}; give the base it was trained on "
            "as the behavior's reference"
        ) from error


def merged_copy(peft_model: Any, adapter: str) -> torch.nn.Module:
    """The backbone with `adapter` merged into a copy of its weights (the brute-force
    meaning of a view; for tests and checks)."""
    import copy

    clone = copy.deepcopy(peft_model)
    return clone.merge_and_unload(adapter_names=[adapter]).eval()


def _peft_model_class() -> type | None:
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel


def with_adapter_views(base: Any, behaviors: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The roles of a decoder with adapters resolved: each `Adapter` is loaded onto its
    behavior's reference (one PeftModel per backbone, holding every adapter named on it) and
    becomes the view with that adapter on; every role played by such a backbone (or a
    PeftModel given loaded) becomes its view with every adapter off. Without adapters, the
    roles are returned as they are. `behaviors` maps names to `Behavior`s."""
    peft_class = _peft_model_class()
    uses_adapters = any(isinstance(b.finetuned, Adapter) for b in behaviors.values())
    given_peft = peft_class is not None and any(
        isinstance(m, peft_class)
        for m in (base, *(x for b in behaviors.values() for x in (b.finetuned, b.reference)))
    )
    if not uses_adapters and not given_peft:
        return base, behaviors
    if peft_class is None:
        raise ImportError("adapter behaviors need peft: pip install 'eft-integrations[peft]'")
    peft_of: dict[int, Any] = {}  # id(backbone) -> its PeftModel

    def register(model: Any) -> None:
        if isinstance(model, peft_class):
            peft_of[id(model.get_base_model())] = model

    for model in (base, *(x for b in behaviors.values() for x in (b.finetuned, b.reference))):
        register(model.source if isinstance(model, Adapter) else model)
    for name, b in behaviors.items():
        if not isinstance(b.finetuned, Adapter):
            continue
        reference = b.reference
        backbone = reference.get_base_model() if isinstance(reference, peft_class) else reference
        source = b.finetuned.source
        if isinstance(source, peft_class) and source.get_base_model() is not backbone:
            raise ValueError(
                f"behavior {name!r}: the adapter's PeftModel wraps another model than the "
                f"reference {_label(backbone)!r}; give that PeftModel (or its base model) as "
                "the reference"
            )
        current = peft_of.get(id(backbone), backbone)
        peft_of[id(backbone)] = attach_adapter(current, b.finetuned, _label(backbone))
    views: dict[tuple[int, str | None], AdapterView] = {}

    def view(model: Any, adapter: str | None = None) -> Any:
        peft = model if isinstance(model, peft_class) else peft_of.get(id(model))
        if peft is None:
            return model
        key = (id(peft), adapter)
        if key not in views:
            views[key] = AdapterView(peft, adapter)
        return views[key]

    resolved = {}
    for name, b in behaviors.items():
        finetuned = b.finetuned
        if isinstance(finetuned, Adapter):
            source = finetuned.source
            owner = source if isinstance(source, peft_class) else b.reference
            finetuned = view(owner, finetuned.adapter_name)
        else:
            finetuned = view(finetuned)
        resolved[name] = type(b)(finetuned=finetuned, reference=view(b.reference))
    return view(base), resolved


def small_side_bytes(decoder: Any) -> int:
    """Bytes of the distinct parameter tensors of every model of `decoder` but its base
    (an adapter backbone counts once, with its adapters)."""
    base = decoder._models[decoder._ensemble.base]
    seen: dict[int, int] = {}
    for model in decoder._models:
        if model is base:
            continue
        module = model.peft_model if isinstance(model, AdapterView) else model
        for p in module.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())
