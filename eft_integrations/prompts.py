"""From a public call to engine requests: chat rendering, prompt encoding, prompt views,
budgets, per-row weights and constraints, validated in the caller's thread.

Everything here raises `EFTRequestError` naming the offending parameter, before the engine sees
the call; the engine only ever receives requests it can run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .constraints import TokenConstraint
from .ensemble import Ensemble
from .errors import EFTRequestError
from .options import OPTION_NAMES, GenerationOptions, WeightsArg, resolve_weights
from .request import Request
from .stopping import RowText

__all__ = ["Call", "Prompt", "PromptEncoder", "RequestBuilder", "as_batch", "render_chat"]

Prompt = str | Sequence[int]
"""A string (tokenized with the shared tokenizer) or token ids (used as given)."""


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str | None,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Messages rendered with `chat_template` (else the tokenizer's own) as a string prompt."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "no chat template: none of the models' tokenizers has one; pass "
            "chat_template=... to EFTDecoder or EFTDecoder.from_pretrained"
        )
    return tokenizer.apply_chat_template(
        list(messages),
        tools=list(tools) if tools else None,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **template_kwargs,
    )


def end_of_turn_tokens(
    tokenizer: PreTrainedTokenizerBase, speakers: Sequence[PreTrainedModel], vocab_size: int
) -> frozenset[int]:
    """EOS of the tokenizer and of the speaking models' generation configs."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for model in speakers:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(e) for e in eos)
    return frozenset(i for i in ids if 0 <= i < vocab_size)


