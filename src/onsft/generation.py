"""Batched decoding with a KV cache: sampling rules, stop rules, and the loop hinted decoding shares.

One loop serves plain generation and hinted decoding. Every example owns one or two *contexts*
(token rows): a plain prompt, and optionally a hinted prompt. All rows of a batch run through the
model together, left-padded, with one KV cache. At each step the loop turns the rows' next-token
log-probs into one distribution per example (plain generation: the plain row's; hinted decoding: a
mixture, see `onsft.hinted`), samples one token per example, appends it to every row of that example,
and drops rows that are no longer needed (finished examples; hinted rows after the hand-over), so
they stop costing compute. Plain `generate` is this loop with no hinted rows.

Sampling is deterministic for a seed and independent of batching: each example draws from its own
`torch.Generator`, seeded from (seed, the example's index in the input list).

What keeps a step cheap (a decoding step mostly reads weights and the KV cache): a prefix shared by
a group's prompts is prefilled once; the cache grows in place instead of being concatenated every
step; rows that finish or hand over leave the batch, and columns that are padding for every row are
cut; with `sdpa` models, attention runs per span of rows (hinted, plain) from the span's first used
column, so short plain rows do not read the hinted rows' long padding.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from onsft.errors import UserError

FINISH_REASONS = ("eos", "stop", "length", "repetition")
NUCLEUS_CANDIDATES = 256  # top-p looks among this many most likely tokens before sorting everything


@dataclass
class SamplingConfig:
    """How to sample continuations. Field names follow `transformers.GenerationConfig` where they overlap."""

    max_new_tokens: int = field(default=1024, metadata={"help": "Most tokens generated per example."})
    min_new_tokens: int = field(
        default=0, metadata={"help": "EOS is suppressed until this many tokens exist (benchmarks, length floors)."}
    )
    temperature: float = field(default=0.0, metadata={"help": "Softmax temperature; 0 means greedy (argmax)."})
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling: keep the smallest set of tokens holding this much probability (1 = off)."},
    )
    top_k: int = field(default=0, metadata={"help": "Keep only the k most likely tokens (0 = off)."})
    seed: int = field(
        default=0,
        metadata={
            "help": "Sampling seed; example i draws from its own generator "
            "seeded by (seed, i), so batching does not change samples."
        },
    )
    repetition_window: int = field(
        default=30,
        metadata={
            "help": "Stop a row when one window of this many tokens has occurred "
            "`repetition_count` times (a degenerate loop)."
        },
    )
    repetition_count: int = field(
        default=5, metadata={"help": "Occurrences of one window that stop a row (0 = never stop for repetition)."}
    )
    stop_strings: list[str] = field(
        default_factory=list,
        metadata={
            "help": "A row stops (finish_reason 'stop') once its text contains one of "
            "these; the tokens that complete it are kept."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Examples decoded together."})
    use_cache: bool = field(
        default=True,
        metadata={
            "help": "Decode with a KV cache. False recomputes the whole sequence every step "
            "(quadratic; only for tests and as a benchmark baseline)."
        },
    )

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(("max_new_tokens", "must be at least 1"))
        if self.min_new_tokens < 0:
            problems.append(("min_new_tokens", "must be >= 0"))
        if self.temperature < 0:
            problems.append(("temperature", "must be >= 0 (0 = greedy)"))
        if not 0 < self.top_p <= 1:
            problems.append(("top_p", "must be in (0, 1]"))
        if self.top_k < 0:
            problems.append(("top_k", "must be >= 0 (0 = off)"))
        if self.repetition_count < 0 or self.repetition_window < 1:
            problems.append(("repetition_window/count", "window must be >= 1 and count >= 0"))
        if self.batch_size < 1:
            problems.append(("batch_size", "must be at least 1"))
        if any(not stop for stop in self.stop_strings):
            problems.append(("stop_strings", "must not contain an empty string"))
        if problems:
            name, why = problems[0]
            raise UserError(f"`{name}` {why}", where="config", fix=f"set a valid `{name}`.")


@dataclass
class Generation:
    """One decoded continuation. `finish_reason` is one of FINISH_REASONS. `token_ids` include the
    final EOS when it is 'eos' (as `model.generate` returns it) and the tokens completing the stop
    string when it is 'stop'; `text` is decoded without special tokens."""

    token_ids: list[int]
    text: str
    finish_reason: str
    n_tokens: int


# ---------------------------------------------------------------------------------------------
# Pure functions: sampling and the repetition rule
# ---------------------------------------------------------------------------------------------


def filter_logprobs(
    logprobs: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order `transformers` applies them) over the last dim.

    Input may be unnormalised (a geometric mixture); output is normalised log-probs with the removed
    tokens at -inf. Temperature must be > 0 here; greedy decoding is an argmax and never calls this.
    """
    if temperature <= 0:
        raise ValueError("filter_logprobs needs temperature > 0; use argmax for greedy decoding")
    scores = torch.log_softmax(logprobs.float() / temperature, dim=-1)
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        # Renormalised so the nucleus below is measured within the top k, as transformers does.
        scores = torch.log_softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)
    if top_p < 1.0:
        # The nucleus is usually a few tokens: look for it among the most likely candidates and sort
        # the whole vocabulary only when some row's candidates hold less than top_p.
        candidates = min(vocab, NUCLEUS_CANDIDATES)
        ordered, order = torch.topk(scores, candidates, dim=-1)
        if candidates < vocab and not bool((ordered.exp().sum(-1) >= top_p).all()):
            ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = ordered.exp()
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # Keep a token while the mass of strictly more likely tokens is below top_p: the smallest
        # prefix reaching top_p, and never less than the single most likely token.
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, keep_sorted)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def example_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of example `index`: fixed by (seed, index) alone, so batch size and order do
    not change what an example samples."""
    # A multiplicative (golden-ratio) mix keeps streams of neighbouring seeds and indices apart.
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(mixed)
    return generator


def sample_tokens(logprobs: torch.Tensor, config: SamplingConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `logprobs` [N, V] (unnormalised is fine): argmax when temperature is 0,
    else a draw from the filtered distribution by inverse CDF with one uniform from row i's own
    generator (one batched search instead of N multinomial calls)."""
    if config.temperature == 0:
        return torch.argmax(logprobs, dim=-1)
    probs = filter_logprobs(logprobs, config.temperature, config.top_k, config.top_p).exp()
    uniforms = torch.cat([torch.rand(1, generator=g, device=g.device, dtype=probs.dtype) for g in generators])
    cdf = torch.cumsum(probs, dim=-1)
    # The first token whose cumulative mass exceeds u * total: token v with probability p_v / total.
    target = (uniforms.to(probs.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def has_repeated_window(tokens: list[int], window: int, count: int) -> bool:
    """True when some run of `window` consecutive tokens occurs at least `count` times (overlaps count).
    The naive statement of the rule; `RepetitionDetector` is its incremental form."""
    if count <= 0 or len(tokens) < window:
        return False
    seen = Counter(tuple(tokens[i : i + window]) for i in range(len(tokens) - window + 1))
    return max(seen.values()) >= count


class RepetitionDetector:
    """Incremental `has_repeated_window`: `push` one token at a time, O(window) per token.

    The reference code scans the whole output every 100 tokens; checking at each token stops a loop
    as soon as it qualifies instead of up to 99 tokens later.
    """

    def __init__(self, window: int, count: int):
        self.window, self.count = window, count
        self.recent: deque[int] = deque(maxlen=window)
        self.seen: Counter[tuple[int, ...]] = Counter()

    def push(self, token: int) -> bool:
        if self.count <= 0:
            return False
        self.recent.append(token)
        if len(self.recent) < self.window:
            return False
        key = tuple(self.recent)
        self.seen[key] += 1
        return self.seen[key] >= self.count


# ---------------------------------------------------------------------------------------------
# Rows of token contexts in one batch with one KV cache
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Attention over row spans: skip the columns that are padding for a whole span of rows
# ---------------------------------------------------------------------------------------------

SPAN_ATTENTION = "onsft_row_spans"
_ROW_SPANS: ContextVar[list[tuple[int, int, int]] | None] = ContextVar("onsft_row_spans", default=None)


def _row_span_attention(module, query, key, value, attention_mask, **kwargs):
    """`sdpa` attention, run per span (start, stop, first column) of rows at a decoding step.

    Hinted rows hold long prompts, plain rows short ones; in one rectangular cache the plain rows'
    left padding is most of their columns, and attention reads it all (the cost of a decoding step on
    a CPU is mostly reading the KV cache). Attending per span from the span's first used column
    reads only what the span uses. Outside a decoding step (prefill, spans unset) it is `sdpa`.
    """
    spans = _ROW_SPANS.get()
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


class RowBatch:
    """Token rows decoded together: padded, sharing one forward pass per step and one KV cache.

    Positions come from the attention mask (a row's first real token is position 0), so padding
    changes nothing a row computes. With `use_cache=False` every step recomputes all rows from scratch
    (the quadratic baseline); results must agree with the cached path.

    Prefill works per group of rows (hinted rows, plain rows): a prefix that every prompt of a group
    shares (a rewriting instruction, a chat template's system prompt) is computed once and copied to
    the rows, and each chunk of rows is padded only to its own longest prompt. A row's layout is then
    [left padding | shared prefix | padding | rest of prompt | generated tokens], all held by the mask.
    """

    def __init__(
        self,
        model,
        prompts: list[list[int]],
        *,
        use_cache: bool = True,
        pad_id: int = 0,
        prefill_groups: list[range] | None = None,
        prefill_token_budget: int = 4096,
        min_shared_prefix: int = 16,
        cache_reserve: int = 256,
    ):
        self.model = model
        self.device = model.device
        self.use_cache = use_cache
        self.pad_id = pad_id
        lengths = torch.tensor([len(p) for p in prompts])
        self.next_position = lengths.to(self.device)
        width = int(lengths.max())
        if use_cache and GrowingCache.supports(model.config):
            self.ids = None
            self.logprobs = self._prefill(
                prompts, prefill_groups or [range(len(prompts))], prefill_token_budget, min_shared_prefix, cache_reserve
            )
            return
        self.mask = _left_padded(prompts, 0, width, lambda p: [1] * len(p)).to(self.device)
        ids = _left_padded(prompts, pad_id, width, list).to(self.device)
        if use_cache:
            # Cache layouts we do not manage (sliding windows, ...): one plain left-padded prefill.
            self.ids, self.cache = None, DynamicCache(config=model.config)
            self.logprobs = self._forward(ids, self.mask, self.cache)
        else:
            self.ids, self.cache = ids, None
            self.logprobs = self._forward(ids, self.mask, None)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def advance(self, keep: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """Keep only rows `keep` (None = all), append one token to each, return next-token log-probs."""
        if keep is not None:
            self._select(keep.to(self.device))
        tokens = tokens.to(self.device).view(-1, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        if self.use_cache:
            first = (self.mask != 0).to(torch.int8).argmax(dim=1).tolist()
            token = _ROW_SPANS.set(row_spans(first, self.mask.shape[1]))
            try:
                out = self.model(
                    input_ids=tokens,
                    attention_mask=self.mask,
                    position_ids=self.next_position.view(-1, 1),
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            finally:
                _ROW_SPANS.reset(token)
            self.logprobs = _logprobs(out.logits[:, -1])
        else:
            self.ids = torch.cat([self.ids, tokens], dim=1)
            self.logprobs = self._forward(self.ids, self.mask, None)
        self.next_position = self.next_position + 1
        return self.logprobs

    # -- internals ---------------------------------------------------------------------------

    def _forward(self, ids, mask, cache, skip: int = 0) -> torch.Tensor:
        """Run `ids` (the columns of `mask` after the first `skip`, which `cache` already holds)."""
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, skip:]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
            logits_to_keep=1,
        )
        return _logprobs(out.logits[:, -1])

    def _prefill(self, prompts, groups, token_budget, min_shared_prefix, reserve) -> torch.Tensor:
        config = self.model.config
        plans = []  # (rows, shared prefix length, prefix cache, padded width)
        for group in groups:
            rows = [prompts[i] for i in group]
            # Keep one token out of the prefix so every row's last position is computed with its chunk.
            shared = min(_common_prefix_length(rows), min(map(len, rows)) - 1) if len(rows) > 1 else 0
            prefix = None
            if shared >= min_shared_prefix:
                prefix = DynamicCache(config=config)
                ids = torch.tensor([rows[0][:shared]], device=self.device)
                self._forward(ids, torch.ones_like(ids), prefix)
            else:
                shared = 0
            for chunk in _chunks(group, [len(prompts[i]) - shared for i in group], token_budget):
                plans.append((chunk, shared, prefix, max(len(prompts[i]) for i in chunk)))
        total = max(plan[3] for plan in plans)
        self.mask = torch.zeros(len(prompts), total, dtype=torch.long, device=self.device)
        self.cache = GrowingCache(config, reserve)
        logprobs = []
        for chunk, shared, prefix, width in plans:
            rest = [prompts[i][shared:] for i in chunk]
            ids = _left_padded(rest, self.pad_id, width - shared, list).to(self.device)
            mask = _left_padded(rest, 0, width - shared, lambda p: [1] * len(p)).to(self.device)
            mask = torch.cat([mask.new_ones(len(chunk), shared), mask], dim=1)
            part = DynamicCache(config=config)
            if prefix is not None:
                for layer, source in zip(part.layers, prefix.layers):
                    layer.update(
                        source.keys.expand(len(chunk), -1, -1, -1), source.values.expand(len(chunk), -1, -1, -1)
                    )
            logprobs.append(self._forward(ids, mask, part, skip=shared))
            self.mask[chunk.start : chunk.stop, total - width :] = mask
            self.cache.place(part, chunk.start, chunk.stop, len(prompts), total)
        return torch.cat(logprobs)

    def _select(self, keep: torch.Tensor) -> None:
        self.mask = self.mask[keep]
        self.next_position = self.next_position[keep]
        if self.use_cache:
            self.cache.batch_select_indices(keep)
        else:
            self.ids = self.ids[keep]
        # Columns that are padding in every remaining row (e.g. the hinted rows' long prompts after
        # they left) cost attention for nothing: cut them.
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start == 0:
            return
        if not self.use_cache:
            self.ids = self.ids[:, start:]
        elif isinstance(self.cache, GrowingCache):
            self.cache.drop_left(start)
        else:
            return
        self.mask = self.mask[:, start:]


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


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    # NaN or +inf logits (broken weights, fp16 overflow) would be decoded silently as garbage (argmax of a
    # NaN row is arbitrary) and then verified and written as if real; stop instead. -inf is a masked token.
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise UserError(
            "the model produced non-finite logits (NaN or +inf) while decoding",
            where="model",
            fix="check the model's weights, or load it in float32 (--dtype float32).",
        )
    # At least float32 for the mixture and the entropy; a float64 model keeps float64.
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _left_padded(rows, pad, width, content) -> torch.Tensor:
    return torch.tensor([[pad] * (width - len(r)) + content(r) for r in rows], dtype=torch.long)


def _common_prefix_length(rows: list[list[int]]) -> int:
    first = rows[0]
    length = min(map(len, rows))
    for row in rows[1:]:
        n = 0
        while n < length and row[n] == first[n]:
            n += 1
        length = n
    return length


def _chunks(indices: range, lengths: list[int], token_budget: int) -> list[range]:
    """Split consecutive rows so each chunk's padded size (rows x longest) stays within the budget."""
    out, start, longest = [], 0, 0
    for offset, length in enumerate(lengths):
        wider = max(longest, length)
        if offset > start and wider * (offset - start + 1) > token_budget:
            out.append(indices[start:offset])
            start, wider = offset, length
        longest = wider
    out.append(indices[start : len(lengths)])
    return out


# ---------------------------------------------------------------------------------------------
# The decoding loop shared by `generate` and `onsft.hinted.hinted_decode`
# ---------------------------------------------------------------------------------------------

# mixer(hinted_logprobs [N, V], plain_logprobs [N, V]) -> (mixed scores [N, V], lambda [N])
Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Trace:
    """What the loop records per example; `generate` and `hinted_decode` turn it into their results."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    lambdas: list[float] = field(default_factory=list)
    handover_step: int | None = None


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the model's generation config (may be several) and the tokenizer."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def decode_examples(
    model,
    tokenizer,
    plain_ids: list[list[int]],
    hinted_ids: list[list[int]] | None,
    config: SamplingConfig,
    mixer: Mixer | None = None,
    answer_marker: str = "",
    hinted_first: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[Trace]:
    """Decode every example; returns traces in input order.

    With `hinted_ids`, example i has a hinted row and a plain row; each step's distribution is
    `mixer(hinted, plain)`, except the first step (hinted alone, when `hinted_first`) and every step
    after `answer_marker` appeared in the generated text (plain alone; the hinted row is dropped).
    Without `hinted_ids` each example has its plain row only: ordinary decoding.
    """
    config.validate()
    if hinted_ids is not None and mixer is None:
        raise ValueError("decoding with hinted contexts needs a mixer (see onsft.hinted.make_mixer)")
    if hinted_ids is not None and len(hinted_ids) != len(plain_ids):
        raise UserError(
            f"{len(hinted_ids)} hinted prompts for {len(plain_ids)} plain prompts",
            where="hinted decoding",
            fix="pass one hinted prompt per plain prompt.",
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    for name, prompts in (("plain", plain_ids), ("hinted", hinted_ids or [])):
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise UserError(f"{name} prompt {i} is empty", where="generation", fix="drop the example.")
            if limit and len(prompt) >= limit:
                raise UserError(
                    f"{name} prompt {i} has {len(prompt)} tokens, the model's context is {limit}",
                    where="generation",
                    fix="shorten the prompt or drop the example.",
                )
    # Similar lengths together waste less padding; results do not depend on the grouping.
    lead = hinted_ids if hinted_ids is not None else plain_ids
    order = sorted(range(len(plain_ids)), key=lambda i: (-len(lead[i]), -len(plain_ids[i]), i))
    traces: list[Trace | None] = [None] * len(plain_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), span_attention(model):
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                done = _decode_batch(
                    model, tokenizer, batch, plain_ids, hinted_ids, config, mixer, answer_marker, hinted_first, limit
                )
                for i, trace in zip(batch, done):
                    traces[i] = trace
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return traces  # type: ignore[return-value]


def _decode_batch(
    model, tokenizer, batch, plain_ids, hinted_ids, config, mixer, answer_marker, hinted_first, limit
) -> list[Trace]:
    n = len(batch)
    hinted = hinted_ids is not None
    prompts = ([hinted_ids[i] for i in batch] if hinted else []) + [plain_ids[i] for i in batch]
    groups = [range(0, n), range(n, 2 * n)] if hinted else [range(n)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = RowBatch(model, prompts, use_cache=config.use_cache, pad_id=pad_id, prefill_groups=groups)
    device = rows.logprobs.device
    stops = torch.tensor(stop_token_ids(model, tokenizer), dtype=torch.long, device=device)
    stop_set = set(stops.tolist())
    generators = [example_generator(config.seed, i, device) for i in batch]
    detectors = [RepetitionDetector(config.repetition_window, config.repetition_count) for _ in batch]
    traces = [Trace() for _ in batch]
    # A row's positions grow from its own prompt length; the longest row of an example meets the
    # model's context first.
    room = [max(len(plain_ids[i]), len(hinted_ids[i]) if hinted else 0) for i in batch]
    # Row of each context of each example in the current RowBatch (-1 = that row is gone).
    hinted_row = list(range(n)) if hinted else [-1] * n
    plain_row = [j + n for j in range(n)] if hinted else list(range(n))
    active = list(range(n))
    # Tokens decoded to look for the marker and stop strings: each token is >= 1 character, plus margin.
    text_tail = max([len(answer_marker), *map(len, config.stop_strings)]) + 32
    for step in range(config.max_new_tokens):
        h_rows = torch.tensor([hinted_row[j] for j in active], device=device)
        p_rows = torch.tensor([plain_row[j] for j in active], device=device)
        plain_lp = rows.logprobs[p_rows]
        has_hint = h_rows >= 0
        if bool(has_hint.any()):
            hint_lp = rows.logprobs[torch.where(has_hint, h_rows, p_rows)]
            if step == 0 and hinted_first:
                scores, lam = hint_lp, torch.zeros(len(active), device=device)
            else:
                scores, lam = mixer(hint_lp, plain_lp)
            # Examples whose hinted row is gone decode the plain context alone.
            scores = torch.where(has_hint[:, None], scores, plain_lp)
            lam = torch.where(has_hint, lam, torch.ones_like(lam))
        else:
            scores, lam = plain_lp, torch.ones(len(active), device=device)
        if step < config.min_new_tokens and stops.numel():
            scores = scores.index_fill(-1, stops, float("-inf"))
        tokens = sample_tokens(scores, config, [generators[j] for j in active]).tolist()
        lam_list = lam.tolist()

        still = []
        for slot, j in enumerate(active):
            token, trace = tokens[slot], traces[j]
            trace.token_ids.append(token)
            trace.lambdas.append(lam_list[slot])
            watch_marker = hinted_row[j] >= 0 and bool(answer_marker)
            # Strings are looked for in the decoded tail only: they first appear ending at this token.
            tail = (
                tokenizer.decode(trace.token_ids[-text_tail:], skip_special_tokens=False)
                if watch_marker or config.stop_strings
                else ""
            )
            reason = None
            if token in stop_set:
                reason = "eos"
            elif any(stop in tail for stop in config.stop_strings):
                reason = "stop"
            elif len(trace.token_ids) >= config.max_new_tokens or (limit and room[j] + len(trace.token_ids) >= limit):
                reason = "length"
            elif detectors[j].push(token):
                reason = "repetition"
            if reason is not None:
                trace.finish_reason = reason
                continue
            still.append(j)
            if watch_marker:
                if answer_marker in tail:
                    trace.handover_step = step + 1  # the first step decoded by the plain context alone
                    hinted_row[j] = -1
        if not still:
            break
        # Surviving rows keep their relative order, so selecting them is one sorted index_select.
        pairs = sorted(
            (row, traces[j].token_ids[-1]) for j in still for row in (hinted_row[j], plain_row[j]) if row >= 0
        )
        renumber = {old: new for new, (old, _) in enumerate(pairs)}
        for j in still:
            hinted_row[j] = renumber[hinted_row[j]] if hinted_row[j] >= 0 else -1
            plain_row[j] = renumber[plain_row[j]]
        keep = None if len(pairs) == rows.rows else torch.tensor([row for row, _ in pairs])
        rows.advance(keep, torch.tensor([token for _, token in pairs]))
        active = still
    return traces


def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    config: SamplingConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Sample one continuation per prompt (token ids), batched, stopping per row at EOS, a stop string,
    `max_new_tokens` or a repetition loop. Results do not depend on `batch_size` (nor, for greedy
    decoding, on the order of the prompts)."""
    config = config or SamplingConfig()
    traces = decode_examples(model, tokenizer, prompt_ids, None, config, progress=progress)
    return [
        Generation(
            token_ids=t.token_ids,
            text=tokenizer.decode(t.token_ids, skip_special_tokens=True),
            finish_reason=t.finish_reason,
            n_tokens=len(t.token_ids),
        )
        for t in traces
    ]
