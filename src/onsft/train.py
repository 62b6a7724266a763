"""`onsft train`: fine-tune a causal LM with SFT (nll), DFT or IDFT; DPO / SimPO via `--method`.

    onsft train --model organism --data teacher.jsonl --loss idft --output_dir runs/idft --max_steps 300

Checkpoints go to `<output_dir>/checkpoint-N`; rerunning the same command resumes from the last one
(step counter, optimiser, scheduler, RNG and IDFT schedule restored). The final model is written to
`<output_dir>/model` (loadable with `from_pretrained`) under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from onsft.config import parse_command
from onsft.errors import UserError
from onsft.losses import LossConfig
from onsft.records import atomic_directory, check_writable, write_json_atomic, write_jsonl_atomic
from onsft.trainer import OnPolicySFTTrainer, TrainConfig

METHODS = ("sft", "dpo", "simpo")


@dataclass
class TrainInputs:
    model: str = field(default="organism", metadata={"help": "Hugging Face model name or local path, or `organism`."})
    data: str = field(default="", metadata={"help": "Training data (.jsonl/.parquet/.csv/saved dataset)."})
    eval_data: str | None = field(default=None, metadata={"help": "Validation data; reports the plain NLL."})
    method: str = field(default="sft", metadata={"help": "sft (token-weighted: --loss nll|dft|idft), dpo or simpo."})
    overlong: str = field(default="reject", metadata={"help": "Rows over --max_length: reject | truncate | drop."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA targets (peft syntax)."})
    resume: bool = field(default=True, metadata={"help": "Resume from the last checkpoint in output_dir if any."})


def _peft_config(inputs: TrainInputs):
    if inputs.lora_r <= 0:
        return None
    from peft import LoraConfig

    targets = inputs.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        r=inputs.lora_r,
        lora_alpha=inputs.lora_alpha,
        lora_dropout=inputs.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def _build_dataset(tokenizer, path: str, max_length: int, overlong: str):
    import datasets

    from onsft.data import encode_examples, load_examples

    examples = load_examples(path, require_response=True)
    encoded, stats = encode_examples(tokenizer, examples, max_length, overlong, where=path)
    table = datasets.Dataset.from_dict(
        {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]}
    )
    stats["response_tokens"] = sum(sum(1 for t in e.labels if t != -100) for e in encoded)
    stats["lengths"] = [(len(e.input_ids), e.line) for e in encoded]
    return table, stats


def _check_context(model, stats: dict, where: str) -> None:
    """Rows longer than the model's positions crash models with learned position embeddings (an IndexError
    deep in the forward pass) and leave the trained range of rotary ones; --max_length alone does not catch
    them when it is larger than the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    over = [(n, line) for n, line in stats["lengths"] if context and n > context]
    if over:
        raise UserError(
            f"{len(over)} row(s) are longer than the model's context of {context} tokens (first: {over[0][0]} tokens)",
            where=where,
            line=over[0][1],
            fix=f"pass --max_length {context} (or less), with --overlong truncate or drop if needed.",
        )


