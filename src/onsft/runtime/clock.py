"""Wall and CPU seconds: how every job's cost is measured and added up across the runs of a resumed job.

CPU seconds are `time.process_time` (all threads of this process). A cost is a dict with `KEYS`, so costs saved
by earlier runs (in a checkpoint, a `.partial` file, a cost record) add to this run's with `plus`.
"""

from __future__ import annotations

import time

KEYS = ("wall_seconds", "cpu_seconds")


def start() -> tuple[float, float]:
    return time.time(), time.process_time()


def seconds_since(started: tuple[float, float]) -> dict[str, float]:
    wall, cpu = started
    return {"wall_seconds": time.time() - wall, "cpu_seconds": time.process_time() - cpu}


def plus(a: dict, b: dict) -> dict[str, float]:
    """The sum of two costs (a key either lacks counts as 0)."""
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in KEYS}
