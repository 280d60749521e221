"""EFTDecoder: the public facade of the EFT engine.

Reference: Mitchell et al., "An Emulator for Fine-Tuning Large Language Models using Small
Language Models", ICLR 2024. Each step composes

    log p_eft = log p_base + sum_b w_b (log p_finetuned_b - log p_reference_b), renormalised

(see `composition.py`). The pieces, each in a module named for it:

    ensemble.py     the distinct models, their roles, one forward per model per step
    kv_state.py     per-model KV cache, mask and positions for the rows in flight
    stopping.py     per-row tokens, text, stop strings, budget, finish reason
    engine.py       the engine loop: schedule -> run the models -> sample -> outputs
    speculative.py  draft, verify, accept, roll back

Every call (`generate`, `stream`, `agenerate`, `astream`, from any thread or coroutine)
becomes a request to the decoder's one engine, which batches concurrent requests step by step.
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .constraints import TokenConstraint
from .engine import Engine
from .ensemble import Ensemble
from .loading import (
    Behavior,
    ModelRef,
    ModelSpec,
    check_same_vocabulary,
    load_model,
    load_tokenizer,
    model_context_window,
)
from .options import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    GenerationOptions,
    GenerationResult,
    ResolvedWeights,
    StreamChunk,
    WeightsArg,
    merge_weights,
    resolve_weights,
)
from .request import Request
from .stopping import RowText

__all__ = ["EFTDecoder"]

Prompt = str | Sequence[int]
"""A string (tokenized with the shared tokenizer) or token ids (used as given)."""


class EFTDecoder:
    """Decode from a base model plus weighted behavior deltas (emulated fine-tuning).

    Build it with `EFTDecoder.from_pretrained(base=..., behaviors=...)`, or from loaded models:
    `EFTDecoder(base=model, behaviors={"chat": (finetuned_model, reference_model)},
    tokenizer=tok)`. With `behaviors={}` it decodes the base model alone through the same path.

    A decoder is an engine: call it from any number of threads and coroutines at once; the
    calls are batched together step by step (`max_batch_size` rows, `max_tokens_in_flight`
    cache positions at most; beyond that requests wait in a FIFO queue). With
    `adaptive_speculation`, speculative requests start at `speculative_k` drafts per round and
    adapt it per row (+2 after full acceptance, -1 after a rejection).
    """

    def __init__(
        self,
        base: PreTrainedModel,
        behaviors: Mapping[str, Behavior | tuple[PreTrainedModel, PreTrainedModel]] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        default_weights: Mapping[str, float] | None = None,
        *,
        chat_template: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
        max_batch_size: int = 32,
        max_tokens_in_flight: int = 131_072,
        adaptive_speculation: bool = True,
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                "EFTDecoder(...) with loaded models needs tokenizer=...; or use "
                "EFTDecoder.from_pretrained(...), which loads it"
            )
        behaviors = {name: Behavior.coerce(name, b) for name, b in (behaviors or {}).items()}
        for name, b in behaviors.items():
            for role, model in (("finetuned", b.finetuned), ("reference", b.reference)):
                _check_loaded(model, f"behavior {name!r} {role}")
        _check_loaded(base, "base")
        self.tokenizer = tokenizer
        self._chat_template = chat_template
        self.vocab_size = len(tokenizer)
        self._ensemble = Ensemble(
            base,
            [(b.finetuned, b.reference) for b in behaviors.values()],
            self.vocab_size,
            pad_id=0,  # set below, once the end-of-turn tokens are known
        )
        self.behavior_names: list[str] = list(behaviors)
        self.default_weights: dict[str, float] = {n: 1.0 for n in self.behavior_names}
        if default_weights is not None:
            self.default_weights = merge_weights(default_weights, self.default_weights)

        for i, model in enumerate(self._models):
            rows = model.get_output_embeddings().weight.shape[0]
            if rows < self.vocab_size:
                raise ValueError(
                    f"model {self.model_names[i]!r} has {rows} output rows but the tokenizer has "
                    f"{self.vocab_size} tokens: it cannot score every token; use the tokenizer "
                    "the model was trained with"
                )
        windows = [w for m in self._models if (w := model_context_window(m)) is not None]
        self.context_window: int | None = min(windows) if windows else None
        self.eos_token_ids = frozenset(
            eos_token_ids if eos_token_ids is not None else self._end_of_turn_tokens()
        )
        pad = tokenizer.pad_token_id
        self._ensemble.pad_id = pad if pad is not None else min(self.eos_token_ids, default=0)
        self.engine = Engine(
            self._ensemble, max_batch_size, max_tokens_in_flight, adaptive_speculation
        )
        """The decode loop every call goes through; `engine.stats` has its diagnostics."""

    # the models are never copied: a deep copy (e.g. of a ChatEFT) shares the decoder
    def __deepcopy__(self, memo: dict[int, Any]) -> EFTDecoder:
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        engine = state.pop("engine")
        state["_engine_limits"] = (
            engine.max_batch_size,
            engine.max_tokens_in_flight,
            engine.adaptive_speculation,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        limits = state.pop("_engine_limits")
        self.__dict__.update(state)
        self.engine = Engine(self._ensemble, *limits)

    @property
    def forward_calls(self) -> int:
        """Model forwards run so far (all models); a model in several roles counts once."""
        return self._ensemble.forward_calls

    @property
    def _models(self) -> list[PreTrainedModel]:
        return self._ensemble.models

    @property
    def _base(self) -> int:
        return self._ensemble.base

    @property
    def _pairs(self) -> list[tuple[int, int]]:
        return self._ensemble.pairs

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        base: ModelRef,
        behaviors: Mapping[str, Behavior | tuple[ModelRef, ModelRef]] | None = None,
        default_weights: Mapping[str, float] | None = None,
        dtype: Any = "auto",
        device_map: Any = None,
        *,
        trust_remote_code: bool = False,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
        max_batch_size: int = 32,
        max_tokens_in_flight: int = 131_072,
        adaptive_speculation: bool = True,
    ) -> EFTDecoder:
        """Load every model with `AutoModelForCausalLM.from_pretrained` and build a decoder.

        Models are hub ids, local paths, `ModelSpec`s (per-model dtype / device_map / kwargs
        such as `gguf_file`) or loaded models. A model named in several roles is loaded once.
        Every model's tokenizer must map the same strings to the same ids (ValueError naming
        the two models and the first differing token otherwise). The chat template comes from
        the first fine-tuned model whose tokenizer has one. `max_batch_size` and
        `max_tokens_in_flight` bound the engine's running batch (see `EFTDecoder`).
        """
        behaviors = {name: Behavior.coerce(name, b) for name, b in (behaviors or {}).items()}
        loaded: dict[tuple[Any, ...], tuple[PreTrainedModel, PreTrainedTokenizerBase | None]] = {}
        names: dict[int, str] = {}

        def get(ref: ModelRef) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
            if isinstance(ref, PreTrainedModel):
                return ref, None
            spec = ref if isinstance(ref, ModelSpec) else ModelSpec(ref)
            if spec.key() not in loaded:
                model = load_model(spec, dtype, device_map, trust_remote_code)
                names[id(model)] = spec.name_or_path
                loaded[spec.key()] = (model, load_tokenizer(spec, trust_remote_code))
            return loaded[spec.key()]

        base_model, base_tok = get(base)
        pairs = {n: (get(b.finetuned), get(b.reference)) for n, b in behaviors.items()}

        tokenizers = [(names.get(id(base_model), "base"), base_tok)]
        for (ft, ft_tok), (ref, ref_tok) in pairs.values():
            tokenizers += [
                (names.get(id(ft), "finetuned"), ft_tok),
                (names.get(id(ref), "reference"), ref_tok),
            ]
        tokenizers = [(n, t) for n, t in tokenizers if t is not None]
        if tokenizer is None:
            if not tokenizers:
                raise ValueError("no tokenizer: pass tokenizer=... when every model is loaded")
            tokenizer = tokenizers[0][1]
        for name, other in tokenizers[1:]:
            check_same_vocabulary(tokenizers[0][0], tokenizers[0][1], name, other)
        if chat_template is None:
            fine_tuned_toks = [t for (_, t), _ in pairs.values() if t is not None]
            for candidate in [*fine_tuned_toks, tokenizer]:
                if getattr(candidate, "chat_template", None):
                    chat_template = candidate.chat_template
                    break
        return cls(
            base=base_model,
            behaviors={n: (ft, ref) for n, ((ft, _), (ref, _)) in pairs.items()},
            tokenizer=tokenizer,
            default_weights=default_weights,
            chat_template=chat_template,
            eos_token_ids=eos_token_ids,
            max_batch_size=max_batch_size,
            max_tokens_in_flight=max_tokens_in_flight,
            adaptive_speculation=adaptive_speculation,
        )

    @property
    def model_names(self) -> list[str]:
        """Names of the distinct models (their hub id or path where known)."""
        return [
            getattr(m, "name_or_path", "") or getattr(m.config, "_name_or_path", "") or f"model{i}"
            for i, m in enumerate(self._models)
        ]

    @property
    def model_name(self) -> str:
        """A readable name for the composition, e.g. `base + chat(ft - ref)`; local paths are
        shortened to their last folder."""
        names = [
            os.path.basename(n.rstrip("/")) if os.path.isabs(n) else n for n in self.model_names
        ]
        parts = [names[self._base]]
        parts += [
            f"{b}({names[f]} - {names[r]})"
            for b, (f, r) in zip(self.behavior_names, self._pairs, strict=True)
        ]
        return " + ".join(parts)

    def _end_of_turn_tokens(self) -> set[int]:
        """EOS of the tokenizer and of the fine-tuned models' generation configs."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        speakers = [i for i, ft in enumerate(self._ensemble.reads_chat_view) if ft] or [self._base]
        for i in speakers:
            config = getattr(self._models[i], "generation_config", None)
            eos = getattr(config, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif eos is not None:
                ids.update(int(e) for e in eos)
        return {i for i in ids if 0 <= i < self.vocab_size}

    # ------------------------------------------------------------------ chat

    def format_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render messages with the fine-tuned model's chat template (a string prompt)."""
        template = self._chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                "no chat template: none of the models' tokenizers has one; pass "
                "chat_template=... to EFTDecoder or EFTDecoder.from_pretrained"
            )
        return self.tokenizer.apply_chat_template(
            list(messages),
            tools=list(tools) if tools else None,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **template_kwargs,
        )

    # ------------------------------------------------------------------ prompts

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of one prompt; strings get the tokenizer's special tokens unless they
        already start with the BOS text (as chat templates render it)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give some text or token ids")
            bos = self.tokenizer.bos_token
            add_special = not (bos and prompt.startswith(bos))
            ids = self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
        else:
            ids = list(prompt)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise ValueError("a prompt is a string or a list of int token ids")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
                )
        if not ids:
            raise ValueError("prompt is empty: give some text or token ids")
        if self.context_window is not None and len(ids) > self.context_window:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the smallest context window is "
                f"{self.context_window}; shorten the prompt"
            )
        return ids

    @staticmethod
    def _as_batch(prompt: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
        """(prompts, is_batch): a str or a flat list of ints is one prompt."""
        if isinstance(prompt, str):
            return [prompt], False
        if (
            isinstance(prompt, Sequence)
            and prompt
            and all(isinstance(p, (str, Sequence)) for p in prompt)
        ):
            return list(prompt), True
        return [prompt], False  # token ids (or an empty list, rejected by encode)

    def _prepare(
        self,
        prompt: Prompt | Sequence[Prompt],
        base_prompt: Prompt | Sequence[Prompt] | None,
        weights: WeightsArg,
    ) -> tuple[list[list[int]], list[list[int]], ResolvedWeights, bool]:
        """(chat view ids, base view ids, weights, is_batch) of a call's prompts, validated."""
        prompts, is_batch = self._as_batch(prompt)
        chat_ids = [self.encode(p) for p in prompts]
        if base_prompt is None:
            base_ids = chat_ids
        else:
            base_prompts, _ = self._as_batch(base_prompt)
            if len(base_prompts) != len(prompts):
                raise ValueError(
                    f"base_prompt has {len(base_prompts)} prompts for {len(prompts)} prompts; "
                    "give one base view per prompt"
                )
            base_ids = [self.encode(p) for p in base_prompts]
            if base_ids != chat_ids:
                self._check_one_view_per_model()
        if not is_batch and isinstance(weights, Sequence) and not isinstance(weights, str):
            raise ValueError("a list of weight dicts needs a list of prompts")
        resolved = resolve_weights(weights, self.default_weights, len(prompts))
        return chat_ids, base_ids, resolved, is_batch

    def _check_one_view_per_model(self) -> None:
        """A model that is both a fine-tuned model and a base or reference runs once per
        step, so it cannot read the chat view and the base view at once."""
        both = self._ensemble.models_in_both_views
        if both:
            name = self.model_names[both[0]]
            raise ValueError(
                f"base_prompt gives the base and references a different view, but model "
                f"{name!r} is a fine-tuned model and a base or reference at once, and reads one "
                "view only; leave base_prompt out, or load a separate copy of the model for "
                "one of its roles"
            )

    def _requests(
        self,
        prompt: Prompt | Sequence[Prompt],
        base_prompt: Prompt | Sequence[Prompt] | None,
        weights: WeightsArg,
        options: GenerationOptions,
        constraints: Sequence[TokenConstraint | None] | None,
        speculative_k: int | None,
        cancel: threading.Event | None,
        streaming: bool,
        sinks: Callable[[], Callable[[object], None]],
    ) -> tuple[list[Request], bool]:
        """Validate a call in the caller's thread and build one request per prompt."""
        chat_ids, base_ids, (weight_rows, weight_tensor), is_batch = self._prepare(
            prompt, base_prompt, weights
        )
        if constraints is not None and len(constraints) != len(chat_ids):
            raise ValueError(f"got {len(constraints)} constraints for {len(chat_ids)} prompts")
        self._check_speculative(speculative_k, constraints)
        requests = []
        for b, (chat, base) in enumerate(zip(chat_ids, base_ids, strict=True)):
            budget = self.token_budget(max(len(chat), len(base)), options.max_new_tokens, b)
            requests.append(
                Request(
                    chat_ids=chat,
                    base_ids=base,
                    weights=weight_rows[b],
                    weight_row=weight_tensor[b : b + 1],
                    options=options,
                    row=RowText(
                        self.tokenizer,
                        options.stop,
                        self.eos_token_ids,
                        len(chat),
                        budget,
                        constraints[b] if constraints is not None else None,
                    ),
                    sink=sinks(),
                    caller_cancel=cancel,
                    streaming=streaming,
                    speculative_k=speculative_k,
                    solo=self._ensemble.needs_own_forwards(len(chat), len(base), budget),
                )
            )
        return requests, is_batch

    def token_budget(self, prompt_tokens: int, max_new_tokens: int, index: int = 0) -> int:
        """Tokens a prompt of `prompt_tokens` may generate: max_new_tokens, cut to what the
        smallest context window leaves (ValueError if it leaves nothing)."""
        room = max_new_tokens
        if self.context_window is not None:
            room = min(room, self.context_window - prompt_tokens)
        if room < 1:
            raise ValueError(
                f"prompt {index} has {prompt_tokens} tokens and fills the smallest context "
                f"window ({self.context_window} tokens): no room to generate; shorten the prompt"
            )
        return room

    def _check_speculative(
        self, speculative_k: int | None, constraints: Sequence[TokenConstraint | None] | None
    ) -> None:
        if speculative_k is None:
            return
        if (
            isinstance(speculative_k, bool)
            or not isinstance(speculative_k, int)
            or speculative_k < 1
        ):
            raise ValueError(f"speculative_k must be an int >= 1 or None, got {speculative_k!r}")
        if not self._pairs:
            raise ValueError(
                "speculative decoding drafts with the behaviors' models; this "
                "decoder has none: leave speculative_k=None"
            )
        if any(self._base == pair.finetuned for pair in self._pairs):
            raise ValueError(
                "speculative decoding drafts with the fine-tuned models; the base "
                "is one of them here: leave speculative_k=None"
            )
        if constraints is not None and any(c is not None for c in constraints):
            raise ValueError(
                "speculative decoding does not combine with constraints; leave speculative_k=None"
            )

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        weights: WeightsArg = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = 1.0,
        top_k: int = 0,
        conservative_top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        speculative_k: int | None = None,
        *,
        base_prompt: Prompt | Sequence[Prompt] | None = None,
        constraints: Sequence[TokenConstraint | None] | TokenConstraint | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult | list[GenerationResult]:
        """Complete one prompt (returns a result) or a list of prompts (a list of results).

        `weights` maps behavior names to floats (names left out take the defaults); with a
        list of prompts it may be a list of dicts, one per prompt. `base_prompt` gives the base
        and reference models a different rendering of the prompt (e.g. plain text while the
        fine-tuned models read the chat template); generated tokens extend every view.
        `constraints` restricts tokens per prompt (see `constraints.TokenConstraint`).
        `speculative_k=k` drafts k tokens per round with the behaviors' (small) models and
        verifies them with one base forward; the output distribution is exactly EFT's (greedy:
        the same tokens). Not with constraints.
        Each prompt is its own request to the engine, batched with every other call running
        now; a seeded or greedy result equals the same call made alone. Setting `cancel`
        (a `threading.Event`, only ever read) stops decoding after the current step.
        """
        arguments = _call_arguments(locals())
        outboxes: list[queue.SimpleQueue[object]] = []
        requests, is_batch = self._start(
            prompt, streaming=False, sinks=lambda: _queue_sink(outboxes), **arguments
        )
        try:
            results = [_result(outbox.get()) for outbox in outboxes]
        finally:
            for request in requests:  # one failed: the others stop too
                request.cancel()
        return results if is_batch else results[0]

    def stream(
        self,
        prompt: Prompt,
        weights: Mapping[str, float] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = 1.0,
        top_k: int = 0,
        conservative_top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        speculative_k: int | None = None,
        *,
        base_prompt: Prompt | None = None,
        constraint: TokenConstraint | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[StreamChunk]:
        """Yield text increments of one completion; they never split a multi-byte character,
        and joined they equal `generate`'s text for the same arguments and seed. The last
        chunk carries `finish_reason`, `usage` and `stats`.

        The stream is a handle on a request: read it from any thread; closing it (or dropping
        it) cancels the request, and leaving it half-read blocks nobody."""
        arguments = _call_arguments(locals())
        outboxes: list[queue.SimpleQueue[object]] = []
        (request,), _ = self._start(
            _one_prompt(prompt, "stream"),
            streaming=True,
            sinks=lambda: _queue_sink(outboxes),
            **arguments,
        )
        try:
            while True:
                chunk = _result(outboxes[0].get())
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            request.cancel()

    async def astream(self, prompt: Prompt, **kwargs: Any) -> AsyncIterator[StreamChunk]:
        """`stream` for asyncio (same arguments): the event loop stays free while tokens are
        decoded, and closing or cancelling the consumer removes the request from the batch."""
        outboxes: list[asyncio.Queue[object]] = []
        (request,), _ = self._start(
            _one_prompt(prompt, "astream"),
            streaming=True,
            sinks=lambda: _loop_sink(outboxes),
            **kwargs,
        )
        try:
            while True:
                chunk = _result(await outboxes[0].get())
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            request.cancel()

    async def agenerate(
        self, prompt: Prompt | Sequence[Prompt], **kwargs: Any
    ) -> GenerationResult | list[GenerationResult]:
        """`generate` for asyncio (same arguments): awaits the engine without blocking the
        event loop; cancelling the task removes its requests from the batch."""
        outboxes: list[asyncio.Queue[object]] = []
        requests, is_batch = self._start(
            prompt, streaming=False, sinks=lambda: _loop_sink(outboxes), **kwargs
        )
        try:
            results = [_result(await outbox.get()) for outbox in outboxes]
        finally:
            for request in requests:
                request.cancel()
        return results if is_batch else results[0]

    def _start(
        self,
        prompt: Prompt | Sequence[Prompt],
        *,
        streaming: bool,
        sinks: Callable[[], Callable[[object], None]],
        weights: WeightsArg = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = 1.0,
        top_k: int = 0,
        conservative_top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        speculative_k: int | None = None,
        base_prompt: Prompt | Sequence[Prompt] | None = None,
        constraints: Sequence[TokenConstraint | None] | TokenConstraint | None = None,
        constraint: TokenConstraint | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[list[Request], bool]:
        """Validate a call (in the caller's thread) and submit its requests to the engine."""
        options = GenerationOptions(
            max_new_tokens, temperature, top_p, top_k, conservative_top_p, stop or (), seed
        )
        if constraint is not None:
            constraints = [constraint]
        requests, is_batch = self._requests(
            prompt,
            base_prompt,
            weights,
            options,
            _per_row(constraints, len(self._as_batch(prompt)[0])),
            speculative_k,
            cancel,
            streaming=streaming,
            sinks=sinks,
        )
        for request in requests:
            self.engine.submit(request)
        return requests, is_batch

    def next_token_logprobs(
        self,
        prompt: Prompt | Sequence[Prompt],
        weights: WeightsArg = None,
        conservative_top_p: float | None = None,
        *,
        base_prompt: Prompt | Sequence[Prompt] | None = None,
    ) -> torch.Tensor:
        """Composed next-token log-probs: [V] for one prompt, [B, V] for a list."""
        if conservative_top_p is not None:
            GenerationOptions(conservative_top_p=conservative_top_p)  # validates it
        chat_ids, base_ids, resolved, is_batch = self._prepare(prompt, base_prompt, weights)
        weight_tensor = resolved.tensor

        def compose() -> torch.Tensor:
            _, logits = self._ensemble.prefill(chat_ids, base_ids, [1] * len(chat_ids))
            return self._ensemble.compose(
                logits,
                weight_tensor.to(self._ensemble.device),
                [conservative_top_p] * len(chat_ids),
            )

        logprobs = self.engine.call(compose).clone()  # a normal tensor, not an inference one
        return logprobs if is_batch else logprobs[0]


def _check_loaded(model: Any, role: str) -> None:
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"{role} must be a loaded transformers model here, got {type(model).__name__}; "
            "use EFTDecoder.from_pretrained for paths"
        )


def _call_arguments(local_names: dict[str, Any]) -> dict[str, Any]:
    """A public method's own keyword arguments (its `locals()` on entry), for `_start`."""
    return {k: v for k, v in local_names.items() if k not in ("self", "prompt")}


def _one_prompt(prompt: Prompt, method: str) -> Prompt:
    if not isinstance(prompt, str) and EFTDecoder._as_batch(prompt)[1]:
        raise ValueError(f"{method}() takes one prompt; use generate() for a list")
    return prompt


def _queue_sink(outboxes: list[queue.SimpleQueue[object]]) -> Callable[[object], None]:
    """A new outbox for a request read by a blocking caller; its `put` is the sink."""
    outboxes.append(queue.SimpleQueue())
    return outboxes[-1].put


def _loop_sink(outboxes: list[asyncio.Queue[object]]) -> Callable[[object], None]:
    """A new outbox for a request awaited on this event loop; the sink hands items from the
    engine thread to it through the loop's mailbox."""
    loop = asyncio.get_running_loop()
    mailbox = _MAILBOXES.get(loop)
    if mailbox is None:
        mailbox = _MAILBOXES[loop] = _LoopMailbox(loop)
    outboxes.append(asyncio.Queue())
    return functools.partial(mailbox.put, outboxes[-1])


class _LoopMailbox:
    """Items from the engine thread for one event loop's outboxes. A step's items for every
    request awaited on the loop arrive with ONE wake-up of the loop (`call_soon_threadsafe`
    writes to the loop's self-pipe), not one per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: list[tuple[asyncio.Queue[object], object]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, outbox: asyncio.Queue[object], item: object) -> None:
        with self._lock:
            self._items.append((outbox, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is waiting
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for outbox, item in items:
            outbox.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopMailbox] = (
    weakref.WeakKeyDictionary()
)


def _result(item: object) -> Any:
    """An outbox item: a StreamChunk or GenerationResult, or the request's error, raised."""
    if isinstance(item, BaseException):
        raise item
    return item


def _per_row(
    constraints: Sequence[TokenConstraint | None] | TokenConstraint | None, batch_size: int
) -> list[TokenConstraint | None] | None:
    if constraints is None:
        return None
    if isinstance(constraints, TokenConstraint):
        if batch_size != 1:
            raise ValueError("give one constraint per prompt (a list) for a batch")
        return [constraints]
    return list(constraints)
