"""The frontier report of a sweep: curves.csv/json, frontier plots per pair of axes, and frontier.md.

Readings (`onsft.formulas.frontier`): for a matched level on an axis (`matched:` in the experiment), each curve
is read where it first reaches the level (linear between the two checkpoints that bracket it, never
extrapolated); a method is read at one swept setting for all its seeds, chosen on the validation draws when the
experiment has them (`validation_in_domain`, `validation_retention`) and read on the test sets; over seeds, the
mean with a 95% percentile-bootstrap interval. Matched in-domain (or OOD) accuracy reads retention; matched
retention reads in-domain accuracy. A compute-matched table reads every method after the same training tokens.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
from pathlib import Path

from matplotlib import colormaps

from onsft.formulas.frontier import (
    Matched,
    best_setting,
    bootstrap_interval,
    chosen_on_validation,
    level_side,
    matched_over_seeds,
    paired_contrast,
    pareto_set,
    reading_at_level,
)
from onsft.pipeline.compare.experiment import METHODS, REPLAY_METHODS, VALIDATION_SETS, Experiment
from onsft.pipeline.report import figure_png, new_figure, save_png
from onsft.runtime.records import dumps, write_json_atomic, write_text_atomic

METRICS = ("in_domain", "ood", "retention", *VALIDATION_SETS, "kl_drift")
# The validation set of each test axis (prompts disjoint from the test set's): where a setting is chosen.
VALIDATION_OF = {test: validation for validation, test in VALIDATION_SETS.items()}
NAMES = {"in_domain": "in-domain", "ood": "OOD", "retention": "retention"}
BOOTSTRAP_SEED = 0
LINESTYLES = ("-", "--", ":", "-.")


def read_axis(axis: str) -> str:
    """The axis a matched level on `axis` reads: retention for a skill level, in-domain for a retention one."""
    return "in_domain" if axis == "retention" else "retention"


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


def _series(cell: dict, x: str, y: str) -> tuple[list[float], list[float]] | None:
    points = [p for p in cell["curve"] if p.get(x) is not None and p.get(y) is not None]
    return ([p[x] for p in points], [p[y] for p in points]) if points else None


def _readings(cells: list[dict], x: str, y: str, level: float) -> dict[str, dict[int, float | None]]:
    """{setting: {seed: y where the cell's curve first reaches x = level, or None}}."""
    by_setting: dict[str, dict[int, float | None]] = {}
    for cell in cells:
        series = _series(cell, x, y)
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
    test = _readings(mine, axis, y, level)
    if chosen_on(cells, axis) == "validation":
        validation = _readings(mine, VALIDATION_OF[axis], VALIDATION_OF[y], level)
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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def interval_text(d: dict, signed: bool = False) -> str:
    """An interval (`Interval.__dict__`) as "mean [low, high]" in %, with signs for differences."""
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * d['mean'])} [{f.format(100 * d['low'])}, {f.format(100 * d['high'])}]"


def reading_name(axis: str, level: float) -> str:
    """What a matched level on `axis` reads, e.g. "retention @ in-domain 50%"."""
    return f"{NAMES[read_axis(axis)]} @ {NAMES[axis]} {100 * level:.0f}%"


def _matched_text(m: dict) -> str:
    """A method's matched reading (`_matched_json`'s form) as "mean [low, high]" in %."""
    at = f" at {m['setting']}" if m.get("setting") else ""
    if m["interval"] is None:
        return f"not reached ({m['reached']}/{m['seeds']} seeds){at if m['reached'] else ''}"
    return interval_text(m["interval"]) + at


def pareto_points(cells: list[dict], base: dict, x: str, y: str) -> list[dict]:
    """The checkpoints (the base model once, as step 0) no other checkpoint beats on both axes."""
    points = [{"method": "base", "setting": "-", "seed": "-", "step": 0, x: base.get(x), y: base.get(y)}]
    for cell in cells:
        for p in cell["curve"][1:]:
            points.append({"method": cell["method"], "setting": cell["setting"], "seed": cell["seed"], **p})
    points = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    return [points[i] for i in pareto_set([(p[x], p[y]) for p in points])]


def plot_frontier(exp: Experiment, cells: list[dict], front: list[dict], x: str, y: str, path: Path) -> None:
    """Each method one colour, one line per setting (line style) and seed, Pareto points ringed, levels dashed."""
    fig, ax = new_figure(width=7.5, height=5.5)
    palette = colormaps["tab10"].colors
    methods = list(dict.fromkeys(c["method"] for c in cells))
    settings = list(dict.fromkeys(c["setting"] for c in cells))
    for cell in cells:
        series = _series(cell, x, y)
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
    write_text_atomic(out / "frontier.md", frontier_markdown(exp, cells, summary))
    return {"plots": plots, "summary": json.loads(dumps(summary))}


def _matched_json(m: Matched) -> dict:
    return {
        "interval": m.interval and m.interval.__dict__,
        "reached": m.reached,
        "seeds": m.seeds,
        "values": m.values,
        "setting": m.setting,
    }


