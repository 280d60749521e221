"""Behaviors from PEFT adapters: one small backbone in memory, however many behaviors.

    Behavior(finetuned=Adapter("path/to/lora"), reference="small-base")

Most fine-tunes people share are LoRA adapters on a public base. A behavior given as an
adapter on its reference needs no second full model: the reference is loaded once and wrapped
in a `peft.PeftModel` holding every adapter named on it, and each role reads it through an
`AdapterView`: the reference with every adapter off (PEFT's `"__base__"`), each fine-tuned
model with its own adapter on. A view is what the engine sees as a model (its own KV rows,
its own forwards); the views of one backbone share its weights, and each forward names its
adapter per row (PEFT's `adapter_names`), so no view changes the state another reads. A PEFT
method that cannot name adapters per row (`mixed_batch_blocker`) falls back to switching the
backbone to the view's adapter for each forward, under the backbone's lock.

The brute-force meaning, which the tests check: a view with adapter A computes what the
backbone with A merged into its weights computes (`merge_and_unload`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_ADAPTER",
    "Adapter",
    "AdapterView",
    "adapter_batching",
    "attach_adapter",
    "call_backbone",
    "is_adapter_view",
    "merged_copy",
    "mixed_batch_blocker",
    "quiet_tied_head_warning",
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
    row; everything else (config, devices, embeddings) is the backbone's.

    `unmixed_reason` set is the fallback for a backbone whose PEFT method cannot name an
    adapter per row (see `mixed_batch_blocker`): each forward switches the backbone to its
    adapter (or turns adapters off) under the backbone's lock, so views never see each
    other's state; its views then never share a forward."""

    def __init__(
        self, peft_model: Any, adapter: str | None, unmixed_reason: str | None = None
    ) -> None:
        self.peft_model = peft_model
        self.adapter = adapter
        self.unmixed_reason = unmixed_reason
        """Why this backbone's adapters cannot share a forward; None when they can."""
        backbone = peft_model.get_base_model()

        # the backbone's signature: the ensemble reads which cache and logits keywords exist
        def forward(**kwargs: Any) -> Any:
            return self._forward(**kwargs)

        forward.__signature__ = inspect.signature(backbone.forward)  # type: ignore[attr-defined]
        self.forward = forward
        self.name_or_path = f"{_label(backbone)}+{self.row_adapter}"

    @property
    def mixes_adapters(self) -> bool:
        """Whether this view's rows may share a forward with the backbone's other views."""
        return self.unmixed_reason is None

    @property
    def row_adapter(self) -> str:
        """The name its rows give in a mixed-adapter batch (`BASE_ADAPTER` for none)."""
        return self.adapter or BASE_ADAPTER

    def _forward(self, **kwargs: Any) -> Any:
        if not self.mixes_adapters:
            return self._switched_forward(**kwargs)
        ids = kwargs.get("input_ids")
        rows = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
        names = [self.row_adapter] * rows
        return call_backbone(self.peft_model, **kwargs, adapter_names=names)

    def _switched_forward(self, **kwargs: Any) -> Any:
        # The lock spans the switch and the forward: another view of this backbone (another
        # decoder's thread included) waits rather than run under this view's adapter.
        switch = _switch_of(self.peft_model)
        with switch.lock:
            switch.turn_to(self.peft_model, self.adapter)
            try:
                return self.peft_model(**kwargs)
            except BaseException:
                switch.on = _UNKNOWN  # a layer may have failed half-way: set it again next time
                raise

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


_UNKNOWN = object()
"""What a backbone has switched on when nobody knows (before its first switched forward)."""


class _Switch:
    """One per PeftModel, whoever holds views of it: the lock its forwards take, and which
    adapter its layers have on (None: every adapter off), so a forward switches only when
    the adapter changes (PEFT's switches cost more than a small model's forward)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.on: object = _UNKNOWN

    def turn_to(self, peft_model: Any, adapter: str | None) -> None:
        """Switch the backbone's layers to `adapter` (None: off); the caller holds the lock."""
        if self.on == adapter:
            return
        self.on = _UNKNOWN
        tuner = peft_model.base_model
        if adapter is None:
            tuner.disable_adapter_layers()
        else:
            tuner.enable_adapter_layers()
            peft_model.set_adapter(adapter, inference_mode=True)
        self.on = adapter


