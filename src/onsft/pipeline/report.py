"""Plots and self-contained HTML reports, shared by audit, rewrite and compare.

Figures use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, no
display needed). Every plot function takes plain data (`{label: values}`) and returns a Figure;
`figure_png` renders it, `image_html` embeds the PNG as base64, so one .html file holds the report.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import statistics
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from onsft.runtime.records import write_bytes_atomic

PALETTE = ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")
NORMAL = statistics.NormalDist()


def new_figure(ncols: int = 1, width: float = 7.0, height: float = 3.8):
    fig = Figure(figsize=(width * ncols if ncols > 1 else width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_png(png: bytes, path: str | os.PathLike) -> None:
    """The rendered PNG at `path`, renamed into place (onsft.runtime.records.write_bytes_atomic)."""
    write_bytes_atomic(path, png)


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _colors(labels) -> dict[str, str]:
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


# ------------------------------------------------------------------------------------------------ plots


def phi_histogram(
    sets: Mapping[str, Sequence[float]],
    threshold: float | None = None,
    xlabel: str = "response mean phi",
    title: str = "Mean phi per response",
) -> Figure:
    """Overlaid density histograms on shared bins, with the OOD threshold marked."""
    fig, ax = new_figure()
    data = {label: _finite(v) for label, v in sets.items() if _finite(v)}
    everything = [x for v in data.values() for x in v]
    if everything:
        lo, hi = min(everything), max(everything)
        if threshold is not None:
            lo, hi = min(lo, threshold), max(hi, threshold)
        hi = hi if hi > lo else lo + 1e-3
        bins = [lo + (hi - lo) * i / 50 for i in range(51)]
        for (label, values), color in zip(data.items(), _colors(data).values()):
            ax.hist(
                values,
                bins=bins,
                density=True,
                alpha=0.45,
                color=color,
                label=f"{label} (n={len(values)}, mean {statistics.fmean(values):.3f})",
            )
    if threshold is not None:
        ax.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {threshold:g}")
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=8)
    return fig


def token_phi_distribution(sets: Mapping[str, Sequence[float]], clip: float = -20.0) -> Figure:
    """Per-token phi (values below `clip` piled into the first bin), log-scaled counts."""
    fig, ax = new_figure()
    bins = [clip + i * 0.25 for i in range(int((5 - clip) / 0.25) + 1)]
    for (label, values), color in zip(sets.items(), _colors(sets).values()):
        values = [min(max(v, clip), 5.0) for v in _finite(values)]
        if values:
            ax.hist(
                values,
                bins=bins,
                density=True,
                histtype="step",
                linewidth=1.5,
                color=color,
                label=f"{label} ({len(values)} tokens)",
            )
    for level in (-1, -3, -5):
        ax.axvline(level, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set(xlabel=f"token phi (clipped at {clip:g})", ylabel="density", title="Per-token phi")
    ax.legend(fontsize=8)
    return fig


def phi_by_position(sets: Mapping[str, Sequence[Sequence[float]]], bins: int = 40) -> Figure:
    """Mean token phi against position in the response, with a +-2 standard-error band."""
    fig, ax = new_figure()
    longest = max((len(seq) for seqs in sets.values() for seq in seqs), default=0)
    width = max(1, math.ceil(longest / bins))
    for (label, seqs), color in zip(sets.items(), _colors(sets).values()):
        groups: dict[int, list[float]] = {}
        for seq in seqs:
            for t, v in enumerate(_finite(seq)):
                groups.setdefault(t // width, []).append(v)
        keys = sorted(k for k, g in groups.items() if len(g) >= 2)
        if not keys:
            continue
        xs = [(k + 0.5) * width for k in keys]
        means = [statistics.fmean(groups[k]) for k in keys]
        errors = [2 * statistics.stdev(groups[k]) / math.sqrt(len(groups[k])) for k in keys]
        ax.plot(xs, means, color=color, label=label)
        ax.fill_between(
            xs, [m - e for m, e in zip(means, errors)], [m + e for m, e in zip(means, errors)], color=color, alpha=0.2
        )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="response token position", ylabel="mean phi", title="Phi by position (band: +-2 s.e.)")
    ax.legend(fontsize=8)
    return fig


def z_calibration(sets: Mapping[str, Sequence[float]]) -> Figure:
    """Z against N(0,1): density histogram with the normal density, and a QQ plot. On the model's own
    samples both should follow the N(0,1) curve / diagonal."""
    fig, (hist_ax, qq_ax) = new_figure(ncols=2, width=5.0)
    data = {label: sorted(_finite(v)) for label, v in sets.items() if _finite(v)}
    grid = [-4 + 8 * i / 200 for i in range(201)]
    everything = [x for v in data.values() for x in v]
    lo, hi = (min(min(everything), -4), max(max(everything), 4)) if everything else (-4, 4)
    bins = [lo + (hi - lo) * i / 60 for i in range(61)]
    for (label, values), color in zip(data.items(), _colors(data).values()):
        std = statistics.pstdev(values) if len(values) > 1 else float("nan")
        hist_ax.hist(
            values,
            bins=bins,
            density=True,
            alpha=0.4,
            color=color,
            label=f"{label} (mean {statistics.fmean(values):.2f}, std {std:.2f})",
        )
        n = len(values)
        theory = [NORMAL.inv_cdf((i + 0.5) / n) for i in range(n)]
        qq_ax.plot(theory, values, ".", markersize=3, color=color, label=label)
    hist_ax.plot(grid, [NORMAL.pdf(x) for x in grid], color="black", linewidth=1.2, label="N(0,1)")
    hist_ax.set(xlabel="Z = sum phi / sqrt(sum Var)", ylabel="density", title="Z vs N(0,1)")
    hist_ax.legend(fontsize=7)
    qq_ax.plot([-4, 4], [-4, 4], color="black", linewidth=1)
    qq_ax.set(xlabel="N(0,1) quantile", ylabel="Z quantile", title="QQ plot of Z")
    qq_ax.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------------------------- HTML


def image_html(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def table_html(header: Sequence[str], rows: Sequence[Sequence], numeric_format: str = "{:.4g}") -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return numeric_format.format(value)
        return html.escape("" if value is None else str(value))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def phi_color(value: float, scale: float = 5.0) -> str:
    """White at phi >= 0, deepening red as phi falls to -scale and below."""
    strength = min(1.0, max(0.0, -value / scale))
    green_blue = int(round(255 * (1 - 0.8 * strength)))
    return f"rgb(255,{green_blue},{green_blue})"


def token_spans(
    tokens: Sequence[str], values: Sequence[float], titles: Sequence[str] | None = None, scale: float = 5.0
) -> str:
    """Tokens as spans coloured by their phi (hover shows the numbers)."""
    spans = []
    for i, (token, value) in enumerate(zip(tokens, values)):
        title = titles[i] if titles else f"phi={value:.3f}"
        text = html.escape(token).replace("\n", "&#8629;<br>")
        spans.append(
            f'<span class="tok" style="background:{phi_color(value, scale)}" title="{html.escape(title)}">{text}</span>'
        )
    return '<div class="tokens">' + "".join(spans) + "</div>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
img{max-width:100%} .note{color:#555;font-size:.9em}
.tokens{font-family:ui-monospace,monospace;font-size:.85em;line-height:1.7;white-space:pre-wrap;
border:1px solid #eee;padding:.5em;margin:.3em 0 1.2em 0}
.tok{border-radius:2px} .prompt{color:#666;font-family:ui-monospace,monospace;font-size:.8em;white-space:pre-wrap}
"""


def page_html(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """A whole HTML page: title, an intro paragraph, then (heading, body HTML) sections."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p class='note'>{intro}</p>")
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    return "".join(parts)
