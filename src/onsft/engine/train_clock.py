"""Training time over the whole run, resumes included.

A run killed and resumed from a checkpoint trains in several calls; timing the last call alone makes its compute
look cheaper than an uninterrupted run's. `TrainClock` keeps the wall and CPU seconds spent training up to each
checkpoint inside the checkpoint itself (transformers saves an `ExportableState` callback's `state()` in
`trainer_state.json`, which a resume loads back), so a resumed call adds its own time to what the earlier calls
had saved. Time spent after the last checkpoint of a killed call is lost with that call's steps, which are
trained again.
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from onsft.runtime.clock import KEYS, plus, seconds_since, start


class TrainClock(TrainerCallback, ExportableState):
    """Wall and CPU (`time.process_time`, all threads) seconds of training: `before` (the earlier calls of this
    run, as their last checkpoint saved it) and this call's, `total()` both."""

    def __init__(self, wall_seconds: float = 0.0, cpu_seconds: float = 0.0):
        self.before = {"wall_seconds": wall_seconds, "cpu_seconds": cpu_seconds}
        self._started: tuple[float, float] | None = None
        self._stopped: dict[str, float] | None = None  # this call's seconds, once its training ended

    def resume_from(self, state) -> None:
        """Take the earlier calls' time from a trainer state loaded from a checkpoint (zero for a fresh run or a
        checkpoint written before onsft kept the clock)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) or {}
        self.before = {k: float(saved.get("args", {}).get(k, 0.0)) for k in KEYS}
        # transformers updates the entry of each exportable callback at every save and fails on a missing one.
        state.stateful_callbacks = {**(state.stateful_callbacks or {}), type(self).__name__: self.state()}

    def on_train_begin(self, args, state, control, **kwargs):
        self.resume_from(state)
        self._started, self._stopped = start(), None

    def on_train_end(self, args, state, control, **kwargs):
        self._stopped = self.this_call()

    def this_call(self) -> dict[str, float]:
        if self._stopped is not None:
            return self._stopped
        if self._started is None:
            return {k: 0.0 for k in KEYS}
        return seconds_since(self._started)

    def total(self) -> dict[str, float]:
        return plus(self.before, self.this_call())

    def state(self) -> dict:
        return {"args": self.total(), "attributes": {}}


def attach_clock(trainer) -> None:
    trainer.add_callback(TrainClock())


def clock_of(trainer) -> TrainClock:
    """The trainer's clock: looked up rather than kept, because `restore_callback_states_from_checkpoint`
    replaces an exportable callback by a new instance built from its saved state."""
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainClock))
