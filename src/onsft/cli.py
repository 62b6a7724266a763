"""The `onsft` command: one sub-command per job, each `main(argv)` in `onsft.commands.<name>`.

Errors a user can fix (`UserError`) print one line and exit 2; partial outputs are never left behind
because every writer in onsft writes under a temporary name and renames on success.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

from onsft import __version__
from onsft.errors import EXIT_USER_ERROR, UserError
from onsft.runtime.given import given_values
from onsft.runtime.progress import configure_output
from onsft.runtime.records import output_error

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)

# name: one-line help. Each command lives in onsft.commands.<name>, imported only when it runs (the
# commands import torch and transformers; `onsft --help` should not).
COMMANDS = {
    "train": "Fine-tune a causal LM: SFT with a token weighting (nll, dft, idft, eaft, asft), or DPO / SimPO.",
    "audit": "Measure how off-policy a dataset is for a model (DDT: phi, Z, p-values, report).",
    "rewrite": "Rewrite off-policy data into the model's own distribution (hinted decoding).",
    "eval": "Accuracy (pass@1, pass@k), retention and KL drift of a model on a dataset.",
    "pairs": "Build DPO / SimPO preference pairs from the model's own samples.",
    "compare": "Run a grid of methods x seeds from one base model and tabulate them.",
    "demo": "The whole story on the embedded model organism, on a CPU, in minutes.",
    "data": "Write the built-in synthetic datasets (or reasoning-gym tasks) to JSONL.",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: onsft <command> [options]   (onsft <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _verbose(argv: list[str]) -> bool:
    """`--verbose` from the command line or its --config file, read before the command's own parser (which
    reports any problem with it): how quiet the libraries are is set before the command imports them."""
    value = given_values(argv, ["verbose"]).get("verbose")
    return str(value).strip().lower() in ("true", "yes", "1", "t", "y")


def _close_progress_bars() -> None:
    """Close the progress bars a Ctrl-C left open, each ending its line, so the message stands on its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"onsft {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(str(UserError(f"unknown command `{name}`", fix=f"use one of: {', '.join(COMMANDS)}.")), file=sys.stderr)
        return EXIT_USER_ERROR
    # Quiet the libraries' chatter (their warnings, loading bars) unless --verbose; users of the CLI read our
    # progress bars and summaries. The environment covers what the command's imports print, the call the rest.
    verbose = _verbose(rest)
    os.environ["TRANSFORMERS_VERBOSITY"] = "warning" if verbose else "error"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        module = importlib.import_module(f"onsft.commands.{name}")
        configure_output(verbose)
        code = int(module.main(rest) or 0)
        sys.stdout.flush()  # a reader that left (`| head`) shows here, not at exit
        return code
    except BrokenPipeError:
        # The reader of stdout closed it (`onsft data gym --list_tasks | head`): it has what it wanted. Point
        # stdout at /dev/null so the interpreter's last flush does not fail again, and exit quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as error:
        print(str(error), file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        # A full disk or a read-only file system can strike any writer (plots, checkpoints, reports);
        # the writers of records name their file themselves (onsft.runtime.records.output_error).
        if error.errno not in DISK_ERRNOS:
            raise
        print(str(output_error(error, error.filename or "output")), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _close_progress_bars()  # else a bar left open redraws itself after the message when it is collected
        print("onsft: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