_SWITCHES: weakref.WeakKeyDictionary[Any, _Switch] = weakref.WeakKeyDictionary()
_SWITCHES_GUARD = threading.Lock()


def _switch_of(peft_model: Any) -> _Switch:
    with _SWITCHES_GUARD:
        return _SWITCHES.setdefault(peft_model, _Switch())


def call_backbone(peft_model: Any, **kwargs: Any) -> Any:
    """A forward of `peft_model` (per-row `adapter_names` in `kwargs`, typically).

    PEFT passes `adapter_names` to its layers through forward hooks it registers for the
    call; two threads' calls would read each other's, so the backbone's lock serialises
    them. And PEFT leaves the hooks behind when the forward raises (a poison row): they
    would feed that call's adapter names to every later forward, so they are removed."""
    with _switch_of(peft_model).lock:
        try:
            return peft_model(**kwargs)
        except BaseException:
            _remove_adapter_name_hooks(peft_model)
            raise


def _remove_adapter_name_hooks(peft_model: Any) -> None:
    """Drop the per-call `adapter_names` hooks a failed forward left on the layers."""
    for module in peft_model.modules():
        hooks = module._forward_pre_hooks
        for key, hook in list(hooks.items()):
            if isinstance(hook, functools.partial) and "adapter_names" in hook.keywords:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def mixed_batch_blocker(peft_model: Any) -> str | None:
    """Why `peft_model` cannot run a mixed-adapter batch (one forward, an adapter named per
    row), or None when it can.

    PEFT names adapters per row for LoRA-style tuners only; other methods (IA3, LoHa, VeRA,
    OFT, ...) drop `adapter_names` without a word, and `modules_to_save` over layers other
    than Linear, Embedding and Conv (a norm, say) refuse it. So the tuner must take adapter
    names, and a one-token forward naming every adapter and the bare backbone must give, row
    for row, what a forward with that adapter switched on gives."""
    if not hasattr(peft_model.base_model, "_enable_peft_forward_hooks"):
        method = sorted({str(c.peft_type) for c in peft_model.peft_config.values()})
        return f"its PEFT method ({', '.join(method)}) takes no adapter names per row"
    names = [*peft_model.peft_config, BASE_ADAPTER]
    device = peft_model.get_input_embeddings().weight.device
    ids = torch.zeros((len(names), 1), dtype=torch.long, device=device)
    peft_model.eval()  # PEFT refuses per-row adapters in training mode
    switch = _switch_of(peft_model)
    try:
        with torch.inference_mode():
            mixed = call_backbone(peft_model, input_ids=ids, adapter_names=names, use_cache=False)
            with switch.lock:
                try:
                    for row, name in enumerate(names):
                        switch.turn_to(peft_model, None if name == BASE_ADAPTER else name)
                        alone = peft_model(input_ids=ids[row : row + 1], use_cache=False)
                        want = torch.log_softmax(alone.logits[0, -1].float(), -1)
                        got = torch.log_softmax(mixed.logits[row, -1].float(), -1)
                        if not torch.allclose(got, want, atol=1e-2, rtol=0):
                            return f"its row of adapter {name!r} does not compute that adapter"
                finally:
                    # mixed forwards need the adapter layers on (PEFT skips named adapters
                    # while they are off)
                    switch.turn_to(peft_model, names[0])
    except Exception as error:  # a refusal (or anything else): one adapter per forward
        switch.on = _UNKNOWN
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def _refuse_prompt_learning(peft_model: Any) -> None:
    """Prompt-learning adapters (prompt, prefix and P-tuning) add virtual tokens or cache
    entries to every forward, which the paged KV cache cannot hold: a clear error."""
    learned = sorted(n for n, c in peft_model.peft_config.items() if c.is_prompt_learning)
    if learned:
        method = peft_model.peft_config[learned[0]].peft_type
        raise ValueError(
            f"the adapter(s) {learned} are prompt learning ({method}): they add virtual tokens "
            "to every forward, which EFT's KV cache cannot hold; give a weight adapter (LoRA, "
            "IA3, LoHa, ...)"
        )


