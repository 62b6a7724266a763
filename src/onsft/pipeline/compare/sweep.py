"""Sweeps in `onsft compare`: the grid of methods x swept train options x seeds, each cell's curve of fully
evaluated checkpoints, and the compute each cell and each data step cost.

A cell is (method, point, seed): `point` is one combination of the swept `onsft train` options (the
experiment's `sweep:`, or the method's own `method_sweep:` entry). Its folder is cells/<method>-<label>-s<seed>.
Its curve starts at the base model (step 0, shared by every cell) and has one point per saved checkpoint and
one for the final model; each point is cached in <cell>/points/step-N.json under the settings it was measured
with (the cell's training settings and the evaluator's), so a rerun or a resumed run evaluates only what is
missing. Costs (wall and CPU seconds of `time.process_time`, all threads of this process) are recorded the
first time a step does its work and reused while its settings stay the same.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from onsft.data.rows import dataset_identity
from onsft.pipeline.compare.experiment import Experiment
from onsft.pipeline.compare.experiment_eval import Evaluator
from onsft.pipeline.train import stage as train_stage
from onsft.runtime.clock import plus, seconds_since, start
from onsft.runtime.fingerprints import config_defaults, same_settings
from onsft.runtime.records import write_json_atomic
from onsft.runtime.runs import RunArguments

# Short names of common swept options in folder names and labels; others are written whole.
SHORT = {"learning_rate": "lr", "max_steps": "steps", "num_train_epochs": "epochs", "replay_share": "replay"}
# Checkpoint files only a resumed training needs; the weights stay for evaluation.
RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")


@dataclass(frozen=True)
class Cell:
    method: str
    point: tuple[tuple[str, object], ...]  # the swept options of this cell, in the sweep's key order
    seed: int

    @property
    def options(self) -> dict:
        return dict(self.point)

    @property
    def label(self) -> str:
        """The swept options as text, e.g. "lr=0.0002" ("default" without a sweep)."""
        return (
            " ".join(
                f"{SHORT.get(k, k)}={v:g}" if isinstance(v, float) else f"{SHORT.get(k, k)}={v}" for k, v in self.point
            )
            or "default"
        )

    @property
    def name(self) -> str:
        setting = "-".join(
            f"{SHORT.get(k, k)}{v:g}" if isinstance(v, float) else f"{SHORT.get(k, k)}{v}" for k, v in self.point
        )
        return f"{self.method}-{setting}-s{self.seed}" if setting else f"{self.method}-s{self.seed}"


def cell_settings(
    exp: Experiment, method: str, seed: int, data: str, inputs, evaluator: Evaluator, point: dict | None = None
) -> dict:
    """What a cell's cached result depends on."""
    return {
        "train": json.loads(json.dumps(dataclasses.asdict(inputs) | {"method": method}, default=str)),
        "data": dataset_identity(data),  # by content: an edited file is not the cached cell's data
        "options": {**exp.train, **exp.method_train.get(method, {}), **(point or {})},
        "seed": seed,
        "curve": [exp.curve_every or exp.eval_every, exp.curve_limit],
        **evaluator.settings(),
    }


def cell_defaults(inputs, evaluator: Evaluator) -> dict:
    """The defaults of `cell_settings`' options: a cell cached before an option existed matches when it holds
    its default now."""
    return {"train": config_defaults(inputs), **evaluator.defaults()}


def sweep_points(exp: Experiment, method: str) -> list[tuple[tuple[str, object], ...]]:
    """Every combination of the method's swept options (one empty point without a sweep)."""
    sweep = exp.method_sweep.get(method, exp.sweep)
    keys = list(sweep)
    return [tuple(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]


def grid(exp: Experiment) -> list[Cell]:
    """Method-major: an interrupted grid has every setting and seed of its first methods."""
    return [
        Cell(method, point, seed)
        for method in exp.methods
        for point in sweep_points(exp, method)
        for seed in exp.seeds_of(method)
    ]


def measured(
    path: Path, key: str, settings: dict, work: Callable[[], dict], defaults: dict | list | None = None
) -> tuple[dict, dict]:
    """Run `work` and return (its result, its cost). The cost is recorded in `path` (a JSON map of key ->
    {wall_seconds, cpu_seconds, settings}) the first time the work runs with these settings; later, when
    the work finds its output cached and returns at once, the recorded cost is kept (`defaults`: options
    added since the record was written match when they hold their defaults). A result holding
    `cost_before_this_run` (a resumed training or data step: its earlier calls' seconds) adds it to what this
    call measured."""
    started = start()
    result = work()
    before = (result.get("cost_before_this_run") if isinstance(result, dict) else None) or {}
    cost = plus(seconds_since(started), before)
    costs = json.loads(path.read_text()) if path.exists() else {}
    known = costs.get(key)
    if known is not None and same_settings(known.get("settings"), settings, defaults):
        return result, {k: known[k] for k in ("wall_seconds", "cpu_seconds")}
    costs[key] = {**cost, "settings": settings}
    write_json_atomic(path, costs)
    return result, cost


def _cached(path: Path, settings: dict, defaults: dict | None) -> dict | None:
    if path.exists():
        record = json.loads(path.read_text())
        if same_settings(record.get("settings"), settings, defaults):
            return record
    return None


def base_point(exp: Experiment, out: Path, evaluator: Evaluator) -> dict:
    """Step 0 of every curve: the base model measured like the checkpoints (cached in base/point.json)."""
    settings = {**evaluator.settings(), "limit": exp.curve_limit}
    path = out / "base" / "point.json"
    record = _cached(path, settings, evaluator.defaults())
    if record is None:
        started = time.time()
        record = {"step": 0, **evaluator.full(evaluator.base, exp.curve_limit)}
        record.update(eval_seconds=time.time() - started, settings=settings)
        write_json_atomic(path, record)
    return record


def checkpoints(train_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.split("-")[1]), p) for p in train_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return sorted(found)


