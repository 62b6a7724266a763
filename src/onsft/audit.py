"""`onsft audit`: how off-policy is a dataset for a model? (DDT, spec section 1)

For every row, the model scores its response tokens: phi = log p(y) + H per token, aggregated into mean
phi, Z = sum phi / sqrt(sum Var) and the one-sided p-value P(N(0,1) <= Z). Outputs in --out:
  scores.jsonl          every input row, its fields kept, scores added (resumable: rerun to continue)
  self_check.jsonl      with --self_check N: N of the model's own samples (tau = 1) scored the same way,
                        the on-policy baseline (mean phi ~ 0, Z ~ N(0,1))
  compare_scores.jsonl  with --compare_data / --compare_model: a second dataset and/or model
  kept.jsonl            with --keep in|out: the rows kept by mean phi (--threshold) or p-value (--alpha)
  summary.json, plots/*.png, report.html

Scoring runs the model's backbone and streams the LM head over vocabulary tiles (`onsft.ddt`), so the
B x T x V logits are never materialised, and only response positions reach the head. Rows are sorted
into length buckets to waste little padding; results do not depend on batching.
Under `accelerate launch` (or torchrun) each process scores its own shard and rank 0 merges.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from onsft import ddt
from onsft.config import parse_command
from onsft.data import DataConfig, Example, encode_examples, load_examples
from onsft.errors import UserError
from onsft.records import ResumableJsonl, check_writable, write_jsonl_atomic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AuditConfig(DataConfig):
    """`onsft audit` options (plus DataConfig's data, max_length, overlong)."""

    model: str = field(default="", metadata={"help": "Model to audit against: Hub name, local folder or alias."})
    out: str = field(default="", metadata={"help": "Output folder (scores.jsonl, summary.json, report.html, ...)."})
    tau: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={
            "help": "Temperature(s) of p_tau = softmax(logits / tau). The first is primary (ood, keep, summary); "
            "others add `<field>_tau<t>` columns."
        },
    )
    threshold: float = field(default=ddt.OOD_THRESHOLD, metadata={"help": "A response is OOD when mean phi < this."})
    alpha: float = field(default=0.05, metadata={"help": "Reject 'on-policy' when the p-value < alpha."})
    batch_size: int = field(default=16, metadata={"help": "Most rows per forward pass."})
    max_batch_tokens: int = field(default=8192, metadata={"help": "Most padded tokens (rows x longest) per pass."})
    self_check: int = field(
        default=0,
        metadata={
            "help": "Sample this many responses from the model itself (temperature 1, full vocabulary) on the "
            "dataset's prompts and score them: the on-policy baseline and Z calibration."
        },
    )
    self_check_max_new_tokens: int = field(default=256, metadata={"help": "Token limit of self-check samples."})
    seed: int = field(default=0, metadata={"help": "Seed of the self-check prompt choice and sampling."})
    keep: str = field(default="", metadata={"help": "Write kept.jsonl with the rows `in` or `out` of distribution."})
    keep_by: str = field(default="phi", metadata={"help": "`phi`: mean phi >= threshold is in; `pvalue`: p >= alpha."})
    per_token: bool = field(default=False, metadata={"help": "Add per-token `token_phi` and `tokens` to every row."})
    compare_data: str = field(default="", metadata={"help": "Second dataset scored into the same report."})
    compare_model: str = field(
        default="",
        metadata={"help": "Second model scored into the same report (on --compare_data if given, else on --data)."},
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."}
    )
    device: str = field(default="auto", metadata={"help": "auto (the process's accelerator, else CPU), cpu, cuda."})
    worst: int = field(default=8, metadata={"help": "Worst responses shown token by token in the report."})
    plot_sample: int = field(default=2000, metadata={"help": "Rows whose per-token phi feed the token plots."})
    vocab_chunk: int = field(default=0, metadata={"help": "Vocabulary tile of the streamed LM head (0 = auto)."})
    row_chunk: int = field(default=0, metadata={"help": "Token rows per LM-head tile (0 = auto)."})
    compile: str = field(
        default="auto",
        metadata={
            "help": "Fuse the LM-head tile arithmetic with torch.compile: true, false, or auto (when scoring at least "
            "200k response tokens, where the one-off compile of 10-60 s pays for itself)."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def validate(self) -> None:
        checks = [
            (bool(self.model), "model", "is required", "pass --model NAME_OR_PATH."),
            (bool(self.data), "data", "is required", "pass --data FILE."),
            (bool(self.out), "out", "is required", "pass --out FOLDER."),
            (bool(self.tau) and all(t > 0 for t in self.tau), "tau", "must be > 0", "pass positive temperatures."),
            (0 < self.alpha < 1, "alpha", "must be in (0, 1)", "e.g. --alpha 0.05."),
            (
                self.batch_size >= 1 and self.max_batch_tokens >= 1,
                "batch_size/max_batch_tokens",
                "must be >= 1",
                "pass positive sizes.",
            ),
            (
                self.self_check >= 0 and self.self_check_max_new_tokens >= 1,
                "self_check",
                "must be >= 0 (and its max_new_tokens >= 1)",
                "pass a sample count.",
            ),
            (self.keep in ("", "in", "out"), "keep", "must be in, out or empty", "use --keep in or --keep out."),
            (self.keep_by in ("phi", "pvalue"), "keep_by", "must be phi or pvalue", "use --keep_by phi|pvalue."),
            (self.dtype in ("auto", *DTYPES), "dtype", "is unknown", f"use auto, {', '.join(DTYPES)}."),
            (
                self.compile in ("auto", "true", "false"),
                "compile",
                "must be auto, true or false",
                "e.g. --compile false.",
            ),
            (
                self.device in ("auto", "cpu") or self.device.startswith("cuda"),
                "device",
                "is unknown",
                "use auto, cpu, cuda or cuda:N.",
            ),
            (
                self.worst >= 0 and self.plot_sample >= 0 and self.vocab_chunk >= 0 and self.row_chunk >= 0,
                "worst/plot_sample/vocab_chunk/row_chunk",
                "must be >= 0",
                "pass non-negative numbers.",
            ),
        ]
        for ok, name, why, fix in checks:
            if not ok:
                raise UserError(f"`{name}` {why}", where="config", fix=fix)


# ------------------------------------------------------------------------------------------- encoding


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
    """Tokenise rows with the chat template, keeping each row's index (over-long policy of `onsft.data`)."""
    encoded, stats = encode_examples(tokenizer, examples, max_length, overlong, where)
    return [Item(e.index, e.input_ids, e.prompt_length, e.truncated) for e in encoded], stats


def check_context(model, items: Sequence[Item], examples: Sequence[Example], where: str) -> None:
    """Rows longer than the model's positions crash models with learned position embeddings (an IndexError
    in the forward pass) and leave the trained range of rotary ones; --max_length alone does not catch them
    when it is larger than the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    over = [it for it in items if context and len(it.ids) > context]
    if over:
        line = next(e.line for e in examples if e.index == over[0].index)
        raise UserError(
            f"{len(over)} row(s) are longer than the model's context of {context} tokens (first: "
            f"{len(over[0].ids)} tokens)",
            where=where,
            line=line,
            fix=f"pass --max_length {context} (or less), with --overlong truncate or drop if needed.",
        )


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


# -------------------------------------------------------------------------------------------- scoring


@dataclass
class LMHead:
    """The pieces of a causal LM that turn a last hidden state into logits."""

    backbone: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None


def find_head(model) -> LMHead | None:
    """Backbone + LM head of a transformers causal LM, checked against the model's own logits on a probe.
    None (so scoring falls back to full logits) when the split is missing or does not reproduce them."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or backbone is None or backbone is model:
        return None
    config = getattr(model.config, "text_config", None) or model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):  # Granite divides the logits
        scale /= float(config.logits_scaling)
    split = LMHead(backbone, head.weight, head.bias, scale, getattr(config, "final_logit_softcapping", None))
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


FUSE_FROM_TOKENS = 200_000


def _scorer(model, tokenizer, config: AuditConfig, tokens: int = 0) -> Scorer:
    fused = config.compile == "true" or (config.compile == "auto" and tokens >= FUSE_FROM_TOKENS)
    return Scorer(
        model,
        list(config.tau),
        config.threshold,
        pad_token_id(tokenizer),
        config.batch_size,
        config.max_batch_tokens,
        config.vocab_chunk,
        config.row_chunk,
        fused,
    )


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def score_examples(model, tokenizer, examples: Sequence[Example], config: AuditConfig) -> list[dict]:
    """Score rows in memory (no files): one dict per kept row, in input order, with `index` and the scores
    of every tau in `config.tau`."""
    items, _ = encode_items(tokenizer, examples, config.max_length, config.overlong, config.data or "data")
    scorer = _scorer(model, tokenizer, config, sum(it.n_response for it in items))
    out: dict[int, dict] = {}
    for batch, rows, _ in scorer.iter_scored(items):
        for i, row in zip(batch, rows):
            out[items[i].index] = {"index": items[i].index, **row}
    return [out[it.index] for it in items]


# ------------------------------------------------------------------------------- models and sampling


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name: str):
    from onsft import models

    return models.load_tokenizer(name)


