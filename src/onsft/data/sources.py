"""Data sources an experiment can name instead of a file, written once as JSONL under the experiment's folder.

A data value in an experiment (`train_data`, `in_domain`, ...) is one of:
  - a path (or a Hub dataset name): used as it is;
  - `organism:NAME`: one of the embedded organism's seeded synthetic sets (`onsft.organism.tasks`);
  - a reasoning-gym draw, or a list of them concatenated (needs `pip install 'onsft[tasks]'`):
        {gym: chain_sum, size: 128, seed: 1, options: {max_terms: 3}, exclude: [train_data]}
    `exclude` names other data keys whose prompts must not appear (test sets drawn apart from training).
This module reads the specs and draws the gym rows; `onsft.pipeline.compare.experiment_data.materialize` writes an
experiment's generated specs as files (an organism set through `onsft.organism.tasks`, which sits above
data). A gym draw is written to `<folder>/<key>-<hash of the spec>.jsonl`, so a changed spec is a new file and
an unchanged one is reused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from onsft.data import gym
from onsft.errors import UserError

ORGANISM_PREFIX = "organism:"
GYM_KEYS = {"gym", "size", "seed", "options", "answer_format", "exclude"}


def is_generated(spec: Any) -> bool:
    """True for specs written as files (organism sets, gym draws), False for paths and Hub names."""
    return isinstance(spec, (dict, list)) or str(spec or "").startswith(ORGANISM_PREFIX)


def gym_draws(spec: Any, key: str) -> list[dict]:
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
