"""`onsft rewrite`: turn off-policy reference solutions into the model's own, verified responses.

The stage is `onsft.pipeline.rewrite.stage` (the pipeline per prompt, outputs, resuming); this module parses
the command line, calls its `run` (the same `run` as `onsft.commands.rewrite.run`) and prints one line.
"""

from __future__ import annotations

import sys

from onsft.pipeline.rewrite.rewrite_summary import advice
from onsft.pipeline.rewrite.stage import CONFIGS, RewriteConfig, run
from onsft.runtime.settings import parse_command

__all__ = ["RewriteConfig", "main", "run"]


def _line(summary: dict) -> str:
    phi = summary["mean_phi"]

    def fmt(stats: dict) -> str:
        return f"{stats['mean_phi']:.3f}" if stats.get("n") else "-"

    def z_of(kind: str) -> str:  # mean Z: 0 for the model's own samples, > 0 sharper, < 0 off-policy
        stats = summary["z"][kind]
        return f" (Z {stats['mean_z']:+.2f})" if stats.get("n") else ""

    speed = summary.get("tokens_per_second")
    by_n, marker = summary["yield"]["by_samples"], summary["answer_marker"]
    shares = ", ".join(f"{entry['share']:.0%}" for entry in by_n)
    best_of_n = f"; failed prompts rewritten with 1..{len(by_n)} samples: {shares}" if len(by_n) > 1 else ""
    handed = f"; {marker['share']:.0%} of hinted samples reached the answer marker" if marker["candidates"] else ""
    return (
        f"onsft rewrite: {summary['rows']} prompts: own-correct {summary['own_correct']}, rewritten "
        f"{summary['rewritten']}, dropped {summary['dropped']}{best_of_n}{handed}; mean phi references "
        f"{fmt(phi['references'])} "
        f"(of rewritten rows {fmt(phi['references_of_rewritten'])}) -> rewritten {fmt(phi['rewritten'])}{z_of('rewritten')}, "
        f"own {fmt(phi['own'])}{z_of('own')}; {summary['generated_tokens_this_run']} tokens generated"
        + (f" at {speed:.0f} tokens/s" if speed else "")
        + f", {summary['wall_seconds']:.1f} s; "
        f"{summary['files']['train']}"
    )


def main(argv: list[str] | None = None) -> int:
    summary = run(*parse_command(argv, *CONFIGS, prog="onsft rewrite"))
    if summary is not None:
        for note in advice(summary, summary["hint"]):
            print(f"onsft rewrite: warning: {note}", file=sys.stderr)
        print(_line(summary))
    return 0
