"""Loading the models of an EFT decoder: specs, de-duplication and tokenizer checks.

A decoder is a base model plus behaviors, each a (fine-tuned, reference) pair. A model named in
several roles (one reference shared by two behaviors) is loaded once and run once per step.
Every model must speak the same tokenizer; embedding matrices padded past the tokenizer's size
are fine, since composition runs over the tokenizer's vocabulary only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .adapters import Adapter, AdapterView

__all__ = [
    "Behavior",
    "LoadedModels",
    "ModelRef",
    "ModelSpec",
    "check_loaded_models",
    "check_same_vocabulary",
    "composition_name",
    "config_context_window",
    "load_model",
    "load_models",
    "load_tokenizer",
    "model_context_window",
    "model_device",
    "model_label",
    "pick_tokenizer",
    "smallest_context_window",
]


@dataclass(frozen=True)
class ModelSpec:
    """Where and how to load one model with `AutoModelForCausalLM.from_pretrained`.

    Use it instead of a plain path to override the decoder-wide loading options for one model,
    e.g. `ModelSpec("unsloth/gemma", gguf_file="gemma.gguf", device_map="cuda:1")`.
    """

    name_or_path: str
    dtype: Any = None
    """torch dtype or "auto"; None takes the decoder-wide `dtype`."""
    device_map: Any = None
    """accelerate device map ("auto", "cuda:0", a dict); None takes the decoder-wide one."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for `from_pretrained` (e.g. `gguf_file`, `revision`)."""

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        dtype: Any = None,
        device_map: Any = None,
        **kwargs: Any,
    ) -> None:
        object.__setattr__(self, "name_or_path", os.fspath(name_or_path))
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "device_map", device_map)
        object.__setattr__(self, "kwargs", dict(kwargs))

    @classmethod
    def of(cls, ref: str | os.PathLike[str] | ModelSpec) -> ModelSpec:
        """`ref` as a spec: a path or hub id takes the decoder-wide loading options."""
        return ref if isinstance(ref, ModelSpec) else cls(ref)

    def key(self) -> tuple[Any, ...]:
        """Identity used to load a model named in several roles only once."""
        return (
            self.name_or_path,
            repr(self.dtype),
            repr(self.device_map),
            tuple(sorted((k, repr(v)) for k, v in self.kwargs.items())),
        )


ModelRef = Union[str, "os.PathLike[str]", ModelSpec, PreTrainedModel, Adapter]
"""A model given by hub id or path, by a `ModelSpec`, as an already loaded model, or (a
behavior's fine-tuned model) as a PEFT `Adapter` on the behavior's reference."""


@dataclass(frozen=True)
class Behavior:
    """One behavior delta: a fine-tuned model and the reference base it was fine-tuned from.

    EFT adds `w * (log p_finetuned - log p_reference)` to the base model's log-probs.
    """

    finetuned: ModelRef
    reference: ModelRef

    @classmethod
    def coerce(cls, name: str, value: Behavior | tuple[ModelRef, ModelRef]) -> Behavior:
        """Accept a Behavior or a (finetuned, reference) pair."""
        if isinstance(value, Behavior):
            return value
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(finetuned=value[0], reference=value[1])
        raise ValueError(
            f"behavior {name!r} must be Behavior(finetuned=..., reference=...) or a "
            f"(finetuned, reference) pair, got {type(value).__name__}"
        )


def load_model(
    spec: ModelSpec, dtype: Any, device_map: Any, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load one causal LM in eval mode, with the spec's overrides over decoder-wide defaults."""
    kwargs = dict(spec.kwargs)
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    model_dtype = spec.dtype if spec.dtype is not None else dtype
    if model_dtype is not None:
        kwargs["dtype"] = model_dtype
    placement = spec.device_map if spec.device_map is not None else device_map
    if placement is not None:
        kwargs["device_map"] = placement
    model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, **kwargs)
    return model.eval()


