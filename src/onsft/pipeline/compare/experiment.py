"""An experiment: one base model, its data, and the grid of methods x seeds that `onsft compare` runs.

The YAML file is flat: the model's settings (`ModelArguments`: model, device, dtype, ...), the data keys
(paths, Hub names, `organism:NAME`, or gym draws: see `onsft.data.sources`), the grid, and one section per
step whose keys are that step's own flags (`train`, `method_train`, `rewrite`, `pairs`, `eval`, `audit`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onsft.data.sources import is_generated
from onsft.errors import UserError
from onsft.runtime.models import ModelArguments

# method: (data source, --method, --loss)
METHODS = {
    "sft": ("teacher", "sft", "nll"),
    "dft": ("teacher", "sft", "dft"),
    "idft": ("teacher", "sft", "idft"),
    "rewrite+sft": ("rewrite", "sft", "nll"),
    "rewrite+dft": ("rewrite", "sft", "dft"),
    "rewrite+idft": ("rewrite", "sft", "idft"),
    "dpo": ("pairs", "dpo", None),
    "simpo": ("pairs", "simpo", None),
    "eaft": ("teacher", "sft", "eaft"),
    "asft": ("teacher", "sft", "asft"),
    "sft+replay": ("teacher", "sft", "nll"),
}
# Methods whose batches also hold the starting model's own answers to `replay_prompts` (`--replay_data`).
REPLAY_METHODS = ("sft+replay",)
EVAL_SETS = ("in_domain", "ood", "retention")
# Validation draws of the in-domain and retention skills (prompts disjoint from the test sets): a sweep's
# setting is chosen on them and read on the tests (`onsft.formulas.frontier.chosen_on_validation`).
VALIDATION_SETS = {"validation_in_domain": "in_domain", "validation_retention": "retention"}
# Every set an evaluation measures.
EVALUATED_SETS = (*EVAL_SETS, *VALIDATION_SETS)
DATA_KEYS = ("train_data", *EVALUATED_SETS, "kl_prompts", "replay_prompts")
SECTIONS = ("train", "method_train", "rewrite", "pairs", "eval", "audit", "replay")
SWEEP_SECTIONS = ("sweep", "method_sweep", "method_seeds", "matched", "variants")
# Axes a matched level can name (`matched:`): a curve's accuracy on that test set.
MATCHED_AXES = EVAL_SETS


@dataclass
class Experiment:
    train_data: Any = field(default="", metadata={"help": "Teacher data: prompt, completion, answer, reference."})
    in_domain: Any = field(default="", metadata={"help": "Test set of the new skill (prompt, answer)."})
    ood: Any = field(default=None, metadata={"help": "Harder / out-of-distribution test set of the skill."})
    retention: Any = field(default=None, metadata={"help": "Old skills to keep (forgetting)."})
    validation_in_domain: Any = field(
        default=None,
        metadata={
            "help": "Validation draw of the new skill (prompts disjoint from `in_domain`): with "
            "`validation_retention`, a sweep's setting per method is chosen on these and read on the test sets."
        },
    )
    validation_retention: Any = field(
        default=None, metadata={"help": "Validation draw of the old skills (prompts disjoint from `retention`)."}
    )
    kl_prompts: Any = field(default=None, metadata={"help": "Prompts for KL drift (default: retention)."})
    replay_prompts: Any = field(
        default=None,
        metadata={
            "help": "Prompts (other than the training and test sets') that the base model answers for replay "
            "methods (`onsft data replay`, options in `replay:`)."
        },
    )
    methods: list[str] = field(
        default_factory=lambda: ["sft", "dft", "idft", "rewrite+sft", "rewrite+idft", "dpo", "simpo"],
        metadata={"help": f"Methods to run, among {', '.join(METHODS)}."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Training seeds."})
    out: str = field(default="runs/compare", metadata={"help": "Output folder."})
    train: dict = field(default_factory=dict, metadata={"help": "`onsft train` options for every cell."})
    method_train: dict = field(default_factory=dict, metadata={"help": "Per-method `onsft train` overrides."})
    rewrite: dict = field(default_factory=dict, metadata={"help": "`onsft rewrite` options."})
    pairs: dict = field(
        default_factory=dict,
        metadata={
            "help": "`onsft pairs` options, plus `rewrites: false` to build the preference pairs without the verified "
            "rewrites as chosen answers (default: with them, so the rewrite runs for dpo/simpo too)."
        },
    )
    eval: dict = field(default_factory=dict, metadata={"help": "Decoding and verifier options of evaluation."})
    audit: dict | None = field(
        default=None, metadata={"help": "`onsft audit` options: audit the training data first (None = no audit)."}
    )
    replay: dict = field(default_factory=dict, metadata={"help": "`onsft data replay` options (replay methods)."})
    kl_limit: int = field(default=64, metadata={"help": "Prompts used for KL drift."})
    curve_every: int = field(default=0, metadata={"help": "Also evaluate checkpoints every N steps (0 = off)."})
    curve_limit: int = field(
        default=100, metadata={"help": "Rows per test set at curve points (every point of a sweep; 0 = all)."}
    )
    sweep: dict = field(
        default_factory=dict,
        metadata={
            "help": "`onsft train` options to sweep, each a list of values, crossed with each other, the methods and "
            "the seeds, e.g. {learning_rate: [5.0e-5, 2.0e-4, 8.0e-4]}. With `sweep` or `eval_every`, every cell "
            "traces a curve and the frontier report is written (frontier.md, frontier_*.png, curves.csv)."
        },
    )
    method_sweep: dict = field(
        default_factory=dict, metadata={"help": "Per-method sweeps replacing `sweep` for that method (e.g. dpo's lrs)."}
    )
    method_seeds: dict = field(
        default_factory=dict,
        metadata={"help": "Per-method seed lists replacing `seeds` (spend 3 seeds where the comparison is decided)."},
    )
    more_seeds: str = field(
        default="all",
        metadata={
            "help": "Where a method's seeds after its first run: `all` (every swept setting), or `chosen` (only the "
            "settings its first seed's curves choose for the matched readings, on the validation draws when the "
            "experiment has them): 3 seeds where the comparison is read, at a third of the cost of a full grid."
        },
    )
    eval_every: int = field(
        default=0,
        metadata={
            "help": "Sweep curves: save a checkpoint every N steps and evaluate each one fully (in-domain, OOD, "
            "retention on `curve_limit` rows, KL on `kl_limit` prompts); 0 = only the start and the end."
        },
    )
    matched: dict = field(
        default_factory=lambda: {"in_domain": 0.5, "retention": 0.8},
        metadata={
            "help": "Levels of the frontier's matched readings: retention at in-domain accuracy `in_domain`, and "
            "in-domain accuracy at retention `retention` (accuracies in [0, 1])."
        },
    )
    contrasts: list = field(
        default_factory=list,
        metadata={"help": "Pairs [A, B] of methods whose matched readings are compared seed by seed (A - B)."},
    )
    variants: dict = field(
        default_factory=dict,
        metadata={
            "help": "Runs of the whole experiment, one per entry, each with some keys replaced, e.g. {native: "
            "{train_data: organism:new_skill_train.native}}: each in OUT/<name>/, compared in OUT/variants.md."
        },
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Keep the optimiser state of sweep checkpoints (default: dropped once a cell finished training; "
            "the weights stay, so a changed evaluation can be rerun)."
        },
    )
    data_seed: int = field(default=0, metadata={"help": "Seed of built-in data (`organism:NAME` paths)."})
    model: ModelArguments = field(default_factory=ModelArguments, metadata={"help": "The base model's settings."})

    def validate(self, where: str) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method `{unknown[0]}`", where=where, fix=f"use any of {', '.join(METHODS)}.")
        if not self.methods or not self.seeds:
            raise UserError("need at least one method and one seed", where=where, fix="set `methods` and `seeds`.")
        for name in ("train_data", "in_domain"):
            if not getattr(self, name):
                raise UserError(f"`{name}` is required", where=where, fix=f"add `{name}: FILE` to the experiment.")
        if bool(self.validation_in_domain) != bool(self.validation_retention) or (
            self.validation_in_domain and not self.retention
        ):
            raise UserError(
                "validation sets come as a pair: `validation_in_domain` and `validation_retention` (with `retention`)",
                where=where,
                fix="give both validation draws (disjoint from the test sets) or neither.",
            )
        bad = [m for m in self.method_train if m not in METHODS]
        if bad:
            raise UserError(f"method_train names unknown method `{bad[0]}`", where=where, fix="use method names.")
        for method in self.methods:
            if method in REPLAY_METHODS and not self.replay_prompts and "replay_data" not in self.options(method):
                raise UserError(
                    f"method `{method}` needs the base model's answers to other prompts",
                    where=where,
                    fix="add `replay_prompts: FILE` (answered by the base model in the shared-data step), or "
                    f"`method_train: {{{method}: {{replay_data: FILE}}}}`.",
                )
        self._validate_sweep(where)
        self.model.validate()

    def _validate_sweep(self, where: str) -> None:
        def refuse(what: str, fix: str):
            raise UserError(what, where=where, fix=fix)

        for name, sweep in [("sweep", self.sweep), *((f"method_sweep.{m}", s) for m, s in self.method_sweep.items())]:
            if not isinstance(sweep, dict):
                refuse(
                    f"`{name}` must be a mapping of option: [values]", "write e.g. {learning_rate: [1.0e-4, 4.0e-4]}."
                )
            for option, values in sweep.items():
                if not isinstance(values, list) or not values or len(set(map(str, values))) != len(values):
                    refuse(f"`{name}.{option}` must be a non-empty list of distinct values", f"write {option}: [a, b].")
        for table in ("method_sweep", "method_seeds"):
            if bad := [m for m in getattr(self, table) if m not in METHODS]:
                refuse(f"{table} names unknown method `{bad[0]}`", "use method names.")
        for method, seeds in self.method_seeds.items():
            if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
                refuse(f"`method_seeds.{method}` must be a non-empty list of integers", "write e.g. [0, 1, 2].")
        for axis, level in self.matched.items():
            if axis not in MATCHED_AXES or not isinstance(level, (int, float)) or not 0 <= level <= 1:
                refuse(
                    f"`matched.{axis}` must name a test set with a level in [0, 1]", f"use {', '.join(MATCHED_AXES)}."
                )
        for pair in self.contrasts:
            if not (isinstance(pair, list) and len(pair) == 2 and all(m in self.methods for m in pair)):
                refuse(f"contrast {pair} must be two of the experiment's methods", "write e.g. [[idft, sft]].")
        allowed = {f.name for f in dataclasses.fields(self)} - {"variants", "out", "model"}
        for name, keys in self.variants.items():
            if not isinstance(keys, dict) or not keys or set(keys) - allowed:
                refuse(f"variant `{name}` must be a mapping of experiment keys", "e.g. {train_data: FILE}.")
        if self.more_seeds not in ("all", "chosen"):
            refuse(f"unknown more_seeds `{self.more_seeds}`", "use all or chosen.")
        if self.eval_every < 0 or (self.eval_every and self.curve_every):
            refuse("`eval_every` must be >= 0 and not combined with `curve_every`", "use eval_every for sweeps.")

    def variant(self, name: str) -> Experiment:
        """The experiment of one variant: its keys replaced, its output in OUT/<name>."""
        return dataclasses.replace(self, **self.variants[name], variants={}, out=str(Path(self.out) / name))

    def sweeping(self) -> bool:
        """A sweep: every cell traces a curve of fully evaluated checkpoints, and the frontier is reported."""
        return bool(self.sweep or self.method_sweep or self.eval_every)

    def seeds_of(self, method: str) -> list[int]:
        return list(self.method_seeds.get(method, self.seeds))

    def sources(self) -> set[str]:
        """The data sources the methods need: teacher, rewrite, pairs, and replay (the base model's answers to
        `replay_prompts`, for replay methods not given a `replay_data` file)."""
        sources = {METHODS[m][0] for m in self.methods}
        if any(m in REPLAY_METHODS and "replay_data" not in self.options(m) for m in self.methods):
            sources.add("replay")
        return sources

    def options(self, method: str) -> dict:
        """The `onsft train` options of one method's cells: `train:`, then its `method_train:` entry."""
        return {**self.train, **self.method_train.get(method, {})}

    def data(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in DATA_KEYS}


