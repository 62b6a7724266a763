"""Statistics of evaluations and score sets: pass@k, KL between next-token distributions, quantiles and
the Kolmogorov-Smirnov distance to N(0, 1). Pure functions, pinned to exact or float64 references.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def kl_per_position(base_logits: torch.Tensor, tuned_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || tuned) at every position over the last (vocabulary) dimension, in float32 or better."""
    dtype = torch.promote_types(base_logits.dtype, torch.float32)
    base = torch.log_softmax(base_logits.to(dtype), dim=-1)
    tuned = torch.log_softmax(tuned_logits.to(dtype), dim=-1)
    return (base.exp() * (base - tuned)).sum(-1)


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolating linearly between order statistics (numpy's default)."""
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ks_distance_to_normal(values: Sequence[float]) -> float:
    """Kolmogorov-Smirnov distance sup_x |F_n(x) - Phi(x)| between the values' empirical distribution and
    N(0, 1): how far Z scores are from calibrated (nan for no values)."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return float("nan")
    cdf = statistics.NormalDist().cdf
    # The empirical CDF jumps at each value: compare Phi with both sides of every step.
    return max(max(abs((i + 1) / n - cdf(v)), abs(i / n - cdf(v))) for i, v in enumerate(ordered))


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (0 spread for one value, nan for none)."""
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0