def load_model(name: str, dtype: torch.dtype | None = None, device=None):
    from onsft import models

    return models.load_model(name, dtype=dtype, device=device)


def sample_responses(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int
) -> list[tuple[list[int], str, str]]:
    """The model's own samples at temperature 1 over the full vocabulary: (token ids, text, finish reason).
    Sample i depends only on (seed, i)."""
    from onsft.generation import SamplingConfig, generate

    config = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        seed=seed,
        repetition_count=0,
        batch_size=max(1, len(prompts)),
    )
    return [(g.token_ids, g.text, g.finish_reason) for g in generate(model, tokenizer, prompts, config)]


# --------------------------------------------------------------------------------------- running sets


def data_identity(path: str) -> dict:
    """What makes a dataset 'the same' for resuming: its bytes (files) or names and sizes (folders)."""
    p = Path(path)
    digest = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file():
                digest.update(f"{f.relative_to(p)}:{f.stat().st_size}".encode())
    else:
        with open(p, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return {"path": str(p), "sha256": digest.hexdigest()}


@dataclass
class ScoreSet:
    """One scored collection (the data, the self-check, the comparison) as the report shows it."""

    name: str
    label: str
    rows: list[dict]
    token_phi: list[list[float]]
    worst: list[dict] = field(default_factory=list)


class Distributed:
    """This process's place among `accelerate launch` / torchrun processes (one process: rank 0 of 1)."""

    def __init__(self, device: str):
        from accelerate import PartialState

        cpu = device == "cpu" or not torch.cuda.is_available()
        self.state = PartialState(cpu=cpu)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.main = self.state.is_main_process
        # One process per accelerator under a launcher: PartialState knows which one is this process's.
        self.device = (
            torch.device(device) if device == "cpu" or (device != "auto" and self.world == 1) else self.state.device
        )

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


def _progress(total: int, desc: str, enabled: bool, unit: str = "tok"):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "tok",
        dynamic_ncols=True,
        disable=not enabled,
        file=sys.stderr,
    )


