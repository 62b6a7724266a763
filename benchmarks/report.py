"""docs/benchmarks.md's tables, written from the JSON under benchmarks/results/ (never typed by hand).

Each benchmark's table sits between `<!-- BEGIN name -->` and `<!-- END name -->` in docs/benchmarks.md, where
name is the JSON file's name without `.json` (`hinted`, `hinted-smollm2-135m`, ...); the part before the first
`-` picks the renderer. This rewrites what is between the markers of every result whose JSON exists and leaves
the rest of the page alone.

    python benchmarks/report.py [--results benchmarks/results] [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cell(s: dict, digits: int = 2) -> tuple[str, str, str]:
    """(median, 'min-max; IQR q1-q3', rounds) of a spread."""
    f = f"{{:.{digits}f}}"
    return (
        f"{f.format(s['median'])}x",
        f"{f.format(s['min'])}-{f.format(s['max'])}; IQR {f.format(s['q1'])}-{f.format(s['q3'])}",
        str(s["n"]),
    )


def short_clock(r: dict) -> str:
    threads = r["machine"]["torch_threads"]
    return f"{'CPU time' if r['clock'] == 'cpu' else 'wall'}, {threads} thread{'s' if threads != 1 else ''}"


def table(rows: list[tuple[str, dict, int]], clock: str) -> list[str]:
    lines = ["| setting | median ratio | spread (range; IQR) | rounds | clock |", "|---|---|---|---|---|"]
    for label, s, digits in rows:
        median, spread, n = cell(s, digits)
        lines.append(f"| {label} | **{median}** | {spread} | {n} | {clock} |")
    return lines


def train_step(r: dict) -> list[str]:
    s, ratios = r["settings"], r["ratios"]
    lines = [
        f"Llama from a config: vocabulary {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers, "
        f"{s['batch']} x {s['seq']} tokens (a quarter masked as prompt), forward + backward per step, "
        f"{len(r['step_seconds'])} variants in turns. Ratios are step times (< 1: faster than the baseline).",
        "",
    ]
    rows = [
        ("**IDFT / TRL nll, same tiles 1024 x 8192** (the weighting's cost)", "idft@cpu / trl_nll@cpu"),
        ("**IDFT / TRL nll, same tiles 4096 x 32768** (the weighting's cost)", "idft@trl / trl_nll@trl"),
        ("tile choice alone: TRL nll at 1024 x 8192 / at TRL's default 4096 x 32768", "trl_nll@cpu / trl_nll@trl"),
        ("onsft as shipped (IDFT, 1024 x 8192) / TRL as shipped (nll, 4096 x 32768)", "idft@cpu / trl_nll@trl"),
        ("onsft nll / TRL nll, same tiles 1024 x 8192", "nll@cpu / trl_nll@cpu"),
        ("DFT / TRL nll, same tiles 1024 x 8192", "dft@cpu / trl_nll@cpu"),
        ("EAFT / onsft nll, 1024 x 8192", "eaft@cpu / nll@cpu"),
        ("ASFT / onsft nll, 1024 x 8192", "asft@cpu / nll@cpu"),
        ("naive fp32 full-logit IDFT / IDFT 1024 x 8192", "naive_fp32 / idft@cpu"),
    ]
    found = [(label, next((v for k, v in ratios.items() if k.startswith(key)), None), 3) for label, key in rows]
    found = [row for row in found if row[1] is not None]
    if "top_k" in r:
        t = r["top_k"]
        label = f"EAFT's top-K alone ({t['rows']} rows): 1024 x 8192 tiles / full fp32 logits"
        found.append((label, t["tiles_over_full_logits"], 3))
    lines += table(found, short_clock(r))
    mem = r["memory"]["step_mib"]
    lines += [
        "",
        "Step memory (MiB above the resident set before the step, one fresh process per variant, one step):",
        "",
        "| variant | step memory (MiB) |",
        "|---|---|",
    ]
    lines += [f"| {v} | {mib:.0f} |" for v, mib in mem.items()]
    lines += ["", "| memory ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in r["memory"]["ratios"].items()]
    losses = r["losses"]
    lines += [
        "",
        f"Equal work: the loss of onsft's nll at 1024 x 8192 is {losses['nll@cpu']:.6f}, TRL's "
        f"{losses['trl_nll@cpu']:.6f}; IDFT's is {losses['idft@cpu']:.6g} at 1024 x 8192 and "
        f"{losses['idft@trl']:.6g} at 4096 x 32768 (naive fp32: {losses['naive_fp32']:.6g}).",
    ]
    return lines


def audit(r: dict) -> list[str]:
    s, pos, ratios = r["settings"], r["head_positions"], r["throughput_ratio_vs_forward"]
    v = r["variants"]
    lines = [
        f"Llama from a config: vocabulary {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers; "
        f"{s['batches']} padded batches of {s['batch_size']} ragged rows of ~{s['seq_len']} tokens; "
        f"tiles {r['tiles']['row_chunk']} x {r['tiles']['vocab_chunk']}. Ratios are throughput over the "
        f"plain forward's (> 1: faster); LM-head positions: forward {pos['forward']} (every padded position).",
        "",
    ]
    labels = {
        "audit_all": f"**audit on every position / forward** (equal token counts: {pos['audit_all']} real "
        f"positions vs the forward's {pos['forward']} padded ones)",
        "audit": f"**audit on response positions / forward** (what `onsft audit` does: {pos['audit']} positions)",
        "audit_fused": f"audit, torch.compile-fused tiles / forward ({pos['audit']} positions)",
        "naive_ddt": "naive fp32 full-logit DDT / forward",
    }
    lines += table([(labels[n], ratios[n], 2) for n in labels if n in ratios], short_clock(r))
    lines += ["", "| variant | peak memory above the set-up (MiB) | vs forward |", "|---|---|---|"]
    base = v["forward"]["peak_delta_mib"]
    for name, d in v.items():
        if d["peak_delta_mib"] is not None:
            ratio = f"{d['peak_delta_mib'] / base:.2f}x" if base else "-"
            lines.append(f"| {name} | {d['peak_delta_mib']:.0f} | {ratio} |")
    diffs = r["max_abs_phi_difference_to_naive_fp32"]
    if diffs:
        shown = ", ".join(f"{k} {d:.1e}" for k, d in diffs.items())
        lines += ["", f"Equal results: max |phi - phi of the naive fp32 scorer|: {shown}."]
    return lines


def real_model(r: dict) -> bool:
    """A result of `--model` (a loaded model with real-text prompts), not of the random default."""
    return r.get("model") not in (None, "random Llama")


def hinted_model(r: dict, params_millions: float) -> str:
    """The model and prompts of a hinted.py result, in words."""
    s = r["settings"]
    if not real_model(r):
        return (
            f"Llama from a config, {params_millions}M parameters (hidden {s['hidden']}, {s['layers']} layers, "
            f"vocabulary {s['vocab']})"
        )
    q = r["prompts"]
    beta = "the default" if q["beta"] is None else q["beta"]
    return (
        f"`{r['model']}` ({params_millions}M parameters, vocabulary {s['vocab']}, float32); prompts: "
        f"{' and '.join(q['tasks'])} questions from reasoning-gym with onsft's worked references, the hinted "
        f"context in the {q['hint_form']} form ({q['hint_source']}), answer markers `{q['answer_marker']}`, beta {beta}"
    )


def run_time(r: dict) -> str:
    """'The run took ...' from a result's load_seconds / run_seconds ('' when absent)."""
    if "run_seconds" not in r:
        return ""
    run, load = r["run_seconds"], r["load_seconds"]
    return (
        f"The whole run took {run['cpu']:.0f} s of CPU time, {run['wall']:.0f} s wall (loading the model and "
        f"tokenizer: {load['wall']:.0f} s wall)."
    )


