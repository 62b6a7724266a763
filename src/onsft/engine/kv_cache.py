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


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in a buffer with spare room along the sequence.

    `DynamicLayer` concatenates at every step, copying the whole cache each time; with long hinted
    prompts that copy costs as much as the attention itself. Here a step writes one column in place
    and the buffer grows by `reserve` columns when full. `keys`/`values` are views of the used part,
    so everything that reads a `DynamicLayer` (mask sizes, sequence length) works unchanged.
    """

    def __init__(self, reserve: int = 256):
        super().__init__()
        self.reserve = reserve
        self.key_buffer = self.value_buffer = None
        self.length = 0

    def allocate(self, like: torch.Tensor, rows: int, width: int) -> None:
        shape = (rows, like.shape[1], width + self.reserve, like.shape[3])
        self.key_buffer = like.new_zeros(shape)
        self.value_buffer = like.new_zeros(shape)
        self.dtype, self.device, self.is_initialized = like.dtype, like.device, True
        self.length = width
        self._refresh()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self.length + new > self.key_buffer.shape[-2]:
            room = self.length + new + self.reserve
            self.key_buffer = _widen(self.key_buffer, room)
            self.value_buffer = _widen(self.value_buffer, room)
        self.key_buffer[:, :, self.length : self.length + new] = key_states
        self.value_buffer[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._refresh()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer = self.key_buffer.index_select(0, indices)
        self.value_buffer = self.value_buffer.index_select(0, indices)
        self._refresh()

    def drop_left(self, columns: int) -> None:
        self.key_buffer = self.key_buffer[:, :, columns:]
        self.value_buffer = self.value_buffer[:, :, columns:]
        self.length -= columns
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s, filled by placing separately prefilled chunks of rows."""

    def __init__(self, config, reserve: int = 256):
        super().__init__(config=config)
        self.layers = [GrowingLayer(reserve) for _ in self.layers]

    @staticmethod
    def supports(config) -> bool:
        layers = DynamicCache(config=config).layers
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def place(self, part: DynamicCache, start: int, stop: int, rows: int, width: int) -> None:
        """Copy `part` (rows start..stop-1, left-padded to its own width) right-aligned into rows
        start..stop-1 of a `rows` x `width` cache."""
        for layer, source in zip(self.layers, part.layers):
            if layer.key_buffer is None:
                layer.allocate(source.keys, rows, width)
            columns = source.keys.shape[-2]
            layer.key_buffer[start:stop, :, width - columns : width] = source.keys
            layer.value_buffer[start:stop, :, width - columns : width] = source.values

    def drop_left(self, columns: int) -> None:
        for layer in self.layers:
            layer.drop_left(columns)


def _widen(buffer: torch.Tensor, width: int) -> torch.Tensor:
    wider = buffer.new_zeros(buffer.shape[0], buffer.shape[1], width, buffer.shape[3])
    wider[:, :, : buffer.shape[2]] = buffer
    return wider