PRIVATE = ("_index", "_token_phi")


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in PRIVATE}


def _read_partial(path: Path) -> list[dict]:
    """Rows of another process's finished partial file (the first line is ResumableJsonl's fingerprint)."""
    raw = path.read_bytes()
    lines = raw[: raw.rfind(b"\n") + 1].decode("utf-8").splitlines()
    return [json.loads(line) for line in lines[1:]]


class ShardStore:
    """This process's resumable rows of one output file, and rank 0's merge into out/<name>.jsonl.

    One process writes out/<name>.jsonl.partial; N processes write out/<name>.rank<r>-of-<N>.jsonl.partial.
    After all processes finish, rank 0 merges in input order, writes the final file atomically and only
    then deletes the partial files: a kill at any point leaves either partials to resume from or the
    finished file."""

    def __init__(self, out: Path, name: str, dist: Distributed, fingerprint: dict):
        self.out, self.name, self.dist = out, name, dist
        stem = f"{name}.jsonl" if dist.world == 1 else f"{name}.rank{dist.rank}-of-{dist.world}.jsonl"
        self.store = ResumableJsonl(out / stem, {**fingerprint, "set": name, "world": dist.world})

    @property
    def done(self) -> dict[int, dict]:
        return self.store.done

    def add(self, rows: list[dict]) -> None:
        self.store.append_many(rows)

    def merge(self) -> list[dict] | None:
        self.store.close()
        self.dist.barrier()
        merged = None
        if self.dist.main:
            by_index = dict(self.store.done)
            others = [
                self.out / f"{self.name}.rank{r}-of-{self.dist.world}.jsonl.partial" for r in range(1, self.dist.world)
            ]
            for part in others:
                by_index.update((row["_index"], row) for row in _read_partial(part))
            merged = [by_index[i] for i in sorted(by_index)]
            write_jsonl_atomic(self.out / f"{self.name}.jsonl", [_public(r) for r in merged])
            for part in [self.store.partial, *others]:
                part.unlink(missing_ok=True)
        self.dist.barrier()
        return merged


