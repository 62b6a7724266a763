"""The readings of a sweep's frontier (`onsft.formulas.frontier` on the cells' curves): where a curve reaches a
matched level, the one setting a method is read at (chosen on the validation draws when the curves carry them),
KL drift at matched skill, compute-matched readings, the Pareto set, and the data-step costs.

Matched in-domain (or OOD) accuracy reads retention; matched retention reads in-domain accuracy.
"""

from __future__ import annotations

import dataclasses

from onsft.formulas.frontier import (
    Matched,
    best_setting,
    bootstrap_interval,
    chosen_on_validation,
    matched_over_seeds,
    pareto_set,
    reading_at_level,
)
from onsft.pipeline.compare.experiment import METHODS, REPLAY_METHODS, VALIDATION_SETS, Experiment

METRICS = ("in_domain", "ood", "retention", *VALIDATION_SETS, "kl_drift")
# The validation set of each test axis (prompts disjoint from the test set's): where a setting is chosen.
VALIDATION_OF = {test: validation for validation, test in VALIDATION_SETS.items()}
NAMES = {"in_domain": "in-domain", "ood": "OOD", "retention": "retention"}
BOOTSTRAP_SEED = 0


def read_axis(axis: str) -> str:
    """The axis a matched level on `axis` reads: retention for a skill level, in-domain for a retention one."""
    return "in_domain" if axis == "retention" else "retention"


def curve_series(cell: dict, x: str, y: str) -> tuple[list[float], list[float]] | None:
    points = [p for p in cell["curve"] if p.get(x) is not None and p.get(y) is not None]
    return ([p[x] for p in points], [p[y] for p in points]) if points else None


def readings_at_level(cells: list[dict], x: str, y: str, level: float) -> dict[str, dict[int, float | None]]:
    """{setting: {seed: y where the cell's curve first reaches x = level, or None}}."""
    by_setting: dict[str, dict[int, float | None]] = {}
    for cell in cells:
        series = curve_series(cell, x, y)
        by_setting.setdefault(cell["setting"], {})[cell["seed"]] = reading_at_level(*series, level) if series else None
    return by_setting


def chosen_on(cells: list[dict], axis: str) -> str:
    """Where a method's setting is chosen for a reading on `axis`: "validation" when every curve carries the
    validation draws of both axes of the reading, else "test" (the test readings themselves, an optimistic
    choice when several settings were swept)."""
    needed = (VALIDATION_OF.get(axis), VALIDATION_OF.get(read_axis(axis)))
    if None in needed or not cells:
        return "test"
    return "validation" if all(p.get(n) is not None for c in cells for p in c["curve"] for n in needed) else "test"


def method_readings(exp: Experiment, cells: list[dict], method: str, axis: str) -> Matched:
    """The method's readings at the matched level of `axis`, all seeds at one setting (chosen on the validation
    draws when the curves carry them, else on these readings); bootstrapped over seeds."""
    level, y = float(exp.matched[axis]), read_axis(axis)
    mine = [c for c in cells if c["method"] == method]
    test = readings_at_level(mine, axis, y, level)
    if chosen_on(cells, axis) == "validation":
        validation = readings_at_level(mine, VALIDATION_OF[axis], VALIDATION_OF[y], level)
        matched = chosen_on_validation(validation, test, BOOTSTRAP_SEED)
    else:
        matched = matched_over_seeds(test.get(setting := best_setting(test), {}), BOOTSTRAP_SEED)
        matched = dataclasses.replace(matched, setting=setting)
    return dataclasses.replace(matched, setting=matched.setting if len(test) > 1 else None)


def settings_for_more_seeds(exp: Experiment, first: list[dict]) -> dict[str, set[str]]:
    """{method: the settings its later seeds run at} under `more_seeds: chosen`: for each matched reading, the
    setting `method_readings` picks from the first seed's cells (on their validation draws when they carry them),
    so the seeds are spent where the comparison is read and no test reading moves the choice."""
    chosen = {}
    for method in exp.methods:
        mine = {c["setting"] for c in first if c["method"] == method}
        picks = {method_readings(exp, first, method, axis).setting for axis in exp.matched}
        chosen[method] = mine if None in picks or not picks else picks  # None: a single setting
    return chosen


def compute_matched(cells: list[dict], method: str, setting: str | None, tokens: float) -> dict:
    """In-domain and retention accuracy after `tokens` training tokens (linear between the checkpoints that
    bracket it; each checkpoint's tokens are the run's tokens x step / last step), bootstrapped over seeds,
    at the method's chosen `setting` (None: its one setting)."""
    result = {}
    mine = [c for c in cells if c["method"] == method and (setting is None or c["setting"] == setting)]
    for metric in ("in_domain", "retention"):
        values = []
        for cell in mine:
            points = [p for p in cell["curve"] if p.get(metric) is not None]
            last = max((p["step"] for p in points), default=0)
            if not last or not cell.get("tokens"):
                continue
            xs = [cell["tokens"] * p["step"] / last for p in points]
            value = reading_at_level(xs, [p[metric] for p in points], tokens)
            if value is not None:
                values.append(value)
        full = bool(values) and len(values) == len(mine)
        result[metric] = bootstrap_interval(values, BOOTSTRAP_SEED).__dict__ if full else None
    return result


def prep_cost(exp: Experiment, method: str, costs: dict) -> dict:
    """CPU and wall seconds of the shared data steps a method's data needs (paid once for all its runs)."""
    source = METHODS[method][0]
    steps = [source]
    if source == "pairs" and exp.pairs.get("rewrites", True):
        steps.append("rewrite")
    if method in REPLAY_METHODS:
        steps.append("replay")
    known = [costs[s] for s in steps if s in costs]
    return {k: sum(c[k] for c in known) for k in ("cpu_seconds", "wall_seconds")}


def pareto_points(cells: list[dict], base: dict, x: str, y: str) -> list[dict]:
    """The checkpoints (the base model once, as step 0) no other checkpoint beats on both axes."""
    points = [{"method": "base", "setting": "-", "seed": "-", "step": 0, x: base.get(x), y: base.get(y)}]
    for cell in cells:
        for p in cell["curve"][1:]:
            points.append({"method": cell["method"], "setting": cell["setting"], "seed": cell["seed"], **p})
    points = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    return [points[i] for i in pareto_set([(p[x], p[y]) for p in points])]


def drift_at_skill(exp: Experiment, cells: list[dict], method: str, setting: str | None) -> Matched:
    """KL drift from the base model where each of the method's curves at `setting` (None: its one setting) first
    reaches the matched in-domain level, bootstrapped over seeds: how far the model moved on unrelated prompts to
    gain that much skill. Read at the setting of the method's retention reading, so both readings share runs."""
    mine = [c for c in cells if c["method"] == method and (setting is None or c["setting"] == setting)]
    by_setting = readings_at_level(mine, "in_domain", "kl_drift", float(exp.matched["in_domain"]))
    matched = matched_over_seeds(next(iter(by_setting.values()), {}), BOOTSTRAP_SEED)
    return dataclasses.replace(matched, setting=setting)
