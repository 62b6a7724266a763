"""`onsft eval`: accuracy (greedy pass@1, sampled pass@k), retention and KL drift of a model.

The stage is `onsft.pipeline.evaluate.stage` (what is measured, outputs, resuming); this module parses the
command line, calls its `run` (the same `run` as `onsft.commands.eval.run`) and prints the headline numbers.
"""

from __future__ import annotations

from onsft.pipeline.evaluate.stage import CONFIGS, EvalConfig, run
from onsft.runtime.records import dumps
from onsft.runtime.settings import parse_command

__all__ = ["EvalConfig", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    metrics = run(*parse_command(argv, *CONFIGS, prog="onsft eval"))
    shown = {k: metrics[k] for k in ("accuracy", "sampled_accuracy", "pass_at_k") if k in metrics}
    if "retention" in metrics:
        shown["retention_accuracy"] = metrics["retention"].get("accuracy")
    if "kl" in metrics:
        shown["kl_drift"] = metrics["kl"]["mean_kl_per_token"]
    print(dumps(shown))
    return 0
