"""What a training run shows and reports, as users of transformers expect it, on stderr (results go to stdout).

transformers' own callbacks print each log as a Python dict to stdout (mixed into the command's result),
restart the bar at 0 after a resume and hide it entirely when the library is quiet; and its `training_loss`
covers only the steps run since the last resume. `TrainProgress` replaces them:
  - a bar over the optimiser steps (step count, rate, ETA) that starts at the resumed step;
  - "resuming: K of N done (steps, checkpoint-K)" when it does, as every resumable command says it;
  - one line per log with the step: `step 20/300  loss 1.234  grad_norm 0.5  learning_rate 1e-05 ...`;
  - a log at every checkpoint, so the log history a checkpoint carries covers all of its steps, and
    `whole_run_loss` can report the loss over the whole run after any number of resumes.
"""

from __future__ import annotations

import sys

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from onsft.runtime.progress import note_resume, progress


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TrainProgress(TrainerCallback):
    """The training bar and log lines on stderr, and the step a run (re)started from."""

    def __init__(self, show_bar: bool = True):
        self.show_bar = show_bar
        self.bar = None
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step
        if not state.is_world_process_zero:
            return
        # The bar does not exist yet: the line goes straight to stderr, like every resumable command's.
        note_resume("train", state.global_step, state.max_steps, f"steps, checkpoint-{state.global_step}")
        self.bar = progress(state.max_steps, "train", self.show_bar, unit="step", initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True  # the checkpoint's log history then covers every step before it
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The final log (this call's `train_loss`, runtime, ...) is reported by the command itself.
        if not state.is_world_process_zero or not logs or "train_loss" in logs:
            return
        text = "  ".join(f"{k} {_format(v)}" for k, v in logs.items() if k != "total_flos")
        self._write(f"step {state.global_step}/{state.max_steps}  {text}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def whole_run_loss(self, state, this_run_loss: float) -> float:
        """The mean training loss over the whole run: this call's steps (`this_run_loss`, as transformers
        reports it) and those before the resume, read from the logs the checkpoint carried (each logged loss
        is the mean over the steps since the previous log)."""
        steps_now = state.global_step - self.start_step
        total, steps, last = this_run_loss * steps_now, steps_now, 0
        for entry in state.log_history:
            step = entry.get("step", 0)
            if "loss" in entry and last < step <= self.start_step:
                total += entry["loss"] * (step - last)
                steps += step - last
                last = step
        return total / steps if steps else this_run_loss


def attach_progress(trainer, show_bar: bool) -> TrainProgress:
    """Replace transformers' progress and printer callbacks on `trainer` by a `TrainProgress`."""
    from transformers import trainer as trainer_module

    for callback in (ProgressCallback, PrinterCallback, trainer_module.DEFAULT_PROGRESS_CALLBACK):
        trainer.remove_callback(callback)
    shown = TrainProgress(show_bar)
    trainer.add_callback(shown)
    return shown
