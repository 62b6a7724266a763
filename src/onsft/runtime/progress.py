"""Progress bars on stderr (results go to stdout), with rates and ETA, as the tools users know show them."""

from __future__ import annotations

import sys


def progress(total: int, desc: str, enabled: bool = True, unit: str = "tok", initial: int = 0):
    """A tqdm bar; `unit="tok"` scales the count (12.3k tok/s). Disabled bars cost nothing."""
    from tqdm.auto import tqdm  # tqdm.auto picks the notebook widget under Jupyter

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=unit == "tok",
        dynamic_ncols=True,
        disable=not enabled,
        file=sys.stderr,
    )
