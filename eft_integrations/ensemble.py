"""The distinct models of an EFT decoder, their roles, and one forward per model per step.

A model used in several roles (one reference shared by two behaviors) appears once and runs
once per step. Fine-tuned models read the chat view of a prompt; the base and the references
read the base view (see `EFTDecoder.generate(base_prompt=...)`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from transformers import PreTrainedModel

from .adapters import AdapterView, call_backbone
from .composition import compose_logprobs
from .kv_state import KVState
from .loading import model_device
from .paged_cache import GroupedCache

if TYPE_CHECKING:
    from .kv_memory import KVMemory

__all__ = ["BehaviorPair", "Ensemble"]


class BehaviorPair(NamedTuple):
    """Indices of one behavior's models in `Ensemble.models`."""

    finetuned: int
    reference: int


class Ensemble:
    """Distinct models with their roles; runs forwards and composes their logits."""

    def __init__(
        self,
        base: PreTrainedModel,
        pairs: Sequence[tuple[PreTrainedModel, PreTrainedModel]],
        vocab_size: int,
        pad_id: int,
    ) -> None:
        self.models: list[PreTrainedModel] = []
        self.reads_chat_view: list[bool] = []  # fine-tuned models read the chat view
        self.reads_base_view: list[bool] = []  # the base and the references read the base view
        self.base = self._index_of(base, finetuned=False)
        self.pairs = [
            BehaviorPair(self._index_of(ft, finetuned=True), self._index_of(ref, finetuned=False))
            for ft, ref in pairs
        ]
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.device = model_device(self.models[self.base])  # where composition runs
        self.devices = [model_device(m) for m in self.models]
        # transformers 5.24 renamed `past_key_values` to `cache` on some models
        self._cache_kwarg = [
            "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
            for m in self.models
        ]
        self._keeps_last_logits = [
            "logits_to_keep" in inspect.signature(m.forward).parameters for m in self.models
        ]
        self._rope_thresholds = [_rope_threshold(m.config) for m in self.models]
        self._compiled: list[Any] = []  # see `compile`
        self.view_groups = _view_groups(self.models)
        """Indices of the adapter views of one backbone (two or more): one decode forward
        for them all (see `step`)."""
        self.forward_calls = 0
        """Model forwards run so far (all models); a model in several roles counts once."""

    def compile(self, mode: str | None = None) -> None:
        """Run the token-feeding forwards (decode, drafts, verification; their shapes are
        bucketed, see `KVState.static`) through `torch.compile`; prefills stay eager.
        `mode` is torch.compile's ("reduce-overhead" captures CUDA graphs)."""
        # one compiled graph per shape bucket and model: allow more than dynamo's default 8
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 64))
        self._compiled = [torch.compile(m, mode=mode, dynamic=False) for m in self.models]

    def _index_of(self, model: PreTrainedModel, finetuned: bool) -> int:
        for i, seen in enumerate(self.models):
            if seen is model:
                self.reads_chat_view[i] = self.reads_chat_view[i] or finetuned
                self.reads_base_view[i] = self.reads_base_view[i] or not finetuned
                return i
        self.models.append(model.eval())
        self.reads_chat_view.append(finetuned)
        self.reads_base_view.append(not finetuned)
        return len(self.models) - 1

    @property
    def models_in_both_views(self) -> list[int]:
        """Models that are a fine-tuned model (chat view) and a base or reference (base
        view) at once: they run once per step, so they can read only one view."""
        both = zip(self.reads_chat_view, self.reads_base_view, strict=True)
        return [i for i, (chat, base) in enumerate(both) if chat and base]

    def needs_own_forwards(self, chat_length: int, base_length: int, budget: int) -> bool:
        """Whether a row may reach a position where a model's RoPE changes for the whole
        forward (longrope and dynamic scaling pick their frequencies from the forward's
        largest position): such a row must not share forwards with others, or its batch-mates'
        outputs would depend on it."""
        for i, limit in enumerate(self._rope_thresholds):
            if limit is None:
                continue
            length = chat_length if self.reads_chat_view[i] else base_length
            if length + budget > limit:
                return True
        return False

    @property
    def drafting_models(self) -> list[int]:
        """The models that draft in speculative decoding: the behaviors' fine-tuned models."""
        return sorted({pair.finetuned for pair in self.pairs})

    @property
    def scoring_models(self) -> list[int]:
        """The models that score drafts in parallel: the base and the references."""
        drafting = set(self.drafting_models)
        return [i for i in range(len(self.models)) if i not in drafting]

    # ------------------------------------------------------------------ forwards

    def forward(
        self,
        i: int,
        state: KVState,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        keep: int = 1,
    ) -> torch.Tensor:
        """One forward of model i over new tokens [B, n] already counted in `state`'s mask;
        float logits of the last `keep` positions [B, keep, V] on the composing device."""
        device = self.devices[i]
        plan = state.cache.plan
        assert plan is not None  # `state` planned this forward
        rows = input_ids.shape[0]
        if plan.batch > rows:  # a bucketed forward: padding rows read the padding block
            input_ids = torch.cat(
                [
                    input_ids,
                    input_ids.new_full((plan.batch - rows, input_ids.shape[1]), self.pad_id),
                ]
            )
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(device, non_blocking=True),
            "attention_mask": state.attention_mask if state.padded else None,
            "position_ids": position_ids,
            "use_cache": True,
            self._cache_kwarg[i]: state.cache,
        }
        if self._keeps_last_logits[i]:
            kwargs["logits_to_keep"] = keep
        self.forward_calls += 1
        model = self._compiled[i] if plan.bucketed and self._compiled else self.models[i]
        logits = model(**kwargs).logits[:rows, -keep:, : self.vocab_size]
        state.commit()
        return logits.to(self.device, non_blocking=True)

    def feed(self, i: int, state: KVState, tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Append tokens [B, n] to model i's context; logits [B, keep, V] at the last positions."""
        positions = state.append(tokens.shape[1])
        return self.forward(i, state, tokens, positions, keep)

    def start(
        self,
        memory: KVMemory,
        chat_ids: Sequence[Sequence[int]],
        base_ids: Sequence[Sequence[int]],
        room: Sequence[int],
    ) -> list[KVState]:
        """New rows in every distinct model, each reading its view of the prompts (cached
        prefixes found, nothing computed). `room[b]`: tokens row b may add afterwards."""
        return [
            memory.start(i, chat_ids if chat_view else base_ids, room)
            for i, chat_view in enumerate(self.reads_chat_view)
        ]

    def prefill_chunk(
        self, states: Sequence[KVState], budget: int | None
    ) -> list[tuple[torch.Tensor, list[int]]]:
        """One prefill forward per model with prompt tokens left (the adapter views of one
        backbone in one), over at most `budget` of them (None: all). Per model: next-token
        logits [B, V] and the rows whose prompt this forward finished (only their rows of
        the logits mean anything)."""
        widths = {i: state.chunk_width(budget) for i, state in enumerate(states) if state.pending}
        # adapter views of one backbone prefill in one forward, the narrower chunks widened
        # with padding columns, unless padding would cost more than the chunks themselves
        shared: dict[int, int] = {}
        for group in self.view_groups:
            members = [i for i in group if i in widths]
            widest = max((widths[i] for i in members), default=0)
            if len(members) > 1 and widest * len(members) <= 2 * sum(widths[i] for i in members):
                shared.update(dict.fromkeys(members, widest))
        chunks = {i: states[i].next_chunk(budget, shared.get(i)) for i in widths}
        logits: dict[int, torch.Tensor] = {}
        for group in self.view_groups:
            by_width: dict[int, list[int]] = {}
            for i in group:
                if i in chunks:
                    by_width.setdefault(chunks[i][0].shape[1], []).append(i)
            for members in by_width.values():
                if len(members) > 1:
                    out = self._feed_views(
                        members,
                        [states[i] for i in members],
                        [chunks[i][0] for i in members],
                        [chunks[i][1] for i in members],
                        keep=1,
                    )
                    logits.update(zip(members, out, strict=True))
        for i, (input_ids, positions, _) in chunks.items():
            if i not in logits:
                logits[i] = self.forward(i, states[i], input_ids, positions)
        return [
            (logits[i][:, -1], chunks[i][2]) if i in chunks else (torch.empty(0), [])
            for i in range(len(states))
        ]

    def prefill(
        self,
        memory: KVMemory,
        chat_ids: Sequence[Sequence[int]],
        base_ids: Sequence[Sequence[int]],
        room: Sequence[int],
    ) -> tuple[list[KVState], list[torch.Tensor]]:
        """Every distinct model reads its view of the whole prompts: per model the rows'
        state and next-token logits [B, V]."""
        states = self.start(memory, chat_ids, base_ids, room)
        try:
            logits = [x for x, _ in self.prefill_chunk(states, None)]
        except BaseException:
            for state in states:
                state.release()
            raise
        return states, logits

    def step(self, states: list[KVState], tokens: torch.Tensor) -> list[torch.Tensor]:
        """Feed one token per row [B] to every distinct model; logits [B, V] per model (the
        adapter views of one backbone in one forward, see `feed_models`)."""
        out = self.feed_models(range(len(states)), states, tokens[:, None])
        return [out[i][:, -1] for i in range(len(states))]

    def feed_models(
        self,
        indices: Sequence[int],
        states: Sequence[KVState],
        tokens: torch.Tensor,
        keep: int = 1,
    ) -> dict[int, torch.Tensor]:
        """Append tokens [B, n] to the context of each model in `indices` (`states` is every
        model's); logits [B, keep, V] per model. The adapter views of one backbone among them
        run as one forward over all their rows (PEFT's mixed-adapter batch, `view_groups`),
        unless their shapes are bucketed for a compiled model."""
        out: dict[int, torch.Tensor] = {}
        if not any(states[i].static for i in indices):
            for group in self.view_groups:
                members = [i for i in group if i in indices]
                if len(members) > 1:
                    views = [states[i] for i in members]
                    positions = [state.append(tokens.shape[1]) for state in views]
                    logits = self._feed_views(
                        members, views, [tokens] * len(members), positions, keep
                    )
                    out.update(zip(members, logits, strict=True))
        for i in indices:
            if i not in out:
                out[i] = self.feed(i, states[i], tokens, keep)
        return out

    def _feed_views(
        self,
        group: list[int],
        states: list[KVState],
        input_ids: list[torch.Tensor],
        positions: list[torch.Tensor],
        keep: int,
    ) -> list[torch.Tensor]:
        """One forward of the backbone of views `group` over every view's rows, each row
        naming its view's adapter: per view its new tokens and their positions [B_v, n] (one
        width n for all, already planned in its state); logits [B_v, keep, V] per view."""
        cache = GroupedCache([state.cache for state in states])
        width = cache.kv_length
        masks = []
        for state in states:
            mask = state.attention_mask
            if mask is None:
                mask = torch.ones(state.batch_size, state.cache._plan().kv_length, dtype=torch.long)
                mask = mask.to(state.device)
            pad = width - mask.shape[1]
            masks.append(torch.nn.functional.pad(mask, (pad, 0)) if pad else mask)
        padded = any(s.padded for s in states) or len({m.shape[1] for m in masks}) > 1
        rows = [ids.shape[0] for ids in input_ids]
        views = [self.models[i] for i in group]
        i = group[0]
        kwargs: dict[str, Any] = {
            "input_ids": torch.cat(input_ids).to(self.devices[i]),
            "attention_mask": torch.cat(masks) if padded else None,
            "position_ids": torch.cat(positions),
            "use_cache": True,
            self._cache_kwarg[i]: cache,
            "adapter_names": [
                v.row_adapter for v, n in zip(views, rows, strict=True) for _ in range(n)
            ],
        }
        if self._keeps_last_logits[i]:
            kwargs["logits_to_keep"] = keep
        self.forward_calls += 1
        output = call_backbone(views[0].peft_model, **kwargs)
        logits = output.logits[:, -keep:, : self.vocab_size]
        for state in states:
            state.commit()
        return list(logits.to(self.device, non_blocking=True).split(rows))

    # ------------------------------------------------------------------ composition

    def compose(
        self,
        logits: Sequence[torch.Tensor],
        weights: torch.Tensor,
        conservative_top_p: Sequence[float | None],
    ) -> torch.Tensor:
        """Per-model logits [B, V] -> EFT log-probs [B, V]; `weights` [B, n_behaviors] and
        `conservative_top_p` (one value per row) are per row."""
        composed = self._compose_rows(logits, weights, None)
        for p in {p for p in conservative_top_p if p is not None}:
            rows = torch.tensor(
                [i for i, q in enumerate(conservative_top_p) if q == p], device=composed.device
            )
            subset = [x.index_select(0, rows) for x in logits]
            composed = composed.index_copy(
                0, rows, self._compose_rows(subset, weights.index_select(0, rows), p)
            )
        return composed

    def score_prompts(
        self,
        memory: KVMemory,
        chat_ids: list[list[int]],
        base_ids: list[list[int]],
        weights: torch.Tensor,
        conservative_top_p: float | None = None,
    ) -> torch.Tensor:
        """Composed next-token log-probs [B, V] of whole prompts (their cache is let go at
        once; full blocks stay in the prefix cache); `weights` [B, n_behaviors]."""
        states, logits = self.prefill(memory, chat_ids, base_ids, [1] * len(chat_ids))
        for state in states:
            state.release()
        rows = [conservative_top_p] * len(chat_ids)
        return self.compose(logits, weights.to(self.device), rows)

    def score_continuations(
        self,
        chat_ids: Sequence[Sequence[int]],
        base_ids: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        weights: torch.Tensor,
        conservative_top_p: float | None = None,
    ) -> list[torch.Tensor]:
        """Teacher forcing: composed log-probs [n_b, V] at each of continuation b's n_b
        positions, after its view of prompt b and the continuation tokens before it. Every
        model reads the whole sequences in one forward (no cache, nothing kept);
        `weights` is [B, n_behaviors]."""
        per_model: dict[int, list[torch.Tensor]] = {}
        n = len(continuations)
        # the adapter views of one backbone read their sequences in shared forwards, each
        # row naming its view's adapter (no cache: rows of different views simply stack)
        for group in self.view_groups:
            prompts = [
                p for i in group for p in (chat_ids if self.reads_chat_view[i] else base_ids)
            ]
            adapters = [self.models[i].row_adapter for i in group for _ in range(n)]
            rows = self._teacher_forced(
                group[0], prompts, list(continuations) * len(group), adapters
            )
            per_model.update({i: rows[k * n : (k + 1) * n] for k, i in enumerate(group)})
        for i, chat_view in enumerate(self.reads_chat_view):
            if i not in per_model:
                prompts = chat_ids if chat_view else base_ids
                per_model[i] = self._teacher_forced(i, prompts, continuations)
        lengths = [len(c) for c in continuations]
        logits = [torch.cat(per_model[i]) for i in range(len(self.models))]  # [sum n_b, V]
        rows_weights = weights.to(self.device).repeat_interleave(
            torch.tensor(lengths, device=self.device), dim=0
        )
        composed = self.compose(logits, rows_weights, [conservative_top_p] * sum(lengths))
        return list(composed.split(lengths))

    def _teacher_forced(
        self,
        i: int,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        adapters: Sequence[str] | None = None,
    ) -> list[torch.Tensor]:
        """Model i's float logits [n_b, V] predicting each continuation token after its
        prompt, from forwards over right-padded sequences (positions count from 0 in every
        row, as in decoding). Rows are batched so one forward's logits stay within
        `_TEACHER_FORCING_LOGITS` floats; a model whose RoPE depends on the forward's length
        reads each row alone, so no row changes another's scores. With `adapters` (one name
        per row), model i is an adapter view and each row runs the adapter it names on the
        view's backbone."""
        sequences = [[*p, *c] for p, c in zip(prompts, continuations, strict=True)]
        out: list[torch.Tensor] = []
        start = 0
        while start < len(sequences):
            width = len(sequences[start])
            stop = start + 1
            while stop < len(sequences) and self._rope_thresholds[i] is None:
                wider = max(width, len(sequences[stop]))
                if (stop + 1 - start) * wider * self.vocab_size > _TEACHER_FORCING_LOGITS:
                    break
                width, stop = wider, stop + 1
            names = list(adapters[start:stop]) if adapters is not None else None
            out.extend(
                self._teacher_forced_batch(i, sequences[start:stop], prompts[start:stop], names)
            )
            start = stop
        return out

    def _teacher_forced_batch(
        self,
        i: int,
        sequences: Sequence[Sequence[int]],
        prompts: Sequence[Sequence[int]],
        adapters: list[str] | None = None,
    ) -> list[torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, sequence in enumerate(sequences):
            ids[b, : len(sequence)] = torch.tensor(sequence)
            mask[b, : len(sequence)] = 1
        device = self.devices[i]
        self.forward_calls += 1
        kwargs = {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "use_cache": False,
        }
        if adapters is None:
            logits = self.models[i](**kwargs).logits
        else:
            logits = call_backbone(
                self.models[i].peft_model, **kwargs, adapter_names=adapters
            ).logits
        return [
            logits[b, len(prompt) - 1 : len(sequence) - 1, : self.vocab_size]
            .float()
            .to(self.device)
            for b, (sequence, prompt) in enumerate(zip(sequences, prompts, strict=True))
        ]

    def _compose_rows(
        self,
        logits: Sequence[torch.Tensor],
        weights: torch.Tensor,
        conservative_top_p: float | None,
    ) -> torch.Tensor:
        return compose_logprobs(
            logits[self.base],
            [logits[p.finetuned] for p in self.pairs],
            [logits[p.reference] for p in self.pairs],
            weights,
            conservative_top_p,
        )


_TEACHER_FORCING_LOGITS = 2**26
"""Most logits one teacher-forcing forward returns (float32: 256 MiB); more rows, more
forwards."""

_POSITION_DEPENDENT_ROPE = ("longrope", "dynamic")


def _rope_threshold(config: Any) -> int | None:
    """The sequence length past which a model's RoPE frequencies change for a whole forward
    (longrope, dynamic NTK scaling), or None when positions never change them."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(parameters, dict):
        return None
    # per-layer-type parameters (e.g. {"full_attention": {...}, "sliding_attention": {...}})
    groups = [v for v in parameters.values() if isinstance(v, dict)] or [parameters]
    limits = [
        group.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or getattr(config, "max_position_embeddings", None)
        for group in groups
        if (group.get("rope_type") or group.get("type")) in _POSITION_DEPENDENT_ROPE
    ]
    limits = [int(x) for x in limits if x]
    return min(limits) if limits else None


def _view_groups(models: Sequence[Any]) -> list[list[int]]:
    """Indices of the models that are views of one PEFT backbone, per backbone with two or
    more views that can share a forward (`AdapterView.mixes_adapters`)."""
    groups: dict[int, list[int]] = {}
    for i, model in enumerate(models):
        if isinstance(model, AdapterView) and model.mixes_adapters:
            groups.setdefault(id(model.peft_model), []).append(i)
    return [g for g in groups.values() if len(g) > 1]