def _last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint. transformers writes a checkpoint's files in place and its
    trainer_state.json last, so a run killed (or out of disk) while saving leaves a folder without a
    readable one; resuming from that folder would crash, and the previous checkpoint is still there."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if suffix.isdigit() and path.is_dir():
            steps.append((int(suffix), path))
    for _, path in sorted(steps, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            print(f"onsft: skipping incomplete checkpoint {path} (interrupted while saving)", file=sys.stderr)
            continue
        return str(path)
    return None


def _settings(inputs: TrainInputs, loss_config: LossConfig, args: TrainConfig) -> dict:
    """Everything that decides the result of a run, as JSON (the output folder itself excluded)."""
    train_args = {k: v for k, v in args.to_dict().items() if k not in ("output_dir", "logging_dir")}
    return json.loads(
        json.dumps({"inputs": vars(inputs), "loss": vars(loss_config), "args": train_args}, sort_keys=True, default=str)
    )


def _finished_run(output_dir: Path, settings: dict) -> dict | None:
    """The summary of a completed run with the same settings: rerunning it must not train past its end."""
    summary_path = output_dir / "train_summary.json"
    if not (summary_path.is_file() and (output_dir / "model").is_dir()):
        return None
    summary = json.loads(summary_path.read_text())
    return summary if summary.get("settings") == settings else None


def run_training(inputs: TrainInputs, loss_config: LossConfig, args: TrainConfig) -> dict:
    """Validate everything a user can get wrong, then train; returns the summary written to train_summary.json."""
    from onsft.models import load_model, load_tokenizer

    loss_config.validate()
    if args.nonfinite not in ("stop", "skip"):
        raise UserError(f"unknown --nonfinite `{args.nonfinite}`", where="command line", fix="use stop or skip.")
    if not inputs.data:
        raise UserError("no training data given", where="command line", fix="pass --data FILE.")
    if not math.isfinite(args.learning_rate) or args.learning_rate < 0:
        # torch's optimiser would refuse it only after the data and the model are loaded, with a traceback.
        raise UserError(
            f"learning_rate must be a finite number >= 0, got {args.learning_rate}",
            where="command line",
            fix="pass e.g. --learning_rate 1e-5.",
        )
    check_writable(Path(args.output_dir) / "train_summary.json")
    settings = _settings(inputs, loss_config, args)
    finished = _finished_run(Path(args.output_dir), settings)
    if finished is not None:
        print(f"onsft: {args.output_dir} already holds this finished run; nothing to do.")
        return finished
    tokenizer = load_tokenizer(inputs.model)
    train_set, stats = _build_dataset(tokenizer, inputs.data, args.max_length, inputs.overlong)
    eval_set, eval_stats = (
        _build_dataset(tokenizer, inputs.eval_data, args.max_length, inputs.overlong)
        if inputs.eval_data
        else (None, None)
    )
    model = load_model(inputs.model)
    _check_context(model, stats, inputs.data)
    if eval_stats is not None:
        _check_context(model, eval_stats, inputs.eval_data)
    args.dataset_kwargs = {"skip_prepare_dataset": True}
    args.remove_unused_columns = False
    if eval_set is not None and args.eval_strategy == "no":
        args.eval_strategy = "steps"
        args.eval_steps = args.eval_steps or args.save_steps
    try:
        trainer = OnPolicySFTTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=_peft_config(inputs),
            loss_config=loss_config,
        )
    except ValueError as error:  # peft's NoMatchingPeftModuleError is a ValueError
        if "target modules" not in str(error).lower():
            raise
        raise UserError(
            str(error).split(". ")[0],
            where="command line",
            fix="pass --lora_target_modules with module names of this model, or all-linear.",
        ) from None
    resume_from = _last_checkpoint(args.output_dir) if inputs.resume else None
    started = time.time()
    with write_failures_as_user_errors(args.output_dir):
        result = trainer.train(resume_from_checkpoint=resume_from)
    summary = {
        "method": inputs.method,
        "loss": loss_config.loss,
        "model": inputs.model,
        "data": inputs.data,
        "global_step": trainer.state.global_step,
        "resumed_from": resume_from,
        "train_loss": result.training_loss,
        "wall_seconds_this_run": time.time() - started,
        "rows": stats["rows"],
        "dropped_overlong": stats["dropped"],
        "truncated_overlong": stats["truncated"],
        "response_tokens_per_epoch": stats["response_tokens"],
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "skipped_nonfinite": trainer.skipped_nonfinite,
        "loss_config": vars(loss_config),
        "settings": settings,
    }
    if trainer.is_world_process_zero():
        with write_failures_as_user_errors(args.output_dir):
            _save_final(trainer, tokenizer, Path(args.output_dir), inputs)
        write_jsonl_atomic(Path(args.output_dir) / "metrics.jsonl", trainer.state.log_history)
        write_json_atomic(Path(args.output_dir) / "train_summary.json", summary)
    return summary


@contextlib.contextmanager
def write_failures_as_user_errors(output_dir: str):
    try:
        yield
    except Exception as error:  # torch's RuntimeError, safetensors' SafetensorError
        if not is_write_failure(error):
            raise
        raise UserError(
            f"writing a checkpoint or the model failed ({str(error).strip().splitlines()[0]})",
            where=output_dir,
            fix="free disk space, then rerun the same command: it resumes from the last complete checkpoint.",
        ) from None


def is_write_failure(error: BaseException) -> bool:
    """torch.save and safetensors report a failed write (a full disk, mostly) as their own errors
    (RuntimeError, SafetensorError), not as OSError."""
    text = str(error)
    return any(
        mark in text
        for mark in (
            "inline_container",
            "PytorchStreamWriter",
            "file write failed",
            "No space left",
            "Disk quota",
            "File too large",
            "Read-only file system",
        )
    )


def _save_final(trainer, tokenizer, output_dir: Path, inputs: TrainInputs) -> None:
    model = trainer.model
    with atomic_directory(output_dir / "model") as tmp:
        if inputs.lora_r > 0:
            # Save the adapter for peft users and a merged model that plain `from_pretrained` loads.
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _method_of(argv: list[str]) -> str:
    """The --method (flag, else the config file's, else sft): it decides which options exist at all."""
    import argparse

    import yaml

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    method = known.method
    if method is None and known.config and Path(known.config).is_file():
        try:
            method = (yaml.safe_load(Path(known.config).read_text()) or {}).get("method")
        except (yaml.YAMLError, AttributeError):
            method = None  # parse_command reports the broken file properly
    method = method or "sft"
    if method not in METHODS:
        raise UserError(f"unknown method `{method}`", where="command line", fix=f"use one of {', '.join(METHODS)}.")
    return method


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if _method_of(argv) in ("dpo", "simpo"):
        from onsft.preference import train_preference

        summary = train_preference(argv)
    else:
        inputs, loss_config, args = parse_command(argv, TrainInputs, LossConfig, TrainConfig, prog="onsft train")
        summary = run_training(inputs, loss_config, args)
    print(json.dumps({k: summary[k] for k in ("global_step", "train_loss") if k in summary}))
    return 0