def frontier_markdown(exp: Experiment, cells: list[dict], summary: dict) -> str:
    levels = summary["levels"]
    heads = [reading_name(a, lv) for a, lv in levels.items()]
    lines = [
        "# Frontier: skill gained vs skill kept",
        "",
        f"{len(cells)} runs (method x setting x seed), each a curve from the base model (step 0) through every "
        "checkpoint. A reading at a matched level is taken where a curve first reaches the level, linearly "
        "between the two checkpoints that bracket it (never extrapolated); a method is read at one swept setting "
        "for all its seeds (shown after the reading): the one reached by the most seeds, then with the best mean "
        "reading, " + _choice_text(summary.get("chosen_on", {})) + "; shown: mean over seeds [95% "
        "percentile-bootstrap interval over seeds], in %. "
        "`not reached (k/n seeds)`: in n - k seeds no curve of that setting reached the level.",
        "",
        "## Matched readings and compute",
        "",
        "| method | runs | " + " | ".join(heads) + " | tokens / run | train CPU s / run | data prep CPU s | "
        "train wall s / run | eval s / run |",
        "|---|---|" + "---|" * (len(heads) + 5),
    ]
    for method, m in summary["methods"].items():
        readings = [_matched_text(m["matched"][a]) for a in levels]
        lines.append(
            f"| {method} | {m['runs']} | " + " | ".join(readings) + f" | {m['tokens_per_run'] / 1000:.0f}k | "
            f"{m['train_cpu_seconds_per_run']:.0f} | {m['data_prep']['cpu_seconds']:.0f} | "
            f"{m['train_wall_seconds_per_run']:.0f} | {m['eval_seconds_per_run']:.0f} |"
        )
    lines += _compute_matched_lines(summary.get("compute_matched") or {})
    lines += [
        "",
        "Compute: CPU seconds are `time.process_time` of this process (all its threads) while training; data prep "
        "is the shared step the method's data needs (rewrite, pairs, replay answers), paid once for all its runs. "
        "A run resumed after a kill counts only its resumed part.",
        "",
        "## Per setting",
        "",
        "| method | setting | seeds | " + " | ".join(heads) + " | final in-domain | final retention |",
        "|---|---|---|" + "---|" * (len(heads) + 2),
    ]
    for method in summary["methods"]:
        for setting in dict.fromkeys(c["setting"] for c in cells if c["method"] == method):
            mine = [c for c in cells if c["method"] == method and c["setting"] == setting]
            texts = []
            for axis, level in levels.items():
                found = [
                    reading_at_level(*s, level) if (s := _series(c, axis, read_axis(axis))) else None for c in mine
                ]
                reached = [v for v in found if v is not None]
                side = {level_side(s[0], level) for c in mine if (s := _series(c, axis, read_axis(axis)))}
                texts.append(
                    f"{100 * statistics.fmean(reached):.1f} ({len(reached)}/{len(mine)})"
                    if reached
                    else f"not reached: stays {'/'.join(sorted(side))}"
                )
            finals = [statistics.fmean(c.get(k) or 0.0 for c in mine) for k in ("in_domain", "retention")]
            lines.append(
                f"| {method} | {setting} | {len(mine)} | " + " | ".join(texts) + f" | {_pct(finals[0])} | "
                f"{_pct(finals[1])} |"
            )
    if summary["contrasts"]:
        lines += ["", "## Contrasts (A - B, paired by seed, in points of %)", "", "| A | B | reading | A - B |"]
        lines.append("|---|---|---|---|")
        for c in summary["contrasts"]:
            head = heads[list(levels).index(c["axis"])]
            difference = c["difference"]
            text = interval_text(difference, signed=True) if difference else "not reached by both in a shared seed"
            lines.append(f"| {c['a']} | {c['b']} | {head} | {text} |")
    for x, front in summary["pareto"].items():
        lines += [
            "",
            f"## Pareto set: {NAMES[x]} vs retention",
            "",
            f"| method | setting | seed | step | {NAMES[x]} | ",
        ]
        lines[-1] += "retention |"
        lines.append("|---|---|---|---|---|---|")
        for p in sorted(front, key=lambda p: p[x]):
            lines.append(
                f"| {p['method']} | {p['setting']} | {p['seed']} | {p['step']} | {_pct(p[x])} | {_pct(p['retention'])} |"
            )
    return "\n".join(lines) + "\n"


def _choice_text(chosen: dict[str, str]) -> str:
    """How the settings were chosen, per matched axis, in words."""
    on_validation = [NAMES[a] for a, where in chosen.items() if where == "validation"]
    on_test = [NAMES[a] for a, where in chosen.items() if where == "test"]
    parts = []
    if on_validation:
        parts.append(
            f"chosen on the validation draws (prompts disjoint from the test sets) for the {', '.join(on_validation)} "
            "level(s) and then read on the test sets"
        )
    if on_test:
        parts.append(
            f"chosen on these test readings themselves for the {', '.join(on_test)} level(s) (no validation draws: "
            "with several settings swept, an optimistic choice)"
        )
    return "; ".join(parts) if parts else "chosen on these readings"


def _compute_matched_lines(compute: dict) -> list[str]:
    if not compute.get("methods"):
        return []
    lines = [
        "",
        f"## Compute-matched: after {compute['tokens']:,.0f} training tokens",
        "",
        "Every method read after the same number of training tokens (those of the run that trained on the fewest), "
        "at its chosen setting, linearly between the checkpoints that bracket it; mean [95% bootstrap interval "
        "over seeds], in %. A method that learns faster per token is ahead here even where the skill-matched "
        "readings tie.",
        "",
        "| method | setting | in-domain | retention |",
        "|---|---|---|---|",
    ]
    for method, m in compute["methods"].items():
        texts = [interval_text(m[k]) if m.get(k) else "-" for k in ("in_domain", "retention")]
        lines.append(f"| {method} | {m.get('setting') or '-'} | {texts[0]} | {texts[1]} |")
    return lines
