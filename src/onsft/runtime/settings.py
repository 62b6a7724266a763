"""Settings: dataclasses with help text, composed per command, read from flags, a YAML file or a dict.

Each group of settings is declared once, in the layer that uses it (`ModelArguments` in
`onsft.runtime.models`, `SamplingConfig` and `HintedConfig` in `onsft.engine`, `LossConfig` in
`onsft.formulas.weighting`, ...), and a command composes the groups it needs, as TRL composes its
`ModelConfig` with a trainer's config:
  - `parse_command(argv, ConfigA, ConfigB)` builds one argument parser from the dataclasses (through
    transformers' `HfArgumentParser`). `--config file.yaml` supplies values that later `--field value`
    flags override;
  - `configs_from_dict(values, ConfigA, ConfigB)` builds the same objects from a mapping (an experiment
    file's section), for commands that run other commands in process.
Unknown keys, wrong types and non-finite numbers are `UserError`s naming the file and the key, so a typo
never silently falls back to a default and a NaN never reaches a computation.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from onsft.errors import UserError
from onsft.runtime.given import given_values

_NUMBER = r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
NEGATIVE_NUMBERS = re.compile(rf"^-{_NUMBER}(,\s*-?{_NUMBER})*$")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each help text, except for `--no_X` switches (their 'default' is not a setting)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if _negation(action):
            return action.help or ""
        return super()._get_help_string(action)


def _negation(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreFalseAction) and any(o.startswith("--no_") for o in action.option_strings)


class _RaisingParser(HfArgumentParser):
    """argparse prints usage and exits on error; we want our one-line message and exit code 2."""

    config_source: str = "command line"

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, formatter_class=_HelpFormatter, **kwargs)
        # argparse takes `-1,2` (a list of numbers starting with a negative one) for an option: it is a value.
        self._negative_number_matcher = NEGATIVE_NUMBERS
        for action in self._actions:
            # transformers parses an optional bool (`bf16: bool | None`, None = decide from the hardware) only
            # with a value; `--bf16` alone means true, as for every other switch.
            if action.type is string_to_bool and action.nargs is None and action.option_strings:
                action.nargs, action.const = "?", True
            # transformers gives `--no_X` the help of `--X`; say what the switch does.
            if _negation(action) and action.help:
                text = action.help.strip()
                action.help = f"Do not: {text[:1].lower()}{text[1:]} (same as --{action.dest} false)"

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


def parse_command(
    argv: list[str] | None,
    *config_types: type,
    prog: str = "onsft",
    yaml_config: bool = True,
    description: str | None = None,
) -> tuple[Any, ...]:
    """Parse `argv` into instances of `config_types` (YAML via `--config`, then flags). With
    `yaml_config=False`, `--config` is not a file of flags (a config type may declare it for itself);
    `description` heads `--help`."""
    argv = list(argv or [])
    # No abbreviations: `--learning_rat` must be an error, not silently `--learning_rate`.
    parser = _RaisingParser(config_types, prog=prog, allow_abbrev=False, description=description)
    if yaml_config:
        parser.add_argument("--config", type=str, default=None, help="YAML file of field: value; flags override it.")
    known = {f.name: f for t in config_types for f in dataclasses.fields(t)}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    ns, _ = pre.parse_known_args(argv) if yaml_config else (argparse.Namespace(config=None), [])
    yaml_argv: list[str] = []
    if ns.config:
        path = Path(ns.config)
        if not path.exists():
            raise UserError("config file not found", where=str(path), fix="check the path given to --config.")
        parser.config_source = str(path)
        multi = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
        yaml_argv = _yaml_to_argv(path, known, multi)
        # Validate the file's values on their own first, so a wrong type names the file, not the command line.
        check_finite([o for o in _parse(parser, yaml_argv)[:-1] if dataclasses.is_dataclass(o)], str(path))
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
    for config_type in config_types:  # old flag names still parse; say once which name to use now
        renamed = getattr(config_type, "RENAMED_FLAGS", {})
        for old in given_values(argv, list(renamed), config_file=False):
            print(
                f"onsft: warning: --{old} is deprecated here; use --{renamed[old]} (the same setting).", file=sys.stderr
            )
    # The namespace holding --config is not a dataclass; callers only want the dataclasses.
    configs = tuple(o for o in outputs if dataclasses.is_dataclass(o))
    check_finite(configs, "command line")
    return configs


def given_options(argv: list[str] | None, config_type: type, config_file: bool = True) -> list[str]:
    """The fields of `config_type` set on the command line or (with `config_file`) in its --config file,
    whatever their value (a flag given with its default value is still given: `--loss idft` where it does not
    apply is an error). Read by `onsft.runtime.given.given_values`, the one reader of given options."""
    return list(given_values(argv, [f.name for f in dataclasses.fields(config_type)], config_file))


def field_like(config_type: type, name: str, why: str | None = None, **default: Any) -> Any:
    """The field `name` of `config_type` declared again (its help) for a config that drives that one under its
    own name and default (`default=` or `default_factory=`): the help is written once, where the setting lives.
    `why` replaces the help where the driving config's own default changes what the help must say."""
    source = {f.name: f for f in dataclasses.fields(config_type)}[name]
    metadata = dict(source.metadata)
    if why is not None:
        metadata["help"] = why
    return dataclasses.field(metadata=metadata, **default)


