"""What the terminal shows: progress bars on stderr (results go to stdout), with rates and ETA, as the tools
users know show them; and the libraries kept quiet unless `--verbose`."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Loggers of the libraries under onsft that write through Python's logging (transformers has its own switch).
LIBRARY_LOGGERS = ("accelerate", "datasets", "huggingface_hub", "peft", "torch", "trl", "httpx", "urllib3")


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


def note_resume(command: str, done: int, total: int, where: str | os.PathLike) -> None:
    """The one line a resumed run prints (stderr) before its bar: "onsft eval: resuming: 3 of 8 done (file)".
    Nothing when no row is on disk yet (a fresh run) or none is left to do (what follows is the run's result or
    its one-line error)."""
    if 0 < done < total:
        print(f"onsft {command}: resuming: {done} of {total} done ({where})", file=sys.stderr, flush=True)


def configure_output(verbose: bool = False) -> None:
    """Quiet by default: the libraries' warnings (Python warnings and their loggers) and their loading and
    saving bars ("Loading weights", "Writing model shards", dataset maps) are hidden, so stderr holds onsft's
    own progress and messages; `verbose` shows them again. Download bars of the Hub stay on: a download is
    long and worth watching. Safe to call again (each command of one process sets it anew)."""
    import huggingface_hub.utils as hub_utils
    from huggingface_hub import constants
    from transformers.utils import logging as transformers_logging

    level = logging.WARNING if verbose else logging.ERROR
    os.environ["TRANSFORMERS_VERBOSITY"] = "warning" if verbose else "error"  # for processes started from here
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    else:
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    warnings.simplefilter("default" if verbose else "ignore")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    transformers_logging.set_verbosity(level)
    with warnings.catch_warnings():  # the libraries warn when a user's environment variable overrides a switch
        warnings.simplefilter("ignore")
        (transformers_logging.enable_progress_bar if verbose else transformers_logging.disable_progress_bar)()
        if constants.HF_HUB_DISABLE_PROGRESS_BARS is None:
            hub_utils.enable_progress_bars()  # transformers' switch turns the Hub's off too
        if "datasets" in sys.modules:  # imported lazily (parquet, saved folders, training): set now if it is here
            import datasets

            (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()
