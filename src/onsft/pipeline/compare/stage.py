"""`onsft compare`: a grid of methods x seeds from one base model and one dataset, then a table and plots.

    onsft compare --config experiments/organism.yaml [--seeds 0 1 2] [--methods sft idft] [--out DIR]

Methods (each a recipe of data + objective, trained by `onsft train`):
    sft, dft, idft           the teacher data with loss nll / dft / idft
    rewrite+sft, rewrite+idft the hinted-decoding rewrite of the teacher data (`onsft rewrite`), nll / idft
    dpo, simpo               preference pairs from the model's own samples (`onsft pairs`), TRL trainers
    eaft, asft               the teacher data with the entropy-adaptive / anchored losses
    sft+replay               the teacher data (nll) with the base model's own answers to `replay_prompts`
                             (`onsft data replay`, options in `replay:`) as a share of every batch
                             (`replay_share` in `train:` / `method_train:`)

Every step runs in this process from config objects built from the experiment's sections (`onsft.runtime.
settings.configs_from_dict`): the optional audit (`audit:`), the rewrite, the pairs and the replay set (built
once, shared by all seeds), then each cell's training and evaluation.

Layout of OUT: experiment.json (the resolved settings of the grid in results.json), data/ (generated sets, rewrite/, pairs.jsonl),
audit/ (with `audit:`), base/eval.json (the untuned model), cells/<method>-s<seed>/{train/, eval.json},
and results.json, table.md, table.csv, skill_vs_retention.png, curves.png, training.png.

Every cell is cached: a cell whose eval.json holds the same settings is not run again, and a killed cell
resumes from its last checkpoint, so rerunning the same command finishes an interrupted grid. A cell whose
training settings changed is refused by `onsft train`'s guard (`--overwrite` starts it over). Settings are
checked (methods, data columns, option names) before anything is trained.

From Python: `run(load_experiment("exp.yaml", {}))` returns results.json's contents.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from onsft.data.rows import dataset_identity, load_examples
from onsft.data.verify import VerifyConfig
from onsft.engine.decoding import OwnSamplingConfig, SamplingConfig
from onsft.engine.hinted import HintedConfig
from onsft.engine.lora import LoraArguments
from onsft.engine.preference import PreferenceTrainConfig
from onsft.engine.scoring import ScoringConfig
from onsft.engine.trainer import TrainConfig
from onsft.errors import UserError
from onsft.formulas.weighting import LossConfig
from onsft.pipeline.audit import stage as audit_stage
from onsft.pipeline.audit.auditing import AuditConfig
from onsft.pipeline.compare.comparison import plot_results, summarize, table_csv, table_markdown
from onsft.pipeline.compare.experiment import EVAL_SETS, METHODS, REPLAY_METHODS, Experiment, load_experiment
from onsft.pipeline.compare.experiment_data import materialize
from onsft.pipeline.compare.experiment_eval import Evaluator
from onsft.pipeline.compare.frontier_readings import settings_for_more_seeds
from onsft.pipeline.compare.frontier_report import write_frontier
from onsft.pipeline.compare.sweep import (
    Cell,
    base_point,
    cell_defaults,
    cell_settings,
    grid,
    measured,
    run_sweep_cell,
    sweep_points,
)
from onsft.pipeline.compare.variants_report import write_variants
from onsft.pipeline.data.stage import ReplayDataConfig, run_replay
from onsft.pipeline.pairs import stage as pairs_stage
from onsft.pipeline.pairs.stage import PairsConfig
from onsft.pipeline.rewrite import stage as rewrite_stage
from onsft.pipeline.rewrite.rewriting import RewriteConfig
from onsft.pipeline.train import stage as train_stage
from onsft.pipeline.train.stage import TrainArguments
from onsft.runtime.models import ModelArguments, resolve_model_path
from onsft.runtime.records import write_json_atomic, write_text_atomic
from onsft.runtime.runs import RunArguments, config_defaults, open_run, same_settings
from onsft.runtime.settings import configs_from_dict

QUIET = RunArguments(progress=False)


# ------------------------------------------------------------------------------------- step configs


def train_configs(
    exp: Experiment,
    method: str,
    seed: int,
    data: str,
    output_dir: Path,
    replay: str | None = None,
    point: dict | None = None,
) -> tuple:
    """(TrainArguments, LoraArguments, trainer config, LossConfig or None) of one cell; `replay` is the shared
    replay set, used by replay methods whose options name no `replay_data` of their own; `point` holds the
    cell's swept options (over `train:` and `method_train:`)."""
    _, train_method, loss = METHODS[method]
    options = {
        "data": data,
        "output_dir": str(output_dir),
        "seed": seed,
        "method": train_method,
        **exp.train,
        **exp.method_train.get(method, {}),
        **(point or {}),
    }
    if loss:
        options["loss"] = loss
    if method in REPLAY_METHODS and replay and "replay_data" not in options:
        options["replay_data"] = replay
    if exp.curve_every or exp.eval_every:
        # Every checkpoint is a curve point, so none may be rotated away.
        options.update(save_steps=exp.curve_every or exp.eval_every, save_total_limit=None)
    where = f"experiment (train options of {method})"
    if train_method == "sft":
        inputs, lora, loss_config, args = configs_from_dict(
            options, TrainArguments, LoraArguments, LossConfig, TrainConfig, where=where
        )
        return inputs, lora, args, loss_config
    inputs, lora, args = configs_from_dict(options, TrainArguments, LoraArguments, PreferenceTrainConfig, where=where)
    return inputs, lora, args, None


