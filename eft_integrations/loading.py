"""Loading the models of an EFT decoder: specs, de-duplication and tokenizer checks.

A decoder is a base model plus behaviors, each a (fine-tuned, reference) pair. A model named in
several roles (one reference shared by two behaviors) is loaded once and run once per step.
Every model must speak the same tokenizer; embedding matrices padded past the tokenizer's size
are fine, since composition runs over the tokenizer's vocabulary only.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

__all__ = [
    "Behavior",
    "LazyDecoder",
    "ModelRef",
    "ModelSpec",
    "aget_decoder",
    "check_same_vocabulary",
    "get_decoder",
    "load_model",
    "load_tokenizer",
    "model_context_window",
    "model_device",
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

    def key(self) -> tuple[Any, ...]:
        """Identity used to load a model named in several roles only once."""
        return (
            self.name_or_path,
            repr(self.dtype),
            repr(self.device_map),
            tuple(sorted((k, repr(v)) for k, v in self.kwargs.items())),
        )


ModelRef = Union[str, "os.PathLike[str]", ModelSpec, PreTrainedModel]
"""A model given by hub id or path, by a `ModelSpec`, or as an already loaded model."""


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
    """Load the tokenizer stored beside a model (GGUF files carry theirs)."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    for key in ("gguf_file", "revision", "subfolder", "token", "cache_dir"):
        if key in spec.kwargs:
            kwargs[key] = spec.kwargs[key]
    return AutoTokenizer.from_pretrained(spec.name_or_path, **kwargs)


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
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class LazyDecoder:
    """An `EFTDecoder` loaded on first use from the arguments of `EFTDecoder.from_pretrained`.

    Holding one is cheap: nothing loads until `get()` is called (the models load once, in
    whichever thread asks first; others wait for that load). `tokenizer` and `format_chat` load
    the shared tokenizer alone, so prompts can be rendered and tokens counted before any model
    is needed. Copies (`copy.copy`, `copy.deepcopy`) are this same holder, so copies of an
    adapter share one set of models; a pickle keeps only the arguments, and the models load
    again where it is unpickled. Drop every reference and the models are freed.

        lazy = LazyDecoder(base="gpt2-large", behaviors={"chat": ("my/chat", "gpt2")})
        lazy.tokenizer("Hello")      # the tokenizer only
        decoder = lazy.get()         # the EFTDecoder, loaded once
    """

    def __init__(
        self,
        base: ModelRef,
        behaviors: Mapping[str, Behavior | tuple[ModelRef, ModelRef]] | None = None,
        **load_args: Any,
    ) -> None:
        self.load_args: dict[str, Any] = {
            "base": base,
            "behaviors": dict(behaviors or {}),
            **load_args,
        }
        """Keyword arguments for `EFTDecoder.from_pretrained`."""
        self._decoder: Any = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._chat_template: str | None = None
        # one lock per load: counting tokens does not wait for the models to load
        self._decoder_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the models are loaded."""
        return self._decoder is not None

    def get(self) -> Any:
        """The `EFTDecoder`, loaded on the first call."""
        if self._decoder is None:
            with self._decoder_lock:
                if self._decoder is None:
                    from .decoder import EFTDecoder  # here: decoder.py imports this module

                    self._decoder = EFTDecoder.from_pretrained(**self.load_args)
        return self._decoder

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The shared tokenizer: the decoder's once loaded, else loaded alone (no model)."""
        if self._decoder is not None:
            return self._decoder.tokenizer
        return self._load_tokenizer()[0]

    @property
    def behavior_names(self) -> list[str]:
        """The behaviors' names, known without loading a model."""
        if self._decoder is not None:
            return list(self._decoder.behavior_names)
        return list(self.load_args["behaviors"])

    @property
    def model_name(self) -> str:
        """The decoder's `model_name` once loaded; before, the base model's name."""
        if self._decoder is not None:
            return self._decoder.model_name
        return str(self.load_args["base"])

    def format_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """`EFTDecoder.format_chat` (same arguments), without loading a model when none is
        loaded yet."""
        if self._decoder is not None:
            return self._decoder.format_chat(messages, tools=tools, **template_kwargs)
        tokenizer, template = self._load_tokenizer()
        if not template:
            raise ValueError(
                "no chat template: none of the models' tokenizers has one; pass "
                "chat_template=... to EFTDecoder or EFTDecoder.from_pretrained"
            )
        template_kwargs.setdefault("add_generation_prompt", True)
        return tokenizer.apply_chat_template(
            list(messages),
            tools=list(tools) if tools else None,
            chat_template=template,
            tokenize=False,
            **template_kwargs,
        )

    def _load_tokenizer(self) -> tuple[PreTrainedTokenizerBase, str | None]:
        """The tokenizer and chat template that `from_pretrained` would pick: the first
        tokenizer among base, fine-tuned and reference models; the template given, else the
        first fine-tuned model's, else the tokenizer's own."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                args = self.load_args
                trust = bool(args.get("trust_remote_code", False))
                behaviors = [Behavior.coerce(n, b) for n, b in args["behaviors"].items()]
                found: dict[tuple[Any, ...], PreTrainedTokenizerBase] = {}

                def tokenizer_of(ref: ModelRef) -> PreTrainedTokenizerBase | None:
                    if isinstance(ref, PreTrainedModel):
                        return None  # a loaded model carries no tokenizer
                    spec = ref if isinstance(ref, ModelSpec) else ModelSpec(ref)
                    if spec.key() not in found:
                        found[spec.key()] = load_tokenizer(spec, trust)
                    return found[spec.key()]

                template = args.get("chat_template")
                if template is None:
                    for behavior in behaviors:
                        candidate = tokenizer_of(behavior.finetuned)
                        if candidate is not None and getattr(candidate, "chat_template", None):
                            template = candidate.chat_template
                            break
                tokenizer = args.get("tokenizer")
                if tokenizer is None:
                    refs = [args["base"]]
                    refs += [r for b in behaviors for r in (b.finetuned, b.reference)]
                    tokenizer = next((t for r in refs if (t := tokenizer_of(r)) is not None), None)
                if tokenizer is None:
                    raise ValueError("no tokenizer: pass tokenizer=... when every model is loaded")
                self._chat_template = template or getattr(tokenizer, "chat_template", None)
                self._tokenizer = tokenizer
            return self._tokenizer, self._chat_template

    def __copy__(self) -> LazyDecoder:
        return self  # a copy shares the models

    def __deepcopy__(self, memo: dict[int, Any]) -> LazyDecoder:
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"load_args": self.load_args}  # the arguments only: models load again

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["load_args"])  # type: ignore[misc]

    def __repr__(self) -> str:
        base, behaviors = self.load_args["base"], list(self.load_args["behaviors"])
        return f"LazyDecoder(base={base!r}, behaviors={behaviors}, loaded={self.loaded})"


def get_decoder(holder: Any) -> Any:
    """The `EFTDecoder` a holder stands for: an `EFTDecoder` as it is, a `LazyDecoder`
    loaded on first use (what the adapters hold either)."""
    return holder.get() if isinstance(holder, LazyDecoder) else holder


async def aget_decoder(holder: Any) -> Any:
    """`get_decoder` from a coroutine: a first load runs on a worker thread, so it never
    blocks the event loop."""
    if isinstance(holder, LazyDecoder) and not holder.loaded:
        return await asyncio.to_thread(holder.get)
    return get_decoder(holder)