def handovers(r: dict, top: int) -> str:
    h = r["hinted_stats"]
    return (
        f"Hinted decoding's batch at L = {top} (last round): {h['handovers']} of {r['settings']['batch']} rows "
        f"handed over to the plain context at an answer marker; mean lambda {h['mean_lambda']:.2f}."
    )


def hinted(r: dict) -> list[str]:
    s, ratios, p = r["settings"], r["ratios"], r["prompt_mean_tokens"]
    top = max(s["lengths"])
    lines = [
        f"{hinted_model(r, s['params_millions'])}; batch {s['batch']}; prompt means: plain {p['plain']:.0f}, hinted "
        f"{p['hinted']:.0f} tokens (the {s['ref_examples']} examples of the single-row and reference variants: "
        f"{p['plain_reference_examples']:.0f} / {p['hinted_reference_examples']:.0f}). Ratios are generated "
        f"tokens/s over the baseline's (> 1: faster).",
        "",
    ]
    rows = []
    for n in s["lengths"]:
        same = r["single_tokens_equal_batched"][str(n)]
        rows += [
            (f"L = {n}: caching (cached single row / reference)", ratios[f"caching@{n}"], 1),
            (
                f"L = {n}: batching (cached batch of {s['batch']} / cached single row; same tokens: {same})",
                ratios[f"batching@{n}"],
                2,
            ),
            (f"**L = {n}: total (cached batch / reference)**", ratios[f"total@{n}"], 1),
        ]
    rows += [
        (
            f"**hinted decoding / HF `generate` on the plain contexts** (batch {s['batch']}, L = {top})",
            ratios["hinted_vs_hf_generate"],
            2,
        ),
        (
            f"onsft `generate` / HF `generate`, plain contexts (batch {s['batch']}, L = {top})",
            ratios["ours_generate_vs_hf_generate"],
            2,
        ),
        (f"hinted decoding / onsft `generate` on the plain contexts (L = {top})", ratios["hinted_vs_ours_generate"], 2),
    ]
    lines += table(rows, short_clock(r))
    if real_model(r):
        lines += ["", *rates(r), "", handovers(r, top) + " " + run_time(r)]
    return lines