def rewrite_configs(exp: Experiment, folder: Path) -> tuple:
    return configs_from_dict(
        {**exp.rewrite, "data": exp.train_data, "out": str(folder)},
        RewriteConfig,
        HintedConfig,
        ScoringConfig,
        VerifyConfig,
        where="experiment (rewrite)",
    )


def pairs_configs(exp: Experiment, target: Path, rewrites: str | None) -> tuple:
    options = {k: v for k, v in exp.pairs.items() if k != "rewrites"}
    options.update(data=exp.train_data, out=str(target), rewrites=rewrites)
    return configs_from_dict(options, PairsConfig, OwnSamplingConfig, VerifyConfig, where="experiment (pairs)")


def replay_configs(exp: Experiment, target: Path) -> tuple:
    return configs_from_dict(
        {**exp.replay, "data": exp.replay_prompts, "out": str(target)},
        ReplayDataConfig,
        OwnSamplingConfig,
        where="experiment (replay)",
    )


def eval_configs(exp: Experiment) -> tuple[SamplingConfig, VerifyConfig]:
    return configs_from_dict(
        {"max_new_tokens": 64, "batch_size": 64, **exp.eval},
        SamplingConfig,
        VerifyConfig,
        where="experiment",
        section="eval",
    )


def audit_configs(exp: Experiment, folder: Path) -> tuple:
    return configs_from_dict(
        {**(exp.audit or {}), "data": exp.train_data, "out": str(folder)},
        AuditConfig,
        ScoringConfig,
        where="experiment (audit)",
    )


def _needs_rewrite(exp: Experiment) -> bool:
    """For the rewrite methods, and for the preference pairs, whose chosen answers are the verified rewrites unless
    `pairs: {rewrites: false}`: a method's data never depends on which other methods run with it."""
    return "rewrite" in exp.sources() or ("pairs" in exp.sources() and bool(exp.pairs.get("rewrites", True)))


def check_options(exp: Experiment, out: Path) -> None:
    """Build every step's configs now, so a typo fails before hours of training, not after."""
    for method, point in ((m, p) for m in exp.methods for p in sweep_points(exp, m)):
        _, lora, _, loss = train_configs(exp, method, exp.seeds[0], "check", out / "check", "check", dict(point))
        try:
            lora.validate()
            if loss is not None:
                loss.validate()
        except UserError as error:  # named as the experiment's option, not the command line's
            raise dataclasses.replace(error, where=f"experiment (train options of {method})") from None
    if "replay" in exp.sources():
        replay_configs(exp, out / "check.jsonl")[0].validate()
    if _needs_rewrite(exp):
        rewrite_configs(exp, out / "check")[0].validate()
    if "pairs" in exp.sources():
        pairs_configs(exp, out / "check.jsonl", None)[0].validate()
    for part in eval_configs(exp):
        part.validate()
    if exp.audit is not None:
        audit_configs(exp, out / "check")[0].validate()