def load_tokenizer(spec: ModelSpec, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored beside a model (GGUF files carry theirs); the model's own
    `trust_remote_code` (a `ModelSpec` keyword) counts as well as the decoder-wide one."""
    trusted = trust_remote_code or bool(spec.kwargs.get("trust_remote_code", False))
    kwargs: dict[str, Any] = {"trust_remote_code": trusted}
    for key in ("gguf_file", "revision", "subfolder", "token", "cache_dir"):
        if key in spec.kwargs:
            kwargs[key] = spec.kwargs[key]
    return AutoTokenizer.from_pretrained(spec.name_or_path, **kwargs)


def adapter_tokenizer(
    adapter: Adapter, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase | None:
    """The tokenizer an adapter's folder ships (chat adapters often carry their chat
    template), or None when it ships none."""
    source = adapter.source
    if not isinstance(source, str) or not os.path.isfile(
        os.path.join(source, "tokenizer_config.json")
    ):
        return None
    return load_tokenizer(ModelSpec(source), trust_remote_code)


def check_same_vocabulary(
    reference_name: str,
    reference: PreTrainedTokenizerBase,
    other_name: str,
    other: PreTrainedTokenizerBase,
) -> None:
    """Raise ValueError unless both tokenizers map the same token strings to the same ids."""
    vocab_a, vocab_b = reference.get_vocab(), other.get_vocab()
    if vocab_a == vocab_b:
        return
    by_id_a = {i: t for t, i in vocab_a.items()}
    by_id_b = {i: t for t, i in vocab_b.items()}
    for token_id in sorted(set(by_id_a) | set(by_id_b)):
        a, b = by_id_a.get(token_id), by_id_b.get(token_id)
        if a != b:
            raise ValueError(
                f"tokenizers differ: {reference_name!r} and {other_name!r} disagree at token id "
                f"{token_id} ({a!r} vs {b!r}); vocabulary sizes {len(vocab_a)} and "
                f"{len(vocab_b)}. EFT composes per-token log-probs, so every model must share "
                "one tokenizer: use models of one family."
            )


def model_device(model: PreTrainedModel) -> torch.device:
    """The device that receives the model's input ids (its input embeddings' device)."""
    return model.get_input_embeddings().weight.device


def model_context_window(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's config admits, if the config says."""
    return config_context_window(model.config)


