"""Data sources an experiment can name instead of a file, written once as JSONL under the experiment's folder.

A data value in an experiment (`train_data`, `in_domain`, ...) is one of:
  - a path (or a Hub dataset name): used as it is;
  - `organism:NAME`: one of the embedded organism's seeded synthetic sets (`onsft.organism.tasks`);
  - a reasoning-gym draw, or a list of them concatenated (needs `pip install 'onsft[tasks]'`):
        {gym: chain_sum, size: 128, seed: 1, options: {max_terms: 3}, exclude: [train_data]}
    `exclude` names other data keys whose prompts must not appear (test sets drawn apart from training).
A gym draw is written to `<folder>/<key>-<hash of the spec>.jsonl`, so a changed spec is a new file and an
unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onsft.data import gym
from onsft.data.rows import load_examples
from onsft.errors import UserError
from onsft.organism.tasks import write_demo_data
from onsft.runtime.records import write_jsonl_atomic

ORGANISM_PREFIX = "organism:"
GYM_KEYS = {"gym", "size", "seed", "options", "answer_format", "exclude"}


def is_generated(spec: Any) -> bool:
    """True for specs this module writes (organism sets, gym draws), False for paths and Hub names."""
    return isinstance(spec, (dict, list)) or str(spec or "").startswith(ORGANISM_PREFIX)


def _gym_draws(spec: Any, key: str) -> list[dict]:
    draws = spec if isinstance(spec, list) else [spec]
    for draw in draws:
        if not isinstance(draw, dict) or "gym" not in draw or set(draw) - GYM_KEYS:
            extra = sorted(set(draw) - GYM_KEYS) if isinstance(draw, dict) else []
            raise UserError(
                f"`{key}` must be a path, organism:NAME, or gym draws like {{gym: TASK, size: N, seed: S}}"
                + (f" (unknown keys: {', '.join(extra)})" if extra else ""),
                where="experiment",
                fix=f"allowed keys of a gym draw: {', '.join(sorted(GYM_KEYS))}.",
            )
    return draws


def _prompts(path: str) -> set[str]:
    return {json.dumps(e.prompt, sort_keys=True) for e in load_examples(path, require_response=False)}


def gym_data(draws: list[Mapping[str, Any]], excluded: set[str]) -> list[dict]:
    """The rows of the draws, each `size` rows of its task whose prompt is not in `excluded` (more items are
    drawn from the same seed when some are excluded: gym rows for a seed grow by appending)."""
    rows: list[dict] = []
    for draw in draws:
        size, seed = int(draw.get("size", 100)), int(draw.get("seed", 0))
        options, answer_format = dict(draw.get("options") or {}), str(draw.get("answer_format", "boxed"))
        wanted = size + len(excluded)
        drawn = gym.gym_rows(str(draw["gym"]), wanted, seed, options=options, answer_format=answer_format)
        kept = [
            r for r in drawn if json.dumps([{"role": "user", "content": r["prompt"]}], sort_keys=True) not in excluded
        ][:size]
        if len(kept) < size:
            raise UserError(
                f"gym task {draw['gym']} gave only {len(kept)} rows not excluded (asked for {size})",
                where="experiment",
                fix="lower `size` or change `seed`.",
            )
        rows += kept
    return rows


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
            draws = _gym_draws(spec, key)
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
