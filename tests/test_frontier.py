"""Frontier statistics on synthetic curves with known answers."""

import itertools
import math
import statistics

import pytest

from onsft.formulas.frontier import (
    Interval,
    best_setting,
    bootstrap_interval,
    chosen_on_validation,
    level_side,
    matched_over_seeds,
    paired_contrast,
    pareto_set,
    reading_at_level,
)


def test_reading_interpolates_between_the_bracketing_checkpoints():
    # in-domain 0 -> 0.4 -> 0.8, retention 0.9 -> 0.8 -> 0.6: at 0.6 halfway between 0.8 and 0.6.
    assert reading_at_level([0.0, 0.4, 0.8], [0.9, 0.8, 0.6], 0.6) == pytest.approx(0.7, abs=1e-15)
    # A quarter of the way: 0.5 lies 1/4 from 0.4 to 0.8.
    assert reading_at_level([0.0, 0.4, 0.8], [0.9, 0.8, 0.6], 0.5) == pytest.approx(0.75, abs=1e-15)
    # A checkpoint exactly at the level is read as it is.
    assert reading_at_level([0.0, 0.6, 0.9], [1.0, 0.5, 0.1], 0.6) == 0.5
    # A falling axis (retention reaching 0.8 from above), read as in-domain accuracy.
    assert reading_at_level([0.96, 0.9, 0.7], [0.0, 0.5, 0.9], 0.8) == pytest.approx(0.7, abs=1e-15)


def test_reading_takes_the_first_crossing_in_step_order():
    # Up through 0.5 (between steps 0 and 1), down, up again: the first crossing counts.
    xs, ys = [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.2, 0.4]
    assert reading_at_level(xs, ys, 0.5) == pytest.approx(0.5)
    # Order matters: the same points in another order give another reading.
    assert reading_at_level(xs[::-1], ys[::-1], 0.5) == pytest.approx(0.3)


def test_not_reached_is_none_never_extrapolated():
    assert reading_at_level([0.0, 0.3, 0.5], [0.9, 0.8, 0.7], 0.6) is None  # stops short of the level
    assert reading_at_level([0.7, 0.9], [0.5, 0.4], 0.6) is None  # starts past it: never crosses
    assert level_side([0.0, 0.3, 0.5], 0.6) == "below"
    assert level_side([0.7, 0.9], 0.6) == "above"
    assert level_side([0.0, 0.9], 0.6) == "crossed"
    assert reading_at_level([], [], 0.5) is None
    with pytest.raises(ValueError):
        reading_at_level([0.0, math.nan], [0.1, 0.2], 0.5)


def test_one_setting_is_chosen_for_all_seeds():
    # Per seed the best setting would be b in seed 0 (0.9) and a in seed 1 (0.8): 0.85, a lucky mixture.
    readings = {"a": {0: 0.7, 1: 0.8}, "b": {0: 0.9, 1: 0.5}, "c": {0: 0.95, 1: None}}
    assert best_setting(readings) == "a"  # c is reached by one seed only; a's mean 0.75 beats b's 0.70
    assert best_setting({"a": {0: None}, "b": {0: None}}) == "a"  # none reached: the first, read as not reached
    assert best_setting({}) is None
    assert best_setting({"a": {0: 0.5, 1: 0.6}, "b": {0: 0.6, 1: 0.5}}) == "a"  # ties: the first


def synthetic_readings(curves: dict[str, list[list[float]]], level: float) -> dict[str, dict[int, float | None]]:
    """{setting: {seed: retention at in-domain `level`}} from {setting: [[in-domain..., retention...] per seed]}."""
    return {
        setting: {seed: reading_at_level(xs, ys, level) for seed, (xs, ys) in enumerate(pairs)}
        for setting, pairs in curves.items()
    }


