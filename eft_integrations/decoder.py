"""EFTDecoder: the public facade of the EFT engine.

Reference: Mitchell et al., "An Emulator for Fine-Tuning Large Language Models using Small
Language Models", ICLR 2024. Each step composes

    log p_eft = log p_base + sum_b w_b (log p_finetuned_b - log p_reference_b), renormalised

(see `composition.py`). The facade only wires the rooms together: `loading.py` loads the
models, `prompts.py` turns a call into validated requests, `engine.py` batches every request
of every caller step by step, and `outboxes.py` hands chunks and results back to the caller's
thread or event loop.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, TypedDict, Unpack

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .adapters import with_adapter_views
from .composition import finite_rows
from .constraints import TokenConstraint
from .engine import DEFAULT_PREFILL_CHUNK, Engine
from .ensemble import Ensemble
from .errors import EFTRequestError
from .loading import (
    Behavior,
    ModelRef,
    check_loaded_models,
    composition_name,
    load_models,
    model_label,
    smallest_context_window,
)
from .logprobs import continuation_score
from .options import (
    ContinuationScore,
    GenerationKwargs,
    GenerationOptions,
    GenerationResult,
    StreamChunk,
    WeightsArg,
    merge_weights,
)
from .outboxes import loop_sink, queue_sink, unwrap
from .prompts import (
    Call,
    Prompt,
    PromptEncoder,
    RequestBuilder,
    as_batch,
    end_of_turn_tokens,
    one_prompt,
    render_chat,
)
from .request import Request

__all__ = ["SCORE_CHUNK_TOKENS", "EFTDecoder", "Prompt", "token_chunks"]

SCORE_CHUNK_TOKENS = 8192
"""Tokens (prompt and continuation) `score` reads per engine task; decode steps of running
requests run between its tasks."""


def token_chunks(sizes: Sequence[int], most: int) -> list[list[int]]:
    """Consecutive indices of `sizes`, grouped so each group's sizes sum to at most `most`
    (an item larger than `most` is a group of its own)."""
    chunks: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if not chunks or total + size > most:
            chunks.append([])
            total = 0
        chunks[-1].append(index)
        total += size
    return chunks


class EngineArgs(TypedDict, total=False):
    """The engine's keyword arguments of `EFTDecoder` (and `from_pretrained`)."""

    eos_token_ids: Sequence[int] | None
    max_batch_size: int
    max_tokens_in_flight: int
    adaptive_speculation: bool
    kv_cache_tokens: int | None
    prefill_chunk: int | None
    prefix_caching: bool
    kv_block_size: int
    compile: bool | str


