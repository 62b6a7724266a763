"""`onsft data`: write datasets as JSONL files that every other command reads.

    onsft data gym --task gsm_symbolic --size 128 --seed 0 --out gsm.jsonl
    onsft data gym --task chain_sum --size 64 --options max_terms=3 max_digits=2 --out chain.jsonl
    onsft data gym --list_tasks                      # the reasoning-gym task names
    onsft data organism --out data/organism --seed 0
    onsft data replay --model organism --data other_prompts.jsonl --out replay.jsonl --max_new_tokens 128

`gym` exports a reasoning-gym task (needs `pip install 'onsft[tasks]'`; columns and verifiers in
`onsft.data.gym`). `organism` writes the embedded model organism's synthetic demo data
(`onsft.organism.tasks.write_demo_data`: the new skill in five teacher styles, its test and
out-of-distribution sets, and the retention set). `replay` samples the model's own answer to every prompt
of a file (one each, `OwnSamplingConfig`: temperature 1 by default) and writes them as training rows
(prompt, completion, replay_model, finish_reason, ...) for `onsft train --replay_data`; unfinished and empty
answers are dropped (counted in `<out stem>.summary.json`). It resumes like `onsft pairs`.

Each output is guarded like every run's: `gym` and `replay` record their settings in `<out stem>.run.json`
beside the file, `organism` in `run.json` inside its folder. The same command again does nothing; other
settings (another size, seed or task), or an existing file that onsft did not write, are refused unless
`--overwrite`, which replaces them. No output may replace an input.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from onsft.data import gym
from onsft.data.rows import DataArguments, check_limit, dataset_identity, limit_field, load_examples
from onsft.engine.decoding import OwnSamplingConfig, SamplingConfig
from onsft.errors import UserError
from onsft.organism.tasks import write_demo_data
from onsft.pipeline.data.own_answers import dropped_text, replay_rows, sample_answers
from onsft.pipeline.evaluate.evaluation import check_prompts
from onsft.runtime.device import ran_on
from onsft.runtime.models import ModelArguments, configured_context_length, load_model, load_tokenizer
from onsft.runtime.records import ResumableJsonl, check_writable, write_json_atomic, write_jsonl_atomic
from onsft.runtime.runs import RunArguments, RunGuard, config_defaults, group_defaults, open_run, settings_record


@dataclass
class GymDataConfig:
    task: str = field(default="", metadata={"help": "reasoning-gym task name, e.g. gsm_symbolic, chain_sum."})
    size: int = field(default=100, metadata={"help": "Rows to generate."})
    seed: int = field(
        default=0, metadata={"help": "Generation seed; the same (task, size, seed, options) gives the same rows."}
    )
    out: str = field(default="", metadata={"help": "Output .jsonl file."})
    options: list[str] = field(
        default_factory=list,
        metadata={"help": "The task's own config fields as key=value (values read as YAML: 3, 0.5, true, [1, 2])."},
    )
    answer_format: str = field(
        default="boxed",
        metadata={
            "help": "boxed: ask for \\boxed{} answers and box the references' answers; raw: the task's text as is."
        },
    )
    metadata: bool = field(
        default=True,
        metadata={"help": "Keep the task's metadata column (onsft.data.gym.score_row needs it for some tasks)."},
    )
    list_tasks: bool = field(default=False, metadata={"help": "Print the task names and exit."})


@dataclass
class OrganismDataConfig:
    out: str = field(default="", metadata={"help": "Output folder for the JSONL files."})
    seed: int = field(default=0, metadata={"help": "Generation seed."})
    n_train: int = field(
        default=500,
        metadata={
            "help": "New-skill prompts; each is written in all five teacher styles, so the teacher data has 5x "
            "this many rows."
        },
    )
    n_test: int = field(default=200, metadata={"help": "Rows of the new skill's test set."})
    n_ood: int = field(default=200, metadata={"help": "Rows of the new skill's out-of-distribution test set."})
    n_retention: int = field(default=200, metadata={"help": "Rows of the retention (old skills) set."})


@dataclass
class ReplayDataConfig(DataArguments):
    """Which prompts the model answers for a replay set (the model is ModelArguments', the sampling
    OwnSamplingConfig's)."""

    out: str = field(default="", metadata={"help": "Output .jsonl of replay rows (prompt, completion, ...)."})
    limit: int = limit_field()
    keep_unfinished: bool = field(
        default=False,
        metadata={"help": "Keep answers cut by the token limit or a repetition loop (dropped by default)."},
    )

    def validate(self) -> None:
        if not self.data:
            raise UserError("no prompts given", where="command line", fix="pass --data FILE (prompt column).")
        if not self.out:
            raise UserError("no output file given", where="command line", fix="pass --out FILE.jsonl.")
        check_limit(self.limit)


SUBCOMMANDS = {
    "gym": "Export a reasoning-gym task (prompt, answer, task, reference where the task has one).",
    "organism": "Write the model organism's synthetic demo data sets into a folder.",
    "replay": "Sample the model's own answers to a prompt file: a replay set for `onsft train --replay_data`.",
}


def parse_options(pairs: list[str]) -> dict:
    """key=value strings into a dict; values parsed as YAML scalars (so `3` is an int, `true` a bool)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"option `{pair}` is not key=value", where="--options", fix="write e.g. max_terms=3.")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise UserError(
                f"option `{pair}` has an unreadable value",
                where="--options",
                fix="write a number, true/false, a word or a [list].",
            ) from None
    return options


ORGANISM_OUTPUTS = ["new_skill_*.jsonl", "retention_test.jsonl", "retention_validation.jsonl", "replay_prompts.jsonl"]


def _guard(record: Path, command: str, config, outputs: list[str], run_args: RunArguments | None) -> RunGuard:
    """A generated data set's guard: the same settings again do nothing, other settings or a file onsft did not
    write are refused unless --overwrite (the settings are the config's, its output path aside)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "list_tasks")}
    return RunGuard(
        record,
        command,
        settings,
        outputs,
        record,
        overwrite=(run_args or RunArguments()).overwrite,
        untracked=outputs,
        defaults={k: v for k, v in config_defaults(config).items() if k in settings},
    )


def run_gym(config: GymDataConfig, run_args: RunArguments | None = None) -> int:
    if config.list_tasks:
        print("\n".join(gym.task_names()))
        return 0
    if not config.task:
        raise UserError("no task given", where="command line", fix="pass --task NAME (`--list_tasks` prints them).")
    if not config.out:
        raise UserError("no output file given", where="command line", fix="pass --out FILE.jsonl.")
    out = check_writable(config.out)
    options = parse_options(config.options)
    with _guard(out.with_name(out.stem + ".run.json"), "data gym", config, [out.name], run_args) as finished:
        if finished is not None and out.is_file():
            print(f"onsft data: {out} already holds these rows; nothing to do.", file=sys.stderr)
            return 0
        rows = gym.gym_rows(
            config.task,
            config.size,
            config.seed,
            options=options,
            answer_format=config.answer_format,
            metadata=config.metadata,
        )
        write_jsonl_atomic(out, rows)
    with_reference = sum("reference" in r for r in rows)
    print(f"onsft data: {len(rows)} rows of {config.task} ({with_reference} with a reference) -> {out}")
    return 0


def run_organism(config: OrganismDataConfig, run_args: RunArguments | None = None) -> int:
    if not config.out:
        raise UserError("no output folder given", where="command line", fix="pass --out FOLDER.")
    sizes = {
        "n_train": config.n_train,
        "n_test": config.n_test,
        "n_ood": config.n_ood,
        "n_retention": config.n_retention,
    }
    small = [k for k, v in sizes.items() if v < 1]
    if small:
        raise UserError(f"`{small[0]}` must be >= 1", where="command line", fix=f"pass a positive --{small[0]}.")
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise UserError("output path is a file, expected a folder", where=config.out, fix="name a folder.")
    check_writable(Path(config.out) / "new_skill_train.jsonl")
    with _guard(Path(config.out) / "run.json", "data organism", config, ORGANISM_OUTPUTS, run_args) as finished:
        if finished is not None:
            print(f"onsft data: {config.out} already holds these data sets; nothing to do.", file=sys.stderr)
            return 0
        paths = write_demo_data(config.out, seed=config.seed, **sizes)
    print(f"onsft data: {len(paths)} files -> {config.out}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


def run_replay(
    config: ReplayDataConfig,
    model_args: ModelArguments | None = None,
    sampling: SamplingConfig | None = None,
    run_args: RunArguments | None = None,
) -> dict:
    """Sample, keep the finished answers, write; returns the summary (`<out stem>.summary.json`)."""
    config, model_args, sampling, run_args = open_run(
        CONFIGS["replay"], (config, model_args, sampling, run_args), writes=(config.out,)
    )
    out = Path(config.out)
    summary_path = out.with_name(out.stem + ".summary.json")
    examples = load_examples(config.data, require_response=False, split=config.split, offline=model_args.offline)
    examples = examples[: config.limit] if config.limit else examples
    tokenizer = load_tokenizer(model_args)
    check_prompts(tokenizer, examples, configured_context_length(model_args), config.data)
    identity = dataset_identity(config.data, config.split)
    settings = settings_record("replay", config, identity, model_args, sampling=sampling)
    defaults = group_defaults(replay=config, model=model_args, sampling=sampling)
    samples_path = out.with_name(out.stem + ".samples.jsonl")
    with RunGuard(
        out.with_name(out.stem + ".run.json"),
        "data replay",
        settings,
        [out.name, samples_path.name + "*", summary_path.name],
        summary_path,
        overwrite=run_args.overwrite,
        defaults=defaults,
        inputs={"--data": config.data},
        untracked=[out.name],  # a file of that name that no recorded run wrote is not ours to replace
    ) as finished:
        if finished is not None and out.exists():
            print(f"onsft: {out} already holds this replay set; nothing to do.", file=sys.stderr)
            return finished
        started = time.time()
        store = ResumableJsonl(samples_path, fingerprint=settings, defaults=defaults)
        model = load_model(model_args)
        samples = sample_answers(model, tokenizer, examples, sampling, store, config.data, run_args.progress)
        rows, dropped = replay_rows(samples, model_args.model, config.keep_unfinished)
        if not rows:
            raise UserError(
                f"none of the {len(examples)} answers is usable ({dropped_text(dropped)})",
                where=config.data,
                fix="raise --max_new_tokens (answers were cut), or pass --keep_unfinished true.",
            )
        write_jsonl_atomic(out, rows)
        store.finalize(order=[e.index for e in examples])
        summary = {
            "prompts": len(examples),
            "rows": len(rows),
            "dropped": dropped,
            "model": model_args.model,
            "ran_on": ran_on(model),
            "wall_seconds": time.time() - started,
            "cost_before_this_run": store.seconds_before,  # the runs before a resume (saved with their answers)
            "settings": settings,
        }
        write_json_atomic(summary_path, summary)
    return summary


def run(config: GymDataConfig | OrganismDataConfig | ReplayDataConfig, *parts) -> int | dict:
    """Write the data set `config` describes (a reasoning-gym task, the organism's sets, or a replay set, which
    also takes ModelArguments, SamplingConfig and RunArguments)."""
    if isinstance(config, ReplayDataConfig):
        return run_replay(config, *parts)
    return run_gym(config, *parts) if isinstance(config, GymDataConfig) else run_organism(config, *parts)


# The settings each data set's run takes, in its order: the command line fills one of each.
CONFIGS = {
    "gym": (GymDataConfig, RunArguments),
    "organism": (OrganismDataConfig, RunArguments),
    "replay": (ReplayDataConfig, ModelArguments, OwnSamplingConfig, RunArguments),
}