def check_finite(configs, where: str) -> None:
    """Refuse NaN and infinite values in any float setting: a NaN compares false with every bound, so it
    would pass range checks and turn into garbage (or invalid JSON) far from the flag that caused it."""
    for config in configs:
        renamed = getattr(config, "RENAMED_FLAGS", {})
        for f in dataclasses.fields(config):
            value = getattr(config, f.name, None)
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, float) and not math.isfinite(item):
                    flag = renamed.get(f.name, f.name)
                    raise UserError(
                        f"`{f.name}` must be a finite number, got {item}", where=where, fix=f"pass a finite --{flag}."
                    )


def _scalar_mismatch(value: Any, hint: Any) -> str | None:
    """The type a number or flag field wants ('int', 'float', 'bool') when `value` is not one; None when it is,
    or when the field takes other types too (the dataclass judges those)."""
    if value is None:
        return None
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if not options or not all(o in (int, float, bool) for o in options):
        return None
    fits = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }
    return None if any(fits[o] for o in options) else options[0].__name__


def _coerce(value: Any, hint: Any) -> Any:
    """A YAML value turned into the field's type where YAML and the type disagree (PyYAML reads `2e-4` as a
    string; `3.0` given for an int); anything else is returned as it is for the dataclass to judge."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for option in typing.get_args(hint):
            if option is type(None):
                continue
            coerced = _coerce(value, option)
            if coerced is not value or isinstance(value, option if isinstance(option, type) else ()):
                return coerced
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        return [_coerce(v, args[0]) if args else v for v in value]
    if hint is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    if hint is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    if hint is int and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum) and isinstance(value, str):
        return value  # transformers' dataclasses accept the strings of their enums
    return value


def configs_from_dict(
    values: dict[str, Any], *config_types: type, where: str = "experiment", section: str = ""
) -> tuple[Any, ...]:
    """Instances of `config_types` from one mapping of field: value (each key goes to the types that have it).
    Unknown keys, values a type rejects and non-finite numbers are `UserError`s naming `where`; an unknown key
    is shown as the flag it would be (`--key`), or as an option of `section` when the mapping is not flags."""
    owners: dict[str, list[type]] = {}
    for config_type in config_types:
        for f in dataclasses.fields(config_type):
            if f.init:
                owners.setdefault(f.name, []).append(config_type)
    unknown = [key for key in values if key not in owners]
    if unknown:
        close = [k for k in owners if k.replace("_", "") == str(unknown[0]).replace("_", "").replace("-", "")]
        raise UserError(
            f"unknown {section} option `{unknown[0]}`" if section else f"unknown option `--{unknown[0]}`",
            where=where,
            fix=f"did you mean `{close[0]}`?" if close else "valid options: " + ", ".join(sorted(owners)) + ".",
        )
    configs = []
    for config_type in config_types:
        hints = typing.get_type_hints(config_type)
        own = {k: _coerce(v, hints.get(k)) for k, v in values.items() if config_type in owners[k]}
        for key, value in own.items():
            # A number field given text would fail far from its key ("'<=' not supported between 'str' and 'int'").
            if (wanted := _scalar_mismatch(value, hints.get(key))) is not None:
                raise UserError(
                    f"{section + ' ' if section else ''}option `{key}`: invalid {wanted} value: {value!r}",
                    where=where,
                    fix=f"give `{key}` a{'n' if wanted == 'int' else ''} {wanted}.",
                )
        try:
            configs.append(config_type(**own))
        except (TypeError, ValueError) as error:
            raise UserError(str(error).strip().splitlines()[0], where=where, fix="check the option's value.") from None
    check_finite(configs, where)
    return tuple(configs)


def to_dict(*configs: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return merged