def read_yaml(path: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError("experiment file not found", where=path, fix="check the path given to --config.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(
            f"cannot read the experiment ({error})", where=path, fix="pass a readable UTF-8 YAML file."
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise UserError(
            f"invalid YAML ({getattr(error, 'problem', error)})",
            where=path,
            line=mark.line + 1 if mark else None,
            fix="fix the YAML syntax.",
        ) from None
    if not isinstance(raw, dict):
        raise UserError(
            "an experiment is a mapping of key: value", where=path, fix="see src/onsft/experiments/organism.yaml."
        )
    return raw


def experiment_from_dict(raw: dict, where: str, base: Path | None = None) -> Experiment:
    """An Experiment from a flat mapping (a YAML file's): ModelArguments' keys go to `model`, data paths are
    relative to `base` (the file's folder) when they do not exist as given."""
    raw, given = dict(raw), dict(raw)
    model_keys = {f.name for f in dataclasses.fields(ModelArguments)}
    known = {f.name: f for f in dataclasses.fields(Experiment) if f.name != "model"}
    model_values = {k: raw.pop(k) for k in list(raw) if k in model_keys}
    for key, value in raw.items():
        if key not in known:
            raise UserError(
                f"unknown experiment key `{key}`",
                where=where,
                fix=f"valid keys: {', '.join([*known, *sorted(model_keys)])}.",
            )
        expected = (
            dict if key in SECTIONS + SWEEP_SECTIONS else list if key in ("methods", "seeds", "contrasts") else None
        )
        if expected and value is not None and not isinstance(value, expected):
            raise UserError(
                f"`{key}` must be a {'mapping' if expected is dict else 'list'}",
                where=where,
                fix=f"write `{key}` as a YAML {'mapping' if expected is dict else 'list'}.",
            )
    for key in DATA_KEYS:
        value = raw.get(key)
        # Data paths in an experiment file are relative to the file, like includes in most configs.
        if (
            base is not None
            and isinstance(value, str)
            and value
            and not is_generated(value)
            and not Path(value).is_absolute()
            and not Path(value).exists()
            and (base / value).exists()
        ):
            raw[key] = str(base / value)
    try:
        model = ModelArguments(**model_values)
    except TypeError as error:
        raise UserError(str(error), where=where, fix="check the model keys.") from None
    experiment = Experiment(**raw, model=model)
    experiment.validate(where)
    for name, values in experiment.variants.items():
        # Each variant is checked (types, paths relative to the file) as the whole experiment it becomes.
        whole = experiment_from_dict({**given, "variants": {}, **values}, f"{where}: variant `{name}`", base)
        experiment.variants[name] = {key: getattr(whole, key) for key in values}
    return experiment


def load_experiment(path: str, overrides: dict) -> Experiment:
    """The experiment file with `overrides` (None values ignored) applied on top."""
    raw = read_yaml(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    methods = overrides.get("methods")
    if methods is not None and isinstance(raw.get("contrasts"), list):
        # A run of some of the methods (--methods) keeps the contrasts between them; the others wait for a run
        # with both of their methods (every cell is cached, so that run only adds what is missing).
        kept = [pair for pair in raw["contrasts"] if not isinstance(pair, list) or set(pair) <= set(methods)]
        if len(kept) < len(raw["contrasts"]):
            print(
                f"onsft compare: {len(raw['contrasts']) - len(kept)} contrast(s) of {path} name a method outside "
                "--methods and are left out of this run's report.",
                file=sys.stderr,
            )
        raw["contrasts"] = kept
    if overrides.get("seeds") is not None and raw.get("method_seeds"):
        # `--seeds 0` means seed 0 for every method: a quick pass over the grid before its other seeds.
        print(f"onsft compare: --seeds replaces the `method_seeds` of {path} in this run.", file=sys.stderr)
        raw["method_seeds"] = {}
    return experiment_from_dict(raw, path, Path(path).resolve().parent)
