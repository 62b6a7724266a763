"""`onsft data`: write datasets as JSONL files that every other command reads.

    onsft data gym --task gsm_symbolic --size 128 --seed 0 --out gsm.jsonl
    onsft data gym --task chain_sum --size 64 --options max_terms=3 max_digits=2 --out chain.jsonl
    onsft data gym --list_tasks                      # the reasoning-gym task names
    onsft data organism --out data/organism --seed 0

`gym` exports a reasoning-gym task (needs `pip install 'onsft[tasks]'`; columns and verifiers in
`onsft.data.gym`). `organism` writes the embedded model organism's synthetic demo data
(`onsft.organism.tasks.write_demo_data`: the new skill in five teacher styles, its test and
out-of-distribution sets, and the retention set).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from onsft.data import gym
from onsft.errors import UserError
from onsft.organism.tasks import write_demo_data
from onsft.runtime.records import check_writable, write_jsonl_atomic
from onsft.runtime.settings import parse_command


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
    n_train: int = field(default=500, metadata={"help": "Training rows (all teacher styles together)."})
    n_test: int = field(default=200, metadata={"help": "Rows of the new skill's test set."})
    n_ood: int = field(default=200, metadata={"help": "Rows of the new skill's out-of-distribution test set."})
    n_retention: int = field(default=200, metadata={"help": "Rows of the retention (old skills) set."})


SUBCOMMANDS = {
    "gym": "Export a reasoning-gym task (prompt, answer, task, reference where the task has one).",
    "organism": "Write the model organism's synthetic demo data sets into a folder.",
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


def run_gym(config: GymDataConfig) -> int:
    if config.list_tasks:
        print("\n".join(gym.task_names()))
        return 0
    if not config.task:
        raise UserError("no task given", where="command line", fix="pass --task NAME (`--list_tasks` prints them).")
    if not config.out:
        raise UserError("no output file given", where="command line", fix="pass --out FILE.jsonl.")
    out = check_writable(config.out)
    rows = gym.gym_rows(
        config.task,
        config.size,
        config.seed,
        options=parse_options(config.options),
        answer_format=config.answer_format,
        metadata=config.metadata,
    )
    write_jsonl_atomic(out, rows)
    with_reference = sum("reference" in r for r in rows)
    print(f"onsft data: {len(rows)} rows of {config.task} ({with_reference} with a reference) -> {out}")
    return 0


def run_organism(config: OrganismDataConfig) -> int:
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
    paths = write_demo_data(config.out, seed=config.seed, **sizes)
    print(f"onsft data: {len(paths)} files -> {config.out}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


def run(config: GymDataConfig | OrganismDataConfig) -> int:
    """Write the data set `config` describes (a reasoning-gym task, or the organism's sets)."""
    return run_gym(config) if isinstance(config, GymDataConfig) else run_organism(config)


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: onsft data <gym|organism> [options]   (onsft data <name> --help for its options)", ""]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "gym":
        (config,) = parse_command(rest, GymDataConfig, prog="onsft data gym")
        return run(config)
    if name == "organism":
        (config,) = parse_command(rest, OrganismDataConfig, prog="onsft data organism")
        return run(config)
    raise UserError(f"unknown data set `{name}`", where="onsft data", fix=f"use one of: {', '.join(SUBCOMMANDS)}.")


if __name__ == "__main__":
    sys.exit(main())