def test_the_setting_is_chosen_on_validation_readings_only():
    # Three learning rates, two seeds. On the validation draw, 1e-4 keeps the most retention at in-domain 50%;
    # on the test draw 4e-4 looks best (its test noise is lucky). The test reading reported is 1e-4's.
    validation = synthetic_readings(
        {
            "5e-5": [[[0.0, 0.3, 0.45], [0.9, 0.88, 0.87]]] * 2,  # never reaches 50%: not chosen
            "1e-4": [[[0.0, 0.4, 0.6], [0.9, 0.86, 0.82]], [[0.0, 0.5, 0.7], [0.9, 0.84, 0.8]]],
            "4e-4": [[[0.0, 0.6, 0.9], [0.9, 0.7, 0.5]], [[0.0, 0.7, 0.9], [0.9, 0.72, 0.6]]],
        },
        0.5,
    )
    test = synthetic_readings(
        {
            "5e-5": [[[0.0, 0.3, 0.45], [0.9, 0.88, 0.87]]] * 2,
            "1e-4": [[[0.0, 0.4, 0.6], [0.9, 0.8, 0.76]], [[0.0, 0.5, 0.7], [0.9, 0.78, 0.7]]],
            "4e-4": [[[0.0, 0.6, 0.9], [0.9, 0.9, 0.85]], [[0.0, 0.7, 0.9], [0.9, 0.89, 0.8]]],
        },
        0.5,
    )
    assert best_setting(test) == "4e-4"  # what choosing on the test readings would report
    matched = chosen_on_validation(validation, test)
    assert matched.setting == "1e-4" == best_setting(validation)
    assert matched.values == test["1e-4"] and matched.values[0] == pytest.approx(0.78)  # halfway 0.8 -> 0.76
    assert matched.interval.mean == pytest.approx((0.78 + 0.78) / 2)
    # No test value moves the choice: any test readings give the validation's setting.
    for scale in (0.0, 0.5, 2.0):
        shifted = {s: {k: (None if v is None else v * scale) for k, v in r.items()} for s, r in test.items()}
        assert chosen_on_validation(validation, shifted).setting == "1e-4"
    # A chosen setting that did not reach the level on every test seed has no interval (never averaged over
    # the seeds that happened to reach it).
    partial = {**test, "1e-4": {0: 0.78, 1: None}}
    assert chosen_on_validation(validation, partial).interval is None
    assert chosen_on_validation(validation, {}).reached == 0  # no test curve of that setting: not reached


def test_pareto_set_maximises_both_axes():
    points = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.5), (0.2, 0.8), (0.1, 0.85)]
    # (0.4, 0.4) is dominated by (0.5, 0.5); (0.1, 0.85) by (0.1, 0.9); the duplicates are both kept.
    assert pareto_set(points) == [0, 1, 3, 4, 5]
    assert pareto_set([]) == []
    # Brute force on a grid: a kept point has no strictly better point, a dropped one has.
    grid = [(x / 4, y / 4) for x, y in itertools.product(range(5), range(5)) if x + y <= 5]
    kept = set(pareto_set(grid))
    for i, (x, y) in enumerate(grid):
        better = [q for q in grid if q[0] >= x and q[1] >= y and q != (x, y)]
        assert (i in kept) == (not better)
    assert sorted(grid[i] for i in kept) == [(0.25 * a, 0.25 * (5 - a)) for a in range(1, 5)]


def test_bootstrap_is_deterministic_for_a_seed_and_brackets_the_mean():
    values = [0.61, 0.72, 0.58, 0.66, 0.70]
    a, b = bootstrap_interval(values, seed=3), bootstrap_interval(values, seed=3)
    assert a == b
    assert a.mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert min(values) <= a.low < a.mean < a.high <= max(values)
    # Few resamples: the seed visibly picks the stream (with 10k both converge to the same quantiles).
    assert bootstrap_interval(values, seed=4, resamples=20) != bootstrap_interval(values, seed=3, resamples=20)
    assert bootstrap_interval(values, seed=4, resamples=20) == bootstrap_interval(values, seed=4, resamples=20)
    assert bootstrap_interval([0.4], seed=0) == Interval(0.4, 0.4, 0.4, 1)
    assert bootstrap_interval([0.3, 0.3, 0.3]) == Interval(0.3, 0.3, 0.3, 3)


def test_bootstrap_matches_the_exact_resampling_distribution():
    # Two values: each resample's mean is 0 (1/4), 0.5 (1/2) or 1 (1/4). The 2.5% and 97.5% quantiles of
    # many draws are 0 and 1; the median 0.5.
    wide = bootstrap_interval([0.0, 1.0], seed=0, resamples=4000, confidence=0.95)
    assert (wide.low, wide.high) == (0.0, 1.0)
    narrow = bootstrap_interval([0.0, 1.0], seed=0, resamples=4000, confidence=0.4)  # 30% .. 70% quantiles
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_matched_over_seeds_reports_not_reached():
    done = matched_over_seeds({0: 0.8, 1: 0.7, 2: 0.9})
    assert done.reached == 3 and done.interval.mean == pytest.approx(0.8)
    missing = matched_over_seeds({0: 0.8, 1: None, 2: 0.9})
    assert missing.interval is None and (missing.reached, missing.seeds) == (2, 3)
    assert matched_over_seeds({0: None}).interval is None


def test_paired_contrast_uses_shared_seeds_as_pairs():
    a = {0: 0.8, 1: 0.7, 2: 0.9, 3: 0.5}
    b = {0: 0.6, 1: 0.5, 2: 0.7}  # a - b = 0.2 on every shared seed: a zero-width interval
    contrast = paired_contrast(a, b, seed=1)
    assert contrast.n == 3
    assert contrast.mean == pytest.approx(0.2) and contrast.low == pytest.approx(0.2)
    assert contrast.high == pytest.approx(0.2)
    assert paired_contrast(a, {0: None, 1: 0.5}) is None
    assert paired_contrast(a, {7: 0.5}) is None
