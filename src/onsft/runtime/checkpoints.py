"""Training outputs on disk: the newest complete checkpoint to resume from, the final model written
atomically, and failed writes (a full disk) turned into one-line errors."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from onsft.errors import UserError
from onsft.runtime.records import atomic_directory

# How torch.save and safetensors word a failed write (they raise RuntimeError / SafetensorError, not OSError).
_WRITE_FAILURES = (
    "inline_container",
    "PytorchStreamWriter",
    "file write failed",
    "No space left",
    "Disk quota",
    "File too large",
    "Read-only file system",
)


def last_checkpoint(output_dir: str | Path) -> str | None:
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


def holds_every_step(path: str | Path) -> bool:
    """True when a complete checkpoint is its run's last: its step reached the total the trainer planned
    (recorded in the checkpoint, so it holds for --num_train_epochs runs too, whose --max_steps is -1)."""
    state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    planned = state.get("max_steps") or 0
    return planned > 0 and state.get("global_step", 0) >= planned


def is_write_failure(error: BaseException) -> bool:
    """True when a library error is a failed write (a full disk, mostly)."""
    return any(mark in str(error) for mark in _WRITE_FAILURES)


@contextlib.contextmanager
def write_failures_as_user_errors(output_dir: str | Path):
    try:
        yield
    except Exception as error:  # torch's RuntimeError, safetensors' SafetensorError
        if not is_write_failure(error):
            raise
        raise UserError(
            f"writing a checkpoint or the model failed ({str(error).strip().splitlines()[0]})",
            where=str(output_dir),
            fix="free disk space, then rerun the same command: it resumes from the last complete checkpoint.",
        ) from None


def save_final_model(model, tokenizer, folder: Path, lora: bool) -> None:
    """The trained model at `folder` (renamed into place when complete): with LoRA, the adapter under
    `adapter/` for peft users and the merged weights that plain `from_pretrained` loads."""
    with write_failures_as_user_errors(folder.parent), atomic_directory(folder) as tmp:
        if lora:
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
