"""`onsft pairs`: DPO / SimPO preference pairs from the model's own samples.

    onsft pairs --model organism --data train.jsonl --out pairs.jsonl --samples 8 [--rewrites rewrites.jsonl]
    onsft train --method dpo   --model organism --data pairs.jsonl --output_dir runs/dpo
    onsft train --method simpo --model organism --data pairs.jsonl --output_dir runs/simpo

Pairs (the paper's baseline): for each prompt the model samples `--samples` responses, each checked by
the verifier against the row's `answer`. rejected = one of the model's own wrong samples; chosen = a
verified correct response, taken in this order: one of the model's own correct samples (on-policy);
else the rewritten response for that row from `--rewrites` (e.g. `onsft rewrite` output); else the
row's reference response (`completion` / last assistant turn). Rewritten and reference responses are
verified too and used only when they pass. A prompt yields no pair when every sample is correct (no
rejected) or nothing correct is found (no chosen). Up to `--pairs_per_prompt` pairs per prompt, each
with a different wrong sample.

Output rows use TRL's conversational preference format by default:
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}], + provenance}
(`--format standard`: the prompt rendered with the chat template as text, chosen / rejected as text.)
Provenance: `chosen_source` (own_sample | rewrite | reference), `source_index` (row of --data),
`n_samples`, `n_correct`, `rejected_finish_reason`, and the row's `id`, `task` and `answer` when present.
Every sample with its verdict goes to `<out stem>.samples.jsonl` and counts to `<out stem>.summary.json`.
Sampling is resumable like `onsft eval` (rerun the same command after a kill).

Training on them is `onsft train --method dpo|simpo` (`onsft.engine.preference`).

From Python: `run(PairsConfig(data=...), ModelArguments(model=...), OwnSamplingConfig(), VerifyConfig())`.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from onsft.data.rows import DataArguments, check_limit, check_sources, dataset_identity, limit_field, load_examples
from onsft.data.verify import VerifyConfig
from onsft.engine.decoding import OwnSamplingConfig, SamplingConfig
from onsft.errors import UserError
from onsft.pipeline.evaluate.evaluation import check_answers, check_prompt_set, evaluate_rows
from onsft.pipeline.pairs.pairing import FORMATS, chosen_candidates, load_rewrites, make_pairs
from onsft.runtime.device import ran_on
from onsft.runtime.models import ModelArguments, configured_context_length, load_model, load_tokenizer
from onsft.runtime.records import ResumableJsonl, write_json_atomic, write_jsonl_atomic
from onsft.runtime.runs import RunArguments, RunGuard, group_defaults, open_run, settings_record


@dataclass
class PairsConfig(DataArguments):
    """Which prompts, how many own samples, and how pairs are written (the model is ModelArguments', the
    sampling OwnSamplingConfig's, the checking VerifyConfig's)."""

    out: str = field(default="pairs.jsonl", metadata={"help": "Output JSONL of preference pairs."})
    rewrites: str | None = field(
        default=None,
        metadata={
            "help": "Rewritten responses (e.g. `onsft rewrite` output) used as chosen when no own sample is "
            "correct. Rows are matched to --data by `id` when both have one, else by prompt text."
        },
    )
    rewrite_field: str | None = field(
        default=None,
        metadata={"help": "Column of --rewrites holding the response (default: `completion` / last assistant turn)."},
    )
    use_reference: bool = field(
        default=True, metadata={"help": "Fall back to the data's own reference response as chosen when it verifies."}
    )
    samples: int = field(default=8, metadata={"help": "Own samples per prompt."})
    pairs_per_prompt: int = field(default=1, metadata={"help": "Most pairs per prompt (distinct wrong samples)."})
    limit: int = limit_field()
    format: str = field(default="conversational", metadata={"help": "conversational (TRL chat) or standard (text)."})

    def validate(self) -> None:
        if not self.data:
            raise UserError("no data given", where="command line", fix="pass --data FILE.")
        if self.samples < 1:
            raise UserError("`samples` must be at least 1", where="command line", fix="pass --samples 8 or so.")
        if self.pairs_per_prompt < 1:
            raise UserError("`pairs_per_prompt` must be at least 1", where="command line", fix="pass a positive value.")
        check_limit(self.limit)
        if self.format not in FORMATS:
            raise UserError(
                f"unknown --format `{self.format}`", where="command line", fix=f"use {' or '.join(FORMATS)}."
            )


def _paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.stem + ".samples.jsonl"), out.with_name(out.stem + ".summary.json")


def run(
    config: PairsConfig,
    model_args: ModelArguments | None = None,
    sampling: SamplingConfig | None = None,
    verify: VerifyConfig | None = None,
    run_args: RunArguments | None = None,
) -> dict:
    """Sample, verify, pair, write; returns the summary (`<out stem>.summary.json`)."""
    out = Path(config.out)
    config, model_args, sampling, verify, run_args = open_run(
        CONFIGS, (config, model_args, sampling, verify, run_args), writes=(out,)
    )
    samples_path, summary_path = _paths(out)
    verifier = verify.build()
    inputs = {"--data": config.data, "--rewrites": config.rewrites}
    check_sources(inputs)
    examples = load_examples(config.data, require_response=False, split=config.split, offline=model_args.offline)
    if config.limit:
        examples = examples[: config.limit]
    check_answers(examples, config.data)
    rewrites = load_rewrites(config.rewrites, config.rewrite_field) if config.rewrites else {}
    tokenizer = load_tokenizer(model_args)
    # Every prompt is encoded now: a missing chat template or a prompt over the context fails before sampling.
    check_prompt_set(tokenizer, examples, configured_context_length(model_args), config.data)
    identity = dataset_identity(config.data, config.split)
    settings = settings_record("pairs", config, identity, model_args, sampling=sampling, verify=verify)
    defaults = group_defaults(pairs=config, model=model_args, sampling=sampling, verify=verify)
    outputs = [out.name, samples_path.name + "*", summary_path.name]
    with RunGuard(
        out.with_name(out.stem + ".run.json"),
        "pairs",
        settings,
        outputs,
        summary_path,
        overwrite=run_args.overwrite,
        inputs=inputs,
        defaults=defaults,
        untracked=[out.name],  # a file of that name that no recorded run wrote is not ours to replace
    ) as finished:
        if finished is not None and out.exists():
            print(f"onsft: {out} already holds these pairs; nothing to do.", file=sys.stderr)
            return finished
        summary = _pairs(
            config, model_args, sampling, verifier, run_args, tokenizer, examples, rewrites, settings, defaults
        )
    return summary


OUTCOME_WORDS = {
    "all_samples_correct": "every sample right",
    "wrong_samples_empty": "only empty wrong samples",
    "no_correct_response": "no correct response to choose",
}


def _outcome_words(outcomes: Counter) -> str:
    """ "3 with every sample right, 5 with no correct response to choose": why prompts gave no pair."""
    return ", ".join(f"{n} with {OUTCOME_WORDS.get(k, k)}" for k, n in sorted(outcomes.items()) if n)


def _pairs(config, model_args, sampling, verifier, run_args, tokenizer, examples, rewrites, settings, defaults) -> dict:
    out = Path(config.out)
    samples_path, summary_path = _paths(out)
    model = load_model(model_args)
    started = time.time()
    store = ResumableJsonl(samples_path, fingerprint={"part": "pairs", **settings}, defaults=defaults)
    rows = evaluate_rows(
        model,
        tokenizer,
        examples,
        sampling,
        verifier,
        greedy=False,
        samples=config.samples,
        store=store,
        desc="pairs",
        command="pairs",
        where=config.data,
        show_progress=run_args.progress,
    )
    pairs, outcomes = [], Counter()
    for row, example in zip(rows, examples):
        candidates = chosen_candidates(example, rewrites, config.use_reference)
        made, outcome = make_pairs(
            row, example, candidates, verifier, config.pairs_per_prompt, tokenizer, config.format
        )
        pairs += made
        outcomes[outcome] += 1
    summary = {
        "prompts": len(examples),
        "pairs": len(pairs),
        "outcomes": dict(sorted(outcomes.items())),
        "chosen_sources": dict(Counter(p["chosen_source"] for p in pairs)),
        "mean_sample_accuracy": sum(r["n_correct"] for r in rows) / max(1, config.samples * len(rows)),
        "samples_file": str(samples_path),
        "ran_on": ran_on(model),
        "wall_seconds_this_run": time.time() - started,
        "cost_before_this_run": store.seconds_before,  # the runs before a resume (saved with their samples)
        "settings": settings,
    }
    if not pairs:
        # No pairs file, no summary: the run did not happen as far as its outputs go. The samples stay as the
        # store's `.partial` file (the run's record with it), so the same command resumes them in seconds and
        # `--overwrite` with other settings starts over; the message says why each prompt gave no pair.
        raise UserError(
            f"no preference pairs from {len(examples)} prompts ({_outcome_words(outcomes)}); "
            f"the samples are in {store.partial}",
            where=config.data,
            fix="a pair needs a wrong own sample and a correct response: raise --samples or "
            "--temperature, or give reference responses / --rewrites for prompts the model fails "
            "(then rerun with --overwrite).",
        )
    store.finalize(order=range(len(examples)))
    write_json_atomic(summary_path, summary)
    write_jsonl_atomic(out, pairs)
    return summary


# The settings `run` takes, in its order: the command line fills one of each.
CONFIGS = (PairsConfig, ModelArguments, OwnSamplingConfig, VerifyConfig, RunArguments)
