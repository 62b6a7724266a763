"""Audit sets: score a dataset (or the model's own samples) into a resumable, sharded JSONL, and summarise.

Used by `onsft audit`; every set is one `ShardStore` of rows keyed by the input index, so a killed run
resumes and N processes merge into the same file one process would write.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onsft.data.chat import OVERLONG, overlong_field
from onsft.data.rows import DataArguments, Example
from onsft.engine.decoding import sample_own
from onsft.engine.scoring import Item, Scorer, ScoringConfig, encode_items, score_batch, score_items, tau_suffix
from onsft.errors import UserError
from onsft.formulas import ddt
from onsft.formulas.stats import QUANTILES, ks_distance_to_normal, quantile
from onsft.runtime.device import Processes, stream_seed
from onsft.runtime.fingerprints import config_defaults
from onsft.runtime.models import pad_token_id
from onsft.runtime.progress import note_resume, progress
from onsft.runtime.store import ShardStore


@dataclass
class AuditConfig(DataArguments):
    """What `onsft audit` scores and reports (the model is ModelArguments', the batching ScoringConfig's)."""

    out: str = field(default="", metadata={"help": "Output folder (scores.jsonl, summary.json, report.html, ...)."})
    max_length: int = field(default=1024, metadata={"help": "Maximum tokens of prompt + response."})
    overlong: str = overlong_field()
    tau: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={
            "help": "Temperature(s) of p_tau = softmax(logits / tau). The first is primary (ood, keep, "
            "summary); others add `<field>_tau<t>` columns."
        },
    )
    threshold: float = field(default=ddt.OOD_THRESHOLD, metadata={"help": "A response is OOD when mean phi < this."})
    alpha: float = field(default=0.05, metadata={"help": "Reject 'on-policy' when the p-value < alpha."})
    self_check: int = field(
        default=0,
        metadata={
            "help": "Sample this many responses from the model itself (temperature 1, full vocabulary) on "
            "the dataset's prompts and score them: the on-policy baseline and Z calibration."
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
    group_by: str = field(
        default="", metadata={"help": "Also summarise the data per value of this column (e.g. task, style, source)."}
    )
    worst: int = field(default=8, metadata={"help": "Worst responses shown token by token in the report."})
    plot_sample: int = field(default=2000, metadata={"help": "Rows whose per-token phi feed the token plots."})

    def validate(self) -> None:
        checks = [
            (bool(self.data), "data", "is required", "pass --data FILE."),
            (bool(self.out), "out", "is required", "pass --out FOLDER."),
            (bool(self.tau) and all(t > 0 for t in self.tau), "tau", "must be > 0", "pass positive temperatures."),
            (0 < self.alpha < 1, "alpha", "must be in (0, 1)", "e.g. --alpha 0.05."),
            (self.max_length >= 2, "max_length", "must be >= 2", "pass a larger --max_length."),
            (self.overlong in OVERLONG, "overlong", "is unknown", "use reject, truncate or drop."),
            (
                self.self_check >= 0 and self.self_check_max_new_tokens >= 1,
                "self_check",
                "must be >= 0 (and its max_new_tokens >= 1)",
                "pass a sample count.",
            ),
            (self.keep in ("", "in", "out"), "keep", "must be in, out or empty", "use --keep in or --keep out."),
            (self.keep_by in ("phi", "pvalue"), "keep_by", "must be phi or pvalue", "use --keep_by phi|pvalue."),
            (
                self.worst >= 0 and self.plot_sample >= 0,
                "worst/plot_sample",
                "must be >= 0",
                "pass non-negative numbers.",
            ),
        ]
        for ok, name, why, fix in checks:
            if not ok:
                raise UserError(f"`{name}` {why}", where="config", fix=fix)


@dataclass
class ScoreSet:
    """One scored collection (the data, the self-check, the comparison) as the report shows it."""

    name: str
    label: str
    rows: list[dict]
    token_phi: list[list[float]]
    worst: list[dict] = field(default_factory=list)


def score_examples(
    model, tokenizer, examples: Sequence[Example], config: AuditConfig, scoring: ScoringConfig | None = None
) -> list[dict]:
    """Score rows in memory (no files): one dict per kept row, in input order, with `index` and the scores
    of every tau in `config.tau`."""
    items, _ = encode_items(tokenizer, examples, config.max_length, config.overlong, config.data or "data")
    scorer = (scoring or ScoringConfig()).scorer(
        model, pad_token_id(tokenizer), config.tau, config.threshold, sum(it.n_response for it in items)
    )
    return [{"index": it.index, **row} for it, row in zip(items, score_items(scorer, items))]


def _finish_row(row: dict, item: Item, phi: torch.Tensor, per_token: bool, tokenizer, sample_every: int) -> dict:
    if item.truncated:
        row["truncated"] = True
    rounded = [round(v, 4) for v in phi.tolist()]
    if per_token:
        row["token_phi"] = rounded
        row["tokens"] = tokenizer.batch_decode([[t] for t in item.ids[item.prompt_length :]])
    elif sample_every and item.index % sample_every == 0:
        row["_token_phi"] = rounded  # feeds the token plots; dropped from the written file
    return row


def score_set(
    name: str,
    items: list[Item],
    records: dict[int, dict],
    scorer: Scorer,
    tokenizer,
    config: AuditConfig,
    dist: Processes,
    out: Path,
    fingerprint: dict,
    lines: dict[int, int] | None = None,
    where: str = "data",
    show_progress: bool = True,
) -> list[dict] | None:
    """Score a dataset into out/<name>.jsonl: input fields kept, scores added. Rank 0 gets the rows.
    `lines` (index -> line in `where`) names the row whose scores are not finite."""
    store = ShardStore(out, name, dist, fingerprint, config_defaults(config))
    shard = scorer.shard(items, dist.rank, dist.world)
    every = max(1, len(items) // config.plot_sample) if config.plot_sample else 0
    todo = sum(it.n_response for it in shard if it.index not in store.done)
    if dist.local_main:
        note_resume("audit", sum(it.index in store.done for it in shard), len(shard), store.store.partial)
    with progress(todo, f"audit {name}", show_progress and dist.local_main) as bar:
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
                    rows.append(_finish_row(row, item, phi, config.per_token, tokenizer, every))
                    bar.update(item.n_response)
            store.add(rows)
    return store.merge()


def self_check(
    items: list[Item],
    examples: dict[int, Example],
    scorer: Scorer,
    tokenizer,
    config: AuditConfig,
    dist: Processes,
    out: Path,
    fingerprint: dict,
    show_progress: bool = True,
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
    store = ShardStore(out, "self_check", dist, fingerprint, config_defaults(config))
    groups = [range(start, min(n, start + scorer.batch_size)) for start in range(0, n, scorer.batch_size)]
    mine = [g for g in groups[dist.rank :: dist.world] if not all(i in store.done for i in g)]
    every = max(1, n // config.plot_sample) if config.plot_sample else 0
    if dist.local_main:
        mine_all = [i for g in groups[dist.rank :: dist.world] for i in g]
        note_resume("audit self-check", sum(i in store.done for i in mine_all), len(mine_all), store.store.partial)
    with progress(
        sum(len(g) for g in mine), "audit self-check", show_progress and dist.local_main, unit="sample"
    ) as bar:
        for group in mine:
            prompts = [chosen[i].ids[: chosen[i].prompt_length] for i in group]
            # Seeded by the group's first sample: sample i is the same however the run is resumed or sharded.
            seed = stream_seed("audit", "self_check", config.seed, group.start)
            samples = sample_own(scorer.model, tokenizer, prompts, config.self_check_max_new_tokens, seed)
            sampled = [Item(i, p + s.token_ids, len(p)) for i, p, s in zip(group, prompts, samples)]
            rows = {}
            for batch, scores, phis in scorer.iter_scored(sampled):
                for j, score, phi in zip(batch, scores, phis):
                    item, source = sampled[j], chosen[sampled[j].index]
                    row = {
                        "_index": item.index,
                        "prompt_index": source.index,
                        "prompt": examples[source.index].prompt,
                        "completion": samples[j].text,
                        "finish_reason": samples[j].finish_reason,
                        **score,
                    }
                    rows[j] = _finish_row(row, item, phi, config.per_token, tokenizer, every)
            store.add([rows[j] for j in range(len(sampled))])
            bar.update(len(group))
    return store.merge()


def worst_responses(scorer: Scorer, tokenizer, items: list[Item], rows: list[dict], k: int) -> list[dict]:
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


def summarize(rows: Sequence[dict], taus: Sequence[float], threshold: float, alpha: float) -> dict:
    """Dataset-level numbers for the rows of one set; extra temperatures under `by_tau`."""
    summary = _summarize_tau(rows, "", threshold, alpha)
    if len(taus) > 1:
        summary["by_tau"] = {f"{t:g}": _summarize_tau(rows, tau_suffix(t, False), threshold, alpha) for t in taus[1:]}
    return summary


def _summarize_tau(rows: Sequence[dict], suffix: str, threshold: float, alpha: float) -> dict:
    if not rows:
        return {"n_responses": 0}
    get = lambda key: [r[key + suffix] for r in rows]  # noqa: E731
    n_tokens, mean_phi, z = get("n_tokens"), get("mean_phi"), get("z")
    total = sum(n_tokens)
    ordered_phi, ordered_z = sorted(mean_phi), sorted(z)
    summary = {
        "n_responses": len(rows),
        "n_tokens": total,
        "mean_phi_token_weighted": sum(get("sum_phi")) / total,
        "mean_phi_response_weighted": statistics.fmean(mean_phi),
        "mean_phi_se": statistics.stdev(mean_phi) / math.sqrt(len(rows)) if len(rows) > 1 else float("nan"),
        "mean_phi_quantiles": {f"{q:g}": quantile(ordered_phi, q) for q in QUANTILES},
        "fraction_ood": sum(v < threshold for v in mean_phi) / len(rows),
        "fraction_rejected": sum(p < alpha for p in get("p_value")) / len(rows),
        "z_mean": statistics.fmean(z),
        "z_std": statistics.pstdev(z),
        "z_quantiles": {f"{q:g}": quantile(ordered_z, q) for q in QUANTILES},
        "z_ks_distance": ks_distance_to_normal(z),
        "z_pooled": sum(get("sum_phi")) / math.sqrt(max(sum(get("sum_var")), ddt.VAR_FLOOR)),
    }
    for level in ddt.PHI_LEVELS:
        key = ddt.share_key(level)
        summary[key + "_token_weighted"] = sum(s * n for s, n in zip(get(key), n_tokens)) / total
    return summary


def summarize_groups(rows: Sequence[dict], column: str, taus: Sequence[float], threshold: float, alpha: float) -> dict:
    """`summarize` per value of `column` (rows without it are grouped under "(none)")."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get(column, "(none)")), []).append(row)
    return {value: summarize(group, taus, threshold, alpha) for value, group in sorted(groups.items())}


def kept_rows(rows: list[dict], config: AuditConfig) -> list[dict]:
    inside = (
        (lambda r: r["mean_phi"] >= config.threshold)
        if config.keep_by == "phi"
        else (lambda r: r["p_value"] >= config.alpha)
    )
    return [r for r in rows if inside(r) == (config.keep == "in")]


def token_phi(rows: list[dict]) -> list[list[float]]:
    return [r.get("token_phi") or r["_token_phi"] for r in rows if "token_phi" in r or "_token_phi" in r]
