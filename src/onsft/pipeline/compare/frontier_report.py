"""The frontier report of a sweep: curves.csv/json, frontier plots per pair of axes, and frontier.md.

The readings are `frontier_readings`' (each curve read where it first reaches a matched level; one setting per
method, chosen on the validation draws when the experiment has them and read on the test sets; KL drift at
matched skill; compute-matched readings), the text `frontier_markdown`'s; this module runs them over the cells,
adds the contrasts (paired by seed) and writes the files.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from matplotlib import colormaps

from onsft.formulas.frontier import Matched, paired_contrast
from onsft.pipeline.compare.experiment import Experiment
from onsft.pipeline.compare.frontier_markdown import frontier_markdown
from onsft.pipeline.compare.frontier_readings import (
    BOOTSTRAP_SEED,
    METRICS,
    NAMES,
    chosen_on,
    compute_matched,
    curve_series,
    drift_at_skill,
    method_readings,
    pareto_points,
    prep_cost,
)
from onsft.pipeline.report import figure_png, new_figure, save_png
from onsft.runtime.records import dumps, write_json_atomic, write_text_atomic

LINESTYLES = ("-", "--", ":", "-.")


def curve_rows(cells: list[dict]) -> list[dict]:
    """One row per (method, setting, seed, step): the point's measurements."""
    rows = []
    for cell in cells:
        for point in cell["curve"]:
            rows.append(
                {
                    "method": cell["method"],
                    "setting": cell["setting"],
                    **{f"opt_{k}": v for k, v in cell["options"].items()},
                    "seed": cell["seed"],
                    "step": point["step"],
                    **{m: point.get(m) for m in METRICS},
                    "eval_seconds": point.get("eval_seconds"),
                }
            )
    return rows


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_frontier(exp: Experiment, cells: list[dict], front: list[dict], x: str, y: str, path: Path) -> None:
    """Each method one colour, one line per setting (line style) and seed, Pareto points ringed, levels dashed."""
    fig, ax = new_figure(width=7.5, height=5.5)
    palette = colormaps["tab10"].colors
    methods = list(dict.fromkeys(c["method"] for c in cells))
    settings = list(dict.fromkeys(c["setting"] for c in cells))
    for cell in cells:
        series = curve_series(cell, x, y)
        if series is None:
            continue
        color = palette[methods.index(cell["method"]) % len(palette)]
        style = LINESTYLES[settings.index(cell["setting"]) % len(LINESTYLES)]
        ax.plot([100 * v for v in series[0]], [100 * v for v in series[1]], style, color=color, marker=".", lw=1)
    for i, method in enumerate(methods):
        ax.plot([], [], "-", color=palette[i % len(palette)], label=method)
    for i, setting in enumerate(settings):
        ax.plot([], [], LINESTYLES[i % len(LINESTYLES)], color="black", label=setting)
    ax.scatter(
        [100 * p[x] for p in front],
        [100 * p[y] for p in front],
        s=70,
        facecolors="none",
        edgecolors="black",
        label="Pareto set",
        zorder=3,
    )
    if x in exp.matched:
        ax.axvline(100 * exp.matched[x], color="grey", ls="--", lw=0.8)
    if y in exp.matched:
        ax.axhline(100 * exp.matched[y], color="grey", ls="--", lw=0.8)
    ax.set_xlabel(f"skill gained: {NAMES[x]} accuracy (%)")
    ax.set_ylabel(f"skill kept: {NAMES[y]} accuracy (%)")
    ax.set_title("Frontier: every checkpoint of every run (start: the base model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_png(figure_png(fig), path)


def write_frontier(exp: Experiment, base: dict, cells: list[dict], costs: dict, out: Path) -> dict:
    """curves.csv, curves.json, frontier_<axis>.png, frontier.md; returns {"plots", "summary"}."""
    rows = curve_rows(cells)
    write_text_atomic(out / "curves.csv", _csv(rows))
    write_json_atomic(out / "curves.json", rows)
    axes = [a for a in ("in_domain", "ood") if any(p.get(a) is not None for c in cells for p in c["curve"])]
    plots, fronts = [], {}
    for x in axes:
        fronts[x] = pareto_points(cells, base, x, "retention")
        plot_frontier(exp, cells, fronts[x], x, "retention", out / f"frontier_{x}.png")
        plots.append(f"frontier_{x}.png")
    methods = list(dict.fromkeys(c["method"] for c in cells))
    levels = [a for a in exp.matched if any(p.get(a) is not None for c in cells for p in c["curve"])]
    summary = {"levels": {a: exp.matched[a] for a in levels}, "methods": {}, "contrasts": [], "pareto": fronts}
    for method in methods:
        mine = [c for c in cells if c["method"] == method]
        summary["methods"][method] = {
            "matched": {a: _matched_json(method_readings(exp, cells, method, a)) for a in levels},
            "runs": len(mine),
            "tokens_per_run": statistics.fmean(c["tokens"] for c in mine),
            "train_cpu_seconds_per_run": statistics.fmean(c["train_cpu_seconds"] for c in mine),
            "train_wall_seconds_per_run": statistics.fmean(c["train_seconds"] for c in mine),
            "eval_seconds_per_run": statistics.fmean(c["eval_seconds"] for c in mine),
            "data_prep": prep_cost(exp, method, costs),
        }
    summary["chosen_on"] = {a: chosen_on(cells, a) for a in levels}
    # Compute-matched: every method read after the training tokens of the method that trained on the fewest
    # (all curves reach it), so a method that learns faster per token shows it.
    budget = min((c["tokens"] for c in cells if c.get("tokens")), default=0)
    summary["compute_matched"] = {"tokens": budget, "methods": {}}
    if budget:
        for method in methods:
            first = next(iter(levels), None)
            setting = summary["methods"][method]["matched"][first]["setting"] if first else None
            summary["compute_matched"]["methods"][method] = {
                "setting": setting,
                **compute_matched(cells, method, setting, budget),
            }
    for a, b in exp.contrasts:
        for axis in levels:
            ra, rb = (method_readings(exp, cells, m, axis).values for m in (a, b))
            diff = paired_contrast(ra, rb, BOOTSTRAP_SEED)
            summary["contrasts"].append({"a": a, "b": b, "axis": axis, "difference": diff and diff.__dict__})
    if "in_domain" in levels and any(p.get("kl_drift") is not None for c in cells for p in c["curve"][1:]):
        summary["drift"] = drift_summary(exp, cells, summary)
    write_text_atomic(out / "frontier.md", frontier_markdown(exp, cells, summary))
    return {"plots": plots, "summary": json.loads(dumps(summary))}


def drift_summary(exp: Experiment, cells: list[dict], summary: dict) -> dict:
    """KL drift at the matched in-domain level per method (at its retention reading's setting) and the
    experiment's contrasts on it, paired by seed."""
    drift = {"level": exp.matched["in_domain"], "methods": {}, "contrasts": []}
    for method, m in summary["methods"].items():
        drift["methods"][method] = _matched_json(
            drift_at_skill(exp, cells, method, m["matched"]["in_domain"]["setting"])
        )
    for a, b in exp.contrasts:
        if a in drift["methods"] and b in drift["methods"]:
            diff = paired_contrast(*(drift["methods"][m]["values"] for m in (a, b)), BOOTSTRAP_SEED)
            drift["contrasts"].append({"a": a, "b": b, "difference": diff and diff.__dict__})
    return drift


def _matched_json(m: Matched) -> dict:
    return {
        "interval": m.interval and m.interval.__dict__,
        "reached": m.reached,
        "seeds": m.seeds,
        "values": m.values,
        "setting": m.setting,
    }
