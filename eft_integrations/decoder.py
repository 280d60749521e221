"""The EFT decoder: several Hugging Face causal LMs composed per token, with KV caches.

Reference: Mitchell et al., "An Emulator for Fine-Tuning Large Language Models using Small
Language Models", ICLR 2024. Each step composes

    log p_eft = log p_base + sum_b w_b (log p_finetuned_b - log p_reference_b), renormalised

(see `composition.py`). The loop is written as named phases, after gpt-fast:

    prefill       every distinct model reads its own left-padded view of the prompts
    compose       per-model logits -> EFT log-probs [B, V], then constraints
    sample        greedy or seeded sampling after temperature / top-k / top-p
    stop check    end-of-turn tokens, stop strings across token boundaries, length limits
    decode step   the sampled tokens go to every model's KV cache

A model used in several roles (one reference shared by two behaviors) is run once per step.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import secrets
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .async_bridge import iterate_in_thread
from .composition import (
    compose_logprobs,
    finetuning_scale_logprobs,
    sample_tokens,
    sampling_logprobs,
)
from .constraints import TokenConstraint
from .loading import (
    Behavior,
    ModelRef,
    ModelSpec,
    check_same_vocabulary,
    load_model,
    load_tokenizer,
    model_context_window,
    model_device,
)
from .options import (
    GenerationOptions,
    GenerationResult,
    StreamChunk,
    Usage,
    WeightsArg,
    resolve_weights,
)
from .speculative import accept_draft, crop_cache
from .text import CompletionText

__all__ = ["EFTDecoder"]

Prompt = str | Sequence[int]
"""A string (tokenized with the shared tokenizer) or token ids (used as given)."""


@dataclass
class _ModelState:
    """One distinct model's side of a batched decode: its mask, positions and KV cache."""

    attention_mask: torch.Tensor  # [B, L] 1 = real token, 0 = left padding
    next_position: torch.Tensor  # [B] position id of the next token fed
    cache: Any


