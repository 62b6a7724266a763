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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onsft.data.rows import Example, check_sources, dataset_identity, load_examples
from onsft.engine.scoring import Item, ScoringConfig, encode_items
from onsft.pipeline.audit.audit_report import write_report
from onsft.pipeline.audit.auditing import (
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
from onsft.runtime.device import Processes, ran_on, resolve_dtype
from onsft.runtime.models import (
    ModelArguments,
    check_context,
    check_model,
    context_length,
    load_model,
    load_tokenizer,
    pad_token_id,
)
from onsft.runtime.records import check_writable, write_json_atomic, write_jsonl_atomic
from onsft.runtime.runs import RunArguments, RunGuard, config_defaults, open_run
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


@dataclass
class _Side:
    """One dataset scored by one model: the data (`scores`) or the comparison (`compare_scores`)."""

    name: str
    label: str
    model_args: ModelArguments
    examples: list[Example]
    tokenizer: Any
    items: list[Item]
    where: str
    fingerprint: dict

    def lengths(self) -> list[tuple[int, int | None]]:
        line = {e.index: e.line for e in self.examples}
        return [(len(it.ids), line[it.index]) for it in self.items]


def _sides(config: AuditConfig, model_args: ModelArguments, dtype) -> tuple[_Side, _Side | None, dict]:
    """Both sides read, tokenised and fingerprinted (every user error surfaces here), and the encoding counts."""
    check_sources({"--data": config.data, "--compare_data": config.compare_data})
    examples = load_examples(config.data, split=config.split, offline=model_args.offline)
    tokenizer = load_tokenizer(model_args)
    items, encoding = encode_items(tokenizer, examples, config.max_length, config.overlong, config.data)
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
    main = _Side(
        "scores", f"data: {Path(config.data).name}", model_args, examples, tokenizer, items, config.data, fingerprint
    )
    if not (config.compare_data or config.compare_model):
        return main, None, encoding
    other_args = (
        dataclasses.replace(model_args, model=config.compare_model, model_revision=None)
        if config.compare_model
        else model_args
    )
    other_examples = (
        load_examples(config.compare_data, split=config.split, offline=model_args.offline, flag="--compare_data")
        if config.compare_data
        else examples
    )
    if config.compare_model:
        check_model(other_args)  # its weights load only after the data is scored: a broken copy fails now
    other_tokenizer = load_tokenizer(other_args) if config.compare_model else tokenizer
    where = config.compare_data or config.data
    other_items = encode_items(other_tokenizer, other_examples, config.max_length, config.overlong, where)[0]
    named = [Path(x).name for x in (config.compare_model, config.compare_data) if x]
    other = _Side(
        "compare_scores",
        "compare: " + " on ".join(named),
        other_args,
        other_examples,
        other_tokenizer,
        other_items,
        where,
        {**fingerprint, "model": other_args.model, "data": dataset_identity(where, config.split)},
    )
    return main, other, encoding


def run(
    config: AuditConfig,
    model_args: ModelArguments | None = None,
    scoring: ScoringConfig | None = None,
    run_args: RunArguments | None = None,
) -> dict | None:
    """The command: returns the summary on rank 0 (None on other ranks of a launch)."""
    config, model_args, scoring, run_args = open_run(CONFIGS, (config, model_args, scoring, run_args))
    procs = Processes(model_args.device)
    dtype = resolve_dtype(model_args.dtype, procs.device)
    out = Path(config.out)
    # Everything a user can get wrong is checked before the output folder exists.
    main, other, encoding = _sides(config, model_args, dtype)
    check_writable(out / "scores.jsonl")
    # Scores are reused only from runs with the same scoring settings; the summary and report are rebuilt.
    with RunGuard(
        out / "run.json",
        "audit",
        main.fingerprint,
        OUTPUTS,
        out / "summary.json",
        overwrite=run_args.overwrite,
        active=procs.main,
        reuse=False,
        inputs={"--data": config.data, "--compare_data": config.compare_data},
        defaults=config_defaults(config),
    ):
        model = load_model(model_args, device=procs.device, dtype=dtype)
        other_model = (
            load_model(other.model_args, device=procs.device, dtype=dtype)
            if other and other.model_args is not model_args
            else model
        )
        for side, scored_by in ((main, model), (other, other_model)):
            if side is not None:
                check_context(context_length(scored_by), side.lengths(), side.where)
        sets: list[ScoreSet] = []
        first, rows, scorer = _score(main, model, config, scoring, procs, run_args)
        sets += [first] if first else []
        if config.self_check:
            by_index = {e.index: e for e in main.examples}
            own = self_check(
                main.items, by_index, scorer, main.tokenizer, config, procs, out, main.fingerprint, run_args.progress
            )
            if procs.main:
                sets.append(ScoreSet("self_check", "model's own samples (tau=1)", own, token_phi(own)))
        if other is not None:
            if other_model is not model:
                del scorer, model
                gc.collect()
            second, _, _ = _score(other, other_model, config, scoring, procs, run_args)
            sets += [second] if second else []
        summary = None
        if procs.main:
            # Where it ran: read from the model that scored last (both models share the device and dtype).
            summary = _summary(config, model_args, encoding, procs, sets, rows, ran_on(other_model, procs.world))
            main_set = summary["sets"]["scores"]
            print(
                f"onsft audit: {main_set['n_responses']} responses, mean phi "
                f"{main_set['mean_phi_token_weighted']:.4f} (token-weighted), {main_set['fraction_ood']:.1%} OOD, "
                f"{main_set['fraction_rejected']:.1%} rejected at alpha={config.alpha:g}; report: "
                f"{out / 'report.html'}"
            )
        procs.barrier()
    return summary


def _score(
    side: _Side, model, config: AuditConfig, scoring: ScoringConfig, procs: Processes, run_args: RunArguments
) -> tuple[ScoreSet | None, list[dict] | None, Any]:
    """Score one side into OUT/<side.name>.jsonl: (its ScoreSet on rank 0, its rows, the scorer)."""
    tokens = sum(it.n_response for it in side.items) // procs.world
    scorer = scoring.scorer(model, pad_token_id(side.tokenizer), config.tau, config.threshold, tokens)
    rows = score_set(
        side.name,
        side.items,
        {e.index: e.record for e in side.examples},
        scorer,
        side.tokenizer,
        config,
        procs,
        Path(config.out),
        side.fingerprint,
        {e.index: e.line for e in side.examples},
        side.where,
        run_args.progress,
    )
    if not procs.main:
        return None, rows, scorer
    worst = worst_responses(scorer, side.tokenizer, side.items, rows, config.worst)
    return ScoreSet(side.name, side.label, rows, token_phi(rows), worst), rows, scorer


def _summary(
    config: AuditConfig,
    model_args: ModelArguments,
    encoding: dict,
    procs: Processes,
    sets: list[ScoreSet],
    rows: list[dict],
    where: dict,
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
        "ran_on": where,
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


# The settings `run` takes, in its order: the command line fills one of each.
CONFIGS = (AuditConfig, ModelArguments, ScoringConfig, RunArguments)
