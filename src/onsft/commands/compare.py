"""`onsft compare`: a grid of methods x seeds from one base model and one dataset, then a table and plots.

    onsft compare --config experiments/organism.yaml [--seeds 0 1 2] [--methods sft idft] [--out DIR]

The stage is `onsft.pipeline.compare.stage` (methods, the steps, OUT's layout, caching); this module parses
the command line and calls its `run`, the same `run` as `onsft.commands.compare.run`.
"""

from __future__ import annotations

from onsft.pipeline.compare.stage import CONFIGS, CompareArgs, experiment_of, run
from onsft.runtime.models import ModelArguments
from onsft.runtime.settings import given_options, parse_command

__all__ = ["CompareArgs", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    # `--config` is the experiment here, not a YAML of flags: it is read by load_experiment.
    args, model_args, run_args = parse_command(argv, *CONFIGS, prog="onsft compare", yaml_config=False)
    given = given_options(argv, ModelArguments, config_file=False)  # they replace the experiment's `model:`
    run(experiment_of(args, model_args, given), run_args)
    return 0
