"""One model's side of the rows in flight: its KV cache, attention mask and next positions.

Rows are left-padded: every row's real tokens end at the last cache column, so one decode
step appends one column for all rows. Rows join (`merge`, padding the shorter side on the
left), leave (`select`) and roll back rejected drafts (`rewind`) without recomputing anything.

The cache is transformers' `DynamicCache` with full (non-sliding) layers on purpose: a
sliding-window layer keeps only the last window of tokens and cannot be cropped or
left-padded, while a full layer under the model's own sliding-window mask gives the same
attention (the mask is what limits the window). The cost is memory for long contexts on
sliding-window models. transformers has no call to merge two caches of different lengths;
`merge` pads the two caches' tensors on the left and concatenates them on the batch axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

__all__ = ["KVState"]


@dataclass
class KVState:
    """KV cache + attention mask + positions of one distinct model for the rows in flight."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, L] 1 = real token, 0 = left padding (model device)
    next_position: torch.Tensor  # [B] position id of the next token fed (model device)
    last_position: torch.Tensor  # [B] the last position a row's own tokens can take
    padded: bool = True
    """Whether some row has left padding, known on the host (no device read): without
    padding the models get no attention mask, so transformers has none to inspect (its SDPA
    path reads a given mask back to the host on every forward to see if it can drop it)."""

    @classmethod
    def for_prompts(
        cls, sequences: list[list[int]], pad_id: int, device: torch.device, room: list[int]
    ) -> tuple[KVState, torch.Tensor, torch.Tensor]:
        """An empty state for left-padded prompts: (state, input_ids [B, S], positions [B, S]).

        `room[b]` is how many tokens row b may still add after its sequence: positions past
        that only ever hold tokens that are thrown away (a speculative round feeds every row
        the batch's largest number of drafts), and they are clamped to the row's last own
        position, so a batch-mate never pushes a row past its context window (absolute
        position embeddings) or past a RoPE scaling threshold (longrope)."""
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # [B, S]
        mask = torch.zeros((len(sequences), length), dtype=torch.long)  # [B, S]
        for row, seq in enumerate(sequences):
            input_ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        # positions count real tokens only, so left padding does not shift them
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
        lengths = mask.sum(-1)
        last = lengths + torch.tensor(room, dtype=torch.long, device=device) - 1
        padded = any(len(s) != length for s in sequences)
        state = cls(DynamicCache(), mask, lengths, last, padded)
        return state, input_ids, positions

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    def append(self, n: int) -> torch.Tensor:
        """Make room for n new tokens per row; their position ids [B, n]."""
        ones = torch.ones_like(self.attention_mask[:, :1]).expand(-1, n)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        positions = self.next_position[:, None] + torch.arange(n, device=self.next_position.device)
        self.next_position = self.next_position + n
        return torch.minimum(positions, self.last_position[:, None])  # see `for_prompts`

    def rewind(self, n: int) -> None:
        """Forget the last n tokens of every row (rejected speculative drafts)."""
        if n <= 0:
            return
        # crop(-n) removes n tokens in transformers 4.x (max_length < 0) and 5.x alike
        self.cache.crop(-n)
        self.attention_mask = self.attention_mask[:, :-n]
        self.next_position = self.next_position - n

    def rewind_rows(self, counts: list[int]) -> None:
        """Forget the last counts[b] tokens of row b (rows accept different numbers of drafts).

        The common part is cropped; a row with more to forget is shifted right by the rest,
        so its forgotten tokens wrap round to the left edge, where the mask hides them."""
        common = min(counts)
        self.rewind(common)
        extra = torch.tensor([c - common for c in counts], device=self.attention_mask.device)
        if not any(c > common for c in counts):
            return
        length = self.attention_mask.shape[1]
        columns = torch.arange(length, device=extra.device)
        index = (columns - extra[:, None]) % length  # [B, L]: new column c reads old c - shift
        for layer in self.cache.layers:
            if layer.is_initialized and layer.keys.numel():
                by_row = index[:, None, :, None]  # [B, 1, L, 1]
                layer.keys = layer.keys.gather(2, by_row.expand_as(layer.keys))
                layer.values = layer.values.gather(2, by_row.expand_as(layer.values))
        self.attention_mask = self.attention_mask.gather(1, index) * (columns >= extra[:, None])
        self.next_position = self.next_position - extra
        self.padded = True
        self._trim_left()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices [B'] on the model device), then drop padding columns
        that no remaining row needs."""
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]
        self.last_position = self.last_position[rows]
        self._trim_left()

    def merge(self, other: KVState) -> None:
        """Append `other`'s rows after this state's rows (left-padding the shorter one)."""
        length = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            if not (mine.is_initialized and theirs.is_initialized):
                continue  # layers that share another layer's KV hold nothing of their own
            mine.keys = torch.cat(
                [_pad_left(mine.keys, length, 2), _pad_left(theirs.keys, length, 2)]
            )
            mine.values = torch.cat(
                [_pad_left(mine.values, length, 2), _pad_left(theirs.values, length, 2)]
            )
        self.padded = (
            self.padded
            or other.padded
            or self.attention_mask.shape[1] != other.attention_mask.shape[1]
        )
        self.attention_mask = torch.cat(
            [_pad_left(self.attention_mask, length, 1), _pad_left(other.attention_mask, length, 1)]
        )
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.last_position = torch.cat([self.last_position, other.last_position])

    def _trim_left(self) -> None:
        """Drop leading columns that are padding in every row (rows end at the last column)."""
        lengths = self.attention_mask.sum(-1)
        # one host sync, only when rows leave or roll back unevenly
        longest, shortest = torch.stack([lengths.max(), lengths.min()]).tolist()
        drop = self.attention_mask.shape[1] - longest
        self.padded = shortest < longest
        if drop <= 0:
            return
        for layer in self.cache.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys = layer.keys[:, :, drop:]
                layer.values = layer.values[:, :, drop:]
        self.attention_mask = self.attention_mask[:, drop:]

    def num_tokens(self) -> int:
        """Cache columns times rows: what this state holds (for memory diagnostics)."""
        return int(self.attention_mask.numel())


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` on the left along `dim` up to `length`."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
