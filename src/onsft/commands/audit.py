"""`onsft audit`: how off-policy is a dataset for a model? (DDT, spec section 1)

The stage is `onsft.pipeline.audit.stage` (what it measures and writes); this module parses the command line
and calls its `run`, the same `run` as `onsft.commands.audit.run`.
"""

from __future__ import annotations

from onsft.pipeline.audit.stage import CONFIGS, AuditConfig, run
from onsft.runtime.settings import parse_command

__all__ = ["AuditConfig", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    run(*parse_command(argv, *CONFIGS, prog="onsft audit"))
    return 0