def adapter_batching(models: Any) -> dict[str, str]:
    """Per adapter backbone among `models` (its label), how its views' decode rows run:
    "mixed" or "one forward per adapter: <why>" (see `mixed_batch_blocker`)."""
    out: dict[str, str] = {}
    labels: dict[int, str] = {}  # id(PeftModel) -> its key (labels may repeat or be empty)
    for model in models:
        if isinstance(model, AdapterView):
            key = id(model.peft_model)
            if key not in labels:
                label = _label(model.peft_model.get_base_model()) or "adapter backbone"
                labels[key] = label if label not in out else f"{label} #{len(labels) + 1}"
            out[labels[key]] = (
                "mixed"
                if model.mixes_adapters
                else f"one forward per adapter: {model.unmixed_reason}"
            )
    return out


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
            with quiet_tied_head_warning():
                backbone.load_adapter(source, adapter_name=name, **adapter.kwargs)
            return backbone
        with quiet_tied_head_warning():
            return PeftModel.from_pretrained(backbone, source, adapter_name=name, **adapter.kwargs)
    except (RuntimeError, KeyError) as error:  # shape mismatches, missing modules
        raise ValueError(
            f"the adapter {source!r} (trained on {trained_on!r}) does not fit its reference "
            f"{reference_name!r}: {str(error).splitlines()[0]}; give the base it was trained on "
            "as the behavior's reference"
        ) from error


@contextlib.contextmanager
def quiet_tied_head_warning() -> Iterator[None]:
    """PEFT warns when an adapter adapts a tied output head, because merging it would change
    the input embeddings too. Views never merge, and `merged_copy` unties first."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True.*")
        yield


def merged_copy(peft_model: Any, adapter: str) -> torch.nn.Module:
    """The backbone with `adapter` merged into a copy of its weights (the brute-force
    meaning of a view; for tests and checks)."""
    import copy

    clone = copy.deepcopy(peft_model)
    backbone = clone.get_base_model()
    head, embeddings = (
        _plain(backbone.get_output_embeddings()),
        _plain(backbone.get_input_embeddings()),
    )
    if head is not None and embeddings is not None and head.weight is embeddings.weight:
        # An adapter on a tied output head adapts the head alone: merging it into the shared
        # tensor would change the input embeddings too. Untie the copy first.
        head.weight = torch.nn.Parameter(
            head.weight.detach().clone(), requires_grad=head.weight.requires_grad
        )
        backbone.config.tie_word_embeddings = False
    return clone.merge_and_unload(adapter_names=[adapter]).eval()


def _plain(layer: Any) -> Any:
    """The layer a PEFT layer wraps (itself when not wrapped)."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


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
    blockers: dict[int, str | None] = {}  # id(PeftModel) -> why it cannot mix adapters

    def view(model: Any, adapter: str | None = None) -> Any:
        peft = model if isinstance(model, peft_class) else peft_of.get(id(model))
        if peft is None:
            return model
        if id(peft) not in blockers:
            _refuse_prompt_learning(peft)
            blocker = blockers[id(peft)] = mixed_batch_blocker(peft)
            if blocker is not None:
                logger.warning(
                    "the adapters on %s cannot share a forward (%s): each view runs its own "
                    "forward, with its adapter switched on",
                    _label(peft.get_base_model()),
                    blocker,
                )
        key = (id(peft), adapter)
        if key not in views:
            views[key] = AdapterView(peft, adapter, unmixed_reason=blockers[id(peft)])
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
