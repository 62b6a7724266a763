"""`onsft audit`: how off-policy is a dataset for a model? (DDT, spec section 1)

For every row, the model scores its response tokens: phi = log p(y) + H per token, aggregated into mean
phi, Z = sum phi / sqrt(sum Var) and the one-sided p-value P(N(0,1) <= Z). Outputs in --out:
  scores.jsonl          every input row, its fields kept, scores added (resumable: rerun to continue)
  self_check.jsonl      with --self_check N: N of the model's own samples (tau = 1) scored the same way,
                        the on-policy baseline (mean phi ~ 0, Z ~ N(0,1))
  compare_scores.jsonl  with --compare_data / --compare_model: a second dataset and/or model
  kept.jsonl            with --keep in|out: the rows kept by mean phi (--threshold) or p-value (--alpha)
  summary.json, plots/*.png, report.html

Scoring runs the model's backbone and streams the LM head over vocabulary tiles (`onsft.formulas.ddt`), so the
B x T x V logits are never materialised, and only response positions reach the head. Rows are sorted
into length buckets to waste little padding; results do not depend on batching.
Under `accelerate launch` (or torchrun) each process scores its own shard and rank 0 merges.

A rerun with the same scoring settings resumes (and rewrites the summary and report); other scoring
settings at the same --out are refused (`--overwrite` starts over).

From Python: `run(AuditConfig(data=..., out=...), ModelArguments(model=...))` returns summary.json's contents.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

from onsft.data.rows import dataset_identity, load_examples
from onsft.engine.scoring import ScoringConfig, encode_items
from onsft.pipeline.audit_report import write_report
from onsft.pipeline.auditing import (
    AuditConfig,
    ScoreSet,
    kept_rows,
    score_set,
    self_check,
    summarize,
    summarize_groups,
    token_phi,
    worst_responses,
)
from onsft.runtime.device import Processes, resolve_dtype
from onsft.runtime.models import (
    ModelArguments,
    check_context,
    context_length,
    load_model,
    load_tokenizer,
    pad_token_id,
)
from onsft.runtime.records import check_writable, write_json_atomic, write_jsonl_atomic
from onsft.runtime.runs import RunArguments, RunGuard
from onsft.runtime.settings import parse_command
from onsft.runtime.store import public

OUTPUTS = [
    "scores*.jsonl*",
    "self_check*.jsonl*",
    "compare_scores*.jsonl*",
    "kept.jsonl",
    "summary.json",
    "report.html",
    "plots",
]


def _lengths(items, examples) -> list[tuple[int, int | None]]:
    line = {e.index: e.line for e in examples}
    return [(len(it.ids), line[it.index]) for it in items]


def run(
    config: AuditConfig,
    model_args: ModelArguments | None = None,
    scoring: ScoringConfig | None = None,
    run_args: RunArguments | None = None,
) -> dict | None:
    """The command: returns the summary on rank 0 (None on other ranks of a launch)."""
    model_args, scoring, run_args = (
        model_args or ModelArguments(),
        scoring or ScoringConfig(),
        run_args or RunArguments(),
    )
    for part in (config, model_args, scoring):
        part.validate()
    procs = Processes(model_args.device)
    dtype = resolve_dtype(model_args.dtype, procs.device)
    out = Path(config.out)

    # Everything a user can get wrong is checked before the output folder exists.
    examples = load_examples(config.data, split=config.split, offline=model_args.offline)
    compare_examples = (
        load_examples(config.compare_data, split=config.split, offline=model_args.offline)
        if config.compare_data
        else examples
    )
    compare_args = (
        dataclasses.replace(model_args, model=config.compare_model, model_revision=None)
        if config.compare_model
        else model_args
    )
    tokenizer = load_tokenizer(model_args)
    items, encoding = encode_items(tokenizer, examples, config.max_length, config.overlong, config.data)
    comparing = bool(config.compare_data or config.compare_model)
    compare_where = config.compare_data or config.data
    compare_tokenizer = load_tokenizer(compare_args) if config.compare_model else tokenizer
    compare_items = (
        encode_items(compare_tokenizer, compare_examples, config.max_length, config.overlong, compare_where)[0]
        if comparing
        else None
    )
    check_writable(out / "scores.jsonl")
    fingerprint = {
        "command": "audit",
        "model": model_args.model,
        "data": dataset_identity(config.data, config.split),
        "tau": list(config.tau),
        "max_length": config.max_length,
        "overlong": config.overlong,
        "dtype": str(dtype),
        "threshold": config.threshold,
        "per_token": config.per_token,
        "plot_sample": config.plot_sample,
    }
    # Scores are reused only from runs with the same scoring settings; the summary and report are rebuilt.
    guard = RunGuard(
        out / "run.json",
        "audit",
        fingerprint,
        OUTPUTS,
        out / "summary.json",
        overwrite=run_args.overwrite,
        active=procs.main,
        reuse=False,
    )
    guard.claim()
    try:
        summary = _audit(
            config,
            model_args,
            compare_args,
            scoring,
            run_args,
            procs,
            dtype,
            examples,
            compare_examples,
            tokenizer,
            compare_tokenizer,
            items,
            compare_items,
            encoding,
            fingerprint,
        )
        guard.finish()
    finally:
        guard.release()
    return summary


def _audit(
    config,
    model_args,
    compare_args,
    scoring,
    run_args,
    procs,
    dtype,
    examples,
    compare_examples,
    tokenizer,
    compare_tokenizer,
    items,
    compare_items,
    encoding,
    fingerprint,
) -> dict | None:
    out = Path(config.out)
    comparing = compare_items is not None
    compare_where = config.compare_data or config.data
    model = load_model(model_args, device=procs.device, dtype=dtype)
    compare_model = load_model(compare_args, device=procs.device, dtype=dtype) if config.compare_model else model
    check_context(context_length(model), _lengths(items, examples), config.data)
    if comparing:
        check_context(context_length(compare_model), _lengths(compare_items, compare_examples), compare_where)
    by_index = {e.index: e for e in examples}
    tokens = sum(it.n_response for it in items) // procs.world
    scorer = scoring.scorer(model, pad_token_id(tokenizer), config.tau, config.threshold, tokens)
    sets: list[ScoreSet] = []
    rows = score_set(
        "scores",
        items,
        {i: e.record for i, e in by_index.items()},
        scorer,
        tokenizer,
        config,
        procs,
        out,
        fingerprint,
        {e.index: e.line for e in examples},
        config.data,
        run_args.progress,
    )
    if procs.main:
        sets.append(
            ScoreSet(
                "scores",
                f"data: {Path(config.data).name}",
                rows,
                token_phi(rows),
                worst_responses(scorer, tokenizer, items, rows, config.worst),
            )
        )
    if config.self_check:
        own = self_check(items, by_index, scorer, tokenizer, config, procs, out, fingerprint, run_args.progress)
        if procs.main:
            sets.append(ScoreSet("self_check", "model's own samples (tau=1)", own, token_phi(own)))
    if comparing:
        if compare_model is not model:
            del scorer, model
            gc.collect()
        tokens = sum(it.n_response for it in compare_items) // procs.world
        compare_scorer = scoring.scorer(
            compare_model, pad_token_id(compare_tokenizer), config.tau, config.threshold, tokens
        )
        compare_fingerprint = {
            **fingerprint,
            "model": compare_args.model,
            "data": dataset_identity(compare_where, config.split),
        }
        other = score_set(
            "compare_scores",
            compare_items,
            {e.index: e.record for e in compare_examples},
            compare_scorer,
            compare_tokenizer,
            config,
            procs,
            out,
            compare_fingerprint,
            {e.index: e.line for e in compare_examples},
            compare_where,
            run_args.progress,
        )
        if procs.main:
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
                    token_phi(other),
                    worst_responses(compare_scorer, compare_tokenizer, compare_items, other, config.worst),
                )
            )
    summary = None
    if procs.main:
        summary = _summary(config, model_args, encoding, procs, sets, rows)
        main_set = summary["sets"]["scores"]
        print(
            f"onsft audit: {main_set['n_responses']} responses, mean phi {main_set['mean_phi_token_weighted']:.4f} "
            f"(token-weighted), {main_set['fraction_ood']:.1%} OOD, {main_set['fraction_rejected']:.1%} rejected "
            f"at alpha={config.alpha:g}; report: {out / 'report.html'}"
        )
    procs.barrier()
    return summary


def _summary(
    config: AuditConfig,
    model_args: ModelArguments,
    encoding: dict,
    procs: Processes,
    sets: list[ScoreSet],
    rows: list[dict],
) -> dict:
    """summary.json, kept.jsonl and the report, on rank 0."""
    out = Path(config.out)
    summary = {
        "command": "audit",
        "model": model_args.model,
        "data": config.data,
        "tau": list(config.tau),
        "threshold": config.threshold,
        "alpha": config.alpha,
        "encoding": encoding,
        "processes": procs.world,
        "compare_model": config.compare_model or None,
        "compare_data": config.compare_data or None,
        "sets": {
            s.name: {"label": s.label, **summarize(s.rows, config.tau, config.threshold, config.alpha)} for s in sets
        },
    }
    if config.group_by:
        summary["sets"]["scores"]["by_group"] = summarize_groups(
            rows, config.group_by, config.tau, config.threshold, config.alpha
        )
    if config.keep:
        kept = kept_rows(rows, config)
        write_jsonl_atomic(out / "kept.jsonl", [public(r) for r in kept])
        summary["kept"] = {"keep": config.keep, "by": config.keep_by, "rows": len(kept), "of": len(rows)}
    produced = {s.name for s in sets} | ({"kept"} if config.keep else set())
    for optional in ("self_check", "compare_scores", "kept"):
        if optional not in produced:  # an earlier run's file would contradict this run's report
            (out / f"{optional}.jsonl").unlink(missing_ok=True)
    write_report(out, config, model_args.model, summary, sets)
    write_json_atomic(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    config, model_args, scoring, run_args = parse_command(
        argv, AuditConfig, ModelArguments, ScoringConfig, RunArguments, prog="onsft audit"
    )
    run(config, model_args, scoring, run_args)
    return 0
