"""Command configuration: dataclasses with help text, a YAML file, and command-line overrides.

`parse_command(argv, ConfigA, ConfigB)` builds one argument parser from the dataclasses (through
transformers' `HfArgumentParser`, the convention TRL users know). `--config file.yaml` supplies values
that later `--field value` flags override. Unknown keys and wrong types are `UserError`s naming the
file and the key, so a typo in a config never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from onsft.errors import UserError


class _RaisingParser(HfArgumentParser):
    """argparse prints usage and exits on error; we want our one-line message and exit code 2."""

    config_source: str = "command line"

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(message, where=self.config_source, fix=f"see `{self.prog} --help`.")


def _yaml_to_argv(path: Path, known: dict[str, dataclasses.Field], multi: set[str] = frozenset()) -> list[str]:
    """Flags for the file's values; `multi` names the keys that take several values (lists)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read config ({error})", where=str(path), fix="pass a readable YAML file.") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise UserError(
            f"invalid YAML ({getattr(error, 'problem', error)})",
            where=str(path),
            line=mark.line + 1 if mark else None,
            fix="fix the YAML syntax.",
        ) from None
    if not isinstance(values, dict):
        raise UserError("config must be a mapping of field: value", where=str(path), fix="write `key: value` lines.")
    argv: list[str] = []
    lines = text.splitlines()
    for key, value in values.items():
        line = next((i + 1 for i, s in enumerate(lines) if s.lstrip().startswith(f"{key}:")), None)
        if key not in known:
            close = [k for k in known if k.replace("_", "") == str(key).replace("_", "").replace("-", "")]
            hint = f"did you mean `{close[0]}`?" if close else "remove it; `--help` lists the valid keys."
            raise UserError(f"unknown config key `{key}`", where=str(path), line=line, fix=hint)
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(value, bool):
            argv += [flag, str(value).lower()]
        elif isinstance(value, (list, tuple)):
            if key not in multi and len(value) != 1:
                # Spread into flags, the extra values would be reported as unknown options of the command line.
                raise UserError(
                    f"config key `{key}` must be a single value, not a list",
                    where=str(path),
                    line=line,
                    fix="write a plain value.",
                )
            argv += [flag, *[str(v) for v in value]]
        elif isinstance(value, dict):
            raise UserError(
                f"config key `{key}` must be a single value, not a mapping",
                where=str(path),
                line=line,
                fix="write a plain value.",
            )
        else:
            argv += [flag, str(value)]
    return argv


def _parse(parser: _RaisingParser, argv: list[str]):
    try:
        return parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ValueError as error:
        # Dataclass __post_init__ checks (e.g. TrainingArguments') raise ValueError: an option problem.
        raise UserError(
            str(error).strip().splitlines()[0], where=parser.config_source, fix=f"see `{parser.prog} --help`."
        ) from None


def parse_command(argv: list[str] | None, *config_types: type, prog: str = "onsft") -> tuple[Any, ...]:
    """Parse `argv` into instances of `config_types` (YAML via `--config`, then flags)."""
    argv = list(argv or [])
    # No abbreviations: `--learning_rat` must be an error, not silently `--learning_rate`.
    parser = _RaisingParser(config_types, prog=prog, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="YAML file of field: value; flags override it.")
    known = {f.name: f for t in config_types for f in dataclasses.fields(t)}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    ns, _ = pre.parse_known_args(argv)
    yaml_argv: list[str] = []
    if ns.config:
        path = Path(ns.config)
        if not path.exists():
            raise UserError("config file not found", where=str(path), fix="check the path given to --config.")
        parser.config_source = str(path)
        multi = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
        yaml_argv = _yaml_to_argv(path, known, multi)
        # Validate the file's values on their own first, so a wrong type names the file, not the command line.
        _parse(parser, yaml_argv)
        parser.config_source = "command line"
    *outputs, remaining = _parse(parser, yaml_argv + argv)
    if remaining:
        flag = next((r for r in remaining if r.startswith("--")), remaining[0])
        close = [k for k in known if k.replace("_", "") == flag.lstrip("-").replace("_", "").replace("-", "")]
        raise UserError(
            f"unknown option `{flag}`",
            where="command line",
            fix=f"did you mean `--{close[0]}`?" if close else f"see `{prog} --help`.",
        )
    # The namespace holding --config is not a dataclass; callers only want the dataclasses.
    return tuple(o for o in outputs if dataclasses.is_dataclass(o))


def to_dict(*configs: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return merged
