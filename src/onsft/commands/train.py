"""`onsft train`: fine-tune a causal LM with SFT under a token weighting (`--loss nll|dft|idft|eaft|asft`); DPO /
SimPO via `--method`.

The stage is `onsft.pipeline.train.stage` (replay, checkpoints, resuming, the summary); this module parses the
command line, calls its `run` (the same `run` as `onsft.commands.train.run`) and prints the last step's loss.
"""

from __future__ import annotations

from onsft.errors import UserError
from onsft.pipeline.train.stage import (
    DESCRIPTION,
    METHODS,
    PREFERENCE_METHODS,
    LossConfig,
    TrainArguments,
    configs,
    run,
)
from onsft.runtime.given import given_values
from onsft.runtime.records import dumps
from onsft.runtime.settings import given_options, parse_command

__all__ = ["TrainArguments", "main", "run"]


def method_of(argv: list[str]) -> str:
    """The --method (flag, else the config file's, else sft): it decides which trainer options exist."""
    method = given_values(argv, ["method"]).get("method")
    method = method if isinstance(method, str) and method else "sft"  # a bare --method: the parser reports it
    if method not in METHODS:
        raise UserError(f"unknown method `{method}`", where="command line", fix=f"use one of {', '.join(METHODS)}.")
    return method


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    method = method_of(argv)
    preference = method in PREFERENCE_METHODS
    inputs, model_args, lora, loss, args, run_args = parse_command(
        argv, *configs(method), prog="onsft train", description=DESCRIPTION
    )
    changed = given_options(argv, LossConfig)  # given at all, even with its default value
    if preference and changed:
        raise UserError(
            f"--{changed[0]} applies to --method sft only, not to --method {inputs.method}",
            where="command line",
            fix=f"drop --{changed[0]}, or use --method sft.",
        )
    summary = run(inputs, model_args, lora, args, None if preference else loss, run_args)
    print(dumps({k: summary[k] for k in ("global_step", "train_loss") if k in summary}))
    return 0
