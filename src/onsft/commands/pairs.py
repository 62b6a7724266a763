"""`onsft pairs`: DPO / SimPO preference pairs from the model's own samples.

The stage is `onsft.pipeline.pairs.stage` (how pairs are chosen, the output format); this module parses the
command line, calls its `run` (the same `run` as `onsft.commands.pairs.run`) and prints the counts.
"""

from __future__ import annotations

from onsft.pipeline.pairs.stage import CONFIGS, PairsConfig, run
from onsft.runtime.records import dumps
from onsft.runtime.settings import parse_command

__all__ = ["PairsConfig", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    summary = run(*parse_command(argv, *CONFIGS, prog="onsft pairs"))
    print(dumps({k: summary[k] for k in ("prompts", "pairs", "outcomes", "chosen_sources")}))
    return 0