def rates(r: dict) -> list[str]:
    """Every variant's generated tokens/s (median and range over rounds)."""
    lines = ["| variant | generated tokens | tokens/s (median) | range |", "|---|---|---|---|"]
    for name, v in r["tokens_per_s"].items():
        lines.append(f"| {name} | {r['tokens_per_call'][name]} | {v['median']:.1f} | {v['min']:.1f}-{v['max']:.1f} |")
    return lines


def hinted_breakdown(r: dict) -> list[str]:
    s, p = r["settings"], r["prompt_mean_tokens"]
    n, b = max(s["lengths"]), s["batch"]
    rows = [
        (
            f"hinted decoding / HF `generate` on the plain contexts (batch {b}, L = {n}; tokens/s)",
            r["hinted_vs_hf_generate"],
            2,
        ),
        (
            f"hinted decoding / HF `generate` on both contexts ({2 * b} rows: the same prompts and steps; time)",
            r["hinted_vs_hf_generate_both_contexts"],
            2,
        ),
        (
            "hinted decoding's prefill (1 new token) / the whole hinted decode (share of its time)",
            r["prefill_share_of_hinted"],
            2,
        ),
    ]
    lines = [
        f"`hinted.py --breakdown`, a separate run of the same model and prompts (plain {p['plain']:.0f}, hinted "
        f"{p['hinted']:.0f} tokens on average):",
        "",
        *table(rows, short_clock(r)),
    ]
    if real_model(r):
        lines += ["", handovers(r, n) + " " + run_time(r)]
    return lines


