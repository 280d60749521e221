"""`LazyDecoder`: an `EFTDecoder` held by its loading arguments and loaded on first use.

The adapters hold one when built from model paths, so building, copying and pickling a
`ChatEFT` or `EFTLLM` stays cheap and loads nothing; the tokenizer alone loads when a prompt
must be rendered or counted before any model is needed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .adapters import Adapter
from .decoder import EFTDecoder
from .loading import (
    Behavior,
    ModelRef,
    ModelSpec,
    adapter_tokenizer,
    composition_name,
    config_context_window,
    load_tokenizer,
    model_label,
    pick_tokenizer,
)
from .prompts import render_chat

__all__ = ["LazyDecoder", "aget_decoder", "get_decoder"]


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
        self._decoder: EFTDecoder | None = None
        self._window: int | object | None = _UNKNOWN  # read from the configs on first use
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._chat_template: str | None = None
        # one lock per load: counting tokens does not wait for the models to load
        self._decoder_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the models are loaded."""
        return self._decoder is not None

    def get(self) -> EFTDecoder:
        """The `EFTDecoder`, loaded on the first call."""
        if self._decoder is None:
            with self._decoder_lock:
                if self._decoder is None:
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
        """The decoder's `model_name` (e.g. `base + chat(ft - ref)`), known without loading:
        before the load it is named from the loading arguments, as the decoder will name it."""
        if self._decoder is not None:
            return self._decoder.model_name
        models = self._models()
        distinct = list(dict.fromkeys(_key(m) for m in models))

        def name(model: ModelSpec | PreTrainedModel | Adapter) -> str:
            if isinstance(model, ModelSpec):
                return model.name_or_path
            if isinstance(model, Adapter):
                source = model.source
                return source if isinstance(source, str) else model.adapter_name
            return model_label(model, distinct.index(_key(model)))

        names = [name(m) for m in models]
        triples = zip(self.load_args["behaviors"], names[1::2], names[2::2], strict=True)
        return composition_name(names[0], triples)

    @property
    def context_window(self) -> int | None:
        """The decoder's `context_window` (the smallest the models admit), known without
        loading: before the load it is read once from the models' configs (`AutoConfig`, a
        few small files, no weights). None when no config states one, or a config cannot be
        read before loading (the load then says why)."""
        if self._decoder is not None:
            return self._decoder.context_window
        if self._window is _UNKNOWN:
            try:
                self._window = self._configured_window()
            except (OSError, ValueError):
                self._window = None  # read once: metadata is read on every prompt packing
        return self._window  # type: ignore[return-value]

    def _models(self) -> list[ModelSpec | PreTrainedModel | Adapter]:
        """The models `from_pretrained` loads, in the decoder's order: the base, then each
        behavior's fine-tuned model (an `Adapter` as given) and reference."""
        args = self.load_args
        behaviors = [Behavior.coerce(n, b) for n, b in args["behaviors"].items()]
        refs = [args["base"], *(r for b in behaviors for r in (b.finetuned, b.reference))]
        return [r if isinstance(r, (PreTrainedModel, Adapter)) else ModelSpec.of(r) for r in refs]

    def _configured_window(self) -> int | None:
        """The smallest window the models' configs state, read with the arguments
        `from_pretrained` gets."""
        trust = bool(self.load_args.get("trust_remote_code", False))
        configs: dict[Any, PretrainedConfig] = {}
        for model in self._models():
            if isinstance(model, Adapter):
                continue  # an adapter keeps its reference's window
            if isinstance(model, PreTrainedModel):
                configs[_key(model)] = model.config
            elif _key(model) not in configs:
                kwargs = {"trust_remote_code": trust, **model.kwargs}
                given = kwargs.pop("config", None)  # from_pretrained(path, config=...) reads it
                configs[_key(model)] = (
                    given
                    if isinstance(given, PretrainedConfig)
                    else AutoConfig.from_pretrained(given or model.name_or_path, **kwargs)
                )
        windows = [config_context_window(c) for c in configs.values()]
        return min((w for w in windows if w is not None), default=None)

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
        return render_chat(tokenizer, template, messages, tools, **template_kwargs)

    def _load_tokenizer(self) -> tuple[PreTrainedTokenizerBase, str | None]:
        """The tokenizer and chat template that `from_pretrained` would pick: the first
        tokenizer among base, fine-tuned and reference models; the template given, else the
        first fine-tuned model's, else the tokenizer's own."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                args = self.load_args
                trust = bool(args.get("trust_remote_code", False))
                found: dict[tuple[Any, ...], PreTrainedTokenizerBase] = {}

                def tokenizer_of(ref: ModelRef) -> PreTrainedTokenizerBase | None:
                    if isinstance(ref, Adapter):
                        return adapter_tokenizer(ref, trust)
                    if isinstance(ref, PreTrainedModel):
                        return None  # a loaded model carries no tokenizer
                    spec = ModelSpec.of(ref)
                    if spec.key() not in found:
                        found[spec.key()] = load_tokenizer(spec, trust)
                    return found[spec.key()]

                behaviors = [Behavior.coerce(n, b) for n, b in args["behaviors"].items()]
                self._tokenizer, self._chat_template = pick_tokenizer(
                    tokenizer_of,
                    args["base"],
                    behaviors,
                    args.get("tokenizer"),
                    args.get("chat_template"),
                )
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


_UNKNOWN = object()


def _key(model: ModelSpec | PreTrainedModel | Adapter) -> Any:
    """One key per distinct model (a spec named twice loads once)."""
    if isinstance(model, ModelSpec):
        return model.key()
    return ("loaded", id(model))


def get_decoder(holder: EFTDecoder | LazyDecoder) -> EFTDecoder:
    """The `EFTDecoder` a holder stands for: an `EFTDecoder` as it is, a `LazyDecoder`
    loaded on first use (what the adapters hold either)."""
    return holder.get() if isinstance(holder, LazyDecoder) else holder


async def aget_decoder(holder: EFTDecoder | LazyDecoder) -> EFTDecoder:
    """`get_decoder` from a coroutine: a first load runs on a worker thread, so it never
    blocks the event loop."""
    if isinstance(holder, LazyDecoder) and not holder.loaded:
        return await asyncio.to_thread(holder.get)
    return get_decoder(holder)
