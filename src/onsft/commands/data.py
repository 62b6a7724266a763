"""`onsft data <gym|organism|replay>`: write the built-in synthetic datasets, reasoning-gym tasks or a replay set.

The stage is `onsft.pipeline.data.stage` (each data set, its run record); this module parses the command line
and calls its `run`, the same `run` as `onsft.commands.data.run`.
"""

from __future__ import annotations

import sys

from onsft.errors import UserError
from onsft.pipeline.data.stage import CONFIGS, SUBCOMMANDS, GymDataConfig, OrganismDataConfig, ReplayDataConfig, run
from onsft.runtime.settings import parse_command

__all__ = ["GymDataConfig", "OrganismDataConfig", "ReplayDataConfig", "main", "run"]


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: onsft data <gym|organism|replay> [options]   (onsft data <name> --help for its options)", ""]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in CONFIGS:
        raise UserError(f"unknown data set `{name}`", where="onsft data", fix=f"use one of: {', '.join(SUBCOMMANDS)}.")
    parts = parse_command(rest, *CONFIGS[name], prog=f"onsft data {name}")
    result = run(*parts)
    if name == "replay":
        print(f"onsft data: {result['rows']} replay rows of {result['prompts']} prompts -> {parts[0].out}")
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