def skewed(r: dict) -> list[str]:
    s, c = r["settings"], r["counts"]
    n_short = s["examples"] - s["long_examples"]
    model = "The organism" if r.get("model", "organism") == "organism" else f"`{r['model']}`"
    lines = [
        f"{model} ({s['params'] / 1e6:.1f}M parameters), greedy, {s['examples']} examples at batch {s['batch']}: "
        f"{n_short} stop at {s['short_tokens']} tokens and {s['long_examples']} run to {s['long_tokens']} (long ones "
        f"{s['long_at']} in admission order), against a uniform workload of the same {c['uniform']['tokens']} tokens. "
        "Ratios are generated tokens/s over the baseline's (> 1: faster); targets: continuous / static >= "
        f"{r['targets']['continuous/static']}, continuous / uniform >= {r['targets']['continuous/uniform']}.",
        "",
    ]
    rows = [
        ("**continuous / static schedule** (skewed workload)", r["ratios"]["continuous/static"], 2),
        ("**continuous (skewed) / uniform workload**", r["ratios"]["continuous/uniform"], 2),
        ("static (skewed) / uniform workload", r["ratios"]["static/uniform"], 2),
    ]
    lines += table(rows, short_clock(r))
    lines += ["", "| variant | decode steps | idle slot-steps | admissions | rows moved | whole-cache copies |"]
    lines.append("|---|---|---|---|---|---|")
    for name, v in c.items():
        lines.append(
            f"| {name} | {v['decode_steps']} | {100 * v['idle_slot_share']:.0f}% | {v['admissions']} | "
            f"{v['row_moves']} | {v['whole_copies']} |"
        )
    lines += ["", f"Equal work: static and continuous gave identical tokens: {r['static_equals_continuous']}."]
    if "step_cost" in r:
        c = r["step_cost"]
        steps = {name: v["decode_steps"] for name, v in r["counts"].items()}
        lines += [
            "",
            f"Where the time goes (per round, the line time = a x decode steps + c through the three variants; all "
            f"make {r['counts']['uniform']['row_steps']} row-steps):",
            "",
            "| quantity | median | range |",
            "|---|---|---|",
            f"| a: fixed cost of a decode step (ms) | {c['step_ms']['median']:.1f} | "
            f"{c['step_ms']['min']:.1f}-{c['step_ms']['max']:.1f} |",
            f"| c: cost independent of the schedule (s) | {c['rest_s']['median']:.2f} | "
            f"{c['rest_s']['min']:.2f}-{c['rest_s']['max']:.2f} |",
            f"| c per row-step, an upper bound on the per-row cost (ms) | {c['rest_per_row_step_ms']['median']:.2f} | "
            f"{c['rest_per_row_step_ms']['min']:.2f}-{c['rest_per_row_step_ms']['max']:.2f} |",
            f"| fixed step costs' share of continuous (a x {steps['continuous']} / (a x {steps['continuous']} + c)) | "
            f"{c['fixed_share_continuous']['median']:.2f} | {c['fixed_share_continuous']['min']:.2f}-"
            f"{c['fixed_share_continuous']['max']:.2f} |",
        ]
    if run_time(r):
        lines += ["", run_time(r)]
    return lines


RENDER = {
    "train_step": train_step,
    "audit": audit,
    "hinted": hinted,
    "hinted_breakdown": hinted_breakdown,
    "skewed": skewed,
    "skewed_long_first": skewed,
}


def renderer(name: str):
    """The renderer of a result named `name` (its JSON file's stem): RENDER[the part before the first '-']."""
    return RENDER.get(name.split("-", 1)[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    doc = Path(args.doc)
    text = doc.read_text()
    for path in sorted(Path(args.results).glob("*.json")):
        name, render = path.stem, renderer(path.stem)
        begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
        if render is None or begin not in text:
            continue
        block = "\n".join([begin, *render(json.loads(path.read_text())), end])
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + block + text[stop:]
    doc.write_text(text)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
