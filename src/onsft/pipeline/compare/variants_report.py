"""Variants of one experiment (`variants:`), e.g. the teacher styles one at a time: each variant is a whole
experiment run in OUT/<name>/, and variants.md / variants.png set them side by side against the training
data's measured mean phi (from the variant's audit), with each variant's frontier readings and contrasts."""

from __future__ import annotations

import math
from pathlib import Path

from onsft.pipeline.compare.experiment import Experiment
from onsft.pipeline.compare.frontier_markdown import interval_text, reading_name
from onsft.pipeline.report import figure_png, new_figure, save_png
from onsft.runtime.records import write_json_atomic, write_text_atomic


def mean_phi(results: dict) -> float | None:
    """The training data's token-weighted mean phi under the base model, when the variant was audited."""
    audit = results.get("audit") or {}
    return (audit.get("sets") or {}).get("scores", {}).get("mean_phi_token_weighted")


def write_variants(exp: Experiment, variants: dict[str, dict]) -> dict:
    """The comparison of the variants' results (variant name -> the compare stage's results), written to OUT."""
    out = Path(exp.out)
    summary = {name: _summary(results) for name, results in variants.items()}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "variants.json", summary)
    write_text_atomic(out / "variants.md", variants_markdown(summary))
    plots = plot_variants(summary, out / "variants.png")
    return {"variants": summary, "plots": plots}


def _summary(results: dict) -> dict:
    rows = {r["method"]: {k: v for k, v in r.items() if k not in ("method",)} for r in results["rows"]}
    frontier = results.get("frontier") or {}
    return {
        "mean_phi": mean_phi(results),
        "rows": rows,
        "matched": {m: v["matched"] for m, v in (frontier.get("methods") or {}).items()},
        "levels": frontier.get("levels", {}),
        "contrasts": frontier.get("contrasts", []),
    }


def _pct(pair) -> str:
    mean = pair[0] if isinstance(pair, (list, tuple)) else pair
    return "-" if mean is None or (isinstance(mean, float) and math.isnan(mean)) else f"{100 * mean:.1f}"


def _interval(d: dict | None, signed: bool = False) -> str:
    return "not reached" if d is None else interval_text(d, signed)


def variants_markdown(summary: dict) -> str:
    lines = [
        "# Variants side by side",
        "",
        "Mean phi: the training data's token-weighted mean phi under the base model (the variant's audit; 0 is the "
        "model's own distribution, more negative is further off-policy). Accuracies in % (final models, mean over "
        "the variant's runs); matched readings as in each variant's frontier.md (mean [95% bootstrap interval over "
        "seeds]).",
        "",
        "| variant | mean phi | method / setting | in-domain | OOD | retention |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in summary.items():
        phi = "-" if v["mean_phi"] is None else f"{v['mean_phi']:.3f}"
        for method, row in v["rows"].items():
            lines.append(
                f"| {name} | {phi} | {method} | {_pct(row.get('in_domain'))} | {_pct(row.get('ood'))} | "
                f"{_pct(row.get('retention'))} |"
            )
    if any(v["matched"] for v in summary.values()):
        lines += [
            "",
            "## Matched readings",
            "",
            "| variant | mean phi | method | reading | value |",
            "|---|---|---|---|---|",
        ]
        for name, v in summary.items():
            for method, readings in v["matched"].items():
                for axis, m in readings.items():
                    text = _interval(m["interval"]) if m["interval"] else f"not reached ({m['reached']}/{m['seeds']})"
                    lines.append(f"| {name} | {_phi(v)} | {method} | {_reading(axis, v['levels'])} | {text} |")
    if any(v["contrasts"] for v in summary.values()):
        lines += [
            "",
            "## Contrasts (A - B, paired by seed, points of %)",
            "",
            "| variant | mean phi | A - B | reading ",
        ]
        lines[-1] += "| difference |"
        lines.append("|---|---|---|---|---|")
        for name, v in summary.items():
            for c in v["contrasts"]:
                lines.append(
                    f"| {name} | {_phi(v)} | {c['a']} - {c['b']} | {_reading(c['axis'], v['levels'])} | "
                    f"{_interval(c['difference'], signed=True)} |"
                )
    return "\n".join(lines) + "\n"


def _phi(v: dict) -> str:
    return "-" if v["mean_phi"] is None else f"{v['mean_phi']:.3f}"


def _reading(axis: str, levels: dict) -> str:
    return reading_name(axis, levels.get(axis, math.nan))


def plot_variants(summary: dict, path: Path) -> list[str]:
    """Each contrast's difference (with its interval) against the variant's mean phi; one panel per reading."""
    with_phi = {n: v for n, v in summary.items() if v["mean_phi"] is not None and v["contrasts"]}
    if not with_phi:
        return []
    axes_names = list(dict.fromkeys(c["axis"] for v in with_phi.values() for c in v["contrasts"]))
    fig, axes = new_figure(ncols=len(axes_names), width=6, height=4.2)
    axes = list(axes) if len(axes_names) > 1 else [axes]
    for ax, axis in zip(axes, axes_names):
        pairs = list(dict.fromkeys((c["a"], c["b"]) for v in with_phi.values() for c in v["contrasts"]))
        for a, b in pairs:
            xs, ys, lows, highs = [], [], [], []
            for v in with_phi.values():
                for c in v["contrasts"]:
                    if (c["a"], c["b"], c["axis"]) == (a, b, axis) and c["difference"]:
                        d = c["difference"]
                        xs.append(v["mean_phi"])
                        ys.append(100 * d["mean"])
                        lows.append(100 * (d["mean"] - d["low"]))
                        highs.append(100 * (d["high"] - d["mean"]))
            if xs:
                ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o-", capsize=3, label=f"{a} - {b}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("training data's mean phi under the base model")
        ax.set_ylabel(f"difference in {_reading(axis, next(iter(with_phi.values()))['levels'])} (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_png(figure_png(fig), path)
    return [path.name]