def _finish_row(row: dict, item: Item, phi: torch.Tensor, config: AuditConfig, tokenizer, sample_every: int) -> dict:
    if item.truncated:
        row["truncated"] = True
    rounded = [round(v, 4) for v in phi.tolist()]
    if config.per_token:
        row["token_phi"] = rounded
        row["tokens"] = tokenizer.batch_decode([[t] for t in item.ids[item.prompt_length :]])
    elif sample_every and item.index % sample_every == 0:
        row["_token_phi"] = rounded  # feeds the token plots; dropped from the written file
    return row


def _score_set(
    name: str,
    items: list[Item],
    records: dict[int, dict],
    scorer: Scorer,
    tokenizer,
    config: AuditConfig,
    dist: Distributed,
    out: Path,
    fingerprint: dict,
    lines: dict[int, int] | None = None,
    where: str = "data",
) -> list[dict] | None:
    """Score a dataset into out/<name>.jsonl: input fields kept, scores added. Rank 0 gets the rows.
    `lines` (index -> line in `where`) names the row whose scores are not finite."""
    store = ShardStore(out, name, dist, fingerprint)
    shard = scorer.shard(items, dist.rank, dist.world)
    every = max(1, len(items) // config.plot_sample) if config.plot_sample else 0
    todo = sum(it.n_response for it in shard if it.index not in store.done)
    with _progress(todo, f"audit {name}", config.progress and dist.state.is_local_main_process) as bar:
        for batch, scores, phis in scorer.iter_scored(shard, set(store.done)):
            rows = []
            for i, score, phi in zip(batch, scores, phis):
                item = shard[i]
                if item.index not in store.done:
                    if not all(math.isfinite(v) for v in score.values() if isinstance(v, float)):
                        # NaN compares false with every threshold: written out, the row would pass as in-distribution.
                        raise UserError(
                            "the model gives non-finite scores (NaN or inf) for this row",
                            where=where,
                            line=(lines or {}).get(item.index),
                            fix="check the model's weights (a diverged checkpoint?) or score in "
                            "float32 (--dtype float32); rows scored before it are kept.",
                        )
                    row = {"_index": item.index, **records[item.index], **score}
                    rows.append(_finish_row(row, item, phi, config, tokenizer, every))
                    bar.update(item.n_response)
            store.add(rows)
    return store.merge()


def _self_check(
    items: list[Item],
    examples: dict[int, Example],
    scorer: Scorer,
    tokenizer,
    config: AuditConfig,
    dist: Distributed,
    out: Path,
    fingerprint: dict,
) -> list[dict] | None:
    """Sample config.self_check responses from the model on the dataset's prompts and score them."""
    n = config.self_check
    order = list(range(len(items)))
    random.Random(config.seed).shuffle(order)
    chosen = [items[order[i % len(order)]] for i in range(n)]
    fingerprint = {
        **fingerprint,
        "self_check": n,
        "seed": config.seed,
        "max_new_tokens": config.self_check_max_new_tokens,
    }
    store = ShardStore(out, "self_check", dist, fingerprint)
    groups = [range(start, min(n, start + config.batch_size)) for start in range(0, n, config.batch_size)]
    mine = [g for g in groups[dist.rank :: dist.world] if not all(i in store.done for i in g)]
    every = max(1, n // config.plot_sample) if config.plot_sample else 0
    with _progress(
        sum(len(g) for g in mine),
        "audit self-check",
        config.progress and dist.state.is_local_main_process,
        unit="sample",
    ) as bar:
        for group in mine:
            prompts = [chosen[i].ids[: chosen[i].prompt_length] for i in group]
            # Seeded by the group's first sample: sample i is the same however the run is resumed or sharded.
            samples = sample_responses(
                scorer.model,
                tokenizer,
                prompts,
                config.self_check_max_new_tokens,
                seed=config.seed * 1_000_003 + group.start,
            )
            sampled = [Item(i, p + ids, len(p)) for i, p, (ids, _, _) in zip(group, prompts, samples)]
            rows = {}
            for batch, scores, phis in scorer.iter_scored(sampled):
                for j, score, phi in zip(batch, scores, phis):
                    item, source = sampled[j], chosen[sampled[j].index]
                    _, text, finish = samples[j]
                    row = {
                        "_index": item.index,
                        "prompt_index": source.index,
                        "prompt": examples[source.index].prompt,
                        "completion": text,
                        "finish_reason": finish,
                        **score,
                    }
                    rows[j] = _finish_row(row, item, phi, config, tokenizer, every)
            store.add([rows[j] for j in range(len(sampled))])
            bar.update(len(group))
    return store.merge()


def _worst(scorer: Scorer, tokenizer, items: list[Item], rows: list[dict], k: int) -> list[dict]:
    """The k lowest mean-phi responses, token by token, for the report."""
    by_index = {it.index: it for it in items}
    details = []
    for row in sorted(rows, key=lambda r: r["mean_phi"])[:k]:
        item = by_index[row["_index"]]
        stats = score_batch(
            scorer.model,
            scorer.head,
            [item],
            scorer.taus[:1],
            scorer.pad_id,
            scorer.vocab_chunk,
            scorer.row_chunk,
            scorer.fused,
        )[0]
        details.append(
            {
                "index": item.index,
                "mean_phi": row["mean_phi"],
                "z": row["z"],
                "p_value": row["p_value"],
                "prompt": tokenizer.decode(item.ids[: item.prompt_length]),
                "tokens": tokenizer.batch_decode([[t] for t in item.ids[item.prompt_length :]]),
                "phi": stats.phi.tolist(),
                "logp": stats.logp.tolist(),
                "entropy": stats.entropy.tolist(),
            }
        )
    return details


# ------------------------------------------------------------------------------------------- summary


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def summarize(rows: Sequence[dict], taus: Sequence[float], threshold: float, alpha: float) -> dict:
    """Dataset-level numbers for the rows of one set; extra temperatures under `by_tau`."""
    summary = _summarize_tau(rows, "", threshold, alpha)
    if len(taus) > 1:
        summary["by_tau"] = {f"{t:g}": _summarize_tau(rows, tau_suffix(t, False), threshold, alpha) for t in taus[1:]}
    return summary


def _summarize_tau(rows: Sequence[dict], suffix: str, threshold: float, alpha: float) -> dict:
    from statistics import NormalDist, fmean, pstdev, stdev

    if not rows:
        return {"n_responses": 0}
    get = lambda key: [r[key + suffix] for r in rows]  # noqa: E731
    n_tokens, mean_phi, z = get("n_tokens"), get("mean_phi"), get("z")
    total = sum(n_tokens)
    ordered_phi, ordered_z = sorted(mean_phi), sorted(z)
    normal = NormalDist()
    ks = max(
        max(abs((i + 1) / len(ordered_z) - normal.cdf(v)), abs(i / len(ordered_z) - normal.cdf(v)))
        for i, v in enumerate(ordered_z)
    )
    summary = {
        "n_responses": len(rows),
        "n_tokens": total,
        "mean_phi_token_weighted": sum(get("sum_phi")) / total,
        "mean_phi_response_weighted": fmean(mean_phi),
        "mean_phi_se": stdev(mean_phi) / math.sqrt(len(rows)) if len(rows) > 1 else float("nan"),
        "mean_phi_quantiles": {f"{q:g}": _quantile(ordered_phi, q) for q in QUANTILES},
        "fraction_ood": sum(v < threshold for v in mean_phi) / len(rows),
        "fraction_rejected": sum(p < alpha for p in get("p_value")) / len(rows),
        "z_mean": fmean(z),
        "z_std": pstdev(z),
        "z_quantiles": {f"{q:g}": _quantile(ordered_z, q) for q in QUANTILES},
        "z_ks_distance": ks,
        "z_pooled": sum(get("sum_phi")) / math.sqrt(max(sum(get("sum_var")), ddt.VAR_FLOOR)),
    }
    for level in ddt.PHI_LEVELS:
        key = ddt.share_key(level)
        summary[key + "_token_weighted"] = sum(s * n for s, n in zip(get(key), n_tokens)) / total
    return summary


def _keep(rows: list[dict], config: AuditConfig) -> list[dict]:
    inside = (
        (lambda r: r["mean_phi"] >= config.threshold)
        if config.keep_by == "phi"
        else (lambda r: r["p_value"] >= config.alpha)
    )
    return [r for r in rows if inside(r) == (config.keep == "in")]


# -------------------------------------------------------------------------------------------- report


SUMMARY_ROWS = (
    ("responses", "n_responses"),
    ("response tokens", "n_tokens"),
    ("mean phi (token-weighted)", "mean_phi_token_weighted"),
    ("mean phi (per response)", "mean_phi_response_weighted"),
    ("  standard error", "mean_phi_se"),
    ("fraction OOD (mean phi < threshold)", "fraction_ood"),
    ("fraction rejected (p < alpha)", "fraction_rejected"),
    ("Z mean", "z_mean"),
    ("Z std (1 if calibrated)", "z_std"),
    ("Z KS distance to N(0,1)", "z_ks_distance"),
    ("pooled Z of the whole set", "z_pooled"),
    ("share of tokens phi > -1", "share_phi_gt_-1_token_weighted"),
    ("share of tokens phi > -3", "share_phi_gt_-3_token_weighted"),
    ("share of tokens phi > -5", "share_phi_gt_-5_token_weighted"),
)


def _write_report(out: Path, config: AuditConfig, summary: dict, sets: list[ScoreSet]) -> None:
    from onsft import report

    labels = [s.label for s in sets]
    table_rows = [[name] + [summary["sets"][s.name].get(key) for s in sets] for name, key in SUMMARY_ROWS]
    table_rows += [
        [f"mean phi quantile {q:g}"] + [summary["sets"][s.name]["mean_phi_quantiles"][f"{q:g}"] for s in sets]
        for q in QUANTILES
    ]
    figures = {
        "mean_phi": report.phi_histogram({s.label: [r["mean_phi"] for r in s.rows] for s in sets}, config.threshold),
        "token_phi": report.token_phi_distribution({s.label: [v for seq in s.token_phi for v in seq] for s in sets}),
        "phi_by_position": report.phi_by_position({s.label: s.token_phi for s in sets}),
        "z_calibration": report.z_calibration({s.label: [r["z"] for r in s.rows] for s in sets}),
    }
    pngs = {}
    for key, fig in figures.items():
        pngs[key] = report.figure_png(fig)
        report.save_png(pngs[key], out / "plots" / f"{key}.png")
    main = summary["sets"]["scores"]
    intro = (
        f"Model <b>{html_escape(config.model)}</b>, data <b>{html_escape(config.data)}</b>, tau "
        f"{', '.join(f'{t:g}' for t in config.tau)}. phi = log p(token) + entropy: about 0 for text the model "
        f"would write itself, negative for text it would not. Z = sum phi / sqrt(sum Var) is ~N(0,1) for the "
        f"model's own samples, so p = P(N(0,1) &le; Z) is a test with false-alarm rate alpha = {config.alpha:g}. "
        f"Here {main['fraction_ood']:.1%} of responses have mean phi &lt; {config.threshold:g} and "
        f"{main['fraction_rejected']:.1%} are rejected at alpha."
    )
    if "self_check" in summary["sets"]:
        own = summary["sets"]["self_check"]
        intro += (
            f" The model's own samples score mean phi {own['mean_phi_token_weighted']:.3f} with Z std "
            f"{own['z_std']:.2f} (calibrated: 0 and 1)."
        )
    sections = [
        ("Summary", report.table_html(["", *labels], table_rows)),
        ("Mean phi per response", report.image_html(pngs["mean_phi"], "mean phi histogram")),
        (
            "Per-token phi",
            report.image_html(pngs["token_phi"], "token phi distribution")
            + "<p class='note'>From a sample of responses (--plot_sample).</p>",
        ),
        ("Phi by position", report.image_html(pngs["phi_by_position"], "phi by position")),
        (
            "Calibration of Z",
            report.image_html(pngs["z_calibration"], "Z calibration")
            + "<p class='note'>On the model's own samples (self-check) Z should follow N(0,1); user data far to the "
            "left of it is off-policy.</p>",
        ),
    ]
    for s in sets:
        if not s.worst:
            continue
        body = []
        for w in s.worst:
            titles = [f"phi={p:.3f} log p={lp:.3f} H={h:.3f}" for p, lp, h in zip(w["phi"], w["logp"], w["entropy"])]
            lowest = sorted(range(len(w["phi"])), key=lambda t: w["phi"][t])[:5]
            listed = ", ".join(
                f"<code>{html_escape(repr(w['tokens'][t]))}</code> at {t} ({w['phi'][t]:.2f})" for t in lowest
            )
            body.append(
                f"<p><b>row {w['index']}</b>: mean phi {w['mean_phi']:.3f}, Z {w['z']:.2f}, "
                f"p {w['p_value']:.2g}. Most off-policy tokens: {listed}</p>"
                f"<div class='prompt'>{html_escape(w['prompt'][-400:])}</div>"
                + report.token_spans(w["tokens"], w["phi"], titles)
            )
        sections.append((f"Most off-policy responses: {s.label}", "".join(body)))
    files = ["scores.jsonl", "summary.json"] + [f"{s.name}.jsonl" for s in sets if s.name != "scores"]
    if config.keep:
        files.append("kept.jsonl")
    sections.append(("Files", "<p class='note'>" + ", ".join(files) + ", plots/*.png</p>"))
    report.write_html(out / "report.html", report.page_html("onsft audit", sections, intro))


def html_escape(text: str) -> str:
    import html

    return html.escape(str(text))


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_command(argv, AuditConfig, prog="onsft audit")
    config.validate()
    dist = Distributed(config.device)
    dtype = resolve_dtype(config.dtype, dist.device)
    out = Path(config.out)

    # Everything a user can get wrong is checked before the output folder exists.
    examples = load_examples(config.data)
    compare_examples = load_examples(config.compare_data) if config.compare_data else examples
    tokenizer = load_tokenizer(config.model)
    items, encoding = encode_items(tokenizer, examples, config.max_length, config.overlong, config.data)
    comparing = bool(config.compare_data or config.compare_model)
    compare_tokenizer = load_tokenizer(config.compare_model) if config.compare_model else tokenizer
    compare_items = (
        encode_items(
            compare_tokenizer, compare_examples, config.max_length, config.overlong, config.compare_data or config.data
        )[0]
        if comparing
        else None
    )
    check_writable(out / "scores.jsonl")
    # Models last: tokenizers already proved the names resolve, and no loading output precedes an error above.
    model = load_model(config.model, dtype, dist.device)
    compare_model = load_model(config.compare_model, dtype, dist.device) if config.compare_model else model
    check_context(model, items, examples, config.data)
    if comparing:
        check_context(compare_model, compare_items, compare_examples, config.compare_data or config.data)

    fingerprint = {
        "command": "audit",
        "model": config.model,
        "data": data_identity(config.data),
        "tau": list(config.tau),
        "max_length": config.max_length,
        "overlong": config.overlong,
        "dtype": str(dtype),
        "threshold": config.threshold,
        "per_token": config.per_token,
        "plot_sample": config.plot_sample,
    }
    by_index = {e.index: e for e in examples}
    scorer = _scorer(model, tokenizer, config, sum(it.n_response for it in items) // dist.world)
    sets: list[ScoreSet] = []
    rows = _score_set(
        "scores",
        items,
        {i: e.record for i, e in by_index.items()},
        scorer,
        tokenizer,
        config,
        dist,
        out,
        fingerprint,
        {e.index: e.line for e in examples},
        config.data,
    )
    if dist.main:
        sets.append(
            ScoreSet(
                "scores",
                f"data: {Path(config.data).name}",
                rows,
                _token_phi(rows),
                _worst(scorer, tokenizer, items, rows, config.worst),
            )
        )
    if config.self_check:
        own = _self_check(items, by_index, scorer, tokenizer, config, dist, out, fingerprint)
        if dist.main:
            sets.append(ScoreSet("self_check", "model's own samples (tau=1)", own, _token_phi(own)))
    if comparing:
        if compare_model is not model:
            del scorer, model
            gc.collect()
        compare_scorer = _scorer(
            compare_model, compare_tokenizer, config, sum(it.n_response for it in compare_items) // dist.world
        )
        compare_fingerprint = {
            **fingerprint,
            "model": config.compare_model or config.model,
            "data": data_identity(config.compare_data or config.data),
        }
        records = {e.index: e.record for e in compare_examples}
        other = _score_set(
            "compare_scores",
            compare_items,
            records,
            compare_scorer,
            compare_tokenizer,
            config,
            dist,
            out,
            compare_fingerprint,
            {e.index: e.line for e in compare_examples},
            config.compare_data or config.data,
        )
        if dist.main:
            label = "compare: " + " on ".join(
                x
                for x in (
                    Path(config.compare_model).name if config.compare_model else "",
                    Path(config.compare_data).name if config.compare_data else "",
                )
                if x
            )
            sets.append(
                ScoreSet(
                    "compare_scores",
                    label,
                    other,
                    _token_phi(other),
                    _worst(compare_scorer, compare_tokenizer, compare_items, other, config.worst),
                )
            )
    if dist.main:
        summary = {
            "command": "audit",
            "model": config.model,
            "data": config.data,
            "tau": list(config.tau),
            "threshold": config.threshold,
            "alpha": config.alpha,
            "encoding": encoding,
            "processes": dist.world,
            "compare_model": config.compare_model or None,
            "compare_data": config.compare_data or None,
            "sets": {
                s.name: {"label": s.label, **summarize(s.rows, config.tau, config.threshold, config.alpha)}
                for s in sets
            },
        }
        if config.keep:
            kept = _keep(rows, config)
            write_jsonl_atomic(out / "kept.jsonl", [_public(r) for r in kept])
            summary["kept"] = {"keep": config.keep, "by": config.keep_by, "rows": len(kept), "of": len(rows)}
        produced = {s.name for s in sets} | ({"kept"} if config.keep else set())
        for optional in ("self_check", "compare_scores", "kept"):
            if optional not in produced:  # an earlier run's file would contradict this run's report
                (out / f"{optional}.jsonl").unlink(missing_ok=True)
        _write_report(out, config, summary, sets)
        from onsft.records import write_json_atomic

        write_json_atomic(out / "summary.json", summary)
        main_set = summary["sets"]["scores"]
        print(
            f"onsft audit: {main_set['n_responses']} responses, mean phi {main_set['mean_phi_token_weighted']:.4f} "
            f"(token-weighted), {main_set['fraction_ood']:.1%} OOD, {main_set['fraction_rejected']:.1%} rejected "
            f"at alpha={config.alpha:g}; report: {out / 'report.html'}"
        )
    dist.barrier()
    return 0


def _token_phi(rows: list[dict]) -> list[list[float]]:
    return [r.get("token_phi") or r["_token_phi"] for r in rows if "token_phi" in r or "_token_phi" in r]
