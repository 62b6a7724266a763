"""An experiment's data values as files: every generated spec (`organism:NAME`, reasoning-gym draws; the forms
are in `onsft.data.sources`) written once as JSONL under the experiment's folder and replaced by its path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from onsft.data.rows import load_examples
from onsft.data.sources import ORGANISM_PREFIX, gym_data, gym_draws, is_generated
from onsft.errors import UserError
from onsft.organism.tasks import write_demo_data
from onsft.runtime.records import write_jsonl_atomic


def _prompts(path: str) -> set[str]:
    return {json.dumps(e.prompt, sort_keys=True) for e in load_examples(path, require_response=False)}


def materialize(values: dict[str, Any], folder: Path, data_seed: int = 0) -> dict[str, Any]:
    """The data values with every generated spec replaced by the path of its written file. Excluded keys
    are materialised first, so a test draw can exclude the training draw."""
    resolved: dict[str, Any] = {}

    def resolve(key: str, stack: tuple[str, ...] = ()) -> Any:
        if key in resolved:
            return resolved[key]
        spec = values.get(key)
        if not is_generated(spec):
            resolved[key] = spec
        elif isinstance(spec, str):
            paths = {
                name: str(path)
                for name, path in write_demo_data(folder / f"organism-seed{data_seed}", seed=data_seed).items()
            }
            name = spec[len(ORGANISM_PREFIX) :]
            if name not in paths:
                raise UserError(
                    f"unknown built-in data `{spec}`",
                    where="experiment",
                    fix=f"use organism:NAME with NAME among {', '.join(sorted(paths))}.",
                )
            resolved[key] = paths[name]
        else:
            draws = gym_draws(spec, key)
            others = [
                o
                for d in draws
                for o in ([d["exclude"]] if isinstance(d.get("exclude"), str) else d.get("exclude") or [])
            ]
            for other in others:
                if other in stack or other not in values:
                    raise UserError(
                        f"`{key}` excludes `{other}`, which is " + ("a cycle" if other in stack else "not a data key"),
                        where="experiment",
                        fix="exclude another data key.",
                    )
            excluded = set().union(*[_prompts(resolve(o, (*stack, key))) for o in others]) if others else set()
            digest = hashlib.sha256(json.dumps([spec, sorted(excluded)], sort_keys=True).encode()).hexdigest()[:10]
            path = folder / f"{key}-{digest}.jsonl"
            if not path.is_file():
                write_jsonl_atomic(path, gym_data(draws, excluded))
            resolved[key] = str(path)
        return resolved[key]

    for key in values:
        resolve(key)
    return resolved
