"""`onsft rewrite`: turn off-policy reference solutions into the model's own, verified responses.

    onsft rewrite --model organism --data teacher.jsonl --out runs/rewrite
    onsft train --data runs/rewrite/train.jsonl ...

The pipeline (spec section 3, "The data pipeline around it"), for every prompt:
  1. sample `--own_samples` (k) answers of the model itself from the plain context (the ordinary chat
     prompt) and verify them against the `answer` column; with `--keep_own` (default) the first
     verified one that ended by itself is kept as it is: provenance `own` (it is on-policy already);
  2. otherwise run hinted decoding (`onsft.engine.hinted`): one response shared by the plain context and a
     hinted context (the hint template filled with the question and the `reference` column, under the
     chat template). Best-of-n (`onsft.pipeline.rewrite.best_of_n`): `--samples_per_prompt` N candidates, candidate
     s at beta `--beta_ladder`[s mod length] (default `--hint_beta`), each verified; `--keep best` (default)
     keeps the usable candidate with the highest Z (closest to the model's own distribution), `first` the
     first, `all` every distinct one (a training row each): provenance `hinted`; when none is usable:
     `dropped` (its most promising try is shown, not trained on, with `drop_reason`). A response cut by
     the decoder (`--max_new_tokens`, a repetition loop) is not a finished solution and is not usable
     unless `--keep_truncated` (`drop_reason: truncated` when only such tries verified);
  3. score every response, and the original reference, with DDT under the plain context (the audit's
     streamed scorer): mean phi, Z and p-value, so the summary shows how far rewriting moved the data;
  4. check the steps each kept response states (`--step_check flag|drop|off`, default flag, with
     `--step_checker arithmetic`: every stated `a op b = c` between numbers, `onsft.data.step_check`): a
     verified answer can follow a false step copied around the reference's numbers. flag keeps the row
     and lists its `false_steps`; drop takes another verified try without one, else drops the row
     (`drop_reason: false step`).

Outputs in --out:
  records.jsonl  every input row once, in input order, its fields untouched, plus: response, provenance
                 (own|hinted|dropped), verified, mean_phi, z, p_value, scored_tokens, finish_reason,
                 n_tokens (generated tokens of the response), reference_mean_phi, reference_z,
                 own_correct (verified own samples of k), own_samples, hinted_tries (candidates judged),
                 sample_index and beta (which sample the response is: own samples have beta null),
                 mean_lambda, handed_over (the hinted response reached the answer marker and the plain
                 context finished it), candidates (per hinted candidate: sample, beta, finish_reason,
                 n_tokens, handed_over, verified, usable, problem, kept, and mean_phi / z when scored),
                 also_kept (the other kept candidates with --keep all: response, sample_index, beta, ...),
                 extracted_answer, verify_method, generated_tokens (all tokens decoded for the row),
                 truncated (the response did not end by itself: finish_reason length or repetition),
                 score_truncated (scored up to --max_length only), false_steps / steps_checked (the
                 step check; null when off), drop_reason for dropped rows, and
                 `analysis` with --analyze_first. An input column of one of these names
                 is an error (rename it), never silently replaced.
  train.jsonl    (or --train_out) the kept rows only (own + hinted), training-ready: `prompt` (as given)
                 + `completion` = the response, plus answer, provenance, mean_phi, false_steps (when
                 the step check ran) and the other input columns; `onsft train --data` reads it directly.
  summary.json   counts own-correct / rewritten / dropped (and why: drop_reasons, truncated, step_check:
                 rows checked, flagged, dropped), the yield against N (of the prompts given hinted
                 candidates, how many have a usable one among their first n, n = 1..N), per beta
                 (by_beta), the share of hinted candidates and of kept rewrites that reached the answer
                 marker (answer_marker: did the hand-over to the plain context happen), mean phi of
                 the references vs the rewritten responses vs the own answers, throughput, wall time and
                 the settings.
A rewrite that keeps no row is an error (exit 2): no train.jsonl or summary.json is written, and the
finished rows stay in records.jsonl.partial for inspection (the same command fails again at once).

Resuming: rows are appended to records.jsonl.partial after every chunk of `--chunk_size` prompts
(flushed and fsynced); a killed run (even SIGKILL) rerun with the same command skips the finished rows,
and the final files appear only when every row is done. Rerunning a finished run does nothing. A
run with other settings at the same --out is refused (`--overwrite` starts over).

Reproducibility: sample s of the row with input index i (an own sample, or a hinted candidate) draws
from the random stream fixed by (--seed, the stage, i, s) alone, so samples do not depend on the chunk,
the decode batch sizes, resuming, the number of processes, or N for the first N samples (the yield can
only grow with --samples_per_prompt). DDT scores are computed per chunk. Under `accelerate launch` /
torchrun each process takes the chunks c with c % N == rank, writes records.rank<r>-of-<N>.jsonl.partial,
and rank 0 merges in input order, so the merged output equals a one-process run.

Hint template: the hinted context is [system: hint system] + [user: hint template], with `{question}`
(the last user turn, after the prompt's own system text if it has one) and `{reference}` filled in.
Default: the model folder's onsft.json (`hint_template`, `hint_system`, `answer_marker`) when it has
one -- the organism was pretrained on exactly that format -- else a generic instruction to rewrite
the reference as the model's own step-by-step reasoning (`onsft.pipeline.rewrite.hint_prompts`).

--analyze_first (off by default) follows the reference code: the model first writes, greedily from
the hinted context, an "# Analyze" part that checks the reference, up to and including its first
`--analyze_marker` ("# CoT"); that text joins the hinted context and the shared response starts
after it. A row whose analysis never reaches the marker is dropped, as the reference code skips it.
(The reference cuts at the *last* marker of a full greedy output; the first one is where the model's
own solution begins.)

Flags: the pipeline's own (`RewriteConfig`), hinted decoding's (`HintedConfig`: --hint_beta, --mode,
--sigmoid_center, --piecewise_low/high, --temperature, --top_p, --max_new_tokens, --batch_size, --seed,
...), scoring's (`ScoringConfig`), checking's (`VerifyConfig`) and the model's (`ModelArguments`).
From Python: `run(RewriteConfig(data=..., out=...), ModelArguments(model=...), HintedConfig(beta=3))`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

from accelerate.utils import gather_object

from onsft.data.chat import check_text_budget
from onsft.data.rows import dataset_identity, load_examples
from onsft.data.verify import VerifyConfig
from onsft.engine.hinted import HintedConfig
from onsft.engine.scoring import ScoringConfig
from onsft.errors import UserError
from onsft.pipeline.rewrite.hint_profiles import model_profile
from onsft.pipeline.rewrite.rewrite_config import RewriteConfig, check_columns
from onsft.pipeline.rewrite.rewrite_summary import summarize, train_rows
from onsft.pipeline.rewrite.rewriting import Rewriter, chunks, prepare
from onsft.runtime.device import Processes, ran_on, resolve_dtype
from onsft.runtime.models import (
    ModelArguments,
    configured_context_length,
    context_length,
    load_model,
    load_tokenizer,
    read_model_info,
)
from onsft.runtime.progress import note_resume, progress
from onsft.runtime.records import check_writable, write_json_atomic, write_jsonl_atomic
from onsft.runtime.runs import RunArguments, RunGuard, group_defaults, normalized, open_run, settings_record
from onsft.runtime.store import ShardStore

OUTPUTS = ["records*.jsonl*", "train.jsonl", "summary.json"]


def _settings(
    config: RewriteConfig, model_args: ModelArguments, hinted: HintedConfig, verify: VerifyConfig, hint, dtype
) -> dict:
    """What changes results (batch sizes and output names do not): a resumed run must match it, and a
    finished run with it is not redone."""
    record = settings_record(
        "rewrite",
        config,
        dataset_identity(config.data, config.split),
        model_args,
        ("out", "train_out", "own_batch_size"),
        # marker_before_stop as resolved (flag, else profile) is the hint's; the flag itself is not recorded, so a
        # rewrite recorded before the option existed matches a rerun that turns it off.
        hinted={k: v for k, v in dataclasses.asdict(hinted).items() if k not in ("batch_size", "marker_before_stop")},
        hint=hint,
        verify=verify,
    )
    # The command's name and the weights' precision as the first rewrites recorded them (cached rewrites stay valid).
    return {"command": "rewrite", "dtype": str(dtype), **record}


def run(
    config: RewriteConfig,
    model_args: ModelArguments | None = None,
    hinted: HintedConfig | None = None,
    scoring: ScoringConfig | None = None,
    verify: VerifyConfig | None = None,
    run_args: RunArguments | None = None,
) -> dict | None:
    """The command: returns the summary on rank 0 (None on other ranks)."""
    config, model_args, hinted, scoring, verify, run_args = open_run(
        CONFIGS, (config, model_args, hinted, scoring, verify, run_args)
    )
    started = time.time()
    if not config.out:
        raise UserError("`out` is required", where="config", fix="pass --out FOLDER.")
    out = Path(config.out)
    train_out = Path(config.train_out) if config.train_out else out / "train.jsonl"
    # Everything a user can get wrong is checked before anything is written.
    verifier = verify.build()
    step_checker = config.build_step_checker()
    examples = load_examples(config.data, require_response=False, split=config.split, offline=model_args.offline)
    check_columns(examples, config.data)
    tokenizer = load_tokenizer(model_args)
    profile = model_profile(model_args.model, tokenizer=tokenizer)
    hint = config.hint(hinted, read_model_info(model_args), profile)
    check_writable(out / "records.jsonl")
    check_writable(train_out)
    procs = Processes(model_args.device)
    dtype = resolve_dtype(model_args.dtype, procs.device)
    context = configured_context_length(model_args)
    # (issue 15) Rows far past the token budget by their characters alone are refused before tokenising.
    check_text_budget(tokenizer, examples, max(config.max_length, context or 0), config.data, with_reference=True)
    prepared = prepare(tokenizer, examples, hint, config.max_length, context, config.data)
    settings = normalized(_settings(config, model_args, hinted, verify, hint, dtype))
    defaults = group_defaults(rewrite=config, hinted=hinted, model=model_args, hint=hint, verify=verify)
    with RunGuard(
        out / "run.json",
        "rewrite",
        settings,
        OUTPUTS,
        out / "summary.json",
        overwrite=run_args.overwrite,
        active=procs.main,
        inputs={"--data": config.data},  # (issue 15) no output may replace the input
        files=[train_out],
        defaults=defaults,
    ) as finished:
        procs.barrier()
        if finished is not None:
            if procs.main and not train_out.is_file():  # a training file asked for under another name
                records = (out / "records.jsonl").read_text(encoding="utf-8").splitlines()
                write_jsonl_atomic(train_out, train_rows([json.loads(line) for line in records]))
            if procs.main:
                print(
                    f"onsft rewrite: {out} already holds this finished run; nothing to do (training file: "
                    f"{train_out}).",
                    file=sys.stderr,
                )
            return finished if procs.main else None
        # The model last: nothing it prints while loading comes before an error above.
        model = load_model(model_args, device=procs.device, dtype=dtype)
        if context is None and context_length(model):
            prepared = prepare(tokenizer, examples, hint, config.max_length, context_length(model), config.data)
        rewriter = Rewriter(model, tokenizer, config, hinted, scoring, hint, verifier, step_checker)
        summary = _rewrite(
            config, model_args, run_args, procs, rewriter, prepared, (settings, defaults), train_out, started
        )
    return summary


def _rewrite(config, model_args, run_args, procs, rewriter, prepared, fingerprint, train_out, started) -> dict | None:
    settings, defaults = fingerprint
    out = Path(config.out)
    _warn_other_shards(out, procs.world)
    store = ShardStore(out, "records", procs, settings, defaults)
    spans = chunks(len(prepared), config.chunk_size)
    mine = spans[procs.rank :: procs.world]
    todo = [span for span in mine if not all(prepared[i].example.index in store.done for i in span)]
    total = sum(len(span) for span in mine)
    decode_start = time.time()
    counts: Counter[str] = Counter(r["provenance"] for r in store.done.values())
    if procs.local_main:
        on_disk = sum(prepared[i].example.index in store.done for span in mine for i in span)
        note_resume("rewrite", on_disk, total, store.store.partial)
    with progress(
        total,
        "rewrite",
        run_args.progress and procs.local_main,
        unit="prompt",
        initial=total - sum(len(s) for s in todo),
    ) as bar:
        for span in todo:
            # A chunk is decoded whole even when a kill left part of it on disk (simpler than splitting it;
            # samples are seeded per row, so they come out the same) and rows already on disk are kept.
            records = rewriter.chunk([prepared[i] for i in span], progress=bar.update)
            fresh = [r for r in records if r["_index"] not in store.done]
            store.add(fresh)
            counts.update(r["provenance"] for r in fresh)
            seconds = max(time.time() - decode_start, 1e-9)
            bar.set_postfix(
                own=counts["own"],
                hinted=counts["hinted"],
                dropped=counts["dropped"],
                tok_s=f"{rewriter.generated / seconds:.0f}",
                refresh=False,
            )
    decode_seconds = time.time() - decode_start
    mine = [(rewriter.generated, decode_seconds, Counter(_outcome(r) for r in store.done.values()))]
    gathered = gather_object(mine) if procs.world > 1 else mine
    throughput = [(tokens, seconds) for tokens, seconds, _ in gathered]
    outcomes = sum((counts for _, _, counts in gathered), Counter())
    if not outcomes["kept"]:
        store.store.close()
        raise _nothing_kept(outcomes, store.store.partial, procs.world)
    merged = store.merge()
    if not procs.main:
        return None
    merged = [{k: v for k, v in row.items() if k != "_index"} for row in merged]
    write_jsonl_atomic(train_out, train_rows(merged))
    generated_now = sum(tokens for tokens, _ in throughput)
    slowest = max(seconds for _, seconds in throughput)
    summary = {
        "command": "rewrite",
        "model": model_args.model,
        "data": config.data,
        "processes": procs.world,
        "ran_on": ran_on(rewriter.model, procs.world),
        **summarize(merged),
        "generated_tokens_this_run": generated_now,
        "decode_seconds_this_run": slowest,
        "tokens_per_second": generated_now / max(slowest, 1e-9) if generated_now else None,
        "wall_seconds": time.time() - started,
        # What the runs before a resume spent (saved with their rows), for the compute of the whole run.
        "cost_before_this_run": store.store.seconds_before,
        "files": {"records": str(out / "records.jsonl"), "train": str(train_out)},
        "hint": settings["hint"],
        "settings": settings,
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def _outcome(record: dict) -> str:
    return "kept" if record["provenance"] != "dropped" else record.get("drop_reason") or "not verified"


def _nothing_kept(outcomes: Counter, partial: Path, world: int) -> UserError:
    """(issue 15) A rewrite that keeps no row is a failed run, not an empty training file: no train.jsonl
    or summary.json; the finished rows stay in the .partial file(s), so the same command fails again at
    once and another one (with --overwrite) starts over."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(outcomes.items()))
    shown = partial if world == 1 else partial.parent / "records.rank*.jsonl.partial"
    return UserError(
        f"the rewrite kept 0 of {sum(outcomes.values())} rows ({reasons}): no prompt got a response that verifies "
        "against its `answer` and ends by itself, even with the reference in context, so there is nothing to "
        "train on; each row's last try (extracted_answer, finish_reason, drop_reason) is in this file",
        where=str(shown),
        fix="try more samples (--own_samples, --samples_per_prompt), a higher --hint_beta, another --verifier (exact, "
        "file.py:function), or a larger --max_new_tokens when rows were cut (truncated); rerun with --overwrite.",
    )


def _warn_other_shards(out: Path, world: int) -> None:
    def ours(name: str) -> bool:
        return name == "records.jsonl.partial" if world == 1 else f"-of-{world}." in name

    others = [p for p in sorted(out.glob("records*.jsonl.partial")) if not ours(p.name)]
    if others:
        print(
            f"onsft rewrite: {out} holds unfinished shards of a run with another number of processes "
            f"({others[0].name}); they are not resumed by this run (rerun with that many processes, or delete "
            "them).",
            file=sys.stderr,
        )


# The settings `run` takes, in its order: the command line fills one of each.
CONFIGS = (RewriteConfig, ModelArguments, HintedConfig, ScoringConfig, VerifyConfig, RunArguments)
