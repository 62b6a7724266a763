"""`onsft train`: fine-tune a causal LM with SFT under a token weighting (`--loss nll|dft|idft|eaft|asft`); DPO /
SimPO via `--method`.

    onsft train --model organism --data teacher.jsonl --loss idft --output_dir runs/idft --max_steps 300

Replay (sft methods): `--replay_data replay.jsonl --replay_share 0.25` fills that share of every optimiser
batch with the starting model's own answers to other prompts (`onsft data replay`); see `onsft.data.replay`.

Checkpoints go to `<output_dir>/checkpoint-N`; rerunning the same command resumes from the last one
(step counter, optimiser, scheduler, RNG and IDFT schedule restored). The final model is written to
`<output_dir>/model` (loadable with `from_pretrained`) under a temporary name and renamed when complete.
A rerun with other settings into the same `--output_dir` is refused (`--overwrite` starts over).

From Python: `run(TrainArguments(data=...), ModelArguments(model=...), trainer=TrainConfig(...),
loss=LossConfig(loss="idft"))` returns the summary that `train_summary.json` holds.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onsft.data.chat import overlong_field
from onsft.data.replay import mix_batches, planned_steps, replay_dataset, replay_rows_per_batch
from onsft.data.rows import DataArguments, check_sources
from onsft.data.training_sets import preference_dataset, sft_dataset
from onsft.engine.lora import LoraArguments
from onsft.engine.preference import PREFERENCE_METHODS, PreferenceTrainConfig, build_preference_trainer, trainer_args
from onsft.engine.train_clock import attach_clock, clock_of
from onsft.engine.train_progress import attach_progress
from onsft.engine.trainer import OnPolicySFTTrainer, TrainConfig, restore_finished
from onsft.errors import UserError
from onsft.formulas.weighting import LOSS_TYPES, LossConfig
from onsft.runtime.checkpoints import (
    holds_every_step,
    last_checkpoint,
    save_final_model,
    write_failures_as_user_errors,
)
from onsft.runtime.device import check_device_name, ran_on, resolve_device, resolve_dtype
from onsft.runtime.models import ModelArguments, check_context, context_length, load_model, load_tokenizer
from onsft.runtime.records import write_json_atomic, write_jsonl_atomic
from onsft.runtime.runs import RunArguments, RunGuard, data_identity, group_defaults, normalized, open_run

METHODS = ("sft", *PREFERENCE_METHODS)
DESCRIPTION = (
    f"Fine-tune a causal LM: --method sft with a token-weighted --loss ({', '.join(LOSS_TYPES)}), or dpo / "
    "simpo on preference pairs. Defaults that depend on --method: --learning_rate 2e-05 (sft) or 1e-06 (dpo, "
    "simpo); --beta 0.1 (dpo) or 2.0 (simpo). `onsft train --method dpo --help` lists the options of dpo / simpo."
)
OUTPUTS = ["checkpoint-*", "model", ".model.building", "metrics.jsonl", "train_summary.json"]


@dataclass
class TrainArguments(DataArguments):
    """What to train on, and how (the trainer's own options are TrainConfig's / PreferenceTrainConfig's)."""

    eval_data: str | None = field(default=None, metadata={"help": "Validation data; reports the plain NLL."})
    method: str = field(
        default="sft", metadata={"help": f"sft (token-weighted: --loss {'|'.join(LOSS_TYPES)}), dpo or simpo."}
    )
    overlong: str = overlong_field()
    resume: bool = field(default=True, metadata={"help": "Resume from the last checkpoint in output_dir if any."})
    replay_data: str | None = field(
        default=None,
        metadata={
            "help": "The starting model's own answers to other prompts (`onsft data replay`), mixed into every "
            "optimiser batch (sft methods; the run then reads its rows in a fixed planned order)."
        },
    )
    replay_share: float = field(
        default=0.25,
        metadata={"help": "Share of every optimiser batch taken from --replay_data (rounded to whole rows)."},
    )


def _settings(
    inputs: TrainArguments, model: ModelArguments, lora: LoraArguments, loss: LossConfig | None, args
) -> dict:
    """Everything that decides the result of a run (the output folder itself excluded)."""
    train_args = {k: v for k, v in args.to_dict().items() if k not in ("output_dir", "logging_dir", "disable_tqdm")}
    model_args = {k: v for k, v in dataclasses.asdict(model).items() if k != "offline"}
    replay = data_identity(inputs.replay_data) if inputs.replay_data else None
    return {
        "inputs": {**dataclasses.asdict(inputs), "data": data_identity(inputs.data), "replay_data": replay},
        "model": model_args,
        "lora": dataclasses.asdict(lora),
        "loss": dataclasses.asdict(loss) if loss is not None else None,
        "args": train_args,
    }


def _place(model_args: ModelArguments, args) -> torch.dtype:
    """The trainer's device from --device (transformers places the model itself) and the weights' dtype:
    float32 master weights unless --dtype says otherwise (mixed precision is --bf16)."""
    check_device_name(model_args.device)
    device = resolve_device(model_args.device)
    if device.type == "cpu":
        args.use_cpu = True
    elif device.index is not None and device.index > 0:
        raise UserError(
            f"train runs on the launcher's devices, not `{model_args.device}`",
            where="--device",
            fix=f"pass --device cuda and set CUDA_VISIBLE_DEVICES={device.index}, or use accelerate launch.",
        )
    return torch.float32 if model_args.dtype == "auto" else resolve_dtype(model_args.dtype, device)


def _check(inputs: TrainArguments, args) -> None:
    if not inputs.data:
        raise UserError("no training data given", where="command line", fix="pass --data FILE.")
    if inputs.method not in METHODS:
        raise UserError(
            f"unknown method `{inputs.method}`", where="command line", fix=f"use one of {', '.join(METHODS)}."
        )
    if inputs.replay_data and inputs.method != "sft":
        raise UserError(
            f"--replay_data mixes answers into token-weighted training, not into --method {inputs.method} pairs",
            where="command line",
            fix="use --method sft (any --loss), or drop --replay_data.",
        )
    if inputs.replay_data:
        replay_rows_per_batch(inputs.replay_share, _batch_rows(args))
    if not math.isfinite(args.learning_rate) or args.learning_rate < 0:
        # torch's optimiser would refuse it only after the data and the model are loaded, with a traceback.
        raise UserError(
            f"learning_rate must be a finite number >= 0, got {args.learning_rate}",
            where="command line",
            fix="pass e.g. --learning_rate 1e-5.",
        )
    check_sources({"--data": inputs.data, "--eval_data": inputs.eval_data})


def _batch_rows(args) -> int:
    """Rows of one optimiser batch: per-device batch x accumulation x processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)


def _mix_replay(inputs: TrainArguments, args, train_set, replay_set) -> tuple:
    """The training rows with the replay rows mixed in, in the planned order; the trainer is set to read that
    order as it is for exactly the planned steps (so resuming keeps the mix)."""
    batch_rows = _batch_rows(args)
    train_rows = batch_rows - replay_rows_per_batch(inputs.replay_share, batch_rows)
    steps = planned_steps(args.max_steps, args.num_train_epochs, len(train_set), train_rows)
    mixed, info = mix_batches(train_set, replay_set, batch_rows, inputs.replay_share, steps, args.seed)
    args.max_steps = steps
    args.train_sampling_strategy = "sequential"
    return mixed, info


def run(
    inputs: TrainArguments,
    model_args: ModelArguments | None = None,
    lora: LoraArguments | None = None,
    trainer: TrainConfig | PreferenceTrainConfig | None = None,
    loss: LossConfig | None = None,
    run_args: RunArguments | None = None,
) -> dict:
    """Validate everything a user can get wrong, then train; returns the summary written to train_summary.json."""
    preference = inputs.method in PREFERENCE_METHODS
    args = trainer or (PreferenceTrainConfig() if preference else TrainConfig())
    _check(inputs, args)
    if isinstance(args, PreferenceTrainConfig) != preference:
        raise UserError(
            f"method `{inputs.method}` is {'' if preference else 'not '}a preference method, but the trainer "
            f"config is a {type(args).__name__}",
            where="command line",
            fix=f"use --method {' or '.join(PREFERENCE_METHODS)} with a PreferenceTrainConfig, sft with a TrainConfig.",
        )
    output_dir = Path(args.output_dir)
    # The trainer config is TRL's (no validate of ours; `_check` above reads it); a preference run has no loss.
    model_args, lora, loss, run_args = open_run(
        (ModelArguments, LoraArguments, LossConfig, RunArguments),
        (model_args, lora, None if preference else loss, run_args),
        writes=(output_dir / "train_summary.json",),
    )
    if preference:
        loss = None
    elif args.nonfinite not in ("stop", "skip"):
        raise UserError(f"unknown --nonfinite `{args.nonfinite}`", where="command line", fix="use stop or skip.")
    args.trust_remote_code = model_args.trust_remote_code  # TRL's copy of the flag ModelArguments owns
    trl_args = trainer_args(inputs.method, args) if preference else args
    dtype = _place(model_args, trl_args)
    if not run_args.progress:
        trl_args.disable_tqdm = True
    tokenizer = load_tokenizer(model_args)
    if preference:
        train_set, stats = preference_dataset(inputs.data, tokenizer, args.max_length, inputs.overlong)
        eval_set = (
            preference_dataset(inputs.eval_data, tokenizer, args.max_length, inputs.overlong)[0]
            if inputs.eval_data
            else None
        )
    else:
        train_set, stats = sft_dataset(tokenizer, inputs.data, args.max_length, inputs.overlong)
        eval_set, eval_stats = (
            sft_dataset(tokenizer, inputs.eval_data, args.max_length, inputs.overlong)
            if inputs.eval_data
            else (None, None)
        )
        if inputs.replay_data:
            replay_set, replay_stats = replay_dataset(
                tokenizer, inputs.replay_data, inputs.data, model_args.model, args.max_length, inputs.overlong
            )
            stats["replay"] = replay_stats
    settings = _settings(inputs, model_args, lora, loss, args)
    # Checkpoints carry no settings of their own: found without a record they are an unknown earlier run.
    with RunGuard(
        output_dir / "run.json",
        "train",
        settings,
        OUTPUTS,
        output_dir / "train_summary.json",
        overwrite=run_args.overwrite,
        active=int(trl_args.process_index) == 0,
        untracked=["checkpoint-*", "model"],
        inputs={"--data": inputs.data, "--eval_data": inputs.eval_data, "--model": model_args.model},
        defaults=group_defaults(inputs=inputs, model=model_args, lora=lora, loss=loss, args=args),
    ) as finished:
        if finished is not None:
            print(f"onsft: {output_dir} already holds this finished run; nothing to do.", file=sys.stderr)
            # All of its training happened before this call (records older than the clock: unknown, 0).
            before = {"wall_seconds": "train_seconds", "cpu_seconds": "train_cpu_seconds"}
            return {**finished, "cost_before_this_run": {k: finished.get(v, 0.0) for k, v in before.items()}}
        model = load_model(model_args, device="cpu", dtype=dtype)
        if not preference:
            check_context(context_length(model), stats["lengths"], inputs.data)
            if eval_stats is not None:
                check_context(context_length(model), eval_stats["lengths"], inputs.eval_data)
            if inputs.replay_data:
                check_context(context_length(model), stats["replay"]["lengths"], inputs.replay_data)
                train_set, stats["mix"] = _mix_replay(inputs, trl_args, train_set, replay_set)
        summary = _train(
            inputs,
            model_args,
            lora,
            loss,
            args,
            trl_args,
            model,
            tokenizer,
            train_set,
            eval_set,
            stats,
            normalized(settings),
        )
    return summary


def _train(
    inputs, model_args, lora, loss, args, trl_args, model, tokenizer, train_set, eval_set, stats, settings
) -> dict:
    output_dir = Path(args.output_dir)
    if eval_set is not None and trl_args.eval_strategy == "no":
        trl_args.eval_strategy = "steps"
        trl_args.eval_steps = trl_args.eval_steps or trl_args.save_steps
    common = dict(train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer)
    try:
        if loss is None:
            trainer = build_preference_trainer(inputs.method, model, trl_args, lora.peft_config(), **common)
        else:
            trl_args.dataset_kwargs = {"skip_prepare_dataset": True}
            trl_args.remove_unused_columns = False
            trainer = OnPolicySFTTrainer(
                model=model, args=trl_args, peft_config=lora.peft_config(), loss_config=loss, **common
            )
    except ValueError as error:  # peft's NoMatchingPeftModuleError is a ValueError
        if "target modules" not in str(error).lower():
            raise
        raise UserError(
            str(error).split(". ")[0],
            where="command line",
            fix="pass --lora_target_modules with module names of this model, or all-linear.",
        ) from None
    resume_from = last_checkpoint(output_dir) if inputs.resume else None
    shown = attach_progress(trainer, not trl_args.disable_tqdm)
    attach_clock(trainer)
    started = time.time()
    with write_failures_as_user_errors(output_dir):
        if resume_from is not None and holds_every_step(resume_from):
            # Killed after its last checkpoint: transformers would resume into one step past max_steps
            # (it skips the batches already seen, then trains one before checking the limit).
            training_loss = restore_finished(trainer, resume_from)
            shown.start_step = trainer.state.global_step  # no step runs now: the whole loss is in the logs
            clock_of(trainer).resume_from(trainer.state)
        else:
            training_loss = trainer.train(resume_from_checkpoint=resume_from).training_loss
    clock = clock_of(trainer)
    seconds = clock.total()  # stopped with the training: one reading for both keys
    summary = {
        "method": inputs.method,
        "model": model_args.model,
        "data": inputs.data,
        "global_step": trainer.state.global_step,
        "resumed_from": resume_from,
        "train_loss": shown.whole_run_loss(trainer.state, training_loss),  # every step, resumes included
        "train_loss_this_run": training_loss,
        "wall_seconds_this_run": time.time() - started,
        # Training time over the whole run, resumes included (the compute a resumed run really cost).
        "train_seconds": seconds["wall_seconds"],
        "train_cpu_seconds": seconds["cpu_seconds"],
        "cost_before_this_run": clock.before,
        "tokens_seen": trainer.state.num_input_tokens_seen,  # restored from the checkpoint: the whole run's
        "trainer": type(trainer).__name__,
        # The device the trainer placed the model on (accelerate decides under a launcher), its processes.
        "ran_on": {
            **ran_on(trainer.model, trl_args.world_size),
            "mixed_precision": "bf16" if trl_args.bf16 else "fp16" if trl_args.fp16 else None,
        },
        "settings": settings,
    }
    if loss is None:
        summary.update(
            pairs=stats.get("rows", 0),
            dropped_overlong=stats.get("dropped", 0),
            truncated_overlong=stats.get("truncated", 0),
            identical_pairs=stats.get("identical", 0),
            beta=trl_args.beta,
            simpo_gamma=args.simpo_gamma if inputs.method == "simpo" else None,
        )
    else:
        summary.update(
            loss=loss.loss,
            rows=stats["rows"],
            dropped_overlong=stats["dropped"],
            truncated_overlong=stats["truncated"],
            response_tokens_per_epoch=stats["response_tokens"],
            skipped_nonfinite=trainer.skipped_nonfinite,
            loss_config=dataclasses.asdict(loss),
            replay=stats.get("mix"),
        )
    if trainer.is_world_process_zero():
        save_final_model(trainer.model, tokenizer, output_dir / "model", lora.lora_r > 0)
        write_jsonl_atomic(output_dir / "metrics.jsonl", trainer.state.log_history)
        write_json_atomic(output_dir / "train_summary.json", summary)
    return summary


def configs(method: str) -> tuple[type, ...]:
    """The settings the command line fills for `--method`, in the order `main` hands them to `run` (LossConfig
    is parsed for dpo/simpo too, so --loss given with them is named as such, not as unknown)."""
    trainer = PreferenceTrainConfig if method in PREFERENCE_METHODS else TrainConfig
    return (TrainArguments, ModelArguments, LoraArguments, LossConfig, trainer, RunArguments)
