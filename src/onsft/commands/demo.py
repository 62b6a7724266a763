"""`onsft demo`: the whole story on the embedded model organism, on a CPU, in minutes.

The stage is `onsft.pipeline.demo.stage` (the steps, the experiment it runs); this module parses the command
line and calls its `run`, the same `run` as `onsft.commands.demo.run`.
"""

from __future__ import annotations

from onsft.pipeline.demo.stage import CONFIGS, DemoConfig, run
from onsft.runtime.settings import parse_command

__all__ = ["DemoConfig", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    run(*parse_command(argv, *CONFIGS, prog="onsft demo"))
    return 0
