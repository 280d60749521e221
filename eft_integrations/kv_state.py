"""One model's side of a group of rows: their block tables, lengths and next forward.

Each row owns a list of blocks in the model's `BlockPool` (see `kv_pool.py`); a row's
memory follows its own length, and joining (`merge`), leaving (`select`), splitting off
(`split`) and rolling back drafts (`rewind_rows`) edit block tables only: no cache is
copied. Before each forward the state plans it (`append`, `next_chunk`): blocks are
allocated for the new tokens, and the model's `PagedCache` learns which slots to write and
which to read (see `paged_cache.py`). Positions equal a row's token index, clamped to the
last position the row may use (`room`), so a batch-mate's extra drafts never push a row
past its context window (absolute position embeddings) or a RoPE scaling threshold.

A row knows the tokens in its cache where the host knows them (its prompt, the tokens
recorded after each step); those tokens' full blocks are registered in the prefix cache,
so later prompts that start the same way reuse them (`start` looks them up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .kv_pool import BlockPool
from .paged_cache import ForwardPlan, PagedCache

__all__ = ["MIN_CONTEXT_BUCKET", "KVState", "PagedRow"]

MIN_CONTEXT_BUCKET = 64
"""The smallest context length of a bucketed forward (see `KVState.static`)."""


@dataclass
class PagedRow:
    """One row in one model: its blocks, how many tokens its cache holds, what it knows."""

    blocks: list[int]
    length: int  # tokens in the cache
    tokens: list[int]  # known tokens from the start (longer than `length` while prefilling)
    last_position: int  # the last position the row's own tokens can take
    registered: int = 0  # leading blocks registered in (or found in) the prefix cache
    cached: int = 0  # prompt tokens found in the prefix cache
    computed: int = 0  # leading tokens whose keys and values a finished forward wrote

    @property
    def pending(self) -> int:
        """Prompt tokens still to prefill."""
        return max(0, len(self.tokens) - self.length)


@dataclass
class KVState:
    """Rows of one model in one batch (see the module docstring)."""

    pool: BlockPool
    cache: PagedCache
    pad_id: int
    device: torch.device
    rows: list[PagedRow] = field(default_factory=list)
    attention_mask: torch.Tensor | None = None  # [B, L] of the planned forward
    padded: bool = False
    """Whether some row of the planned forward is shorter than the context (known on the
    host): without padding the model gets no mask at all (transformers' SDPA path reads a
    given mask back to the host on every forward to see whether it can drop it)."""
    static: bool = False
    """Token-feeding forwards (decode, drafts, verification) get bucketed shapes: rows padded
    to a power of two, the context to a power of two (at least `MIN_CONTEXT_BUCKET`), so a
    compiled model (torch.compile, CUDA graphs) sees few distinct shapes."""

    @classmethod
    def start(
        cls,
        pool: BlockPool,
        cache: PagedCache,
        pad_id: int,
        device: torch.device,
        sequences: Sequence[Sequence[int]],
        room: Sequence[int],
        static: bool = False,
    ) -> KVState:
        """Rows for prompts, nothing computed yet: each starts with the longest cached prefix
        of its prompt (never the whole prompt: its last token must be read for logits)."""
        rows = []
        for sequence, extra in zip(sequences, room, strict=True):
            blocks = pool.match(sequence, len(sequence) - 1)
            length = len(blocks) * pool.block_size
            rows.append(
                PagedRow(
                    blocks=blocks,
                    length=length,
                    tokens=list(sequence),
                    last_position=len(sequence) + extra - 1,
                    registered=len(blocks),
                    cached=length,
                    computed=length,
                )
            )
        return cls(pool, cache, pad_id, device, rows, static=static)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def pending(self) -> int:
        """Prompt tokens still to prefill, over all rows."""
        return sum(r.pending for r in self.rows)

    # ------------------------------------------------------------------ forwards

    def _chunk_sizes(self, budget: int | None) -> list[int]:
        """The prompt tokens each row would prefill next, at most `budget` in all."""
        left = budget if budget is not None else sum(r.pending for r in self.rows)
        new = []
        for row in self.rows:
            take = min(row.pending, max(left, 0))
            new.append(take)
            left -= take
        return new

    def chunk_width(self, budget: int | None) -> int:
        """The query width `next_chunk(budget)` would plan (nothing is planned)."""
        return max(max(self._chunk_sizes(budget)), 1)

    def next_chunk(
        self, budget: int | None, width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Plan a prefill forward over the next pending prompt tokens, at most `budget` in
        all (None: all of them), rows in order. Returns input_ids and positions [B, S]
        (rows' new tokens end at the last column) and the rows whose prompt this finishes.
        `width` widens S (left-padded columns), so views of one backbone can stack."""
        new = self._chunk_sizes(budget)
        width = max(max(new), 1, width or 0)
        input_ids = torch.full((len(self.rows), width), self.pad_id, dtype=torch.long)
        for b, (row, n) in enumerate(zip(self.rows, new, strict=True)):
            if n:
                chunk = row.tokens[row.length : row.length + n]
                input_ids[b, width - n :] = torch.tensor(chunk, dtype=torch.long)
        finishing = [
            b for b, (r, n) in enumerate(zip(self.rows, new, strict=True)) if n and n == r.pending
        ]
        positions = self._plan(new, width)
        return input_ids.to(self.device, non_blocking=True), positions, finishing

    def append(self, n: int) -> torch.Tensor:
        """Plan a forward that feeds n new tokens to every row; their position ids [B, n]."""
        return self._plan([n] * len(self.rows), n, bucket=self.static)

    def _plan(self, new: list[int], width: int, bucket: bool = False) -> torch.Tensor:
        """Allocate blocks for `new[b]` tokens per row, point the cache at the slots, and
        return the positions [B, width] of the query columns ([B', width] with `bucket`:
        rows past the real ones are one-token rows over the padding block)."""
        size = self.pool.block_size
        old = [r.length for r in self.rows]
        for row, n in zip(self.rows, new, strict=True):
            row.length += n
            need = -(-row.length // size) - len(row.blocks)
            if need > 0:
                row.blocks += self.pool.allocate(need)
        lengths = [r.length for r in self.rows]
        kv_length = max(max(lengths), width)
        tables = [r.blocks for r in self.rows]
        last = [r.last_position for r in self.rows]
        if bucket:
            kv_length = _power_of_two(max(kv_length, MIN_CONTEXT_BUCKET))
            extra = _power_of_two(len(self.rows)) - len(self.rows)
            old, lengths = old + [0] * extra, lengths + [1] * extra
            tables, last = tables + [[0]] * extra, last + [0] * extra
        widest = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (widest - len(t)) for t in tables])
        host = torch.tensor([old, lengths, last])
        table, host = table.to(self.device), host.to(self.device)
        old_t, length_t, last_t = host[0][:, None], host[1][:, None], host[2][:, None]
        # context columns: row b's tokens fill the last lengths[b] columns
        context = torch.arange(kv_length, device=self.device)[None] - (kv_length - length_t)
        read = _slots(table, context, size)  # [B, L]
        # query columns: row b's new tokens fill the last new[b] columns
        query = torch.arange(width, device=self.device)[None] + (length_t - width)
        write = torch.where(query >= old_t, _slots(table, query, size), 0)  # [B, S]
        positions = torch.minimum(query.clamp(min=0), last_t)
        self.padded = bucket or any(n != kv_length for n in lengths)
        self.attention_mask = (context >= 0).long() if self.padded else None
        self.cache.plan = ForwardPlan(
            write_slots=write.flatten(),
            read_slots=read.flatten(),
            batch=len(lengths),
            queries=width,
            kv_length=kv_length,
            slots_needed=self.pool.highest_slot,
            bucketed=bucket,
        )
        return positions

    # ------------------------------------------------------------------ bookkeeping

    def record(self, tokens: Sequence[Sequence[int]]) -> None:
        """The host now knows the last tokens each row's cache holds (`tokens[b]`, in order):
        rows whose earlier tokens are all known extend what they know."""
        for row, ids in zip(self.rows, tokens, strict=True):
            if len(row.tokens) == row.length - len(ids):
                row.tokens.extend(ids)

    def commit(self) -> None:
        """The planned forward finished: what the rows' caches hold is computed (a forward
        that raised leaves it uncommitted, so it is never registered), and the prompt
        blocks it completed are registered."""
        for row in self.rows:
            row.computed = row.length
            if row.registered * self.pool.block_size < min(len(row.tokens), row.length):
                row.registered = self.pool.register(
                    row.blocks, row.tokens[: row.computed], row.registered
                )

    def rewind_rows(self, counts: Sequence[int]) -> None:
        """Forget the last counts[b] tokens of row b (rejected speculative drafts)."""
        size = self.pool.block_size
        for row, n in zip(self.rows, counts, strict=True):
            if n <= 0:
                continue
            row.length -= n
            row.computed = min(row.computed, row.length)
            del row.tokens[row.length :]
            keep = -(-row.length // size)
            if keep < len(row.blocks):
                self.pool.release(row.blocks[keep:])
                del row.blocks[keep:]

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the rows at `keep` (in that order); the others let go of their blocks."""
        kept = set(keep)
        self._release([r for b, r in enumerate(self.rows) if b not in kept])
        self.rows = [self.rows[b] for b in keep]

    def subset(self, indices: Sequence[int]) -> KVState:
        """A state over the rows at `indices` that shares them with this one (a forward
        planned on it advances them here too)."""
        rows = [self.rows[b] for b in indices]
        return KVState(self.pool, self.cache, self.pad_id, self.device, rows, static=self.static)

    def split(self, indices: Sequence[int]) -> KVState:
        """Move the rows at `indices` into a new state (no cache is copied)."""
        moved = set(indices)
        out = KVState(
            self.pool,
            self.cache,
            self.pad_id,
            self.device,
            [self.rows[b] for b in indices],
            static=self.static,
        )
        self.rows = [r for b, r in enumerate(self.rows) if b not in moved]
        return out

    def merge(self, other: KVState) -> None:
        """Append `other`'s rows after this state's rows (no cache is copied)."""
        self.rows += other.rows
        other.rows = []

    def release(self) -> None:
        """Every row lets go of its blocks."""
        self._release(self.rows)
        self.rows = []

    def _release(self, rows: Sequence[PagedRow]) -> None:
        for row in rows:
            row.registered = self.pool.register(
                row.blocks, row.tokens[: row.computed], row.registered
            )
            self.pool.release(row.blocks)
            row.blocks = []

    def num_tokens(self) -> int:
        """Tokens the rows' caches hold (what this state keeps in memory, blocks rounded)."""
        return sum(r.length for r in self.rows)


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _slots(table: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Pool slots of token indices [B, n] given block tables [B, blocks]; indices below 0
    (padding) read the padding slot 0."""
    valid = index >= 0
    index = index.clamp(min=0)
    block = table.gather(1, (index // size).clamp(max=table.shape[1] - 1))
    return torch.where(valid, block * size + index % size, 0)
