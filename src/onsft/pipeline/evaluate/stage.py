"""`onsft eval`: accuracy (greedy pass@1, sampled pass@k), retention and KL drift of a model.

    onsft eval --model runs/idft/model --data test.jsonl --out runs/idft/eval --samples 8 \\
        --retention_data old_skills.jsonl --base_model organism

What is measured
- accuracy: greedy decoding (temperature 0), one response per prompt, checked by the verifier
  (`onsft.data.verify`: math, exact, or your own function) against the `answer` column: pass@1.
- pass@k: `--samples n` responses per prompt at `--temperature` (default 1: the model's own distribution); for each k <= n the unbiased
  estimator 1 - C(n-c, k) / C(n, k) (c = correct samples), averaged over prompts. `sampled_accuracy`
  is the mean fraction of correct samples (= pass@1 from samples).
- per task: every number above again per value of a `task` column, when the data has one.
- retention (forgetting, part 1): greedy accuracy on `--retention_data`, a set of skills the model had.
- KL drift (forgetting, part 2), with `--base_model`: the base model writes continuations of the
  prompts of `--kl_data` (default: the retention data, else the eval data) -- greedy by default,
  or sampled with `--kl_continuation sampled` -- and both models score them. At every continuation
  position t (prompt tokens excluded, the final EOS included) the exact KL over the vocabulary
      KL_t = sum_v p_base(v | ctx_t) (log p_base(v | ctx_t) - log p_tuned(v | ctx_t))
  is computed; the reported number is the mean of KL_t over all continuation tokens of all prompts
  (token-weighted). It measures how far tuning moved the model on text the base model itself writes.

Outputs in `--out`: metrics.json, generations.jsonl (each input row with its fields kept, plus the
greedy response, samples, extracted answers and correct flags; these added fields -- generation,
finish_reason, n_tokens, extracted_answer, correct, verify_method, samples, n_correct -- replace input
columns of the same name), retention.jsonl and kl.jsonl when
asked, and accuracy.png. A killed run rerun with the same command resumes: finished prompts are read
back from the `.partial` files (keyed by example index), nothing is generated twice, and the final
files appear only when everything is done.

Sampling seeds: prompts are decoded in fixed chunks; the samples of a chunk come from
`--seed` and the chunk's first example index, so results are reproducible for given
`--seed --samples --batch_size`, and identical between an interrupted and an uninterrupted run.

From Python: `run(EvalConfig(data=...), ModelArguments(model=...), OwnSamplingConfig(), VerifyConfig())`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from onsft.data.chat import encode_prompt
from onsft.data.rows import (
    DataArguments,
    Example,
    check_limit,
    check_sources,
    dataset_identity,
    limit_field,
    load_examples,
)
from onsft.data.verify import VerifyConfig
from onsft.engine.decoding import OwnSamplingConfig, SamplingConfig
from onsft.engine.kl import KL_CONTINUATIONS, kl_drift
from onsft.errors import UserError
from onsft.pipeline.evaluate.evaluation import (
    aggregate,
    check_answers,
    check_prompt_set,
    check_prompts,
    default_ks,
    evaluate_rows,
    fitting_prompts,
    plot_accuracy,
)
from onsft.runtime.device import ran_on, stream_seed
from onsft.runtime.models import (
    ModelArguments,
    check_model,
    context_length,
    load_model,
    load_tokenizer,
    vocabulary_size,
)
from onsft.runtime.progress import note_resume, progress
from onsft.runtime.records import ResumableJsonl, write_json_atomic
from onsft.runtime.runs import RunArguments, RunGuard, group_defaults, open_run, settings_record

OUTPUTS = ["metrics.json", "accuracy.png", "generations.jsonl*", "retention.jsonl*", "kl.jsonl*"]


@dataclass
class EvalConfig(DataArguments):
    """What to evaluate (the data: rows with a prompt and an `answer`; the model is ModelArguments', the
    decoding OwnSamplingConfig's, the checking VerifyConfig's)."""

    out: str = field(default="runs/eval", metadata={"help": "Output folder (metrics.json, generations.jsonl, plot)."})
    greedy: bool = field(default=True, metadata={"help": "Decode one greedy response per prompt (pass@1)."})
    samples: int = field(default=0, metadata={"help": "Sampled responses per prompt for pass@k (0 = none)."})
    pass_k: list[int] = field(
        default_factory=list,
        metadata={"help": "k values for pass@k (each <= --samples); default: 1, 2, 4, ... up to --samples."},
    )
    limit: int = limit_field()
    overlong: str = field(
        default="reject",
        metadata={
            "help": "Rows whose prompt fills the model's context: `reject` (stop before the run, naming the line) "
            "or `drop` (evaluate the others; the dropped lines are listed in metrics.json and on stderr)."
        },
    )
    retention_data: str | None = field(
        default=None,
        metadata={"help": "Data of skills to keep (with `answer`): greedy accuracy there measures forgetting."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Model before tuning: reports KL(base || model) on the base model's own continuations."},
    )
    kl_data: str | None = field(
        default=None, metadata={"help": "Prompts for the KL drift (default: --retention_data, else --data)."}
    )
    kl_continuation: str = field(
        default="greedy",
        metadata={"help": "Base-model continuations scored for KL: greedy or sampled (at --kl_temperature)."},
    )
    kl_temperature: float = field(default=1.0, metadata={"help": "Temperature of sampled KL continuations."})
    kl_max_new_tokens: int = field(default=128, metadata={"help": "Length of the base model's KL continuations."})
    plot: bool = field(default=True, metadata={"help": "Write accuracy.png (bars per task, pass@k curve)."})

    def validate(self) -> None:
        def bad(name: str, why: str):
            raise UserError(f"`{name}` {why}", where="command line", fix=f"pass a valid --{name}.")

        if not self.data:
            raise UserError("no evaluation data given", where="command line", fix="pass --data FILE.")
        if self.samples < 0:
            bad("samples", "must be >= 0")
        if not self.greedy and self.samples == 0:
            bad("samples", "must be > 0 when --greedy false (nothing would be evaluated)")
        if any(k < 1 or k > self.samples for k in self.pass_k):
            bad("pass_k", f"values must be between 1 and --samples ({self.samples})")
        if self.kl_continuation not in KL_CONTINUATIONS:
            bad("kl_continuation", f"must be one of {', '.join(KL_CONTINUATIONS)}")
        check_limit(self.limit)
        if self.overlong not in ("reject", "drop"):
            bad("overlong", "must be reject or drop")
        SamplingConfig(max_new_tokens=self.kl_max_new_tokens, temperature=self.kl_temperature).validate()

    def ks(self) -> list[int]:
        return sorted(set(self.pass_k)) if self.pass_k else default_ks(self.samples)


def _load(path: str, config: EvalConfig, model: ModelArguments, need_answer: bool, flag: str) -> list[Example]:
    examples = load_examples(path, require_response=False, split=config.split, offline=model.offline, flag=flag)
    if config.limit:
        examples = examples[: config.limit]
    if need_answer:
        check_answers(examples, path)
    return examples


def _settings(config: EvalConfig, model: ModelArguments, sampling: SamplingConfig, verify: VerifyConfig) -> dict:
    identity = {
        name: dataset_identity(path, config.split)
        for name in ("data", "retention_data", "kl_data")
        if (path := getattr(config, name))
    }
    return settings_record("eval", config, identity, model, ("out", "plot"), sampling=sampling, verify=verify)


def run(
    config: EvalConfig,
    model_args: ModelArguments | None = None,
    sampling: SamplingConfig | None = None,
    verify: VerifyConfig | None = None,
    run_args: RunArguments | None = None,
) -> dict:
    """The command: every input is checked before the first forward pass; returns metrics.json's contents."""
    out = Path(config.out)
    config, model_args, sampling, verify, run_args = open_run(
        CONFIGS, (config, model_args, sampling, verify, run_args), writes=(out / "metrics.json",)
    )
    verifier = verify.build()
    kl_flag = next(f for f in ("kl_data", "retention_data", "data") if getattr(config, f))
    kl_source = getattr(config, kl_flag)
    inputs = {"--data": config.data, "--retention_data": config.retention_data}
    inputs["--kl_data"] = config.kl_data if config.base_model else None
    check_sources(inputs)
    examples = _load(config.data, config, model_args, True, "--data")
    retention = (
        _load(config.retention_data, config, model_args, True, "--retention_data") if config.retention_data else None
    )
    kl_examples = _load(kl_source, config, model_args, False, f"--{kl_flag}") if config.base_model else None
    tokenizer = load_tokenizer(model_args)
    base_args = (
        dataclasses.replace(model_args, model=config.base_model, model_revision=None) if config.base_model else None
    )
    # Every input is checked now, before any model loads and any output file exists: both models (the base
    # is loaded only when the KL part starts, hours later), every prompt against the context and the template.
    model_config = check_model(model_args)
    context = context_length(model_config) if model_config is not None else None
    kl_context = context
    if base_args is not None:
        base_config = check_model(base_args)
        sizes = [vocabulary_size(c) if c is not None else None for c in (base_config, model_config)]
        if None not in sizes and sizes[0] != sizes[1]:
            raise UserError(
                f"the base model has a vocabulary of {sizes[0]} tokens, the model {sizes[1]}; KL drift compares "
                "the two distributions over one vocabulary",
                where=config.base_model,
                fix="pass the model this one was tuned from (same tokenizer) as --base_model.",
            )
        base_context = context_length(base_config) if base_config is not None else None
        kl_context = min((c for c in (context, base_context) if c), default=None)
    dropped: dict[str, list[int]] = {}
    if config.overlong == "drop":
        examples, dropped["data"] = fitting_prompts(tokenizer, examples, context, config.data)
        if retention is not None:
            retention, dropped["retention_data"] = fitting_prompts(tokenizer, retention, context, config.retention_data)
        _note_dropped(dropped, {"data": examples, "retention_data": retention}, config, context)
        if kl_examples is not None:  # the KL prompts follow the same rule (not reported: they are not scored)
            kl_examples, _ = fitting_prompts(tokenizer, kl_examples, kl_context, kl_source)
    fix = "shorten or remove the row, or pass --overlong drop to evaluate the other rows."
    for rows, where in ((examples, config.data), (retention, config.retention_data)):
        if rows is not None:
            check_prompt_set(tokenizer, rows, context, where, fix)
    if kl_examples is not None:  # (their unknown tokens were counted above when they are the data's prompts)
        check = check_prompt_set if kl_flag == "kl_data" else check_prompts
        check(tokenizer, kl_examples, kl_context, kl_source, fix)
    settings = _settings(config, model_args, sampling, verify)
    defaults = group_defaults(eval=config, model=model_args, sampling=sampling, verify=verify)
    with RunGuard(
        out / "run.json",
        "eval",
        settings,
        OUTPUTS,
        out / "metrics.json",
        overwrite=run_args.overwrite,
        inputs=inputs,
        defaults=defaults,
    ) as finished:
        if finished is not None:
            print(f"onsft: {out} already holds this finished evaluation; nothing to do.", file=sys.stderr)
            return finished
        sets = _Sets(examples, retention, kl_examples, kl_source, {k: v for k, v in dropped.items() if v})
        metrics = _evaluate(
            config, model_args, sampling, verifier, run_args, tokenizer, sets, base_args, settings, defaults
        )
    return metrics


