"""Frontier statistics of learning curves: readings at a matched level, the Pareto set, bootstrap intervals.

A curve is one training run's checkpoints in step order, each a point (x, y), e.g. x = in-domain accuracy and
y = retention accuracy. `reading_at_level` answers "what was y when x reached the level?": the first pair of
consecutive checkpoints whose x values bracket the level, interpolated linearly (x and y move together
between two checkpoints; nothing else is assumed). A curve that never reaches the level gives None: it is
never extrapolated. Over seeds, `bootstrap_interval` is the percentile bootstrap of the mean (resampling
seeds with replacement), deterministic for a given seed, and `paired_contrast` the same for the per-seed
difference of two methods. Plain Python floats (IEEE float64) throughout.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass


def reading_at_level(xs: Sequence[float], ys: Sequence[float], level: float) -> float | None:
    """y where the curve (xs[i], ys[i]), in step order, first reaches x = level, or None if it never does.

    "Reaches" means a checkpoint sits exactly at the level, or two consecutive checkpoints lie on either
    side of it (either direction: in-domain accuracy rises to a level, retention falls to one). Between
    the two, y is interpolated linearly in x."""
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length ({len(xs)} vs {len(ys)})")
    points = [(float(x), float(y)) for x, y in zip(xs, ys)]
    if any(not (math.isfinite(x) and math.isfinite(y)) for x, y in points):
        raise ValueError("curve points must be finite")
    level = float(level)
    for i, (x, y) in enumerate(points):
        if x == level:
            return y
        if i + 1 < len(points):
            x1, y1 = points[i + 1]
            if (x - level) * (x1 - level) < 0:  # strictly on either side: the level lies between
                return y + (level - x) * (y1 - y) / (x1 - x)
    return None


def level_side(xs: Sequence[float], level: float) -> str:
    """Why a curve did not reach a level: "above" (every point above it), "below", or "crossed"."""
    if all(float(x) > level for x in xs):
        return "above"
    if all(float(x) < level for x in xs):
        return "below"
    return "crossed"


def pareto_set(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (in input order) of the points no other point dominates, maximising both coordinates. A point
    is dominated when another is at least as good on both axes and better on one; equal points are kept."""
    kept = []
    for i, (x, y) in enumerate(points):
        dominated = any((qx >= x and qy >= y) and (qx > x or qy > y) for j, (qx, qy) in enumerate(points) if j != i)
        if not dominated:
            kept.append(i)
    return kept


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its percentile-bootstrap interval; `n` values went in."""

    mean: float
    low: float
    high: float
    n: int


def bootstrap_interval(
    values: Sequence[float], seed: int = 0, resamples: int = 10_000, confidence: float = 0.95
) -> Interval:
    """Mean of `values` and the percentile bootstrap interval of the mean: `resamples` draws of len(values)
    values with replacement (a `random.Random(seed)` stream, so equal inputs give equal intervals), and the
    (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of their means (linear between order
    statistics). With n values there are only C(2n - 1, n) distinct resamples (10 for n = 3): the interval
    is coarse for few seeds, and a single value gives a zero-width interval."""
    data = [float(v) for v in values]
    if not data:
        raise ValueError("bootstrap of no values")
    if any(not math.isfinite(v) for v in data):
        raise ValueError("bootstrap values must be finite")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError("need 0 < confidence < 1 and resamples >= 1")
    mean = math.fsum(data) / len(data)
    if len(data) == 1:
        return Interval(mean, mean, mean, 1)
    rng = random.Random(seed)
    n = len(data)
    means = sorted(math.fsum(data[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return Interval(mean, _quantile(means, (1 - confidence) / 2), _quantile(means, (1 + confidence) / 2), n)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Quantile of sorted values, linear between order statistics (numpy's default 'linear' method)."""
    position = q * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (position - lower) * (ordered[upper] - ordered[lower])


@dataclass(frozen=True)
class Matched:
    """A method's reading at a matched level over seeds: the interval when every seed reached the level,
    else None; `reached` of `seeds` seeds did, `values` holds each seed's reading (None: not reached)."""

    interval: Interval | None
    reached: int
    seeds: int
    values: dict[int, float | None]
    setting: str | None = None  # the swept setting read (see best_setting); None when there is one


def best_setting(readings: Mapping[Hashable, Mapping[int, float | None]]) -> Hashable | None:
    """The one swept setting a method is read at, from {setting: {seed: reading or None}}: the setting reached
    by the most seeds, then the highest mean reading over them (the first such on ties). One choice for all
    seeds: taking each seed's best setting would pick the luckiest of several runs per seed and favour the
    methods with more settings."""

    def rank(setting: Hashable) -> tuple[int, float]:
        reached = [v for v in readings[setting].values() if v is not None]
        return len(reached), (sum(reached) / len(reached) if reached else -math.inf)

    return max(readings, key=rank) if readings else None


def matched_over_seeds(readings: Mapping[int, float | None], seed: int = 0, resamples: int = 10_000) -> Matched:
    """Bootstrap over seeds of per-seed readings; no interval unless every seed reached the level (averaging
    only the seeds that reached it would flatter the method)."""
    values = dict(sorted(readings.items()))
    reached = [v for v in values.values() if v is not None]
    interval = bootstrap_interval(reached, seed, resamples) if reached and len(reached) == len(values) else None
    return Matched(interval, len(reached), len(values), values)


def paired_contrast(
    a: Mapping[int, float | None], b: Mapping[int, float | None], seed: int = 0, resamples: int = 10_000
) -> Interval | None:
    """Mean over the seeds both methods ran of (a - b), with the bootstrap interval of that mean (seeds
    resampled as pairs, so what a seed shares between the two methods cancels). None when they share no
    seed or a shared seed did not reach the level in one of them."""
    shared = sorted(set(a) & set(b))
    if not shared or any(a[s] is None or b[s] is None for s in shared):
        return None
    return bootstrap_interval([float(a[s]) - float(b[s]) for s in shared], seed, resamples)


def chosen_on_validation(
    validation: Mapping[Hashable, Mapping[int, float | None]],
    test: Mapping[Hashable, Mapping[int, float | None]],
    seed: int = 0,
    resamples: int = 10_000,
) -> Matched:
    """A method's test reading at the setting chosen from its validation readings alone.

    Both map {setting: {seed: reading or None}}, the validation readings taken on prompts disjoint from the
    test sets. `best_setting` picks on `validation`; the test readings of that setting are bootstrapped over
    seeds. Choosing on the test readings themselves would report the best of several draws of test noise
    (an optimistic bias that grows with the number of settings swept); here no test value can move the
    choice."""
    setting = best_setting(validation)
    matched = matched_over_seeds(test.get(setting, {}), seed, resamples)
    return Matched(matched.interval, matched.reached, matched.seeds, matched.values, setting)
