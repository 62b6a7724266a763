"""Settings records and when two of them describe the same run (the run guard, the stores' partial files and
compare's caches all decide it here).

A record is a command's settings as plain JSON values (`normalized`). Records saved by an older onsft lack
the options added since; a run recorded then ran with what is now the option's default, so a key that only
one of the two records holds does not count as a change when its value is the newer code's default
(`config_defaults` reads them from the settings' dataclasses). Any other difference does.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def normalized(settings: Any) -> Any:
    """Settings as plain JSON values (tuples -> lists, paths and dtypes -> strings), so a saved copy compares
    equal to a fresh one."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def config_defaults(config: Any) -> dict:
    """The default of every field of a dataclass (an instance or its class) that has one, normalised: what a
    record written before that field existed implicitly ran with."""
    found = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            found[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            found[f.name] = f.default_factory()
    return normalized(found)


def changed_keys(old: Any, new: Any, prefix: str = "", defaults: Any = None) -> list[str]:
    """Dotted names of the settings that differ between a saved record `old` and a fresh one `new` (nested
    dicts, and lists of equal length, are compared item by item). A key only one of them has is unchanged
    when its value equals `defaults` at that key (a dict value: when each of its keys holds its default)."""
    if isinstance(old, dict) and isinstance(new, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        found = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}{key}."
            if key in old and key in new:
                found += changed_keys(old[key], new[key], name, defaults.get(key))
            elif not _holds_default(old[key] if key in old else new[key], defaults, key):
                found.append(name.rstrip("."))
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and old != new:
        parts = defaults if isinstance(defaults, list) and len(defaults) == len(old) else [None] * len(old)
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in changed_keys(a, b, f"{prefix}{i}.", parts[i])]
    return [] if normalized(old) == normalized(new) else [prefix.rstrip(".") or "settings"]


def _holds_default(value: Any, defaults: dict, key: str) -> bool:
    if key not in defaults:
        return False
    default = defaults[key]
    if isinstance(value, dict) and isinstance(default, dict):
        return not changed_keys({}, value, defaults=default)
    return normalized(value) == normalized(default)


def same_settings(old: Any, new: Any, defaults: Any = None) -> bool:
    """Whether a saved record and a fresh one describe the same run (see `changed_keys`)."""
    return not changed_keys(old, new, defaults=defaults)


def group_defaults(**configs: Any) -> dict:
    """`config_defaults` of each settings group, named as in the record ({"model": ModelArguments(...), ...})."""
    return {name: config_defaults(config) for name, config in configs.items() if config is not None}
