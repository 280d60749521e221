"""The KV memory of every distinct model: one block pool and one cache view per model.

The budget is in tokens per model (`kv_cache_tokens`): the scheduler admits a request only
while the prompts and budgets of the rows in flight fit in it, so a running row never finds
the pool empty. Each pool also holds a margin of blocks per row for what the budget does not
count: the unfilled end of a row's last block, and the drafts of a speculative round (every
row of a round is fed the batch's largest number of drafts, which it then forgets).

`kv_cache_tokens=None` picks the budget: on a CUDA device, the tokens that
`CUDA_MEMORY_FRACTION` of the free device memory holds for all models together; elsewhere
`max_tokens_in_flight`. Pools allocate their tensors as they fill, so a large budget costs
memory only once it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .kv_pool import BlockPool
from .kv_state import KVState
from .paged_cache import PagedCache
from .speculative import MAX_ADAPTIVE_K

__all__ = ["CUDA_MEMORY_FRACTION", "KVMemory", "kv_bytes_per_token"]

CUDA_MEMORY_FRACTION = 0.8
"""The share of free CUDA memory the KV pools may take when no budget is given."""


class KVMemory:
    """Block pools and cache views of the distinct models (see the module docstring)."""

    def __init__(
        self,
        models: Sequence[Any],
        devices: Sequence[torch.device],
        pad_id: int,
        kv_cache_tokens: int,
        max_batch_size: int,
        block_size: int = 16,
        prefix_caching: bool = True,
        static: bool = False,
    ) -> None:
        if kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be >= 1, got {kv_cache_tokens}")
        self.kv_cache_tokens = kv_cache_tokens
        self.block_size = block_size
        margin = 2 + -(-(MAX_ADAPTIVE_K + 1) // block_size)  # blocks per row (docstring)
        capacity = -(-kv_cache_tokens // block_size) + max_batch_size * margin + 1
        self.pools = [BlockPool(capacity, block_size, prefix_caching, whole=static) for _ in models]
        self.static = static
        """Bucketed shapes for compiled models (see `KVState.static`); the pools then
        allocate their whole capacity at once, so compiled graphs see fixed tensors."""
        self.caches = [PagedCache(pool) for pool in self.pools]
        self.devices = list(devices)
        self.pad_id = pad_id

    def start(self, model: int, sequences: Sequence[Sequence[int]], room: Sequence[int]) -> KVState:
        """New rows of `model` for these prompts (cached prefixes found, nothing computed)."""
        return KVState.start(
            self.pools[model],
            self.caches[model],
            self.pad_id,
            self.devices[model],
            sequences,
            room,
            self.static,
        )

    def used_blocks(self) -> int:
        """Blocks held by rows, over all models."""
        return sum(p.used_blocks for p in self.pools)

    def cached_blocks(self) -> int:
        """Blocks that only keep a cached prefix, over all models."""
        return sum(p.cached_blocks for p in self.pools)

    def memory_bytes(self) -> int:
        """Bytes the pools' tensors take now."""
        return sum(p.memory_bytes() for p in self.pools)


def kv_bytes_per_token(model: Any) -> int:
    """Bytes one token's keys and values take in `model` (every layer), from its config."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * layers * heads * dim * model.dtype.itemsize


def default_kv_cache_tokens(models: Sequence[Any], device: torch.device, max_tokens: int) -> int:
    """The budget when none is given (see the module docstring)."""
    if device.type != "cuda":
        return max_tokens
    free, _ = torch.cuda.mem_get_info(device)
    per_token = sum(kv_bytes_per_token(m) for m in models)
    return max(1, min(max_tokens, int(free * CUDA_MEMORY_FRACTION) // per_token))
