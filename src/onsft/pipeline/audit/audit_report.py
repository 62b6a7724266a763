"""The audit's HTML report: a summary table, the phi and Z plots, and the most off-policy responses
token by token (`onsft.pipeline.report` draws the pieces)."""

from __future__ import annotations

import html
from pathlib import Path

from onsft.formulas.stats import QUANTILES
from onsft.pipeline import report
from onsft.pipeline.audit.auditing import AuditConfig, ScoreSet
from onsft.runtime.records import write_text_atomic

SUMMARY_ROWS = (
    ("responses", "n_responses"),
    ("response tokens", "n_tokens"),
    ("mean phi (token-weighted)", "mean_phi_token_weighted"),
    ("mean phi (per response)", "mean_phi_response_weighted"),
    ("  standard error", "mean_phi_se"),
    ("fraction OOD (mean phi < threshold)", "fraction_ood"),
    ("fraction rejected (p < alpha)", "fraction_rejected"),
    ("Z mean", "z_mean"),
    ("Z std (1 if calibrated)", "z_std"),
    ("Z KS distance to N(0,1)", "z_ks_distance"),
    ("pooled Z of the whole set", "z_pooled"),
    ("share of tokens phi > -1", "share_phi_gt_-1_token_weighted"),
    ("share of tokens phi > -3", "share_phi_gt_-3_token_weighted"),
    ("share of tokens phi > -5", "share_phi_gt_-5_token_weighted"),
)


def write_report(out: Path, config: AuditConfig, model: str, summary: dict, sets: list[ScoreSet]) -> None:
    """report.html (self-contained: plots inline) and plots/*.png for the scored sets."""
    labels = [s.label for s in sets]
    table_rows = [[name] + [summary["sets"][s.name].get(key) for s in sets] for name, key in SUMMARY_ROWS]
    table_rows += [
        [f"mean phi quantile {q:g}"] + [summary["sets"][s.name]["mean_phi_quantiles"][f"{q:g}"] for s in sets]
        for q in QUANTILES
    ]
    figures = {
        "mean_phi": report.phi_histogram({s.label: [r["mean_phi"] for r in s.rows] for s in sets}, config.threshold),
        "token_phi": report.token_phi_distribution({s.label: [v for seq in s.token_phi for v in seq] for s in sets}),
        "phi_by_position": report.phi_by_position({s.label: s.token_phi for s in sets}),
        "z_calibration": report.z_calibration({s.label: [r["z"] for r in s.rows] for s in sets}),
    }
    pngs = {}
    for key, fig in figures.items():
        pngs[key] = report.figure_png(fig)
        report.save_png(pngs[key], out / "plots" / f"{key}.png")
    main = summary["sets"]["scores"]
    intro = (
        f"Model <b>{html_escape(model)}</b>, data <b>{html_escape(config.data)}</b>, tau "
        f"{', '.join(f'{t:g}' for t in config.tau)}. phi = log p(token) + entropy: about 0 for text the model "
        f"would write itself, negative for text it would not. Z = sum phi / sqrt(sum Var) is ~N(0,1) for the "
        f"model's own samples, so p = P(N(0,1) &le; Z) is a test with false-alarm rate alpha = {config.alpha:g}. "
        f"Here {main['fraction_ood']:.1%} of responses have mean phi &lt; {config.threshold:g} and "
        f"{main['fraction_rejected']:.1%} are rejected at alpha."
    )
    if "self_check" in summary["sets"]:
        own = summary["sets"]["self_check"]
        intro += (
            f" The model's own samples score mean phi {own['mean_phi_token_weighted']:.3f} with Z std "
            f"{own['z_std']:.2f} (calibrated: 0 and 1)."
        )
    sections = [
        ("Summary", report.table_html(["", *labels], table_rows)),
        ("Mean phi per response", report.image_html(pngs["mean_phi"], "mean phi histogram")),
        (
            "Per-token phi",
            report.image_html(pngs["token_phi"], "token phi distribution")
            + "<p class='note'>From a sample of responses (--plot_sample).</p>",
        ),
        ("Phi by position", report.image_html(pngs["phi_by_position"], "phi by position")),
        (
            "Calibration of Z",
            report.image_html(pngs["z_calibration"], "Z calibration")
            + "<p class='note'>On the model's own samples (self-check) Z should follow N(0,1); user data far to the "
            "left of it is off-policy.</p>",
        ),
    ]
    for s in sets:
        if not s.worst:
            continue
        body = []
        for w in s.worst:
            titles = [f"phi={p:.3f} log p={lp:.3f} H={h:.3f}" for p, lp, h in zip(w["phi"], w["logp"], w["entropy"])]
            lowest = sorted(range(len(w["phi"])), key=lambda t: w["phi"][t])[:5]
            listed = ", ".join(
                f"<code>{html_escape(repr(w['tokens'][t]))}</code> at {t} ({w['phi'][t]:.2f})" for t in lowest
            )
            body.append(
                f"<p><b>row {w['index']}</b>: mean phi {w['mean_phi']:.3f}, Z {w['z']:.2f}, "
                f"p {w['p_value']:.2g}. Most off-policy tokens: {listed}</p>"
                f"<div class='prompt'>{html_escape(w['prompt'][-400:])}</div>"
                + report.token_spans(w["tokens"], w["phi"], titles)
            )
        sections.append((f"Most off-policy responses: {s.label}", "".join(body)))
    files = ["scores.jsonl", "summary.json"] + [f"{s.name}.jsonl" for s in sets if s.name != "scores"]
    if config.keep:
        files.append("kept.jsonl")
    sections.append(("Files", "<p class='note'>" + ", ".join(files) + ", plots/*.png</p>"))
    write_text_atomic(out / "report.html", report.page_html("onsft audit", sections, intro))


def html_escape(text: str) -> str:
    return html.escape(str(text))
