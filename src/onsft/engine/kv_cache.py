"""KV-cache pieces of the decoding loop: a cache that grows in place, and attention over row spans.

`GrowingCache` keeps every layer's keys and values in a buffer with spare room, so a decoding step
writes one column instead of concatenating (copying) the whole cache. `span_attention` switches an
`sdpa` model to an attention that runs per span of rows from the span's first used column, so rows with
short prompts do not read the long left padding of rows with long prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

SPAN_ATTENTION = "onsft_row_spans"
ROW_SPANS: ContextVar[list[tuple[int, int, int]] | None] = ContextVar("onsft_row_spans", default=None)


def _row_span_attention(module, query, key, value, attention_mask, **kwargs):
    """`sdpa` attention, run per span (start, stop, first column) of rows at a decoding step.

    Hinted rows hold long prompts, plain rows short ones; in one rectangular cache the plain rows'
    left padding is most of their columns, and attention reads it all (the cost of a decoding step on
    a CPU is mostly reading the KV cache). Attending per span from the span's first used column
    reads only what the span uses. Outside a decoding step (prefill, spans unset) it is `sdpa`.
    """
    spans = ROW_SPANS.get()
    if not spans or query.shape[2] != 1 or len(spans) == 1 and spans[0][2] == 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for start, stop, column in spans:
        mask = None if attention_mask is None else attention_mask[start:stop, ..., column:]
        out, _ = sdpa_attention_forward(
            module, query[start:stop], key[start:stop, :, column:], value[start:stop, :, column:], mask, **kwargs
        )
        outputs.append(out)
    return torch.cat(outputs), None


AttentionInterface.register(SPAN_ATTENTION, _row_span_attention)
AttentionMaskInterface.register(SPAN_ATTENTION, sdpa_mask)


@contextmanager
def span_attention(model) -> Iterator[bool]:
    """Switch a model that uses `sdpa` to the row-span attention for the duration (yields whether it
    did); any other attention implementation is left alone."""
    before = getattr(model.config, "_attn_implementation", None)
    switched = False
    if before == "sdpa":
        try:
            model.set_attn_implementation(SPAN_ATTENTION)
            switched = model.config._attn_implementation == SPAN_ATTENTION
        except (ValueError, KeyError, ImportError, AttributeError):
            switched = False
    try:
        yield switched
    finally:
        if switched:
            model.set_attn_implementation(before)


def row_spans(first_columns: list[int], width: int, min_saving: float = 0.1) -> list[tuple[int, int, int]]:
    """Split rows into at most two contiguous spans (start, stop, first used column) so that attention
    reads the fewest columns; one span unless the split saves `min_saving` of the columns read."""
    rows = len(first_columns)
    prefix_min, suffix_min = [], [0] * rows
    low = width
    for column in first_columns:
        low = min(low, column)
        prefix_min.append(low)
    low = width
    for i in range(rows - 1, -1, -1):
        low = min(low, first_columns[i])
        suffix_min[i] = low
    whole = rows * (width - prefix_min[-1])
    best, split = whole, 0
    for s in range(1, rows):
        cost = s * (width - prefix_min[s - 1]) + (rows - s) * (width - suffix_min[s])
        if cost < best:
            best, split = cost, s
    if split == 0 or best > (1 - min_saving) * whole:
        return [(0, rows, prefix_min[-1])]
    return [(0, split, prefix_min[split - 1]), (split, rows, suffix_min[split])]


@dataclass
class CopyCounter:
    """Key/value bytes a `GrowingCache` copied besides the column each step writes. A row move copies
    one row of one layer; a whole copy copies every live row of one layer (a buffer that grows, a
    whole-batch select)."""

    row_moves: int = 0
    moved_bytes: int = 0
    whole_copies: int = 0
    whole_bytes: int = 0


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in a buffer with spare rows and columns.

    `DynamicLayer` concatenates at every step, copying the whole cache each time; with long hinted
    prompts that copy costs as much as the attention itself. Here a step writes one column in place,
    and the buffer grows by `reserve` columns when full. The used part is rows [0, rows) and columns
    [begin, end); columns dropped on the left stay allocated, so a longer prompt admitted later takes
    them back without moving anything. `keys`/`values` are views of the used part, so everything that
    reads a `DynamicLayer` (mask sizes, sequence length) works unchanged.
    """

    def __init__(self, reserve: int = 256, copies: CopyCounter | None = None):
        super().__init__()
        self.reserve = reserve
        self.copies = copies if copies is not None else CopyCounter()
        self.key_buffer = self.value_buffer = None
        self.rows = self.begin = self.end = 0

    def allocate(self, like: torch.Tensor, capacity: int, width: int) -> None:
        shape = (capacity, like.shape[1], width + self.reserve, like.shape[3])
        self.key_buffer = like.new_zeros(shape)
        self.value_buffer = like.new_zeros(shape)
        self.dtype, self.device, self.is_initialized = like.dtype, like.device, True
        self.begin, self.end = 0, width
        self._refresh()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self.end + new > self.key_buffer.shape[-2]:
            self._reallocate(left=0, right=new + self.reserve)
        self.key_buffer[: self.rows, :, self.end : self.end + new] = key_states
        self.value_buffer[: self.rows, :, self.end : self.end + new] = value_states
        self.end += new
        self._refresh()
        return self.keys, self.values

    def row_bytes(self) -> int:
        """Bytes of one row's used keys and values."""
        if self.key_buffer is None:
            return 0
        return 2 * self.key_buffer[0, :, self.begin : self.end].numel() * self.key_buffer.element_size()

    def move_row(self, source: int, target: int) -> None:
        for buffer in (self.key_buffer, self.value_buffer):
            buffer[target, :, self.begin : self.end] = buffer[source, :, self.begin : self.end]
        self.copies.row_moves += 1
        self.copies.moved_bytes += self.row_bytes()

    def write(self, keys: torch.Tensor, values: torch.Tensor, at: int) -> None:
        """Rows at..at+n-1 take `keys`/`values` (n rows, at most the used width), right-aligned."""
        rows, columns = keys.shape[0], keys.shape[-2]
        self.key_buffer[at : at + rows, :, self.end - columns : self.end] = keys
        self.value_buffer[at : at + rows, :, self.end - columns : self.end] = values

    def grow_left(self, columns: int) -> None:
        """Add `columns` on the left; their content is stale and the mask hides it. Copies the used
        part only when no room is left of `begin`."""
        if self.begin < columns:
            self._reallocate(left=columns, right=self.reserve)
        else:
            self.begin -= columns
        self._refresh()

    def drop_left(self, columns: int) -> None:
        self.begin += columns
        self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` in that order: a copy of every kept row (the way to drop rows in bulk)."""
        for buffer in (self.key_buffer, self.value_buffer):
            buffer[: len(indices), :, self.begin : self.end] = buffer[indices, :, self.begin : self.end]
        self.rows = len(indices)
        self._count_whole_copy()
        self._refresh()

    def _reallocate(self, left: int, right: int) -> None:
        width = self.end - self.begin
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], left + width + right, old.shape[3])
            new[: self.rows, :, left : left + width] = old[: self.rows, :, self.begin : self.end]
            setattr(self, name, new)
        self.begin, self.end = 0, left + width
        self._count_whole_copy()

    def _count_whole_copy(self) -> None:
        self.copies.whole_copies += 1
        self.copies.whole_bytes += self.row_bytes() * self.rows

    def _refresh(self) -> None:
        self.keys = self.key_buffer[: self.rows, :, self.begin : self.end]
        self.values = self.value_buffer[: self.rows, :, self.begin : self.end]


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s with `capacity` row slots.

    Rows are filled by writing separately prefilled chunks (`write`) and leave by having another row
    moved into their slot (`move_row`: one row of every layer is copied, never the whole cache);
    `copies` counts every copy, so a test can check that retiring a row stays cheap.
    """

    def __init__(self, config, reserve: int = 256, capacity: int = 0):
        super().__init__(config=config)
        self.copies = CopyCounter()
        self.layers = [GrowingLayer(reserve, self.copies) for _ in self.layers]
        self.capacity = capacity

    @staticmethod
    def supports(config) -> bool:
        layers = DynamicCache(config=config).layers
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    @property
    def width(self) -> int:
        return self.layers[0].end - self.layers[0].begin

    def live_bytes(self) -> int:
        """Bytes of the used keys and values of every live row: what copying the whole cache moves."""
        return sum(layer.row_bytes() * layer.rows for layer in self.layers)

    def set_rows(self, rows: int) -> None:
        for layer in self.layers:
            layer.rows = rows
            if layer.key_buffer is not None:
                layer._refresh()

    def move_row(self, source: int, target: int) -> None:
        for layer in self.layers:
            layer.move_row(source, target)

    def write(self, part: DynamicCache, at: int, width: int) -> None:
        """Copy `part` (the rows of one prefill chunk, left-padded to its own width) right-aligned into
        rows at.. of this cache, first widening it on the left to `width` columns if narrower."""
        for layer, source in zip(self.layers, part.layers):
            if layer.key_buffer is None:
                layer.allocate(source.keys, self.capacity, width)
            elif width > layer.end - layer.begin:
                layer.grow_left(width - (layer.end - layer.begin))
            layer.write(source.keys, source.values, at)

    def drop_left(self, columns: int) -> None:
        for layer in self.layers:
            layer.drop_left(columns)
