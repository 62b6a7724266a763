"""`onsft compare`: a grid of methods x seeds from one base model and one dataset, then a table and plots.

    onsft compare --config experiments/organism.yaml [--seeds 0 1 2] [--methods sft idft] [--out DIR]

Methods (each a recipe of data + objective, trained by `onsft train`):
    sft, dft, idft           the teacher data with loss nll / dft / idft
    rewrite+sft, rewrite+idft the hinted-decoding rewrite of the teacher data (`onsft rewrite`), nll / idft
    dpo, simpo               preference pairs from the model's own samples (`onsft pairs`), TRL trainers

Layout of OUT: experiment.json (the resolved settings), data/rewrite/ and data/pairs.jsonl (built once,
shared by all seeds), base/eval.json (the untuned model), cells/<method>-s<seed>/{train/, eval.json},
and results.json, table.md, table.csv, skill_vs_retention.png, curves.png, training.png.

Every cell is cached: a cell whose eval.json holds the same settings is not run again, and a killed
cell resumes from its last checkpoint, so rerunning the same command finishes an interrupted grid.
Settings are checked (methods, data columns, option names) before anything is trained.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from onsft.errors import UserError
from onsft.records import write_json_atomic

METHODS = {
    # method: (data source, --method, --loss)
    "sft": ("teacher", "sft", "nll"),
    "dft": ("teacher", "sft", "dft"),
    "idft": ("teacher", "sft", "idft"),
    "rewrite+sft": ("rewrite", "sft", "nll"),
    "rewrite+dft": ("rewrite", "sft", "dft"),
    "rewrite+idft": ("rewrite", "sft", "idft"),
    "dpo": ("pairs", "dpo", None),
    "simpo": ("pairs", "simpo", None),
}
EVAL_SETS = ("in_domain", "ood", "retention")


@dataclass
class Experiment:
    model: str = field(default="organism", metadata={"help": "Base model every cell starts from."})
    train_data: str = field(default="", metadata={"help": "Teacher data: prompt, completion, answer, reference."})
    in_domain: str = field(default="", metadata={"help": "Test set of the new skill (prompt, answer)."})
    ood: str | None = field(default=None, metadata={"help": "Harder / out-of-distribution test set of the skill."})
    retention: str | None = field(default=None, metadata={"help": "Old skills to keep (forgetting)."})
    kl_prompts: str | None = field(default=None, metadata={"help": "Prompts for KL drift (default: retention)."})
    methods: list[str] = field(
        default_factory=lambda: list(METHODS)[:3] + ["rewrite+sft", "rewrite+idft", "dpo", "simpo"],
        metadata={"help": f"Methods to run, among {', '.join(METHODS)}."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Training seeds."})
    out: str = field(default="runs/compare", metadata={"help": "Output folder."})
    train: dict = field(default_factory=dict, metadata={"help": "`onsft train` options for every cell."})
    method_train: dict = field(default_factory=dict, metadata={"help": "Per-method `onsft train` overrides."})
    rewrite: dict = field(default_factory=dict, metadata={"help": "`onsft rewrite` options."})
    pairs: dict = field(default_factory=dict, metadata={"help": "`onsft pairs` options."})
    eval: dict = field(default_factory=dict, metadata={"help": "Evaluation options (EvalConfig fields)."})
    kl_limit: int = field(default=64, metadata={"help": "Prompts used for KL drift."})
    curve_every: int = field(default=0, metadata={"help": "Also evaluate checkpoints every N steps (0 = off)."})
    curve_limit: int = field(default=100, metadata={"help": "Rows per test set at curve points."})
    data_seed: int = field(default=0, metadata={"help": "Seed of built-in data (`organism:NAME` paths)."})

    def validate(self, where: str) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method `{unknown[0]}`", where=where, fix=f"use any of {', '.join(METHODS)}.")
        if not self.methods or not self.seeds:
            raise UserError("need at least one method and one seed", where=where, fix="set `methods` and `seeds`.")
        for name in ("train_data", "in_domain"):
            if not getattr(self, name):
                raise UserError(f"`{name}` is required", where=where, fix=f"add `{name}: FILE` to the experiment.")
        bad = [m for m in self.method_train if m not in METHODS]
        if bad:
            raise UserError(f"method_train names unknown method `{bad[0]}`", where=where, fix="use method names.")


DATA_KEYS = ("train_data", "in_domain", "ood", "retention", "kl_prompts")


def resolve_builtin_data(exp: Experiment, out: Path) -> None:
    """`organism:NAME` data paths name the organism's synthetic sets, written (seeded) under OUT/data."""
    specs = {key: getattr(exp, key) for key in DATA_KEYS if str(getattr(exp, key) or "").startswith("organism:")}
    if not specs:
        return
    from onsft.organism.tasks import write_demo_data

    folder = out / "data" / f"organism-seed{exp.data_seed}"
    paths = {name: str(path) for name, path in write_demo_data(folder, seed=exp.data_seed).items()}
    for key, spec in specs.items():
        name = spec.split(":", 1)[1]
        if name not in paths:
            raise UserError(
                f"unknown built-in data `{spec}`",
                where="experiment",
                fix=f"use organism:NAME with NAME among {', '.join(sorted(paths))}.",
            )
        setattr(exp, key, paths[name])


