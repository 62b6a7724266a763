"""frontier.md: the frontier's readings (`frontier_readings`) as text."""

from __future__ import annotations

import statistics

from onsft.formulas.frontier import level_side, reading_at_level
from onsft.pipeline.compare.experiment import Experiment
from onsft.pipeline.compare.frontier_readings import NAMES, curve_series, read_axis


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def interval_text(d: dict, signed: bool = False, scale: float = 100, digits: int = 1) -> str:
    """An interval (`Interval.__dict__`) as "mean [low, high]" (in % by default: `scale` 100), with signs for
    differences."""
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(scale * d['mean'])} [{f.format(scale * d['low'])}, {f.format(scale * d['high'])}]"


def reading_name(axis: str, level: float) -> str:
    """What a matched level on `axis` reads, e.g. "retention @ in-domain 50%"."""
    return f"{NAMES[read_axis(axis)]} @ {NAMES[axis]} {100 * level:.0f}%"


def _matched_text(m: dict) -> str:
    """A method's matched reading (`_matched_json`'s form) as "mean [low, high]" in %."""
    at = f" at {m['setting']}" if m.get("setting") else ""
    if m["interval"] is None:
        return f"not reached ({m['reached']}/{m['seeds']} seeds){at if m['reached'] else ''}"
    return interval_text(m["interval"]) + at


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
        "A step resumed after a kill counts the time of its earlier runs too, as far as their last checkpoint or "
        "written rows (the work redone after that, once).",
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
                    reading_at_level(*s, level) if (s := curve_series(c, axis, read_axis(axis))) else None for c in mine
                ]
                reached = [v for v in found if v is not None]
                side = {level_side(s[0], level) for c in mine if (s := curve_series(c, axis, read_axis(axis)))}
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
    lines += _drift_lines(summary.get("drift"))
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


def _nats(d: dict, signed: bool = False) -> str:
    return interval_text(d, signed, scale=1, digits=3)


def _drift_lines(drift: dict | None) -> list[str]:
    if not drift:
        return []
    level = f"in-domain {100 * drift['level']:.0f}%"
    lines = [
        "",
        f"## KL drift at matched skill ({level})",
        "",
        "KL(base || model) in nats per token on the base model's own continuations of the KL prompts, read where "
        f"each curve first reaches {level} (linearly between the checkpoints that bracket it), at the setting of "
        "the method's retention reading; mean [95% bootstrap interval over seeds]: how far the model moved on "
        "unrelated prompts to gain that skill.",
        "",
        "| method | setting | KL drift |",
        "|---|---|---|",
    ]
    for method, m in drift["methods"].items():
        text = _nats(m["interval"]) if m["interval"] else f"not reached ({m['reached']}/{m['seeds']} seeds)"
        lines.append(f"| {method} | {m.get('setting') or '-'} | {text} |")
    if drift["contrasts"]:
        lines += ["", f"| A | B | A - B: KL drift @ {level} (nats/token, paired by seed) |", "|---|---|---|"]
        for c in drift["contrasts"]:
            diff = c["difference"]
            lines.append(
                f"| {c['a']} | {c['b']} | {_nats(diff, True) if diff else 'not reached by both in a shared seed'} |"
            )
    return lines