def as_batch(prompt: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
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


def one_prompt(prompt: Prompt, method: str) -> Prompt:
    """`prompt` when it is one prompt; a typed error naming `method` for a list."""
    if not isinstance(prompt, str) and as_batch(prompt)[1]:
        raise EFTRequestError(
            f"{method}() takes one prompt; use generate() for a list", param="prompt"
        )
    return prompt


@dataclass(frozen=True)
class PromptEncoder:
    """Token ids of prompts, checked against the vocabulary and the smallest context window."""

    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    context_window: int | None

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of one prompt; strings get the tokenizer's special tokens unless they
        already start with the BOS text (as chat templates render it)."""
        if isinstance(prompt, str):
            bos = self.tokenizer.bos_token
            add_special = not (bos and prompt.startswith(bos))
            ids = (
                self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
                if prompt
                else []
            )
        else:
            ids = self._checked_ids(prompt, "prompt")
        if not ids:
            raise EFTRequestError("prompt is empty: give some text or token ids", param="prompt")
        if self.context_window is not None and len(ids) > self.context_window:
            raise EFTRequestError(
                f"prompt has {len(ids)} tokens but the smallest context window is "
                f"{self.context_window}; shorten the prompt",
                param="prompt",
                code="context_length_exceeded",
            )
        return ids

    def encode_continuation(
        self, continuation: Prompt, prompt_tokens: int, index: int = 0
    ) -> list[int]:
        """Token ids of a continuation to score after a prompt of `prompt_tokens` tokens:
        strings are tokenized on their own, without special tokens (give token ids to choose
        how a prompt and its continuation split)."""
        if isinstance(continuation, str):
            ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        else:
            ids = self._checked_ids(continuation, "continuation")
        if not ids:
            raise EFTRequestError(
                f"continuation {index} is empty: give some text or token ids to score",
                param="continuation",
            )
        total = prompt_tokens + len(ids)
        if self.context_window is not None and total > self.context_window:
            raise EFTRequestError(
                f"prompt {index} and its continuation have {total} tokens but the smallest "
                f"context window is {self.context_window}; shorten them",
                param="continuation",
                code="context_length_exceeded",
            )
        return ids

    def _checked_ids(self, ids: Sequence[int], param: str) -> list[int]:
        ids = list(ids)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise EFTRequestError(f"a {param} is a string or a list of int token ids", param=param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EFTRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                param=param,
            )
        return ids

    def token_budget(self, prompt_tokens: int, max_new_tokens: int, index: int = 0) -> int:
        """Tokens a prompt of `prompt_tokens` may generate: max_new_tokens, cut to what the
        smallest context window leaves (an error if it leaves nothing)."""
        room = max_new_tokens
        if self.context_window is not None:
            room = min(room, self.context_window - prompt_tokens)
        if room < 1:
            raise EFTRequestError(
                f"prompt {index} has {prompt_tokens} tokens and fills the smallest context "
                f"window ({self.context_window} tokens): no room to generate; shorten the prompt",
                param="prompt",
                code="context_length_exceeded",
            )
        return room


@dataclass(frozen=True)
class Call:
    """One public call's arguments, as the decoder's four entry points take them."""

    prompt: Prompt | Sequence[Prompt]
    weights: WeightsArg
    base_prompt: Prompt | Sequence[Prompt] | None
    constraints: Sequence[TokenConstraint | None] | TokenConstraint | None
    cancel: threading.Event | None
    options: GenerationOptions | None
    option_kwargs: Mapping[str, Any]

    def generation_options(self) -> GenerationOptions:
        """The call's one options object: `options` with the keywords over it."""
        if self.options is None:
            return GenerationOptions.from_kwargs(**self.option_kwargs)
        if not self.option_kwargs:
            return self.options
        fields = {name: getattr(self.options, name) for name in OPTION_NAMES}
        return GenerationOptions.from_kwargs(**{**fields, **self.option_kwargs})


@dataclass(frozen=True)
class PromptViews:
    """A call's prompts as the models read them, with their weights."""

    chat_ids: list[list[int]]
    """What the fine-tuned models read."""
    base_ids: list[list[int]]
    """What the base and the references read (`chat_ids` unless `base_prompt` was given)."""
    weight_rows: list[dict[str, float]]
    weight_tensor: torch.Tensor
    """[B, n_behaviors] float32."""
    is_batch: bool


class RequestBuilder:
    """Turns a call into validated `Request`s for one decoder's engine."""

    def __init__(
        self,
        encoder: PromptEncoder,
        ensemble: Ensemble,
        eos_token_ids: frozenset[int],
        model_names: Sequence[str],
    ) -> None:
        self.encoder = encoder
        self.ensemble = ensemble
        self.eos_token_ids = eos_token_ids
        self.model_names = list(model_names)

    def views(
        self,
        prompt: Prompt | Sequence[Prompt],
        base_prompt: Prompt | Sequence[Prompt] | None,
        weights: WeightsArg,
        default_weights: Mapping[str, float],
    ) -> PromptViews:
        """A call's prompt views and weights, validated."""
        prompts, is_batch = as_batch(prompt)
        chat_ids = [self.encoder.encode(p) for p in prompts]
        base_ids = chat_ids
        if base_prompt is not None:
            base_prompts, _ = as_batch(base_prompt)
            if len(base_prompts) != len(prompts):
                raise EFTRequestError(
                    f"base_prompt has {len(base_prompts)} prompts for {len(prompts)} prompts; "
                    "give one base view per prompt",
                    param="base_prompt",
                )
            base_ids = [self.encoder.encode(p) for p in base_prompts]
            if base_ids != chat_ids:
                self._check_one_view_per_model()
        if not is_batch and isinstance(weights, Sequence) and not isinstance(weights, str):
            raise EFTRequestError("a list of weight dicts needs a list of prompts", param="weights")
        rows, tensor = resolve_weights(weights, default_weights, len(prompts))
        return PromptViews(chat_ids, base_ids, rows, tensor, is_batch)

    def requests(
        self,
        call: Call,
        default_weights: Mapping[str, float],
        *,
        streaming: bool,
        sinks: Callable[[], Callable[[object], None]],
    ) -> tuple[list[Request], bool]:
        """One request per prompt of `call`, each with a sink from `sinks()`."""
        options = call.generation_options()
        options.check_vocabulary(self.encoder.vocab_size)
        views = self.views(call.prompt, call.base_prompt, call.weights, default_weights)
        constraints = _per_row(call.constraints, len(views.chat_ids))
        self._check_speculative(options.speculative_k, constraints)
        requests = []
        for b, (chat, base) in enumerate(zip(views.chat_ids, views.base_ids, strict=True)):
            budget = self.encoder.token_budget(max(len(chat), len(base)), options.max_new_tokens, b)
            constraint = constraints[b] if constraints is not None else None
            row = RowText(
                self.encoder.tokenizer,
                options.stop,
                self.eos_token_ids,
                len(chat),
                budget,
                constraint,
                logprobs=options.logprobs is not None,
            )
            requests.append(
                Request(
                    chat_ids=chat,
                    base_ids=base,
                    weights=views.weight_rows[b],
                    weight_row=views.weight_tensor[b : b + 1],
                    options=options,
                    row=row,
                    sink=sinks(),
                    caller_cancel=call.cancel,
                    streaming=streaming,
                    speculative_k=options.speculative_k,
                    solo=self.ensemble.needs_own_forwards(len(chat), len(base), budget),
                )
            )
        return requests, views.is_batch

    def _check_one_view_per_model(self) -> None:
        """A model that is both a fine-tuned model and a base or reference runs once per
        step, so it cannot read the chat view and the base view at once."""
        both = self.ensemble.models_in_both_views
        if both:
            raise EFTRequestError(
                f"base_prompt gives the base and references a different view, but model "
                f"{self.model_names[both[0]]!r} is a fine-tuned model and a base or reference "
                "at once, and reads one view only; leave base_prompt out, or load a separate "
                "copy of the model for one of its roles",
                param="base_prompt",
            )

    def _check_speculative(
        self, speculative_k: int | None, constraints: Sequence[TokenConstraint | None] | None
    ) -> None:
        if speculative_k is None:
            return
        problem = None
        if not self.ensemble.pairs:
            problem = "drafts with the behaviors' models; this decoder has none"
        elif any(self.ensemble.base == pair.finetuned for pair in self.ensemble.pairs):
            problem = "drafts with the fine-tuned models; the base is one of them here"
        elif constraints is not None and any(c is not None for c in constraints):
            problem = "does not combine with constraints"
        if problem is not None:
            raise EFTRequestError(
                f"speculative decoding {problem}: leave speculative_k=None", param="speculative_k"
            )


def _per_row(
    constraints: Sequence[TokenConstraint | None] | TokenConstraint | None, batch_size: int
) -> list[TokenConstraint | None] | None:
    if constraints is None:
        return None
    if isinstance(constraints, TokenConstraint):
        if batch_size != 1:
            raise EFTRequestError(
                "give one constraint per prompt (a list) for a batch", param="constraints"
            )
        return [constraints]
    constraints = list(constraints)
    if len(constraints) != batch_size:
        raise EFTRequestError(
            f"got {len(constraints)} constraints for {batch_size} prompts", param="constraints"
        )
    return constraints
