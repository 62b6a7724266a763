"""What the benchmarks share: variants timed in turns inside one process, round after round, and each
comparison reported as the median of its per-round ratios with their spread.

Why in turns: the machine is shared, and its load drifts over minutes. Timing variant A for a while and
then variant B measures the drift as much as the variants; timing A, B, C, then B, C, A, ... pairs each
round's times under nearly the same conditions, so the per-round ratio B/A is steady even when the
times are not. The order is rotated each round so no variant always runs first (warm caches) or last.

Clocks: `cpu` is the process's CPU time (`time.process_time`), `wall` is `time.perf_counter`. With one
torch thread the CPU time is the work itself, whatever else runs on the machine; with more threads,
spinning and waiting threads blur it and wall time is the honest measure. Both are always recorded.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


def spread(values: list[float]) -> dict:
    """Median, quartiles, range and every value (quartiles by the inclusive method: exact for n >= 2)."""
    values = list(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "all": values,
    }


def clocks() -> dict[str, float]:
    """Both clocks now: {"cpu": process CPU seconds, "wall": seconds}."""
    return {"cpu": time.process_time(), "wall": time.perf_counter()}


def since(start: dict[str, float]) -> dict[str, float]:
    """Both clocks' seconds since `start` (from `clocks()`)."""
    now = clocks()
    return {name: round(now[name] - start[name], 2) for name in start}


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(CPU seconds of this process, wall seconds, what fn returned)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def in_turns(
    variants: dict[str, Callable[[], object]], rounds: int, between: Callable[[str], None] | None = None
) -> tuple[dict[str, dict[str, list[float]]], dict[str, object]]:
    """Run every variant once per round, the order rotated each round. Returns {name: {"cpu": [...],
    "wall": [...]}} (one entry per round) and each variant's last result. `between(name)` runs untimed
    before each call (e.g. to set process-wide settings of that variant)."""
    names = list(variants)
    times = {name: {"cpu": [], "wall": []} for name in names}
    last: dict[str, object] = {}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if between is not None:
                between(name)
            cpu, wall, last[name] = timed(variants[name])
            times[name]["cpu"].append(cpu)
            times[name]["wall"].append(wall)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return times, last


def paired(times: dict[str, dict[str, list[float]]], over: str, base: str, clock: str) -> dict:
    """Per-round time ratio over/base (a cost: < 1 means `over` is faster), as a spread."""
    return spread([a / b for a, b in zip(times[over][clock], times[base][clock])])


def speedup(times: dict[str, dict[str, list[float]]], fast: str, slow: str, clock: str, work: float = 1.0) -> dict:
    """Per-round throughput ratio (slow's time / fast's time, each per unit of its work), as a spread.
    `work` is fast's work divided by slow's (e.g. tokens), when the two do not do the same amount."""
    return spread([work * s / f for f, s in zip(times[fast][clock], times[slow][clock])])


def clock_for(threads: int) -> str:
    return "cpu" if threads == 1 else "wall"


def clock_words(clock: str, threads: int) -> str:
    what = "process CPU time (time.process_time)" if clock == "cpu" else "wall time (time.perf_counter)"
    return f"{what}, {threads} torch thread{'s' if threads != 1 else ''}"


def show(ratio: dict, digits: int = 2) -> str:
    """'1.23x [1.10-1.30] (IQR 1.15-1.27, 6 rounds)'."""
    f = f"{{:.{digits}f}}"
    return (
        f"{f.format(ratio['median'])}x [{f.format(ratio['min'])}-{f.format(ratio['max'])}] "
        f"(IQR {f.format(ratio['q1'])}-{f.format(ratio['q3'])}, {ratio['n']} rounds)"
    )


def status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: the process's resident peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def machine() -> dict:
    import torch
    import transformers

    return {
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
