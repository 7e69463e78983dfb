"""The rollout engine's KV cache: appended to in place, and compacted between turns.

transformers' `DynamicCache` appends a decode step's keys and values with `torch.cat`, which copies the whole
cache of every layer for every generated token: for a batch of 32 episodes 1000 tokens into a game, that copy
cost more than the attention itself. `GrowingLayer` instead writes into a buffer with spare room (doubled when
full, so a token costs amortised O(1) copies) and hands attention a view of its filled part.

A batch's episodes advance together, one column of the cache per fed position, so every row has holes (masked
columns) where it was padded or waited for a longer row to finish its turn; after a few turns a third of the
columns are holes. Attention reads holes like real tokens, so `compact` moves each row's cached tokens to the
right end in their order and drops the columns that are then holes in every row. Moving a key does not change
it (its rotary position was applied when it was computed, from the position ids), and attention does not depend
on the order of the keys it reads, so compacting changes no log-prob beyond float summation order.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_MIN_CAPACITY = 64


class GrowingLayer(DynamicLayer):
    """One layer's keys and values, [rows, heads, length, head_dim] views of buffers with spare room.

    Supports what the rollout engine does with a cache (append, select rows, gather columns); `crop` and the
    beam-search helpers of `DynamicLayer` would act on the views only, so they are refused.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]))
        self._value_buffer = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[3]))
        self._length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._length + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:
            self._reserve(max(end, 2 * self._key_buffer.shape[-2], _MIN_CAPACITY))
        self._key_buffer[..., self._length:end, :] = key_states
        self._value_buffer[..., self._length:end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (episodes that ended leave the batch)."""
        if self.is_initialized:
            self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
            self._set_length(self._length)

    def gather_columns(self, columns: torch.Tensor) -> None:
        """Re-lay each row's cache as `columns` [rows, width] lists (indices of the current columns)."""
        if not self.is_initialized:
            return
        rows, heads, _, head_dim = self._key_buffer.shape
        index = columns[:, None, :, None].expand(rows, heads, columns.shape[1], head_dim)
        keys, values = self.keys.gather(2, index), self.values.gather(2, index)
        self._key_buffer, self._value_buffer = keys, values
        self._set_length(columns.shape[1])

    def take_rows(self, rows: torch.Tensor) -> GrowingLayer:
        """A new layer holding a copy of the rows `rows`, to be extended alone and put back (`put_rows`)."""
        taken = GrowingLayer()
        if self.is_initialized:
            taken.lazy_initialization(self.keys, self.values)
            taken._key_buffer, taken._value_buffer = self._key_buffer[rows], self._value_buffer[rows]
            taken._set_length(self._length)
        return taken

    def put_rows(self, rows: torch.Tensor, taken: GrowingLayer) -> None:
        """Take back what the rows `rows` appended in `taken` since `take_rows`: this layer widens to `taken`'s
        length, and the new columns are zero (to be masked) in the other rows."""
        start, end = self._length, taken._length
        if not taken.is_initialized or end == start:
            return
        if end > self._key_buffer.shape[-2]:
            self._reserve(max(end, 2 * self._key_buffer.shape[-2]))
        for mine, theirs in ((self._key_buffer, taken._key_buffer), (self._value_buffer, taken._value_buffer)):
            mine[..., start:end, :] = 0  # masked columns are still multiplied by 0: keep them finite
            mine[rows, :, start:end] = theirs[..., start:end, :]
        self._set_length(end)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GrowingLayer is the rollout engine's cache; it does not crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("GrowingLayer is the rollout engine's cache; it does not repeat rows")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("GrowingLayer is the rollout engine's cache; it does not run beam search")

    def _reserve(self, capacity: int) -> None:
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
            new[..., :self._length, :] = old[..., :self._length, :]
            setattr(self, name, new)

    def _set_length(self, length: int) -> None:
        self._length = length
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]


def growing_cache() -> Cache:
    """A cache of `GrowingLayer`s, one made per model layer on first use."""
    return Cache(layer_class_to_replicate=GrowingLayer)


def take_rows(cache: Cache, rows: torch.Tensor) -> Cache:
    """A cache of copies of the rows `rows` of `cache` (see `GrowingLayer.take_rows`)."""
    return Cache(layers=[layer.take_rows(rows) for layer in cache.layers])


def put_rows(cache: Cache, rows: torch.Tensor, taken: Cache) -> None:
    """Put what `taken` (from `take_rows(cache, rows)`) appended back into `cache`'s rows `rows`."""
    for layer, taken_layer in zip(cache.layers, taken.layers, strict=True):
        layer.put_rows(rows, taken_layer)


def compact_columns(attention_mask: torch.Tensor) -> torch.Tensor:
    """For a [rows, columns] mask (1 = cached token, 0 = hole), the columns each row keeps after compaction:
    its cached tokens in their order, right-aligned, as wide as the row with the most of them."""
    width = int(attention_mask.sum(dim=-1).max())
    # a stable sort of 0/1 puts the holes first and keeps the tokens in order after them
    return torch.sort(attention_mask, dim=-1, stable=True).indices[:, attention_mask.shape[1] - width:]