def load_experiment(path: str, overrides: dict) -> Experiment:
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
        raise UserError("an experiment is a mapping of key: value", where=path, fix="see experiments/organism.yaml.")
    known = {f.name: f for f in fields(Experiment)}
    for key, value in raw.items():
        if key not in known:
            raise UserError(f"unknown experiment key `{key}`", where=path, fix=f"valid keys: {', '.join(known)}.")
        expected = dict if known[key].type == "dict" else list if known[key].type.startswith("list") else None
        if expected and not isinstance(value, expected):
            raise UserError(
                f"`{key}` must be a {expected.__name__}",
                where=path,
                fix=f"write `{key}` as a YAML {'mapping' if expected is dict else 'list'}.",
            )
    raw.update({k: v for k, v in overrides.items() if v is not None})
    base = Path(path).resolve().parent
    for key in DATA_KEYS:
        if str(raw.get(key) or "").startswith("organism:"):
            continue
        # Data paths in an experiment file are relative to the file, like includes in most configs.
        if raw.get(key) and not Path(raw[key]).is_absolute() and not Path(raw[key]).exists():
            raw[key] = str(base / raw[key])
    experiment = Experiment(**raw)
    experiment.validate(path)
    return experiment


# -------------------------------------------------------------------------------------------- the cells