def curve(
    exp: Experiment,
    folder: Path,
    final_step: int,
    evaluator: Evaluator,
    base: dict,
    settings: dict,
    defaults: dict | None = None,
) -> list[dict]:
    """The cell's points: the base model at step 0, every checkpoint, and the final model at `final_step`
    (the final model's weights are its last checkpoint's when that one is at the final step)."""
    settings = {**settings, "limit": exp.curve_limit}
    train_dir = folder / "train"
    sources = {step: path for step, path in checkpoints(train_dir) if 0 < step < final_step}
    sources[final_step] = train_dir / "model"
    points = [{k: v for k, v in base.items() if k != "settings"}]
    for step, path in sorted(sources.items()):
        target = folder / "points" / f"step-{step}.json"
        record = _cached(target, settings, defaults)
        if record is None:
            print(f"onsft compare: {folder.name} step {step}", file=sys.stderr, flush=True)
            started = time.time()
            record = {"step": step, **evaluator.full(evaluator.load(path), exp.curve_limit)}
            record.update(eval_seconds=time.time() - started, settings=settings)
            write_json_atomic(target, record)
        points.append({k: v for k, v in record.items() if k != "settings"})
    # Points cached for checkpoints no longer on disk (their weights dropped) stay part of the curve.
    for target in (folder / "points").glob("step-*.json"):
        step = int(target.stem.split("-")[1])
        if step not in sources and (record := _cached(target, settings, defaults)) is not None:
            points.append({k: v for k, v in record.items() if k != "settings"})
    return sorted(points, key=lambda p: p["step"])


def drop_resume_state(train_dir: Path) -> None:
    """A finished cell's checkpoints keep their weights (to evaluate them again) but not the optimiser state."""
    for _, checkpoint in checkpoints(train_dir):
        for pattern in RESUME_ONLY:
            for path in checkpoint.glob(pattern):
                path.unlink() if path.is_file() else shutil.rmtree(path)


def run_sweep_cell(
    exp: Experiment,
    cell: Cell,
    folder: Path,
    evaluator: Evaluator,
    base: dict,
    settings: dict,
    configs: tuple,
    steps: RunArguments,
    defaults: dict | None = None,
) -> dict:
    """Train the cell (the train stage's run on `configs`: TrainArguments, LoraArguments, trainer config,
    LossConfig or None; a finished run returns at once), then evaluate its curve. Cached whole in
    <cell>/eval.json under `settings` (`cell_defaults`)."""
    done = folder / "eval.json"
    if (cached := _cached(done, settings, defaults)) is not None:
        return cached
    train_settings = {k: settings[k] for k in ("train", "data", "options", "seed")}

    def train() -> dict:
        return train_stage.run(configs[0], exp.model, configs[1], configs[2], configs[3], steps)

    summary, cost = measured(folder / "cost.json", "train", train_settings, train, defaults)
    if not exp.keep_checkpoints:
        drop_resume_state(folder / "train")
    points = curve(exp, folder, int(summary["global_step"]), evaluator, base, settings, defaults)
    final = {k: v for k, v in points[-1].items() if k not in ("step", "eval_seconds")}
    log = folder / "train" / "metrics.jsonl"
    result = {
        "method": cell.method,
        "setting": cell.label,
        "options": cell.options,
        "seed": cell.seed,
        **final,
        "train_seconds": cost["wall_seconds"],
        "train_cpu_seconds": cost["cpu_seconds"],
        "eval_seconds": sum(p.get("eval_seconds", 0.0) for p in points[1:]),
        "tokens": summary.get("tokens_seen") or 0,
        "steps": summary.get("global_step"),
        "curve": points,
        "training_log": [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else [],
        "settings": settings,
    }
    write_json_atomic(done, result)
    return result
