"""A transformers `Cache` over a `BlockPool`: the model's own attention reads paged KV.

transformers' paged cache (`PagedAttentionCache`, attention "sdpa_paged") belongs to its own
continuous-batching manager: one model, its own scheduler and request states, packed
sequences with no left padding and no per-row prompt views. An EFT step runs several models
over per-model prompt views and feeds speculative drafts, so the engine keeps its own
scheduler and gives each model this small cache instead, which works with every attention
implementation the models already use (eager, SDPA; sliding windows included):

- before a forward, `KVState` sets a `ForwardPlan`: for every query position the slot its
  key and value go to, and for every row the slots of its whole context;
- `update` writes the new keys and values into the pool, then gathers each row's context
  into a [B, kv_heads, L, head_dim] view where every row ends at the last column (rows are
  right-aligned, like left padding), so transformers' own masks (2D padding mask, causal,
  sliding window) apply unchanged and positions equal column offsets within a row.

The gather copies the rows' contexts once per layer per forward, which is what
`DynamicCache`'s concatenation cost per step already; what changes is that nothing else is
ever copied: joining, leaving and rolling back only edit block tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .kv_pool import BlockPool

__all__ = ["ForwardPlan", "GroupedCache", "PagedCache"]


@dataclass
class ForwardPlan:
    """Where one forward's keys and values go and come from."""

    write_slots: torch.Tensor  # [B * S]: the slot of each query position (0: written nowhere)
    read_slots: torch.Tensor  # [B * L]: the slot of each context column (0: padding)
    batch: int  # B
    queries: int  # S
    kv_length: int  # L
    slots_needed: int  # the pool's storage must reach this slot
    bucketed: bool = False  # shapes from a few buckets (a compiled model may run it)


class PagedCache(Cache):
    """One model's cache view over its pool; `plan` is set before every forward."""

    def __init__(self, pool: BlockPool) -> None:
        super().__init__(layers=[])
        self.pool = pool
        self.plan: ForwardPlan | None = None

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(_PagedLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        plan = self._plan()
        return plan.kv_length - plan.queries

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._plan().kv_length, 0

    def _plan(self) -> ForwardPlan:
        if self.plan is None:
            raise RuntimeError("a paged cache was used without a forward plan")
        return self.plan


class _PagedLayer(CacheLayerMixin):
    """One layer's view: writes the new keys/values, returns the rows' gathered contexts."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: Any, index: int) -> None:
        super().__init__()
        self.owner = owner  # a PagedCache (a GroupedCache for `_GroupedLayer`)
        self.index = index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.owner._plan()
        store = self.owner.pool.storage(self.index, key_states, plan.slots_needed)
        batch, heads, queries, dim = key_states.shape
        flat = (batch * queries, heads, dim)
        store.keys.index_copy_(0, plan.write_slots, key_states.transpose(1, 2).reshape(flat))
        store.values.index_copy_(0, plan.write_slots, value_states.transpose(1, 2).reshape(flat))
        shape = (batch, plan.kv_length, heads, dim)
        keys = store.keys.index_select(0, plan.read_slots).view(shape).transpose(1, 2)
        values = store.values.index_select(0, plan.read_slots).view(shape).transpose(1, 2)
        self.is_initialized = True
        return keys, values

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return -1


class GroupedCache(Cache):
    """Several models' `PagedCache`s as one cache of their stacked rows, for one forward of
    a backbone over the rows of all its adapter views (`Ensemble.feed_models` and prefill
    chunks; every view feeds the same number of tokens per row): each view's rows
    write and read their own pool; their contexts are left-padded to the longest, so every
    row still ends at the last column."""

    def __init__(self, caches: list[PagedCache]) -> None:
        super().__init__(layers=[])
        self.caches = caches
        plans = [c._plan() for c in caches]
        self.kv_length = max(p.kv_length for p in plans)
        self.queries = plans[0].queries
        self.sizes = [p.batch for p in plans]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(_GroupedLayer(self, len(self.layers)))
        keys, values = [], []
        for cache, k, v in zip(
            self.caches,
            key_states.split(self.sizes),
            value_states.split(self.sizes),
            strict=True,
        ):
            k, v = cache.update(k, v, layer_idx)
            pad = self.kv_length - k.shape[2]
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)) if pad else k)
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)) if pad else v)
        return torch.cat(keys), torch.cat(values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_length - self.queries

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.kv_length, 0


class _GroupedLayer(_PagedLayer):
    """One layer of a `GroupedCache`: its update is the owner's (every view's pool)."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.update(key_states, value_states, self.index)