def check_data(exp: Experiment) -> None:
    sources = exp.sources()
    offline = exp.model.offline
    load_examples(
        exp.train_data,
        require_response="teacher" in sources or "pairs" in sources,
        require_answer=bool(sources & {"rewrite", "pairs"}),
        require_reference="rewrite" in sources,
        offline=offline,
    )
    for name in EVAL_SETS:
        if getattr(exp, name):
            load_examples(getattr(exp, name), require_response=False, require_answer=True, offline=offline)
    if "replay" in sources:
        load_examples(exp.replay_prompts, require_response=False, offline=offline)


# ------------------------------------------------------------------------------------- shared data


def prepare_shared_data(exp: Experiment, out: Path, steps: RunArguments = QUIET) -> dict:
    """Build the rewrite and the preference pairs once (seed-independent), return data path per source, the
    seconds each took (from its own summary, so a cached step still reports what it cost), and its measured
    wall and CPU seconds (`costs`, recorded in data/costs.json the first time the step runs)."""
    paths, timings, costs = {"teacher": exp.train_data}, {}, {}
    record = out / "data" / "costs.json"

    def step(name: str, configs: tuple, work):
        settings = json.loads(json.dumps([dataclasses.asdict(c) for c in (*configs, exp.model)], default=str))
        defaults = [[config_defaults(c) for c in (*configs, exp.model)], None]
        summary, costs[name] = measured(record, name, [settings, dataset_identity(exp.train_data)], work, defaults)
        return summary

    if _needs_rewrite(exp):
        configs = rewrite_configs(exp, out / "data" / "rewrite")
        summary = step("rewrite", configs, lambda: rewrite_stage.run(configs[0], exp.model, *configs[1:], steps))
        paths["rewrite"] = summary["files"]["train"]
        timings["rewrite"] = summary.get("wall_seconds", 0.0)
    if "pairs" in exp.sources():
        target = out / "data" / "pairs.jsonl"
        rewrites = paths.get("rewrite") if exp.pairs.get("rewrites", True) else None
        configs = pairs_configs(exp, target, rewrites)
        summary = step("pairs", configs, lambda: pairs_stage.run(configs[0], exp.model, *configs[1:], steps))
        paths["pairs"] = str(target)
        timings["pairs"] = summary.get("wall_seconds_this_run", 0.0)
    if "replay" in exp.sources():
        target = out / "data" / "replay.jsonl"
        configs = replay_configs(exp, target)
        summary = step("replay", configs, lambda: run_replay(configs[0], exp.model, *configs[1:], steps))
        paths["replay"] = str(target)
        timings["replay"] = summary.get("wall_seconds", 0.0)
    return {"paths": paths, "timings": timings, "costs": costs}


def run_audit(exp: Experiment, out: Path, steps: RunArguments = QUIET) -> dict | None:
    if exp.audit is None:
        return None
    config, scoring = audit_configs(exp, out / "audit")
    return audit_stage.run(config, exp.model, scoring, steps)


# ------------------------------------------------------------------------------------- evaluation