@dataclass
class _Row:
    """One sequence of the batch: its text, limits and (optional) constraint."""

    text: CompletionText
    prompt_tokens: int
    token_budget: int  # max_new_tokens, cut to what the smallest context window leaves
    constraint: TokenConstraint | None = None
    finish_reason: str | None = None
    new_token_ids: list[int] = field(default_factory=list)  # since the last stream chunk

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EFTDecoder:
    """Decode from a base model plus weighted behavior deltas (emulated fine-tuning).

    Build it with `EFTDecoder.from_pretrained(base=..., behaviors=...)`, or from loaded models:
    `EFTDecoder(base=model, behaviors={"chat": (finetuned_model, reference_model)},
    tokenizer=tok)`. With `behaviors={}` it decodes the base model alone through the same path.
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
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                "EFTDecoder(...) with loaded models needs tokenizer=...; or use "
                "EFTDecoder.from_pretrained(...), which loads it"
            )
        behaviors = {name: Behavior.coerce(name, b) for name, b in (behaviors or {}).items()}
        self.tokenizer = tokenizer
        self._chat_template = chat_template

        # distinct models by identity: a model in several roles is run once per step
        self._models: list[PreTrainedModel] = []
        self._is_finetuned: list[bool] = []

        def index_of(model: Any, role: str, finetuned: bool) -> int:
            if not isinstance(model, PreTrainedModel):
                raise ValueError(
                    f"{role} must be a loaded transformers model here, got "
                    f"{type(model).__name__}; use EFTDecoder.from_pretrained for paths"
                )
            for i, seen in enumerate(self._models):
                if seen is model:
                    self._is_finetuned[i] = self._is_finetuned[i] or finetuned
                    return i
            self._models.append(model.eval())
            self._is_finetuned.append(finetuned)
            return len(self._models) - 1

        self._base = index_of(base, "base", finetuned=False)
        self._pairs: list[tuple[int, int]] = [
            (index_of(b.finetuned, f"behavior {n!r} finetuned", True),
             index_of(b.reference, f"behavior {n!r} reference", False))
            for n, b in behaviors.items()
        ]
        self.behavior_names: list[str] = list(behaviors)
        self.default_weights: dict[str, float] = {n: 1.0 for n in self.behavior_names}
        if default_weights is not None:
            self.default_weights = resolve_weights(default_weights, self.default_weights, 1)[0][0]

        self.vocab_size = len(tokenizer)
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
        self._device = model_device(self._models[self._base])
        self._cache_kwarg = [
            "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
            for m in self._models
        ]
        self._keeps_last_logits = [
            "logits_to_keep" in inspect.signature(m.forward).parameters for m in self._models
        ]
        # one decode at a time: the models' modules are shared between calls
        self._lock = threading.RLock()
        self.forward_calls = 0
        """Model forwards run so far (all models); a model in several roles counts once."""

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
    ) -> EFTDecoder:
        """Load every model with `AutoModelForCausalLM.from_pretrained` and build a decoder.

        Models are hub ids, local paths, `ModelSpec`s (per-model dtype / device_map / kwargs
        such as `gguf_file`) or loaded models. A model named in several roles is loaded once.
        Every model's tokenizer must map the same strings to the same ids (ValueError naming
        the two models and the first differing token otherwise). The chat template comes from
        the first fine-tuned model whose tokenizer has one.
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
            tokenizers += [(names.get(id(ft), "finetuned"), ft_tok),
                           (names.get(id(ref), "reference"), ref_tok)]
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
        names = [os.path.basename(n.rstrip("/")) if os.path.isabs(n) else n
                 for n in self.model_names]
        parts = [names[self._base]]
        parts += [f"{b}({names[f]} - {names[r]})"
                  for b, (f, r) in zip(self.behavior_names, self._pairs, strict=True)]
        return " + ".join(parts)

    def _end_of_turn_tokens(self) -> set[int]:
        """EOS of the tokenizer and of the fine-tuned models' generation configs."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        speakers = [i for i, ft in enumerate(self._is_finetuned) if ft] or [self._base]
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
        if isinstance(prompt, Sequence) and prompt and all(
            isinstance(p, (str, Sequence)) for p in prompt
        ):
            return list(prompt), True
        return [prompt], False  # token ids (or an empty list, rejected by encode)

    def _prepare(
        self,
        prompt: Prompt | Sequence[Prompt],
        base_prompt: Prompt | Sequence[Prompt] | None,
        weights: WeightsArg,
    ) -> tuple[list[list[int]], list[list[int]], list[dict[str, float]], torch.Tensor, bool]:
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
        if not is_batch and isinstance(weights, Sequence) and not isinstance(weights, str):
            raise ValueError("a list of weight dicts needs a list of prompts")
        weight_rows, weight_tensor = resolve_weights(
            weights, self.default_weights, len(prompts)
        )
        return chat_ids, base_ids, weight_rows, weight_tensor.to(self._device), is_batch

    # ------------------------------------------------------------------ phases

    def _forward(self, i: int, state: _ModelState, input_ids: torch.Tensor,
                 position_ids: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """One forward of model i over new tokens; logits of the last `keep` positions
        [B, keep, V] (float32, on the composing device)."""
        model = self._models[i]
        device = model_device(model)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(device),
            "attention_mask": state.attention_mask.to(device),
            "position_ids": position_ids.to(device),
            "use_cache": True,
            self._cache_kwarg[i]: state.cache,
        }
        if self._keeps_last_logits[i]:
            kwargs["logits_to_keep"] = keep
        self.forward_calls += 1
        logits = model(**kwargs).logits[:, -keep:, : self.vocab_size]
        return logits.to(self._device)

    def _feed(self, i: int, state: _ModelState, tokens: torch.Tensor, keep: int = 1
              ) -> torch.Tensor:
        """Append tokens [B, n] to model i's context; logits [B, keep, V] at the last positions."""
        n = tokens.shape[1]
        ones = torch.ones_like(state.attention_mask[:, :1]).expand(-1, n)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=-1)
        offsets = torch.arange(n, device=state.next_position.device)
        positions = state.next_position[:, None] + offsets  # [B, n]
        logits = self._forward(i, state, tokens, positions, keep)
        state.next_position = state.next_position + n
        return logits

    def _rewind(self, state: _ModelState, tokens_to_remove: int) -> None:
        """Forget the last tokens of a context (rejected speculative drafts)."""
        if tokens_to_remove <= 0:
            return
        crop_cache(state.cache, tokens_to_remove)
        state.attention_mask = state.attention_mask[:, :-tokens_to_remove]
        state.next_position = state.next_position - tokens_to_remove

    def _new_cache(self, i: int) -> Any:
        try:
            return DynamicCache(config=self._models[i].config)
        except TypeError:  # transformers < 4.56 builds it without a config
            return DynamicCache()

    def _prefill(
        self, chat_ids: list[list[int]], base_ids: list[list[int]]
    ) -> tuple[list[_ModelState], list[torch.Tensor]]:
        """Every distinct model reads its view of the prompts, left-padded; logits [B, V]."""
        states, logits = [], []
        for i, finetuned in enumerate(self._is_finetuned):
            input_ids, mask = self._left_pad(chat_ids if finetuned else base_ids)
            # positions count real tokens only, so left padding does not shift them
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
            state = _ModelState(mask, mask.sum(-1), self._new_cache(i))
            logits.append(self._forward(i, state, input_ids, positions)[:, -1])
            states.append(state)
        return states, logits

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_token_ids, default=0)
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)  # [B, S]
        mask = torch.zeros((len(sequences), length), dtype=torch.long)  # [B, S]
        for row, seq in enumerate(sequences):
            input_ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq):] = 1
        return input_ids, mask

    def _decode_step(self, states: list[_ModelState], tokens: torch.Tensor) -> list[torch.Tensor]:
        """Feed one token per row [B] to every distinct model; logits [B, V] per model."""
        return [self._feed(i, state, tokens[:, None])[:, -1] for i, state in enumerate(states)]

    def _compose(self, logits: list[torch.Tensor], weights: torch.Tensor,
                 conservative_top_p: float | None) -> torch.Tensor:
        """Per-model logits -> EFT log-probs [B, V]."""
        return compose_logprobs(
            logits[self._base],
            [logits[f] for f, _ in self._pairs],
            [logits[r] for _, r in self._pairs],
            weights,
            conservative_top_p,
        )

    @staticmethod
    def _constrain(logprobs: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Mask tokens each row's constraint forbids, and renormalise."""
        masks = []
        for row in rows:
            mask = None
            if row.constraint is not None and not row.finished:
                mask = row.constraint.allowed_mask(logprobs.shape[-1])
            masks.append(mask)
        if all(m is None for m in masks):
            return logprobs
        allowed = torch.ones_like(logprobs, dtype=torch.bool)
        for b, mask in enumerate(masks):
            if mask is not None:
                allowed[b] = mask.to(device=logprobs.device, dtype=torch.bool)
        return torch.log_softmax(logprobs.masked_fill(~allowed, float("-inf")), dim=-1)

    def _stop_check(self, row: _Row, token: int) -> None:
        """Record one sampled token and decide whether the row is done."""
        row.new_token_ids.append(token)
        if token in self.eos_token_ids:
            row.text.append_end_token(token)
            row.finish_reason = "stop"
            return
        row.text.append(token)
        if row.constraint is not None:
            row.constraint.advance(token)
            if row.constraint.is_finished():
                row.finish_reason = "stop"
        if row.text.stopped:
            row.finish_reason = "stop"
        elif row.finish_reason is None and len(row.text.token_ids) >= row.token_budget:
            row.finish_reason = "length"

    # ------------------------------------------------------------------ the loop

    def _new_rows(
        self,
        chat_ids: list[list[int]],
        base_ids: list[list[int]],
        options: GenerationOptions,
        constraints: Sequence[TokenConstraint | None] | None,
    ) -> list[_Row]:
        if constraints is not None and len(constraints) != len(chat_ids):
            raise ValueError(f"got {len(constraints)} constraints for {len(chat_ids)} prompts")
        rows = []
        for b, (chat, base) in enumerate(zip(chat_ids, base_ids, strict=True)):
            room = options.max_new_tokens
            if self.context_window is not None:
                room = min(room, self.context_window - max(len(chat), len(base)))
            if room < 1:
                raise ValueError(
                    f"prompt {b} fills the smallest context window ({self.context_window} "
                    "tokens): no room to generate; shorten the prompt"
                )
            rows.append(_Row(
                text=CompletionText(self.tokenizer, options.stop),
                prompt_tokens=len(chat),
                token_budget=room,
                constraint=constraints[b] if constraints is not None else None,
            ))
        return rows

    def _check_speculative(self, speculative_k: int | None, rows: list[_Row]) -> None:
        if speculative_k is None:
            return
        if isinstance(speculative_k, bool) or not isinstance(speculative_k, int) \
                or speculative_k < 1:
            raise ValueError(f"speculative_k must be an int >= 1 or None, got {speculative_k!r}")
        if not self._pairs:
            raise ValueError("speculative decoding drafts with the behaviors' models; this "
                             "decoder has none: leave speculative_k=None")
        if any(self._base in pair for pair in self._pairs):
            raise ValueError("speculative decoding needs a base model that is not also a "
                             "fine-tuned or reference model; leave speculative_k=None")
        if len(rows) != 1:
            raise ValueError("speculative decoding takes one prompt at a time; call generate "
                             "per prompt or leave speculative_k=None for a batch")
        if rows[0].constraint is not None:
            raise ValueError("speculative decoding does not combine with constraints; leave "
                             "speculative_k=None")

    def _decode_loop(
        self,
        chat_ids: list[list[int]],
        base_ids: list[list[int]],
        weights: torch.Tensor,
        options: GenerationOptions,
        constraints: Sequence[TokenConstraint | None] | None,
        cancel: threading.Event | None = None,
        speculative_k: int | None = None,
    ) -> Iterator[list[_Row]]:
        """Yield the batch's rows after every step, until all rows finish."""
        rows = self._new_rows(chat_ids, base_ids, options, constraints)
        self._check_speculative(speculative_k, rows)
        generator = torch.Generator(device=self._device)
        generator.manual_seed(options.seed if options.seed is not None else secrets.randbits(63))
        fill_token = min(self.eos_token_ids, default=0)
        with self._lock, torch.inference_mode():
            states, logits = self._prefill(chat_ids, base_ids)
            try:
                if speculative_k is not None:
                    yield from self._speculative_rounds(
                        rows[0], states, logits, weights, options, speculative_k, generator,
                        cancel,
                    )
                    return
                while True:
                    logprobs = self._compose(logits, weights, options.conservative_top_p)
                    logprobs = self._constrain(logprobs, rows)
                    tokens = sample_tokens(
                        logprobs, options.temperature, options.top_k, options.top_p, generator
                    )  # [B]
                    for row, token in zip(rows, tokens.tolist(), strict=True):
                        if not row.finished:
                            self._stop_check(row, token)
                    yield rows
                    if all(r.finished for r in rows) or (cancel is not None and cancel.is_set()):
                        return
                    # finished rows keep decoding a filler token whose output is ignored
                    done = torch.tensor([r.finished for r in rows], device=tokens.device)
                    tokens = tokens.masked_fill(done, fill_token)
                    logits = self._decode_step(states, tokens)
            finally:
                del states, logits  # free the KV caches now, even when the consumer stops

    def _draft_logprobs(self, logits: Mapping[int, torch.Tensor], weights: torch.Tensor
                        ) -> torch.Tensor:
        """The fine-tuning-scale distribution [1, V] from the behaviors' models alone."""
        lp = {i: torch.log_softmax(x.float(), dim=-1) for i, x in logits.items()}
        return finetuning_scale_logprobs(
            [lp[f] for f, _ in self._pairs], [lp[r] for _, r in self._pairs], weights
        )

    def _speculative_rounds(
        self,
        row: _Row,
        states: list[_ModelState],
        logits: list[torch.Tensor],
        weights: torch.Tensor,
        options: GenerationOptions,
        k: int,
        generator: torch.Generator,
        cancel: threading.Event | None,
    ) -> Iterator[list[_Row]]:
        """Draft k tokens with the small models, verify them with one base forward, repeat.

        Invariant between rounds: every small model has read all emitted tokens and holds
        next-position logits; the base has read all but `pending`, which it reads together
        with the next round's drafts (one base forward per round).
        """
        greedy = options.temperature == 0.0

        def transform(lp: torch.Tensor) -> torch.Tensor:
            if greedy:
                return lp
            return sampling_logprobs(lp, options.temperature, options.top_k, options.top_p)

        small = sorted({i for pair in self._pairs for i in pair})
        small_logits = {i: logits[i] for i in small}  # each [1, V]
        base_logits: torch.Tensor | None = logits[self._base]  # valid while nothing is pending
        pending: int | None = None
        while True:
            k_round = max(0, min(k, row.token_budget - len(row.text.token_ids) - 1))
            # draft: the fine-tuning-scale models propose k_round tokens, one at a time
            history = [small_logits]
            drafts: list[int] = []
            draft_lps = []
            for _ in range(k_round):
                q = transform(self._draft_logprobs(history[-1], weights))  # [1, V]
                token = int(sample_tokens(q, 0.0 if greedy else 1.0, generator=generator))
                drafts.append(token)
                draft_lps.append(q[0])
                step = torch.tensor([[token]])
                history.append({i: self._feed(i, states[i], step)[:, -1] for i in small})
            # verify: the base scores pending + drafts in one forward
            base_inputs = ([pending] if pending is not None else []) + drafts
            base_rows = [] if base_logits is None else [base_logits]
            if base_inputs:
                out = self._feed(self._base, states[self._base], torch.tensor([base_inputs]),
                                 keep=len(base_inputs))  # [1, n, V]
                base_rows += [out[:, j] for j in range(out.shape[1])]
            targets = torch.cat([
                transform(compose_logprobs(
                    base_rows[j],
                    [history[j][f] for f, _ in self._pairs],
                    [history[j][r] for _, r in self._pairs],
                    weights,
                    options.conservative_top_p,
                ))
                for j in range(k_round + 1)
            ])  # [k_round + 1, V]
            draft_stack = torch.stack(draft_lps) if draft_lps else targets[:0]
            emitted = accept_draft(targets, draft_stack, drafts, greedy, generator)
            rejected = k_round - (len(emitted) - 1)
            for i in [*small, self._base]:  # roll every context back to the accepted prefix
                self._rewind(states[i], rejected)
            for token in emitted:
                self._stop_check(row, token)
                if row.finished:
                    break
            yield [row]
            if row.finished or (cancel is not None and cancel.is_set()):
                return
            pending = emitted[-1]
            base_logits = None
            step = torch.tensor([[pending]])
            small_logits = {i: self._feed(i, states[i], step)[:, -1] for i in small}

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        weights: WeightsArg = None,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
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
        the same tokens). One prompt at a time, without constraints.
        Setting `cancel` stops decoding after the current token.
        """
        options = GenerationOptions(max_new_tokens, temperature, top_p, top_k,
                                    conservative_top_p, stop or (), seed)
        chat_ids, base_ids, weight_rows, weight_tensor, is_batch = self._prepare(
            prompt, base_prompt, weights
        )
        rows: list[_Row] = []
        for step_rows in self._decode_loop(chat_ids, base_ids, weight_tensor, options,
                                           _per_row(constraints, len(chat_ids)), cancel,
                                           speculative_k):
            rows = step_rows
        results = [
            GenerationResult(
                text=row.text.text,
                token_ids=list(row.text.token_ids),
                finish_reason=row.finish_reason or "stop",
                usage=Usage(row.prompt_tokens, len(row.text.token_ids)),
                weights=w,
            )
            for row, w in zip(rows, weight_rows, strict=True)
        ]
        return results if is_batch else results[0]

    def stream(
        self,
        prompt: Prompt,
        weights: Mapping[str, float] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
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
        chunk carries `finish_reason` and `usage`. Setting `cancel` stops decoding."""
        options = GenerationOptions(max_new_tokens, temperature, top_p, top_k,
                                    conservative_top_p, stop or (), seed)
        if not isinstance(prompt, str) and self._as_batch(prompt)[1]:
            raise ValueError("stream() takes one prompt; use generate() for a list")
        chat_ids, base_ids, _, weight_tensor, _ = self._prepare(prompt, base_prompt, weights)
        loop = self._decode_loop(chat_ids, base_ids, weight_tensor, options,
                                 [constraint] if constraint is not None else None, cancel,
                                 speculative_k)
        with contextlib.closing(loop):
            for (row,) in loop:
                if row.finished:
                    yield StreamChunk(
                        text=row.text.delta(final=True),
                        token_ids=row.new_token_ids,
                        finish_reason=row.finish_reason,
                        usage=Usage(row.prompt_tokens, len(row.text.token_ids)),
                    )
                    return
                piece = row.text.delta()
                if piece:
                    yield StreamChunk(text=piece, token_ids=row.new_token_ids)
                    row.new_token_ids = []
                if cancel is not None and cancel.is_set():
                    return

    async def astream(self, prompt: Prompt, **kwargs: Any) -> AsyncIterator[StreamChunk]:
        """`stream` on a worker thread: the event loop stays free while tokens are decoded.
        Closing or cancelling the consumer stops decoding and frees the caches."""
        async for chunk in iterate_in_thread(
            lambda cancel: self.stream(prompt, cancel=cancel, **kwargs)
        ):
            yield chunk

    async def agenerate(
        self, prompt: Prompt | Sequence[Prompt], **kwargs: Any
    ) -> GenerationResult | list[GenerationResult]:
        """`generate` on a worker thread, so the event loop stays responsive."""
        async for result in iterate_in_thread(
            lambda cancel: iter([self.generate(prompt, cancel=cancel, **kwargs)])
        ):
            return result
        raise RuntimeError("generation produced no result")

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
        chat_ids, base_ids, _, weight_tensor, is_batch = self._prepare(
            prompt, base_prompt, weights
        )
        with self._lock, torch.inference_mode():
            _, logits = self._prefill(chat_ids, base_ids)
            logprobs = self._compose(logits, weight_tensor, conservative_top_p)
        return logprobs if is_batch else logprobs[0]


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
