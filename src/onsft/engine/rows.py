"""`RowBatch`: token rows decoded together, left-padded, sharing one forward pass per step and one KV cache."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from onsft.engine.kv_cache import ROW_SPANS, GrowingCache, row_spans
from onsft.errors import UserError


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
            token = ROW_SPANS.set(row_spans(first, self.mask.shape[1]))
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
                ROW_SPANS.reset(token)
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