def config_context_window(config: PretrainedConfig) -> int | None:
    """The longest sequence a model config admits, if it says."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pick_tokenizer(
    tokenizer_of: Callable[[ModelRef], PreTrainedTokenizerBase | None],
    base: ModelRef,
    behaviors: Sequence[Behavior],
    tokenizer: PreTrainedTokenizerBase | None = None,
    chat_template: str | None = None,
) -> tuple[PreTrainedTokenizerBase, str | None]:
    """The shared tokenizer and chat template of a decoder: `tokenizer` if given, else the
    first among base, fine-tuned and reference models (`tokenizer_of` gives a model's, None
    for a loaded model); the template given, else the first fine-tuned model's that has one,
    else the tokenizer's own. `tokenizer_of` is called only as far as the choice needs."""
    if chat_template is None:
        for behavior in behaviors:
            candidate = tokenizer_of(behavior.finetuned)
            if candidate is not None and getattr(candidate, "chat_template", None):
                chat_template = candidate.chat_template
                break
    if tokenizer is None:
        refs = [base, *(ref for b in behaviors for ref in (b.finetuned, b.reference))]
        tokenizer = next((t for ref in refs if (t := tokenizer_of(ref)) is not None), None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer=... when every model is loaded")
    return tokenizer, chat_template or getattr(tokenizer, "chat_template", None)


@dataclass
class LoadedModels:
    """What `load_models` gives `EFTDecoder`: the models, de-duplicated, and the tokenizer."""

    base: PreTrainedModel
    behaviors: dict[str, tuple[PreTrainedModel, PreTrainedModel]]
    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None


def load_models(
    base: ModelRef,
    behaviors: Mapping[str, Behavior | tuple[ModelRef, ModelRef]] | None,
    dtype: Any = "auto",
    device_map: Any = None,
    *,
    trust_remote_code: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    chat_template: str | None = None,
) -> LoadedModels:
    """Load every model of a decoder once (a model named in several roles is one object),
    pick the shared tokenizer and chat template (`pick_tokenizer`) and check that every
    model's tokenizer maps the same strings to the same ids."""
    coerced = {name: Behavior.coerce(name, b) for name, b in (behaviors or {}).items()}
    loaded: dict[tuple[Any, ...], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
    names: dict[int, str] = {}

    def get(ref: ModelRef) -> tuple[Any, PreTrainedTokenizerBase | None]:
        if isinstance(ref, Adapter):  # loaded onto its reference by the decoder
            return ref, adapter_tokenizer(ref, trust_remote_code)
        if isinstance(ref, PreTrainedModel) or not isinstance(ref, (str, os.PathLike, ModelSpec)):
            return ref, None
        spec = ModelSpec.of(ref)
        if spec.key() not in loaded:
            model = load_model(spec, dtype, device_map, trust_remote_code)
            names[id(model)] = spec.name_or_path
            loaded[spec.key()] = (model, load_tokenizer(spec, trust_remote_code))
        return loaded[spec.key()]

    base_model, _ = get(base)
    pairs = {n: (get(b.finetuned)[0], get(b.reference)[0]) for n, b in coerced.items()}
    tokenizer, chat_template = pick_tokenizer(
        lambda ref: get(ref)[1], base, list(coerced.values()), tokenizer, chat_template
    )
    tokenizers = [(names[id(model)], tok) for model, tok in loaded.values()]
    tokenizers += [
        (str(b.finetuned.source), tok)
        for b in coerced.values()
        if isinstance(b.finetuned, Adapter) and (tok := get(b.finetuned)[1]) is not None
    ]
    for name, other in tokenizers[1:]:
        check_same_vocabulary(*tokenizers[0], name, other)
    return LoadedModels(base_model, pairs, tokenizer, chat_template)


def model_label(model: PreTrainedModel, index: int) -> str:
    """A model's hub id or path where known, else `model<index>`."""
    return (
        getattr(model, "name_or_path", "")
        or getattr(model.config, "_name_or_path", "")
        or f"model{index}"
    )


def check_loaded_models(
    base: Any, behaviors: Mapping[str, Behavior], tokenizer: PreTrainedTokenizerBase | None
) -> PreTrainedTokenizerBase:
    """The tokenizer, once every model is a loaded transformers model that scores every one
    of its tokens; a ValueError naming the model and the fix otherwise."""
    if tokenizer is None:
        raise ValueError(
            "EFTDecoder(...) with loaded models needs tokenizer=...; or use "
            "EFTDecoder.from_pretrained(...), which loads it"
        )
    roles = [("base", base)]
    for name, b in behaviors.items():
        roles += [(f"behavior {name!r} finetuned", b.finetuned)]
        roles += [(f"behavior {name!r} reference", b.reference)]
    for role, model in roles:
        if not isinstance(model, (PreTrainedModel, AdapterView)):
            raise ValueError(
                f"{role} must be a loaded transformers model here, got {type(model).__name__}; "
                "use EFTDecoder.from_pretrained for paths"
            )
    for i, (_, model) in enumerate(roles):
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < len(tokenizer):
            raise ValueError(
                f"model {model_label(model, i)!r} has {rows} output rows but the tokenizer has "
                f"{len(tokenizer)} tokens: it cannot score every token; use the tokenizer "
                "the model was trained with"
            )
    return tokenizer


def smallest_context_window(models: Sequence[PreTrainedModel]) -> int | None:
    """The smallest context window among the models whose config gives one."""
    windows = [w for m in models if (w := model_context_window(m)) is not None]
    return min(windows) if windows else None


def composition_name(base: str, behaviors: Iterable[tuple[str, str, str]]) -> str:
    """`base + chat(ft - ref) + ...` from model names and (behavior, fine-tuned, reference)
    triples; local paths are shortened to their last folder."""

    def short(name: str) -> str:
        return os.path.basename(name.rstrip("/")) if os.path.isabs(name) else name

    parts = [short(base), *(f"{b}({short(ft)} - {short(ref)})" for b, ft, ref in behaviors)]
    return " + ".join(parts)