def _note_dropped(dropped: dict[str, list[int]], kept: dict[str, list], config: EvalConfig, context: int | None):
    """One stderr line per input that lost rows to `--overlong drop`; an input left with no row is refused."""
    for flag, lines in dropped.items():
        if lines:
            shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
            print(
                f"onsft eval: {getattr(config, flag)}: {len(lines)} row(s) with a prompt of {context}+ tokens left "
                f"out (line {shown}); the others are evaluated.",
                file=sys.stderr,
            )
        if lines and not kept[flag]:
            raise UserError(
                f"every prompt has {context}+ tokens: nothing is left to evaluate",
                where=getattr(config, flag),
                fix="shorten the prompts, or use a model with a longer context.",
            )


@dataclass
class _Sets:
    """The rows eval reads, loaded and checked before the run starts."""

    examples: list[Example]
    retention: list[Example] | None
    kl_examples: list[Example] | None
    kl_source: str
    dropped: dict[str, list[int]]  # per input flag, the lines of rows `--overlong drop` left out


def _evaluate(
    config, model_args, sampling, verifier, run_args, tokenizer, sets: _Sets, base_args, settings, defaults
) -> dict:
    out = Path(config.out)
    model = load_model(model_args)
    started = time.time()
    stores = [ResumableJsonl(out / "generations.jsonl", fingerprint={"part": "eval", **settings}, defaults=defaults)]
    rows = evaluate_rows(
        model,
        tokenizer,
        sets.examples,
        sampling,
        verifier,
        greedy=config.greedy,
        samples=config.samples,
        store=stores[0],
        where=config.data,
        show_progress=run_args.progress,
    )
    metrics: dict = {
        "model": model_args.model,
        "data": config.data,
        "verifier": verifier.name,
        "ran_on": ran_on(model),
        **aggregate(rows, config.ks()),
    }
    if sets.retention is not None:
        stores.append(
            ResumableJsonl(out / "retention.jsonl", fingerprint={"part": "retention", **settings}, defaults=defaults)
        )
        retention_rows = evaluate_rows(
            model,
            tokenizer,
            sets.retention,
            sampling,
            verifier,
            store=stores[-1],
            desc="retention",
            where=config.retention_data,
            show_progress=run_args.progress,
        )
        metrics["retention"] = {"data": config.retention_data, **aggregate(retention_rows)}
    if sets.kl_examples is not None:
        stores.append(ResumableJsonl(out / "kl.jsonl", fingerprint={"part": "kl", **settings}, defaults=defaults))
        base = load_model(base_args)
        metrics["kl"] = _kl(
            config, sampling, base, model, tokenizer, sets.kl_examples, stores[-1], sets.kl_source, run_args
        )
    if sets.dropped:
        metrics["overlong_dropped"] = sets.dropped
    metrics["wall_seconds_this_run"] = time.time() - started
    metrics["settings"] = settings
    # Every part is complete: publish the final files, then the metrics that summarise them.
    for store in stores:
        store.finalize(order=range(max(len(sets.examples), len(sets.retention or []), len(sets.kl_examples or []))))
    if config.plot:
        plot_accuracy(metrics, out / "accuracy.png")
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _kl(
    config: EvalConfig,
    sampling: SamplingConfig,
    base,
    model,
    tokenizer,
    examples: list[Example],
    store: ResumableJsonl,
    where: str,
    run_args: RunArguments,
) -> dict:
    """KL drift in chunks of `batch_size` prompts, each appended to the resumable store."""
    chunk = sampling.batch_size
    note_resume("eval", len(store.done), len(examples), store.partial)
    with progress(len(examples), "kl drift", run_args.progress, unit="prompt", initial=len(store.done)) as bar:
        for start in range(0, len(examples), chunk):
            todo = [e for e in examples[start : start + chunk] if e.index not in store.done]
            if not todo:
                continue
            prompts = [encode_prompt(tokenizer, e.prompt, where) for e in todo]
            _, per_prompt = kl_drift(
                base,
                model,
                tokenizer,
                prompts,
                continuation=config.kl_continuation,
                max_new_tokens=config.kl_max_new_tokens,
                temperature=config.kl_temperature,
                seed=stream_seed("eval", "kl", sampling.seed, examples[start].index),
                batch_size=sampling.batch_size,
                return_per_prompt=True,
            )
            store.append_many(
                [
                    {**e.record, "_index": e.index, "kl_sum": s, "kl_tokens": n, "kl_mean": s / n if n else 0.0}
                    for e, (s, n) in zip(todo, per_prompt)
                ]
            )
            bar.update(len(todo))
    rows = store.rows(e.index for e in examples)
    tokens = sum(r["kl_tokens"] for r in rows)
    return {
        "base_model": config.base_model,
        "data": where,
        "direction": "KL(base || model)",
        "continuation": config.kl_continuation,
        "prompts": len(rows),
        "tokens": tokens,
        "mean_kl_per_token": sum(r["kl_sum"] for r in rows) / tokens if tokens else 0.0,
    }


# The settings `run` takes, in its order: the command line fills one of each.
CONFIGS = (EvalConfig, ModelArguments, OwnSamplingConfig, VerifyConfig, RunArguments)
