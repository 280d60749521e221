"""One model's KV memory: fixed-size blocks, an allocator, and the automatic prefix cache.

As in vLLM's paged attention and its automatic prefix caching: a row's cache is a list of
blocks (`block_size` token slots each) in one pool per model, so rows join and leave without
copying anyone's cache, and a row's memory follows its own length. A full block whose
tokens are known is registered under its prefix: the key is (the registration of the block
before it, the block's tokens), compared exactly (no hash that could collide), so a block
matches only when every token before it matched too. A new row reuses the longest chain of
registered blocks of its prompt (shared, reference counted) and computes only the rest.
Blocks nobody holds stay cached until their slots are needed: the allocator takes free
blocks first, then evicts cached ones, least recently used first.

Slot 0 (block 0) is never handed out: padding reads it and writes that must go nowhere go
there, so a forward's index tensors have fixed shapes.

The pool's tensors (per layer, keys and values [slots, kv_heads, head_dim]) are made on the
first write of each layer, when the layer's shape and dtype are known, and grow by doubling
up to the pool's capacity, so a large budget costs memory only once it is used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BlockPool", "KVCacheFullError", "PrefixKey"]

PrefixKey = tuple[int, tuple[int, ...]]
"""(registration serial of the previous block, or 0 at the start; this block's tokens)."""


class KVCacheFullError(RuntimeError):
    """The pool has no block left for a write (admission keeps this from happening)."""


@dataclass
class _Layer:
    keys: torch.Tensor  # [slots, kv_heads, head_dim]
    values: torch.Tensor


class BlockPool:
    """Blocks of one model's KV cache, their owners, and the prefix cache (see the module
    docstring)."""

    def __init__(
        self,
        capacity_blocks: int,
        block_size: int = 16,
        prefix_caching: bool = True,
        whole: bool = False,
    ) -> None:
        if block_size < 1 or capacity_blocks < 2:
            raise ValueError("a KV pool needs block_size >= 1 and at least 2 blocks")
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.prefix_caching = prefix_caching
        self.whole = whole
        """Allocate each layer's whole capacity on its first write (compiled models need
        tensors that never move)."""
        self._free = list(range(capacity_blocks - 1, 0, -1))  # block 0 is the padding block
        self._refs = [0] * capacity_blocks
        self._key_of: dict[int, PrefixKey] = {}  # registered block -> its key
        self._serial_of: dict[int, int] = {}  # registered block -> its registration serial
        self._block_of: dict[PrefixKey, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unheld; LRU first
        self._serials = 0
        self._layers: dict[int, _Layer] = {}
        self._top = 0  # the highest block handed out so far (free blocks are reused first)

    # ------------------------------------------------------------------ accounting

    @property
    def used_blocks(self) -> int:
        """Blocks held by some row."""
        return self.capacity_blocks - 1 - len(self._free) - len(self._evictable)

    @property
    def cached_blocks(self) -> int:
        """Blocks nobody holds that keep a registered prefix (evicted when slots are needed)."""
        return len(self._evictable)

    def memory_bytes(self) -> int:
        """Bytes of the pool's tensors allocated so far."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() * 2 for layer in self._layers.values()
        )

    # ------------------------------------------------------------------ blocks

    def allocate(self, n: int) -> list[int]:
        """n blocks for one row (free ones first, then the least recently used cached ones)."""
        if n > len(self._free) + len(self._evictable):
            raise KVCacheFullError(
                f"the KV cache has {len(self._free) + len(self._evictable)} free blocks of "
                f"{self.block_size} tokens, {n} are needed"
            )
        blocks = []
        for _ in range(n):
            if not self._free:
                self._forget(next(iter(self._evictable)))
            block = self._free.pop()
            self._refs[block] = 1
            self._top = max(self._top, block)
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """A row lets go of its blocks (last first, so the ends of prefixes are evicted
        before their starts)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _forget(self, block: int) -> None:
        """Evict a cached block: its prefix is no longer known."""
        del self._evictable[block]
        del self._block_of[self._key_of.pop(block)]
        del self._serial_of[block]
        self._free.append(block)

    # ------------------------------------------------------------------ prefix cache

    def match(self, tokens: Sequence[int], most: int) -> list[int]:
        """The longest chain of cached blocks that starts `tokens`, covering at most `most`
        tokens; the row now holds them."""
        if not self.prefix_caching:
            return []
        size, parent, blocks = self.block_size, 0, []
        for start in range(0, most - size + 1, size):
            block = self._block_of.get((parent, tuple(tokens[start : start + size])))
            if block is None:
                break
            blocks.append(block)
            parent = self._serial_of[block]
        for block in blocks:
            self._refs[block] += 1
            self._evictable.pop(block, None)
        return blocks

    def register(self, blocks: Sequence[int], tokens: Sequence[int], done: int) -> int:
        """Register a row's full blocks past its first `done` (which are registered, or
        were found taken); `tokens` are the row's known tokens. Returns the new `done`."""
        if not self.prefix_caching:
            return done
        size = self.block_size
        full = min(len(tokens) // size, len(blocks))
        for index in range(done, full):
            block = blocks[index]
            parent = self._serial_of.get(blocks[index - 1], -1) if index else 0
            if parent < 0 or block in self._key_of:
                return index  # the chain before it is not registered: nothing after can be
            key = (parent, tuple(tokens[index * size : (index + 1) * size]))
            if key in self._block_of:
                return index  # the same prefix computed twice: the first copy stays the one
            self._serials += 1
            self._block_of[key] = block
            self._key_of[block] = key
            self._serial_of[block] = self._serials
        return full

    # ------------------------------------------------------------------ storage

    def storage(self, layer: int, like: torch.Tensor, slots_needed: int) -> _Layer:
        """The pool tensors of `layer` ([slots, kv_heads, head_dim], shaped like `like`
        [B, kv_heads, n, head_dim]), grown to hold `slots_needed` slots."""
        stored = self._layers.get(layer)
        # whole pools never grow (and a compiled graph must not guard on `slots_needed`)
        if stored is not None and (self.whole or stored.keys.shape[0] >= slots_needed):
            return stored
        total = self.capacity_blocks * self.block_size
        have = 0 if stored is None else stored.keys.shape[0]
        slots = (
            total if self.whole else min(total, max(slots_needed, 2 * have, 16 * self.block_size))
        )
        shape = (slots, like.shape[1], like.shape[3])
        keys = like.new_zeros(shape)
        values = like.new_zeros(shape)
        if self.whole and keys.is_cuda:  # CUDA graphs may then update them in place
            torch._dynamo.mark_static_address(keys)
            torch._dynamo.mark_static_address(values)
        if stored is not None:
            keys[:have] = stored.keys
            values[:have] = stored.values
        self._layers[layer] = _Layer(keys, values)
        return self._layers[layer]

    @property
    def highest_slot(self) -> int:
        """One past the highest slot of any block handed out so far (the storage must reach
        it before a forward)."""
        return (self._top + 1) * self.block_size