def run_grid_cell(
    exp: Experiment,
    method: str,
    seed: int,
    data: str,
    folder: Path,
    evaluator: Evaluator,
    replay: str | None = None,
    steps: RunArguments = QUIET,
) -> dict:
    inputs, lora, args, loss = train_configs(exp, method, seed, data, folder / "train", replay)
    settings = cell_settings(exp, method, seed, data, inputs, evaluator)
    done = folder / "eval.json"
    if done.exists():
        cached = json.loads(done.read_text())
        if same_settings(cached.get("settings"), settings, cell_defaults(inputs, evaluator)):
            return cached
    started = time.time()
    summary = train_stage.run(inputs, exp.model, lora, args, loss, steps)
    train_seconds = summary.get("train_seconds", time.time() - started)  # resumes included
    model = evaluator.load(folder / "train" / "model")
    result = {
        "method": method,
        "seed": seed,
        **evaluator.full(model),
        "train_seconds": train_seconds,
        "tokens": summary.get("tokens_seen") or 0,
        "steps": summary.get("global_step"),
    }
    result["curve"] = _curve(folder / "train", evaluator) if exp.curve_every else []
    result["training_log"] = [
        json.loads(line) for line in (folder / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    result["settings"] = settings
    write_json_atomic(done, result)
    return result


def _curve(train_dir: Path, evaluator: Evaluator) -> list[dict]:
    points = [{"step": 0, **evaluator.accuracy(evaluator.base, evaluator.exp.curve_limit)}]
    checkpoints = sorted(train_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for checkpoint in checkpoints:
        points.append(
            {
                "step": int(checkpoint.name.split("-")[1]),
                **evaluator.accuracy(evaluator.load(checkpoint), evaluator.exp.curve_limit),
            }
        )
    return points


def run_sweep(exp: Experiment, out: Path, shared: dict, evaluator: Evaluator, steps: RunArguments) -> tuple:
    """Every cell of the sweep (`onsft.pipeline.compare.sweep`): (the base model's point, the cells' results).
    Under `more_seeds: chosen` each method's first seed runs every setting first, then its other seeds only
    the settings chosen from those curves (`settings_for_more_seeds`)."""
    base = base_point(exp, out, evaluator)

    def run_cell(cell: Cell) -> dict:
        source, folder = METHODS[cell.method][0], out / "cells" / cell.name
        data, replay = shared["paths"][source], shared["paths"].get("replay")
        configs = train_configs(exp, cell.method, cell.seed, data, folder / "train", replay, cell.options)
        settings = cell_settings(exp, cell.method, cell.seed, data, configs[0], evaluator, cell.options)
        print(f"onsft compare: {cell.method} {cell.label} seed {cell.seed}", file=sys.stderr, flush=True)
        defaults = cell_defaults(configs[0], evaluator)
        return run_sweep_cell(exp, cell, folder, evaluator, base, settings, configs, steps, defaults)

    cells = grid(exp)
    if exp.more_seeds == "all":
        return base, [run_cell(cell) for cell in cells]
    first = {cell: run_cell(cell) for cell in cells if cell.seed == exp.seeds_of(cell.method)[0]}
    chosen = settings_for_more_seeds(exp, list(first.values()))
    for method, labels in chosen.items():
        if len(exp.seeds_of(method)) > 1:
            print(f"onsft compare: later seeds of {method} at {', '.join(sorted(labels))}", file=sys.stderr)
    later = {cell: run_cell(cell) for cell in cells if cell not in first and cell.label in chosen[cell.method]}
    return base, [{**first, **later}[cell] for cell in cells if cell in first or cell in later]


def _base_eval(out: Path, evaluator: Evaluator) -> dict:
    base_path = out / "base" / "eval.json"
    base = json.loads(base_path.read_text()) if base_path.exists() else None
    if base is None or not same_settings(base.get("settings"), evaluator.settings(), evaluator.defaults()):
        base = {**evaluator.full(evaluator.base), "settings": evaluator.settings()}
        write_json_atomic(base_path, base)
    return base


def run_grid(exp: Experiment, out: Path, shared: dict, evaluator: Evaluator, steps: RunArguments) -> list[dict]:
    """Methods x seeds without a sweep: each cell's final model evaluated fully (and its `curve_every` points)."""
    cells = []
    # Method-major: an interrupted grid has every seed of its first methods (a mean and a spread), rather
    # than one seed of everything.
    for method in exp.methods:
        for seed in exp.seeds_of(method):
            print(f"onsft compare: {method} seed {seed}", file=sys.stderr, flush=True)
            folder, replay = out / "cells" / f"{method}-s{seed}", shared["paths"].get("replay")
            data = shared["paths"][METHODS[method][0]]
            cells.append(run_grid_cell(exp, method, seed, data, folder, evaluator, replay, steps))
    return cells


# ------------------------------------------------------------------------------------- the command


def run(exp: Experiment, run_args: RunArguments | None = None) -> dict:
    """Audit (optional), shared data, base evaluation, every cell, then the table and plots. `run_args` go to
    every step: `overwrite` lets a step start over where an earlier grid left outputs made with other
    settings (each step refuses them otherwise, naming its folder), `progress` shows the steps' bars."""
    # The experiment validated itself when it was read (`load_experiment`); a variant grid writes in its variants.
    (steps,) = open_run(
        (RunArguments,), (run_args or QUIET,), writes=() if exp.variants else (Path(exp.out) / "results.json",)
    )
    if exp.variants:  # each variant is a whole experiment of its own, in OUT/<name>
        return write_variants(exp, {name: run(exp.variant(name), run_args) for name in exp.variants})
    out = Path(exp.out)
    resolve_model_path(exp.model.model, revision=exp.model.model_revision, offline=exp.model.offline)
    for key, value in materialize(exp.data(), out / "data", exp.data_seed).items():
        setattr(exp, key, value)
    check_data(exp)
    check_options(exp, out)
    out.mkdir(parents=True, exist_ok=True)
    audit_summary = run_audit(exp, out, steps)
    shared = prepare_shared_data(exp, out, steps)
    evaluator = Evaluator(exp, *eval_configs(exp))
    frontier = None
    if exp.sweeping():
        base, cells = run_sweep(exp, out, shared, evaluator, steps)
    else:
        base, cells = _base_eval(out, evaluator), run_grid(exp, out, shared, evaluator, steps)
    for cell in cells:
        source = METHODS[cell["method"]][0]
        cell["prep_seconds"] = shared["timings"].get(source, 0.0)
        if cell["method"] in REPLAY_METHODS:
            cell["prep_seconds"] += shared["timings"].get("replay", 0.0)
    labels = [f"{c['method']} {c['setting']}" if exp.sweeping() else c["method"] for c in cells]
    rows = summarize(base, [{**c, "method": label} for c, label in zip(cells, labels)], list(dict.fromkeys(labels)))
    markdown = table_markdown(rows)
    write_text_atomic(out / "table.md", markdown)
    write_text_atomic(out / "table.csv", table_csv(rows))
    plots = plot_results(rows, [{**c, "method": label} for c, label in zip(cells, labels)], out)
    if exp.sweeping():
        frontier = write_frontier(exp, base, cells, shared["costs"], out)
        plots += frontier["plots"]
    results = {
        "rows": rows,
        "cells": [{k: v for k, v in c.items() if k != "training_log"} for c in cells],
        "plots": plots,
        "data": shared["paths"],
        "data_prep_seconds": shared["timings"],
        "data_prep_costs": shared["costs"],
        "audit": audit_summary,
        "frontier": frontier and frontier["summary"],
    }
    # Written with the results they produced: a grid refused half-way (a step's outputs hold other settings)
    # leaves the earlier grid's record as it was.
    write_json_atomic(out / "experiment.json", dataclasses.asdict(exp))
    write_json_atomic(out / "results.json", results)
    print(markdown)
    reports = ["results.json", "table.md", "table.csv", *(["frontier.md", "curves.csv"] if frontier else []), *plots]
    print("Written:\n" + "\n".join(f"  {out / name}" for name in reports))
    return results


@dataclass
class CompareArgs:
    config: str = field(default="", metadata={"help": "Experiment YAML (see experiments/organism.yaml)."})
    out: str | None = field(default=None, metadata={"help": "Override the experiment's output folder."})
    seeds: list[int] = field(
        default_factory=list,
        metadata={"help": "Override the experiment's seeds (its `method_seeds` too: every method runs these)."},
    )
    methods: list[str] = field(default_factory=list, metadata={"help": "Override the experiment's methods."})


# The settings the command line fills: the experiment's file and overrides, its model, the run's options.
CONFIGS = (CompareArgs, ModelArguments, RunArguments)


def experiment_of(args: CompareArgs, model_args: ModelArguments, given: list[str]) -> Experiment:
    """The experiment of `--config` with the command line's overrides (`given`: the ModelArguments options
    given on the command line, which replace the experiment's `model:` values)."""
    if not args.config:
        raise UserError("no experiment given", where="command line", fix="pass --config experiment.yaml.")
    if unknown := [m for m in args.methods if m not in METHODS]:  # the flag's, not the experiment file's
        raise UserError(f"unknown method `{unknown[0]}`", where="--methods", fix=f"use any of {', '.join(METHODS)}.")
    overrides = {"out": args.out, "seeds": args.seeds or None, "methods": args.methods or None}
    overrides.update({name: getattr(model_args, name) for name in given})
    return load_experiment(args.config, overrides)
