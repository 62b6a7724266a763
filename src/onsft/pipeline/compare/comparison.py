"""The comparison's table and plots: methods x seeds summarised as mean and spread, skill vs retention,
learning curves and training curves."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from onsft.formulas.stats import mean_std
from onsft.pipeline.report import figure_png, new_figure, save_png

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
                {"method": method, "seeds": len(mine), **{k: mean_std([c.get(k) for c in mine]) for k, *_ in COLUMNS}}
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
    """skill_vs_retention.png, curves.png (when cells have curves) and training.png; returns their names."""
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
