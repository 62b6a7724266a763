"""`RowBatch`: token rows decoded together, left-padded, sharing one forward pass per step and one KV cache."""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache

from onsft.engine.kv_cache import ROW_SPANS, GrowingCache, row_spans
from onsft.errors import UserError


def cache_keyword(model) -> str:
    """The name of forward's KV-cache argument: transformers 5.25 renamed `past_key_values` to `cache` (the old
    name warns on every model and goes in 5.40); earlier 5.x releases, and wrappers without the new name, take
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class RowBatch:
    """Token rows decoded together: padded, sharing one forward pass per step and one KV cache.

    Positions come from the attention mask (a row's first real token is position 0), so padding
    changes nothing a row computes. With `use_cache=False` every step recomputes all rows from scratch
    (the quadratic baseline); results must agree with the cached path.

    Rows belong to groups (hinted rows, plain rows) and every group's rows stay contiguous, in group
    order, so attention can run per span of rows (`kv_cache.row_spans`). Each row has a key (its
    example and context) and `row_of` finds it; rows move. The batch keeps `capacity` row slots:
    `admit` prefills new prompts into free slots while other rows keep decoding (continuous
    batching), `retire` frees a row's slot by moving at most one row per group into it (a few rows of
    the KV cache are copied, never the whole cache), `step` appends one token to every row.

    Prefill works per group: a prefix that every prompt of a group shares (a rewriting instruction, a
    chat template's system prompt) is computed once per batch object, i.e. once per run, and copied to
    the rows; each chunk of new rows is padded only to its own longest prompt. A row's layout is then
    [stale or left padding | shared prefix | padding | rest of prompt | generated tokens], all held by
    the mask; its prompt ends at the cache's current last column.
    """

    def __init__(
        self,
        model,
        prompts: list[list[int]] | None = None,
        *,
        use_cache: bool = True,
        pad_id: int = 0,
        prefill_groups: list[range] | None = None,
        prefill_token_budget: int = 4096,
        min_shared_prefix: int = 16,
        cache_reserve: int = 256,
        capacity: int | None = None,
        groups: int = 1,
        shared_prefixes: list[list[int]] | None = None,
    ):
        self.model = model
        self.device = model.device
        self.use_cache = use_cache
        self.pad_id = pad_id
        self.token_budget = prefill_token_budget
        prompts = prompts or []
        if prefill_groups is None:
            prefill_groups = [range(len(prompts))] if prompts else [range(0)] * groups
        self.capacity = capacity or len(prompts)
        self.managed = use_cache and GrowingCache.supports(model.config)
        self.block_end = [0] * len(prefill_groups)
        self.keys: list = []
        self.row_of: dict = {}
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.ids = self.mask.clone() if not use_cache else None
        self.next_position = torch.zeros(0, dtype=torch.long, device=self.device)
        self.logprobs = None
        self.cache = GrowingCache(model.config, cache_reserve, self.capacity) if self.managed else None
        self.cache_keyword = cache_keyword(model)
        if shared_prefixes is None:
            shared_prefixes = [group_prefix([prompts[i] for i in g], "auto", min_shared_prefix) for g in prefill_groups]
        self.prefixes = [list(prefix) if self.managed else [] for prefix in shared_prefixes]
        self.prefix_caches: list[DynamicCache | None] = [None] * len(self.prefixes)
        entries = [(i, g, prompts[i]) for g, group in enumerate(prefill_groups) for i in group]
        if entries:
            self.admit(entries)

    @property
    def rows(self) -> int:
        return len(self.keys)

    def can_admit(self, rows: int) -> bool:
        """Whether `rows` new rows fit now. A cache layout we do not manage (sliding windows, ...)
        takes new rows only once every row has left."""
        return self.rows + rows <= self.capacity and (self.managed or not self.use_cache or self.rows == 0)

    def admit(self, entries: list[tuple[object, int, list[int]]]) -> None:
        """Add rows (key, group, prompt); afterwards `logprobs[row_of[key]]` is each new row's
        next-token log-probs, and the other rows' are unchanged."""
        if not self.can_admit(len(entries)):
            raise ValueError(f"{len(entries)} new rows do not fit ({self.rows} of {self.capacity} used)")
        if self.use_cache and not self.managed:
            return self._admit_unmanaged(entries)
        n_groups = len(self.block_end)
        counts = [sum(1 for _, g, _ in entries if g == group) for group in range(n_groups)]
        # Open room at the end of each group's block: the later blocks shift right, moving at most as
        # many rows as are admitted per block (the rows at a block's start go to its end).
        grown = self.rows + len(entries)
        self.keys.extend([None] * len(entries))
        self.mask = torch.cat([self.mask, self.mask.new_zeros(len(entries), self.mask.shape[1])])
        self.next_position = torch.cat([self.next_position, self.next_position.new_zeros(len(entries))])
        if self.ids is not None:
            self.ids = torch.cat([self.ids, self.ids.new_full((len(entries), self.ids.shape[1]), self.pad_id)])
        if self.logprobs is not None:
            self.logprobs = torch.cat([self.logprobs, self.logprobs.new_zeros(len(entries), self.logprobs.shape[1])])
        if self.cache is not None:
            self.cache.set_rows(grown)
        starts = [0, *self.block_end[:-1]]
        shift = sum(counts)
        for group in range(n_groups - 1, -1, -1):
            shift -= counts[group]
            start, end = starts[group], self.block_end[group]
            if shift:
                vacated = range(start, min(start + shift, end))
                for k, row in enumerate(vacated):
                    self._move(row, max(end, start + shift) + k)
            self.block_end[group] = end + shift + counts[group]
        for group in range(n_groups):
            new = [(key, prompt) for key, g, prompt in entries if g == group]
            if new:
                self._prefill_group(group, new, self.block_end[group] - len(new))

    def retire(self, keys: list) -> None:
        """Free the rows of `keys`: the last row of the row's group block moves into its slot, and the
        hole moves block by block to the end (at most one row per later group is copied)."""
        if self.use_cache and not self.managed:
            leaving = {self.row_of.pop(key) for key in keys}
            kept = [r for r in range(self.rows) if r not in leaving]
            self._select(torch.tensor(kept, dtype=torch.long, device=self.device))
            return
        for key in keys:
            hole = self.row_of.pop(key)
            group = next(g for g, end in enumerate(self.block_end) if hole < end)
            for later in range(group, len(self.block_end)):
                # The block's last row fills the hole (none when the hole is that row, or the block
                # is empty); the block then ends one row earlier, and the hole is the next block's
                # first slot minus one.
                last = self.block_end[later] - 1
                if last != hole:
                    self._move(last, hole)
                    hole = last
                self.block_end[later] -= 1
            self._shrink(self.rows - 1)
        self._trim()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens[r]` to row r of every row, return the next-token log-probs."""
        tokens = tokens.to(self.device).view(-1, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        if self.use_cache:
            first = (self.mask != 0).to(torch.int8).argmax(dim=1).tolist()
            token = ROW_SPANS.set(row_spans(first, self.mask.shape[1]))
            try:
                out = self.model(
                    input_ids=tokens,
                    attention_mask=self.mask,
                    position_ids=self.next_position.view(-1, 1),
                    **{self.cache_keyword: self.cache},
                    use_cache=True,
                    logits_to_keep=1,
                )
            finally:
                ROW_SPANS.reset(token)
            self.logprobs = _logprobs(out.logits[:, -1])
        else:
            self.ids = torch.cat([self.ids, tokens], dim=1)
            self.logprobs = self._forward(self.ids, self.mask, None)
        self.next_position = self.next_position + 1
        return self.logprobs

    def advance(self, keep: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """Keep only rows `keep` (ascending; None = all; a copy of every kept row), then `step`."""
        if keep is not None:
            self._select(keep.to(self.device))
        return self.step(tokens)

    # -- internals ---------------------------------------------------------------------------

    def _forward(self, ids, mask, cache, skip: int = 0) -> torch.Tensor:
        """Run `ids` (the columns of `mask` after the first `skip`, which `cache` already holds)."""
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, skip:]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **{self.cache_keyword: cache},
            use_cache=cache is not None,
            logits_to_keep=1,
        )
        return _logprobs(out.logits[:, -1])

    def _prefix_cache(self, group: int) -> DynamicCache | None:
        prefix = self.prefixes[group]
        if prefix and self.prefix_caches[group] is None:
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([prefix], device=self.device)
            self._forward(ids, torch.ones_like(ids), cache)
            self.prefix_caches[group] = cache
        return self.prefix_caches[group]

    def _prefill_group(self, group: int, new: list[tuple[object, list[int]]], at: int) -> None:
        """Prefill `new` (key, prompt) into rows at.. of the group's block, chunk by chunk."""
        shared = len(self.prefixes[group])
        if any(prompt[:shared] != self.prefixes[group] or len(prompt) <= shared for _, prompt in new):
            raise ValueError("every prompt of a group must extend the group's shared prefix")
        prefix = self._prefix_cache(group)
        prompts = [prompt for _, prompt in new]
        widths = [len(p) for p in prompts]
        if max(widths) > self.mask.shape[1]:
            self._grow_left(max(widths) - self.mask.shape[1])
        total = self.mask.shape[1]
        for chunk in _chunks(range(len(new)), [w - shared for w in widths], self.token_budget):
            width = max(widths[i] for i in chunk)
            rest = [prompts[i][shared:] for i in chunk]
            mask = _left_padded(rest, 0, width - shared, lambda p: [1] * len(p)).to(self.device)
            mask = torch.cat([mask.new_ones(len(chunk), shared), mask], dim=1)
            rows = slice(at + chunk.start, at + chunk.stop)
            ids = _left_padded(rest, self.pad_id, width - shared, list).to(self.device)
            if self.use_cache:
                part = DynamicCache(config=self.model.config)
                if prefix is not None:
                    for layer, source in zip(part.layers, prefix.layers):
                        layer.update(
                            source.keys.expand(len(chunk), -1, -1, -1), source.values.expand(len(chunk), -1, -1, -1)
                        )
                logprobs = self._forward(ids, mask, part, skip=shared)
                self.cache.write(part, rows.start, total)
            else:
                self.ids[rows] = self.pad_id
                self.ids[rows, total - width :] = ids
                logprobs = self._forward(self.ids[rows, total - width :], mask, None)
            self.mask[rows] = 0
            self.mask[rows, total - width :] = mask
            self.next_position[rows] = torch.tensor([widths[i] for i in chunk], device=self.device)
            if self.logprobs is None:
                self.logprobs = logprobs.new_zeros(self.rows, logprobs.shape[1])
            self.logprobs[rows] = logprobs
            for offset, i in enumerate(chunk):
                self.keys[rows.start + offset] = new[i][0]
                self.row_of[new[i][0]] = rows.start + offset
        self._trim()

    def _admit_unmanaged(self, entries) -> None:
        # One plain left-padded prefill into a fresh cache of a layout we do not manage.
        entries = sorted(entries, key=lambda entry: entry[1])
        prompts = [prompt for _, _, prompt in entries]
        width = max(map(len, prompts))
        self.mask = _left_padded(prompts, 0, width, lambda p: [1] * len(p)).to(self.device)
        self.cache = DynamicCache(config=self.model.config)
        self.logprobs = self._forward(
            _left_padded(prompts, self.pad_id, width, list).to(self.device), self.mask, self.cache
        )
        self.next_position = torch.tensor([len(p) for p in prompts], device=self.device)
        self.keys = [key for key, _, _ in entries]
        self.row_of = {key: r for r, key in enumerate(self.keys)}
        self.block_end = [sum(1 for _, g, _ in entries if g <= group) for group in range(len(self.block_end))]

    def _move(self, source: int, target: int) -> None:
        key = self.keys[source]
        self.keys[target] = key
        self.row_of[key] = target
        self.mask[target] = self.mask[source]
        self.next_position[target] = self.next_position[source]
        if self.logprobs is not None and source < self.logprobs.shape[0]:
            self.logprobs[target] = self.logprobs[source]
        if self.cache is not None:
            self.cache.move_row(source, target)
        else:
            self.ids[target] = self.ids[source]

    def _shrink(self, rows: int) -> None:
        del self.keys[rows:]
        self.mask = self.mask[:rows]
        self.next_position = self.next_position[:rows]
        if self.logprobs is not None:
            self.logprobs = self.logprobs[:rows]
        if self.ids is not None:
            self.ids = self.ids[:rows]
        if self.cache is not None:
            self.cache.set_rows(rows)

    def _grow_left(self, columns: int) -> None:
        self.mask = torch.cat([self.mask.new_zeros(self.rows, columns), self.mask], dim=1)
        if self.ids is not None:
            self.ids = torch.cat([self.ids.new_full((self.rows, columns), self.pad_id), self.ids], dim=1)

    def _select(self, keep: torch.Tensor) -> None:
        # `keep` is ascending, so every group's rows stay contiguous.
        kept = keep.tolist()
        self.block_end = [sum(1 for r in kept if r < end) for end in self.block_end]
        self.keys = [self.keys[r] for r in kept]
        self.row_of = {key: r for r, key in enumerate(self.keys)}
        self.mask = self.mask[keep]
        self.next_position = self.next_position[keep]
        if self.logprobs is not None:
            self.logprobs = self.logprobs[keep]
        if self.use_cache:
            self.cache.batch_select_indices(keep)
        else:
            self.ids = self.ids[keep]
        self._trim()

    def _trim(self) -> None:
        # Columns that are padding in every remaining row (e.g. the hinted rows' long prompts after
        # they left) cost attention for nothing: cut them.
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.mask.shape[1]
        if start == 0 or (self.use_cache and not self.managed):
            return
        if self.ids is not None:
            self.ids = self.ids[:, start:]
        if self.cache is not None:
            self.cache.drop_left(start)
        self.mask = self.mask[:, start:]


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


def group_prefix(prompts: list[list[int]], shared: str | list[int] = "auto", min_length: int = 16) -> list[int]:
    """The prefix a group of prompts shares, prefilled once: "auto" = their longest common token prefix
    (at least `min_length` tokens, else none), "off" = none, or the given tokens when every prompt
    extends them. One token of every prompt stays out, so each row's last position is computed with
    its own prompt's chunk."""
    if isinstance(shared, str):
        if shared not in ("auto", "off"):
            raise ValueError(f"shared_prefix must be 'auto', 'off' or a list of token ids, not {shared!r}")
        if shared == "off" or len(prompts) < 2:
            return []
        length = min(_common_prefix_length(prompts), min(map(len, prompts)) - 1)
        return list(prompts[0][:length]) if length >= min_length else []
    prefix = list(shared)
    fits = all(len(p) > len(prefix) and list(p[: len(prefix)]) == prefix for p in prompts)
    return prefix if fits else []


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
