"""The streamed DDT scorer: a causal LM's backbone, then its LM head in vocabulary tiles (`onsft.formulas.ddt`).

Rows are `Item`s (prompt + response token ids); only response positions reach the head, so the
B x T x V logits are never materialised. Rows are grouped longest first into batches within a row and
padded-token budget; results do not depend on the batching (tested).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from onsft.data.chat import encode_examples
from onsft.data.rows import Example
from onsft.errors import UserError
from onsft.formulas import ddt


@dataclass
class Item:
    """One sequence to score: `ids` = prompt + response tokens; the response starts at `prompt_length`."""

    index: int
    ids: list[int]
    prompt_length: int
    truncated: bool = False

    @property
    def n_response(self) -> int:
        return len(self.ids) - self.prompt_length


def encode_items(
    tokenizer, examples: Sequence[Example], max_length: int, overlong: str = "reject", where: str = "data"
) -> tuple[list[Item], dict[str, int]]:
    """Tokenise rows with the chat template, keeping each row's index (over-long policy of `onsft.data.chat`)."""
    encoded, stats = encode_examples(tokenizer, examples, max_length, overlong, where)
    return [Item(e.index, e.input_ids, e.prompt_length, e.truncated) for e in encoded], stats


def length_batches(items: Sequence[Item], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Positions of `items` grouped longest first, each group within batch_size rows and max_batch_tokens
    padded tokens (a single over-budget row still gets its own group)."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].ids), items[i].index))
    batches, current, width = [], [], 0
    for i in order:
        new_width = max(width, len(items[i].ids))
        if current and (len(current) >= batch_size or new_width * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current, new_width = [], len(items[i].ids)
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    return batches


@dataclass
class LMHead:
    """The pieces of a causal LM that turn a last hidden state into logits."""

    backbone: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None


def head_transform(model_config) -> tuple[float, float | None]:
    """(logit scale, soft cap) between a model's LM-head matmul and its logits, read from its config the way
    TRL's fused head reads it (so the tiled EAFT / ASFT terms see the distribution TRL's log p comes from)."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):  # Cohere; Muse Glimmer; Falcon-H1
        if scale is None:
            scale = getattr(config, name, None)
    if scale is None and getattr(config, "logits_scaling", None):
        # Granite and MiniCPM3 divide by logits_scaling, HyperCLOVA X multiplies by it.
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(config, "final_logit_softcapping", None)


def find_head(model) -> LMHead | None:
    """Backbone + LM head of a transformers causal LM, checked against the model's own logits on a probe.
    None (so scoring falls back to full logits) when the split is missing or does not reproduce them."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or backbone is None or backbone is model:
        return None
    scale, softcap = head_transform(model.config)
    split = LMHead(backbone, head.weight, head.bias, scale, softcap)
    device = head.weight.device
    probe = torch.arange(1, 9, device=device).remainder(head.weight.shape[0]).unsqueeze(0)
    with torch.inference_mode():
        expected = model(input_ids=probe, use_cache=False).logits[0].float()
        hidden = backbone(input_ids=probe, use_cache=False)[0][0]
        raw = hidden.to(head.weight.dtype) @ head.weight.T
        if head.bias is not None:
            raw = raw + head.bias
        got = ddt.transform_logits(raw.float(), split.logit_scale, split.softcap)
    tolerance = (1e-4 if head.weight.dtype == torch.float32 else 3e-2) * (1 + expected.abs().max().item())
    if not torch.allclose(got, expected, rtol=0, atol=tolerance):
        print(
            "onsft audit: the model's LM head is not a plain linear layer on the backbone; scoring from "
            "full logits (correct, but memory grows with batch x length x vocabulary).",
            file=sys.stderr,
        )
        return None
    return split


def _pad_batch(items: Sequence[Item], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it.ids)] = torch.tensor(it.ids)
        mask[row, : len(it.ids)] = 1
    return ids.to(device), mask.to(device)


def _response_positions(items: Sequence[Item], width: int) -> tuple[list[int], list[int]]:
    """Flat indices (row * width + t) of the hidden states that predict response tokens, and those tokens."""
    positions, targets = [], []
    for row, it in enumerate(items):
        start = row * width
        positions += range(start + it.prompt_length - 1, start + len(it.ids) - 1)
        targets += it.ids[it.prompt_length :]
    return positions, targets


@torch.inference_mode()
def score_batch(
    model,
    head: LMHead | None,
    items: Sequence[Item],
    taus: Sequence[float],
    pad_id: int = 0,
    vocab_chunk: int = 0,
    row_chunk: int = 0,
    fused: bool = False,
) -> list[ddt.TokenStats]:
    """TokenStats of every response token of `items` (concatenated in item order), one per tau.
    Right padding with an attention mask, so padding never changes a real position's hidden state."""
    device = head.weight.device if head is not None else next(model.parameters()).device
    ids, mask = _pad_batch(items, pad_id, device)
    positions, targets = _response_positions(items, ids.shape[1])
    positions = torch.tensor(positions, device=device)
    targets = torch.tensor(targets, device=device)
    if head is None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        picked = logits.reshape(-1, logits.shape[-1])[positions]
        return [ddt.token_stats(picked, targets, tau) for tau in taus]
    hidden = head.backbone(input_ids=ids, attention_mask=mask, use_cache=False)[0]
    picked = hidden.reshape(-1, hidden.shape[-1])[positions]
    return ddt.token_stats_from_hidden(
        picked,
        head.weight,
        targets,
        head.bias,
        list(taus),
        vocab_chunk=vocab_chunk or None,
        row_chunk=row_chunk or None,
        logit_scale=head.logit_scale,
        softcap=head.softcap,
        fused=fused,
    )


def tau_suffix(tau: float, primary: bool) -> str:
    return "" if primary else f"_tau{tau:g}"


def _rows_from_stats(
    items: Sequence[Item], stats: Sequence[ddt.TokenStats], taus: Sequence[float], threshold: float
) -> tuple[list[dict], list[torch.Tensor]]:
    """Score dicts per item (every tau) and the primary tau's per-token phi per item."""
    lengths = [it.n_response for it in items]
    rows = [{} for _ in items]
    for k, (tau, s) in enumerate(zip(taus, stats)):
        suffix = tau_suffix(tau, k == 0)
        agg = ddt.aggregate_responses(s.phi, s.var, lengths, threshold)
        for key, values in agg.items():
            for row, value in zip(rows, values.tolist()):
                row[key + suffix] = value
    return rows, list(stats[0].phi.float().cpu().split(lengths))


@dataclass
class Scorer:
    """A model ready to score Items: its head split, the temperatures and tiling."""

    model: Any
    taus: list[float]
    threshold: float = ddt.OOD_THRESHOLD
    pad_id: int = 0
    batch_size: int = 16
    max_batch_tokens: int = 8192
    vocab_chunk: int = 0
    row_chunk: int = 0
    fused: bool = False
    head: LMHead | None = None

    def __post_init__(self):
        self.head = find_head(self.model)

    def batches(self, items: Sequence[Item]) -> list[list[int]]:
        return length_batches(items, self.batch_size, self.max_batch_tokens)

    def shard(self, items: Sequence[Item], rank: int, world: int) -> list[Item]:
        """This process's items: dealt round-robin in length order, so every process gets a similar load."""
        order = [i for batch in self.batches(items) for i in batch]
        return [items[i] for i in order[rank::world]]

    def score(self, items: Sequence[Item]) -> tuple[list[dict], list[torch.Tensor]]:
        stats = score_batch(
            self.model, self.head, items, self.taus, self.pad_id, self.vocab_chunk, self.row_chunk, self.fused
        )
        return _rows_from_stats(items, stats, self.taus, self.threshold)

    def iter_scored(
        self, items: Sequence[Item], skip: set[int] = frozenset()
    ) -> Iterator[tuple[list[int], list[dict], list[torch.Tensor]]]:
        """(positions in `items`, score dicts, per-token phi) per batch; batches whose items' indices are all
        in `skip` are passed over. Batches are fixed by the full item list, so a resumed run scores every
        item in exactly the batch an uninterrupted run would (bitwise the same numbers)."""
        for batch in self.batches(items):
            if all(items[i].index in skip for i in batch):
                continue
            rows, phis = self.score([items[i] for i in batch])
            yield batch, rows, phis


FUSE_FROM_TOKENS = 200_000  # below this many response tokens the one-off torch.compile does not pay for itself


@dataclass
class ScoringConfig:
    """How the streamed scorer batches and tiles (results do not depend on any of it, speed and memory do)."""

    score_batch_size: int = field(default=16, metadata={"help": "Most responses per scoring pass."})
    max_batch_tokens: int = field(default=8192, metadata={"help": "Most padded tokens (rows x longest) per pass."})
    vocab_chunk: int = field(default=0, metadata={"help": "Vocabulary tile of the streamed LM head (0 = auto)."})
    row_chunk: int = field(default=0, metadata={"help": "Token rows per LM-head tile (0 = auto)."})
    compile: str = field(
        default="auto",
        metadata={
            "help": "Fuse the LM-head tile arithmetic with torch.compile: true, false, or auto (when scoring "
            "at least 200k response tokens, where the one-off compile of 10-60 s pays for itself)."
        },
    )

    def validate(self) -> None:
        if min(self.score_batch_size, self.max_batch_tokens) < 1:
            raise UserError(
                "`score_batch_size` and `max_batch_tokens` must be >= 1",
                where="command line",
                fix="pass positive sizes.",
            )
        if min(self.vocab_chunk, self.row_chunk) < 0:
            raise UserError(
                "`vocab_chunk` and `row_chunk` must be >= 0 (0 = auto)",
                where="command line",
                fix="pass non-negative tile sizes.",
            )
        if self.compile not in ("auto", "true", "false"):
            raise UserError("`compile` must be auto, true or false", where="command line", fix="e.g. --compile false.")

    def scorer(self, model, pad_id: int, taus=(1.0,), threshold: float = ddt.OOD_THRESHOLD, tokens: int = 0) -> Scorer:
        """A Scorer for `model`; `tokens` (response tokens about to be scored) decides compile=auto."""
        fused = self.compile == "true" or (self.compile == "auto" and tokens >= FUSE_FROM_TOKENS)
        return Scorer(
            model,
            list(taus),
            threshold,
            pad_id,
            self.score_batch_size,
            self.max_batch_tokens,
            self.vocab_chunk,
            self.row_chunk,
            fused,
        )


def score_items(scorer: Scorer, items: Sequence[Item]) -> list[dict]:
    """Score dicts (every tau) for `items`, in item order."""
    out: dict[int, dict] = {}
    for batch, rows, _ in scorer.iter_scored(items):
        for i, row in zip(batch, rows):
            out[i] = row
    return [out[i] for i in range(len(items))]