Constraints = Sequence[TokenConstraint | None] | TokenConstraint | None
"""One constraint per prompt (a list), or one constraint for a single prompt."""


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

    KV memory (see `kv_memory.py`): each model keeps its cache in blocks within a budget of
    `kv_cache_tokens` tokens (default: `max_tokens_in_flight`, or on CUDA what 80% of the
    free memory holds); with `prefix_caching`, prompts that start like an earlier one (a
    chat's next turn, an agent's next call) reuse its cached prefix in every model and
    compute only the rest (`GenerationResult.usage.cached_tokens`); prompts longer than
    `prefill_chunk` tokens are read chunk by chunk between decode steps (None: at once).
    Blocks hold `kv_block_size` tokens; only whole blocks are shared between prompts.
    With `compile` (True, or a torch.compile mode such as "reduce-overhead" for CUDA
    graphs), decode forwards run with bucketed shapes through `torch.compile`; prefills stay
    eager. Eager is the default.
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
        kv_cache_tokens: int | None = None,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
        prefix_caching: bool = True,
        kv_block_size: int = 16,
        compile: bool | str = False,
    ) -> None:
        behaviors = {name: Behavior.coerce(name, b) for name, b in (behaviors or {}).items()}
        base, behaviors = with_adapter_views(base, behaviors)  # adapters -> views of a backbone
        tokenizer = check_loaded_models(base, behaviors, tokenizer)
        self.tokenizer = tokenizer
        self._chat_template = chat_template
        self.vocab_size = len(tokenizer)
        speakers = [b.finetuned for b in behaviors.values()] or [base]
        self.eos_token_ids = frozenset(
            end_of_turn_tokens(tokenizer, speakers, self.vocab_size)
            if eos_token_ids is None
            else eos_token_ids
        )
        pad = tokenizer.pad_token_id
        pairs = [(b.finetuned, b.reference) for b in behaviors.values()]
        pad = pad if pad is not None else min(self.eos_token_ids, default=0)
        self._ensemble = Ensemble(base, pairs, self.vocab_size, pad_id=pad)
        self.behavior_names: list[str] = list(behaviors)
        self.default_weights = merge_weights(default_weights, dict.fromkeys(behaviors, 1.0))
        self.context_window: int | None = smallest_context_window(self._models)
        self.engine = Engine(
            self._ensemble,
            max_batch_size,
            max_tokens_in_flight,
            adaptive_speculation,
            kv_cache_tokens=kv_cache_tokens,
            prefill_chunk=prefill_chunk,
            prefix_caching=prefix_caching,
            block_size=kv_block_size,
            compile=compile,
        )
        """The decode loop every call goes through; `engine.stats` has its diagnostics."""
        self._builder = RequestBuilder(
            PromptEncoder(tokenizer, self.vocab_size, self.context_window),
            self._ensemble,
            self.eos_token_ids,
            self.model_names,
        )

    # the models are never copied: a deep copy (e.g. of a ChatEFT) shares the decoder
    def __deepcopy__(self, memo: dict[int, Any]) -> EFTDecoder:
        return self

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
        **engine_args: Unpack[EngineArgs],
    ) -> EFTDecoder:
        """Load every model with `AutoModelForCausalLM.from_pretrained` and build a decoder.

        Models are hub ids, local paths, `ModelSpec`s (per-model dtype / device_map / kwargs
        such as `gguf_file`) or loaded models. A model named in several roles is loaded once.
        Every model's tokenizer must map the same strings to the same ids (ValueError naming
        the two models and the first differing token otherwise). The chat template comes from
        the first fine-tuned model whose tokenizer has one. `engine_args` are the keyword-only
        arguments of `EFTDecoder` (`eos_token_ids`, `max_batch_size`, `max_tokens_in_flight`,
        `adaptive_speculation`, `kv_cache_tokens`, `prefill_chunk`, `prefix_caching`,
        `kv_block_size`, `compile`).
        """
        loaded = load_models(
            base,
            behaviors,
            dtype,
            device_map,
            trust_remote_code=trust_remote_code,
            tokenizer=tokenizer,
            chat_template=chat_template,
        )
        return cls(
            loaded.base,
            loaded.behaviors,
            loaded.tokenizer,
            default_weights,
            chat_template=loaded.chat_template,
            **engine_args,
        )

    # ------------------------------------------------------------------ what it is

    @property
    def forward_calls(self) -> int:
        """Model forwards run so far (all models); a model in several roles counts once."""
        return self._ensemble.forward_calls

    @property
    def _models(self) -> list[PreTrainedModel]:
        return self._ensemble.models

    @property
    def model_names(self) -> list[str]:
        """Names of the distinct models (their hub id or path where known)."""
        return [model_label(m, i) for i, m in enumerate(self._models)]

    @property
    def model_name(self) -> str:
        """A readable name for the composition, e.g. `base + chat(ft - ref)`; local paths are
        shortened to their last folder."""
        names = self.model_names
        pairs = zip(self.behavior_names, self._ensemble.pairs, strict=True)
        triples = [(b, names[ft], names[ref]) for b, (ft, ref) in pairs]
        return composition_name(names[self._ensemble.base], triples)

    # ------------------------------------------------------------------ prompts

    def format_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render messages with the fine-tuned model's chat template (a string prompt)."""
        return render_chat(
            self.tokenizer,
            self._chat_template,
            messages,
            tools,
            add_generation_prompt,
            **template_kwargs,
        )

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of one prompt; strings get the tokenizer's special tokens unless they
        already start with the BOS text (as chat templates render it)."""
        return self._builder.encoder.encode(prompt)

    def token_budget(self, prompt_tokens: int, max_new_tokens: int, index: int = 0) -> int:
        """Tokens a prompt of `prompt_tokens` may generate: max_new_tokens, cut to what the
        smallest context window leaves (an `EFTRequestError` if it leaves nothing)."""
        return self._builder.encoder.token_budget(prompt_tokens, max_new_tokens, index)

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        weights: WeightsArg = None,
        *,
        base_prompt: Prompt | Sequence[Prompt] | None = None,
        constraints: Constraints = None,
        cancel: threading.Event | None = None,
        options: GenerationOptions | None = None,
        **option_kwargs: Unpack[GenerationKwargs],
    ) -> GenerationResult | list[GenerationResult]:
        """Complete one prompt (returns a result) or a list of prompts (a list of results).

        `weights` maps behavior names to floats (names left out take the defaults); with a
        list of prompts it may be a list of dicts, one per prompt. How to decode is one
        `GenerationOptions`: pass it as `options=`, or its fields as keywords (keywords
        override `options`; see `GenerationOptions` for each). `base_prompt` gives the base and
        reference models a different rendering of the prompt (e.g. plain text while the
        fine-tuned models read the chat template); generated tokens extend every view.
        `constraints` restricts tokens per prompt (see `constraints.TokenConstraint`).
        `speculative_k=k` drafts k tokens per round with the behaviors' (small) models and
        verifies them with one base forward; the output distribution is exactly EFT's.
        Each prompt is its own request to the engine, batched with every other call running
        now; a seeded or greedy result equals the same call made alone. Setting `cancel`
        (a `threading.Event`, only ever read) stops decoding after the current step.
        """
        outboxes: list[queue.SimpleQueue[object]] = []
        call = Call(prompt, weights, base_prompt, constraints, cancel, options, option_kwargs)
        requests, is_batch = self._start(call, streaming=False, sinks=lambda: queue_sink(outboxes))
        try:
            results = [unwrap(outbox.get()) for outbox in outboxes]
        finally:
            for request in requests:  # one failed: the others stop too
                request.cancel()
        return results if is_batch else results[0]

    async def agenerate(
        self,
        prompt: Prompt | Sequence[Prompt],
        weights: WeightsArg = None,
        *,
        base_prompt: Prompt | Sequence[Prompt] | None = None,
        constraints: Constraints = None,
        cancel: threading.Event | None = None,
        options: GenerationOptions | None = None,
        **option_kwargs: Unpack[GenerationKwargs],
    ) -> GenerationResult | list[GenerationResult]:
        """`generate` for asyncio (same arguments): awaits the engine without blocking the
        event loop; cancelling the task removes its requests from the batch."""
        outboxes: list[asyncio.Queue[object]] = []
        call = Call(prompt, weights, base_prompt, constraints, cancel, options, option_kwargs)
        requests, is_batch = self._start(call, streaming=False, sinks=lambda: loop_sink(outboxes))
        try:
            results = [unwrap(await outbox.get()) for outbox in outboxes]
        finally:
            for request in requests:
                request.cancel()
        return results if is_batch else results[0]

    def stream(
        self,
        prompt: Prompt,
        weights: Mapping[str, float] | None = None,
        *,
        base_prompt: Prompt | None = None,
        constraint: TokenConstraint | None = None,
        cancel: threading.Event | None = None,
        options: GenerationOptions | None = None,
        **option_kwargs: Unpack[GenerationKwargs],
    ) -> Iterator[StreamChunk]:
        """Yield text increments of one completion (the arguments of `generate`, with one
        `constraint`); they never split a multi-byte character, and joined they equal
        `generate`'s text for the same arguments and seed. The last chunk carries
        `finish_reason`, `usage` and `stats`.

        The stream is a handle on a request: read it from any thread; closing it (or dropping
        it) cancels the request, and leaving it half-read blocks nobody."""
        outboxes: list[queue.SimpleQueue[object]] = []
        prompt = one_prompt(prompt, "stream")
        call = Call(prompt, weights, base_prompt, constraint, cancel, options, option_kwargs)
        (request,), _ = self._start(call, streaming=True, sinks=lambda: queue_sink(outboxes))
        try:
            while (chunk := unwrap(outboxes[0].get())).finish_reason is None:
                yield chunk
            yield chunk
        finally:
            request.cancel()

    async def astream(
        self,
        prompt: Prompt,
        weights: Mapping[str, float] | None = None,
        *,
        base_prompt: Prompt | None = None,
        constraint: TokenConstraint | None = None,
        cancel: threading.Event | None = None,
        options: GenerationOptions | None = None,
        **option_kwargs: Unpack[GenerationKwargs],
    ) -> AsyncIterator[StreamChunk]:
        """`stream` for asyncio (same arguments): the event loop stays free while tokens are
        decoded, and closing or cancelling the consumer removes the request from the batch."""
        outboxes: list[asyncio.Queue[object]] = []
        prompt = one_prompt(prompt, "astream")
        call = Call(prompt, weights, base_prompt, constraint, cancel, options, option_kwargs)
        (request,), _ = self._start(call, streaming=True, sinks=lambda: loop_sink(outboxes))
        try:
            while (chunk := unwrap(await outboxes[0].get())).finish_reason is None:
                yield chunk
            yield chunk
        finally:
            request.cancel()

    def _start(
        self, call: Call, *, streaming: bool, sinks: Callable[[], Callable[[object], None]]
    ) -> tuple[list[Request], bool]:
        """Validate a call (in the caller's thread) and submit its requests together."""
        requests, is_batch = self._builder.requests(
            call, self.default_weights, streaming=streaming, sinks=sinks
        )
        self.engine.submit(*requests)
        return requests, is_batch

    def score(
        self,
        prompt: Prompt | Sequence[Prompt],
        continuation: Prompt | Sequence[Prompt],
        weights: WeightsArg = None,
        *,
        base_prompt: Prompt | Sequence[Prompt] | None = None,
        top_logprobs: int = 0,
        conservative_top_p: float | None = None,
    ) -> ContinuationScore | list[ContinuationScore]:
        """How likely `continuation` is after `prompt` under the composed EFT distribution at
        `weights`: its per-token log-probs, whether each token is the greedy choice, and
        with `top_logprobs=k` the k most likely tokens at each position (a list of prompts
        takes a list of continuations, and gives a list of scores).

        Teacher forcing: every model reads each prompt view plus its continuation in one
        forward, batched, and nothing stays in the cache. A string continuation is tokenized
        on its own, without special tokens; give token ids to choose how a prompt and its
        continuation split (as lm-evaluation-harness does). The log-probs are those decoding
        would report (`GenerationOptions.logprobs`): before logit_bias, penalties,
        temperature, top-k and top-p.
        """
        GenerationOptions(logprobs=top_logprobs, conservative_top_p=conservative_top_p)
        views = self._builder.views(prompt, base_prompt, weights, self.default_weights)
        continuations, is_batch = as_batch(continuation)
        if is_batch != views.is_batch or len(continuations) != len(views.chat_ids):
            raise EFTRequestError(
                f"{len(continuations)} continuation(s) for {len(views.chat_ids)} prompt(s): "
                "give one continuation per prompt (a list of continuations for a list of "
                "prompts)",
                param="continuation",
            )
        encoder = self._builder.encoder
        conts = [
            encoder.encode_continuation(c, max(len(chat), len(base)), b)
            for b, (c, chat, base) in enumerate(
                zip(continuations, views.chat_ids, views.base_ids, strict=True)
            )
        ]

        def run(rows: list[int]) -> list[ContinuationScore]:
            composed = self._ensemble.score_continuations(
                [views.chat_ids[b] for b in rows],
                [views.base_ids[b] for b in rows],
                [conts[b] for b in rows],
                views.weight_tensor[rows],
                conservative_top_p,
            )
            finite = torch.stack([finite_rows(lp).all() for lp in composed]).tolist()  # 1 sync
            for b, ok in zip(rows, finite, strict=True):
                if not ok:
                    raise EFTRequestError(
                        f"the EFT distribution is not finite along continuation {b} (weights "
                        f"{views.weight_rows[b]}): the weights overflow float32 when multiplied "
                        "by the models' log-prob deltas; use smaller weights",
                        param="weights",
                    )
            return [
                continuation_score(logprobs, conts[b], top_logprobs)
                for logprobs, b in zip(composed, rows, strict=True)
            ]

        # chunks of at most SCORE_CHUNK_TOKENS: the engine decodes its running rows between
        # them, so a large scoring call (an lm-eval task) never holds generation for long
        sizes = [
            len(c) + max(len(a), len(b))
            for c, a, b in zip(conts, views.chat_ids, views.base_ids, strict=True)
        ]
        scores: list[ContinuationScore] = []
        for rows in token_chunks(sizes, SCORE_CHUNK_TOKENS):
            scores += self.engine.call(functools.partial(run, rows))
        return scores if is_batch else scores[0]

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
        views = self._builder.views(prompt, base_prompt, weights, self.default_weights)
        args = (
            self.engine.memory,
            views.chat_ids,
            views.base_ids,
            views.weight_tensor,
            conservative_top_p,
        )
        # cloned: a normal tensor for the caller, not an inference-mode one
        logprobs = self.engine.call(lambda: self._ensemble.score_prompts(*args)).clone()
        return logprobs if views.is_batch else logprobs[0]
