"""Which options a command line gives: the one reader of argv (and its `--config` YAML file) before or beside a
command's real parser (`onsft.runtime.settings.parse_command`), which reports every problem with them.

Light on purpose (argparse and yaml only): `onsft.cli` reads `--verbose` with it before any library loads.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import yaml


def given_values(argv: Iterable[str] | None, names: Iterable[str], config_file: bool = True) -> dict[str, object]:
    """{name: value} for each of `names` given as `--name value`, `--name=value` or a bare `--name` (True), else
    (with `config_file`) as a key of the `--config` YAML file, whatever the value: a flag given with its default
    value is still given. Names not given are left out; a flag wins over the file. Anything unreadable (a
    broken file, a malformed flag) counts as not given: the command's parser reports it."""
    argv, names = list(argv or []), list(names)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for name in names:
        pre.add_argument(f"--{name}", dest=name, nargs="?", const=True, default=None)
    if config_file and "config" not in names:
        pre.add_argument("--config", dest="config", default=None)
    try:
        known, _ = pre.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return {}
    values = {name: getattr(known, name) for name in names if getattr(known, name) is not None}
    config = getattr(known, "config", None) if config_file else None
    if isinstance(config, str) and Path(config).is_file():
        try:
            loaded = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            loaded = None
        if isinstance(loaded, dict):
            values = {name: loaded[name] for name in names if name in loaded} | values
    return {name: values[name] for name in names if name in values}