def _flags(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            argv += [str(v) for v in value]
        else:
            argv.append(str(value).lower() if isinstance(value, bool) else str(value))
    return argv


def train_argv(exp: Experiment, method: str, seed: int, data: str, output_dir: Path) -> list[str]:
    _, train_method, loss = METHODS[method]
    options = {
        "model": exp.model,
        "data": data,
        "output_dir": str(output_dir),
        "seed": seed,
        "method": train_method,
        "disable_tqdm": True,
    }
    if loss:
        options["loss"] = loss
    options.update(exp.train)
    options.update(exp.method_train.get(method, {}))
    if exp.curve_every:
        # Every checkpoint is a curve point, so none may be rotated away (a None would be dropped as a flag).
        options.update(save_steps=exp.curve_every, save_total_limit=10**6)
    return _flags(options)


def _check_options(exp: Experiment, out: Path) -> None:
    """Parse every cell's options now, so a typo fails before hours of training, not after."""
    from onsft.config import parse_command
    from onsft.losses import LossConfig
    from onsft.train import TrainInputs
    from onsft.trainer import TrainConfig

    for method in exp.methods:
        argv = train_argv(exp, method, exp.seeds[0], exp.train_data, out / "check")
        if METHODS[method][1] == "sft":
            *_, args = parse_command(argv, TrainInputs, LossConfig, TrainConfig, prog="onsft compare (train)")
            LossConfig(loss=METHODS[method][2]).validate()
        else:
            from onsft.preference import PreferenceTrainConfig

            parse_command([a for a in argv], TrainInputs, PreferenceTrainConfig, prog="onsft compare (train)")
    # The rewrite, the pairs and the evaluation run after hours of work: their options are checked now too.
    from onsft.evaluate import EvalConfig
    from onsft.preference import PairsConfig
    from onsft.rewrite import RewriteConfig

    sources = {METHODS[m][0] for m in exp.methods}
    common = {"model": exp.model, "data": exp.train_data}
    if "rewrite" in sources or ("pairs" in sources and exp.pairs.get("rewrites") is True):
        parse_command(
            _flags({**common, "out": str(out / "check"), **exp.rewrite}), RewriteConfig, prog="onsft compare (rewrite)"
        )[0].validate()
    if "pairs" in sources:
        options = {k: v for k, v in exp.pairs.items() if k != "rewrites"}
        parse_command(
            _flags({**common, "out": str(out / "check.jsonl"), **options}), PairsConfig, prog="onsft compare (pairs)"
        )[0].validate()
    known = {f.name for f in fields(EvalConfig)}
    unknown = [k for k in exp.eval if k not in known]
    if unknown:
        raise UserError(
            f"unknown eval option `{unknown[0]}`",
            where="experiment",
            fix=f"use EvalConfig fields: {', '.join(sorted(known))}.",
        )


def _check_data(exp: Experiment) -> None:
    from onsft.data import load_examples

    sources = {METHODS[m][0] for m in exp.methods}
    load_examples(
        exp.train_data,
        require_response="teacher" in sources or "pairs" in sources,
        require_answer=bool(sources & {"rewrite", "pairs"}),
        require_reference="rewrite" in sources,
    )
    for name in EVAL_SETS:
        path = getattr(exp, name)
        if path:
            load_examples(path, require_response=False, require_answer=True)


def prepare_shared_data(exp: Experiment, out: Path) -> dict[str, str]:
    """Build the rewrite and the preference pairs once (seed-independent), return data path per source."""
    paths = {"teacher": exp.train_data}
    sources = {METHODS[m][0] for m in exp.methods}
    timings = {}
    if "rewrite" in sources or ("pairs" in sources and exp.pairs.get("rewrites") is True):
        from onsft import rewrite

        started = time.time()
        folder = out / "data" / "rewrite"
        if not (folder / "train.jsonl").exists():
            rewrite.main(_flags({"model": exp.model, "data": exp.train_data, "out": str(folder), **exp.rewrite}))
        paths["rewrite"] = str(folder / "train.jsonl")
        timings["rewrite"] = time.time() - started
    if "pairs" in sources:
        from onsft import preference

        started = time.time()
        target = out / "data" / "pairs.jsonl"
        options = {k: v for k, v in exp.pairs.items() if k != "rewrites"}
        if "rewrite" in paths and exp.pairs.get("rewrites", True):
            options["rewrites"] = paths["rewrite"]
        if not target.exists():
            preference.main(_flags({"model": exp.model, "data": exp.train_data, "out": str(target), **options}))
        paths["pairs"] = str(target)
        timings["pairs"] = time.time() - started
    paths["timings"] = timings
    return paths


class Evaluator:
    """Loads each test set once and evaluates models on them, in process."""

    def __init__(self, exp: Experiment):
        from onsft.data import encode_prompt, load_examples
        from onsft.evaluate import EvalConfig
        from onsft.models import load_model, load_tokenizer

        self.exp = exp
        self.config = EvalConfig(**{"max_new_tokens": 64, "batch_size": 64, **exp.eval})
        self.sets = {
            name: load_examples(getattr(exp, name), require_response=False, require_answer=True)
            for name in EVAL_SETS
            if getattr(exp, name)
        }
        self.tokenizer = load_tokenizer(exp.model)
        self.base = load_model(exp.model).eval()
        kl_source = exp.kl_prompts or exp.retention or exp.in_domain
        kl_examples = load_examples(kl_source, require_response=False)[: exp.kl_limit]
        self.kl_prompts = [encode_prompt(self.tokenizer, e.prompt, kl_source) for e in kl_examples]

    def accuracy(self, model, limit: int = 0) -> dict[str, float]:
        from onsft.evaluate import evaluate_model

        result = {}
        for name, examples in self.sets.items():
            rows = examples[:limit] if limit else examples
            metrics = evaluate_model(model, self.tokenizer, rows, self.config)
            result[name] = metrics["accuracy"]
        return result

    def full(self, model) -> dict:
        from onsft.evaluate import kl_drift

        result = self.accuracy(model)
        result["kl_drift"] = kl_drift(
            self.base,
            model,
            self.tokenizer,
            self.kl_prompts,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
        )
        return result


def _cell_settings(exp: Experiment, method: str, seed: int, data: str) -> dict:
    return {
        "argv": train_argv(exp, method, seed, data, Path("OUT")),
        "eval": exp.eval,
        "curve": [exp.curve_every, exp.curve_limit],
        "kl_limit": exp.kl_limit,
        "sets": [getattr(exp, n) for n in EVAL_SETS],
    }


def run_cell(exp: Experiment, method: str, seed: int, data: str, folder: Path, evaluator: Evaluator) -> dict:
    from onsft.models import load_model
    from onsft.train import main as train_main

    settings = _cell_settings(exp, method, seed, data)
    done = folder / "eval.json"
    if done.exists():
        cached = json.loads(done.read_text())
        if cached.get("settings") == settings:
            return cached
    started = time.time()
    train_main(train_argv(exp, method, seed, data, folder / "train"))
    train_seconds = time.time() - started
    summary = json.loads((folder / "train" / "train_summary.json").read_text())
    model = load_model(str(folder / "train" / "model")).eval()
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
    from onsft.models import load_model

    points = [{"step": 0, **evaluator.accuracy(evaluator.base, evaluator.exp.curve_limit)}]
    checkpoints = sorted(train_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for checkpoint in checkpoints:
        model = load_model(str(checkpoint)).eval()
        points.append(
            {"step": int(checkpoint.name.split("-")[1]), **evaluator.accuracy(model, evaluator.exp.curve_limit)}
        )
    return points


# ------------------------------------------------------------------------------------- table and plots


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


COLUMNS = (
    ("in_domain", "in-domain acc", True),
    ("ood", "OOD acc", True),
    ("retention", "retention acc", True),
    ("kl_drift", "KL drift", False),
    ("train_seconds", "train s", False),
    ("prep_seconds", "data prep s", False),
    ("tokens", "tokens", False),
)


def summarize(base: dict, cells: list[dict], methods: list[str]) -> list[dict]:
    rows = [{"method": "base (no tuning)", "seeds": 1, **{k: (base.get(k), 0.0) for k, *_ in COLUMNS}}]
    for method in methods:
        mine = [c for c in cells if c["method"] == method]
        if mine:
            rows.append(
                {"method": method, "seeds": len(mine), **{k: _mean_std([c.get(k) for c in mine]) for k, *_ in COLUMNS}}
            )
    return rows


def _fmt(key: str, pair) -> str:
    mean, std = pair
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if key in ("in_domain", "ood", "retention"):
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    if key == "kl_drift":
        return f"{mean:.3f} ± {std:.3f}"
    if key == "tokens":
        return f"{mean / 1000:.0f}k"
    return f"{mean:.0f}"


def table_markdown(rows: list[dict]) -> str:
    present = [
        c
        for c in COLUMNS
        if any(
            r[c[0]][0] not in (None,) and not (isinstance(r[c[0]][0], float) and math.isnan(r[c[0]][0])) for r in rows
        )
    ]
    lines = [
        "| method | seeds | " + " | ".join(label for _, label, _ in present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seeds']} | " + " | ".join(_fmt(k, r[k]) for k, *_ in present) + " |")
    return (
        "\n".join(lines) + "\n\nAccuracies in % (mean ± std over seeds); KL drift in nats/token from the base "
        "model on its own continuations of held-out prompts.\n"
    )


def table_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "seeds"] + [f"{k}_{s}" for k, *_ in COLUMNS for s in ("mean", "std")])
    for r in rows:
        writer.writerow([r["method"], r["seeds"]] + [v for k, *_ in COLUMNS for v in r[k]])
    return buffer.getvalue()


def plot_results(rows: list[dict], cells: list[dict], out: Path) -> list[str]:
    from onsft.report import figure_png, new_figure, save_png

    written = []
    fig, ax = new_figure(width=6.5, height=4.8)
    for r in rows:
        (x, xs), (y, ys) = r["retention"], r["in_domain"]
        if x is None or y is None or math.isnan(x) or math.isnan(y):
            continue
        ax.errorbar(100 * x, 100 * y, xerr=100 * xs, yerr=100 * ys, fmt="o" if r["seeds"] else "s", capsize=3)
        ax.annotate(r["method"], (100 * x, 100 * y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("skill kept: retention accuracy (%)")
    ax.set_ylabel("skill gained: in-domain accuracy (%)")
    ax.set_title("Learning vs forgetting (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    save_png(figure_png(fig), out / "skill_vs_retention.png")
    written.append("skill_vs_retention.png")
    curves = [c for c in cells if c.get("curve")]
    if curves:
        fig, axes = new_figure(ncols=2, width=11, height=4)
        for name, ax in zip(("in_domain", "retention"), axes):
            for method in dict.fromkeys(c["method"] for c in curves):
                mine = [c["curve"] for c in curves if c["method"] == method]
                steps = [p["step"] for p in mine[0]]
                values = [statistics.fmean(run[i][name] for run in mine if i < len(run)) for i in range(len(steps))]
                ax.plot(steps, [100 * v for v in values], marker="o", ms=3, label=method)
            ax.set_xlabel("training step")
            ax.set_ylabel(f"{name.replace('_', '-')} accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        save_png(figure_png(fig), out / "curves.png")
        written.append("curves.png")
    fig, axes = new_figure(ncols=2, width=11, height=4)
    for method in dict.fromkeys(c["method"] for c in cells):
        log = [row for row in cells if row["method"] == method][0].get("training_log", [])
        points = [(row["step"], row) for row in log if "step" in row and "loss" in row]
        if not points:
            continue
        axes[0].plot([s for s, _ in points], [r["loss"] for _, r in points], label=method)
        nll = [(s, r["nll"]) for s, r in points if "nll" in r]
        if nll:
            axes[1].plot([s for s, _ in nll], [v for _, v in nll], label=method)
    axes[0].set_title("training objective (as optimised)")
    axes[1].set_title("plain NLL of the training data")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_png(figure_png(fig), out / "training.png")
    written.append("training.png")
    return written


# -------------------------------------------------------------------------------------------- command


def run_compare(exp: Experiment) -> dict:
    out = Path(exp.out)
    from onsft.models import resolve_model_path
    from onsft.records import check_writable

    check_writable(out / "results.json")
    resolve_model_path(exp.model)
    resolve_builtin_data(exp, out)
    _check_data(exp)
    _check_options(exp, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "experiment.json", asdict(exp))
    paths = prepare_shared_data(exp, out)
    evaluator = Evaluator(exp)
    base_path = out / "base" / "eval.json"
    base_settings = {"eval": exp.eval, "kl_limit": exp.kl_limit, "sets": [getattr(exp, n) for n in EVAL_SETS]}
    base = json.loads(base_path.read_text()) if base_path.exists() else None
    if base is None or base.get("settings") != base_settings:
        base = {**evaluator.full(evaluator.base), "settings": base_settings}
        write_json_atomic(base_path, base)
    cells = []
    # Method-major: an interrupted grid has every seed of its first methods (a mean and a spread), rather
    # than one seed of everything.
    for method in exp.methods:
        for seed in exp.seeds:
            source = METHODS[method][0]
            print(f"onsft compare: {method} seed {seed}", flush=True)
            cell = run_cell(exp, method, seed, paths[source], out / "cells" / f"{method}-s{seed}", evaluator)
            cell["prep_seconds"] = paths["timings"].get(source, 0.0)
            cells.append(cell)
    rows = summarize(base, cells, exp.methods)
    markdown = table_markdown(rows)
    (out / "table.md").write_text(markdown)
    (out / "table.csv").write_text(table_csv(rows))
    plots = plot_results(rows, cells, out)
    results = {
        "rows": rows,
        "cells": [{k: v for k, v in c.items() if k != "training_log"} for c in cells],
        "plots": plots,
        "data": {k: v for k, v in paths.items() if k != "timings"},
        "data_prep_seconds": paths["timings"],
    }
    write_json_atomic(out / "results.json", results)
    print(markdown)
    return results


@dataclass
class CompareArgs:
    config: str = field(default="", metadata={"help": "Experiment YAML (see experiments/organism.yaml)."})
    out: str | None = field(default=None, metadata={"help": "Override the experiment's output folder."})
    seeds: list[int] = field(default_factory=list, metadata={"help": "Override the experiment's seeds."})
    methods: list[str] = field(default_factory=list, metadata={"help": "Override the experiment's methods."})


def main(argv: list[str] | None = None) -> int:
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError(message, where="command line", fix="see `onsft compare --help`.")

    parser = Parser(prog="onsft compare", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    for f in fields(CompareArgs):
        kwargs = {"nargs": "+", "type": int if f.name == "seeds" else str} if f.name in ("seeds", "methods") else {}
        parser.add_argument(f"--{f.name}", help=f.metadata["help"], **kwargs)
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if unknown:
        raise UserError(f"unknown option `{unknown[0]}`", where="command line", fix="see `onsft compare --help`.")
    if not args.config:
        raise UserError("no experiment given", where="command line", fix="pass --config experiment.yaml.")
    exp = load_experiment(args.config, {"out": args.out, "seeds": args.seeds or None, "methods": args.methods or None})
    run_compare(exp)
    return 0
