"""Trainer callbacks of ``deltatune train``: a graceful Ctrl-C, and a record of losses and speed.

Ctrl-C (SIGINT) during training does not kill the run: the first one asks the Trainer to finish
the optimizer step in progress, write a resumable checkpoint and stop; a second one stops at once
(the last checkpoint on disk is kept). :class:`StepBoundary` tells whether the model is between
optimizer steps, i.e. whether the weights, optimizer and scheduler agree on ``global_step`` and a
checkpoint written now would resume correctly.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from transformers import TrainerCallback


class StepBoundary(TrainerCallback):
    """Tracks whether the Trainer is outside the optimizer-step / scheduler-step / counter update."""

    def __init__(self) -> None:
        self.consistent = True
        """False between ``optimizer.step()`` and ``global_step += 1``."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.consistent = False

    def on_step_end(self, args, state, control, **kwargs):
        self.consistent = True


class GracefulInterrupt(TrainerCallback):
    """First SIGINT: checkpoint after the current optimizer step and stop. Second: KeyboardInterrupt now.

    Use as a context manager around ``trainer.train()``; the previous SIGINT handler is restored on
    exit. Outside the main thread (where signal handlers cannot be installed) it does nothing and a
    Ctrl-C raises KeyboardInterrupt as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        """Set by the first SIGINT (or by :meth:`request`)."""
        self.stopped_at: int | None = None
        """``global_step`` at which the requested stop happened."""
        self._previous: Any = None

    def request(self) -> None:
        """Ask for a checkpoint-and-stop at the end of the current optimizer step."""
        self.requested = True

    def _handler(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a resumable checkpoint and stopping "
              "(press Ctrl-C again to stop immediately, keeping the last checkpoint).", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class RunRecorder(TrainerCallback):
    """Collects the run's loss curve and throughput for ``metrics.json`` and the plot.

    Tokens are the non-padding input tokens the Trainer counted (``include_num_input_tokens_seen``).
    """

    def __init__(self) -> None:
        self.train_loss: list[tuple[int, float]] = []
        """(step, mean training loss since the previous log)."""
        self.eval_loss: list[tuple[int, float]] = []
        """(step, eval loss)."""
        self.train_seconds = 0.0
        """Wall time inside ``trainer.train()`` (this session only, when resumed)."""
        self.tokens = 0
        """Input tokens processed in this session."""
        self._start: float | None = None
        self._tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._tokens_at_start = int(state.num_input_tokens_seen or 0)
        # A resumed run's history comes back in state.log_history: keep the whole curve.
        self.train_loss = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
        self.eval_loss = [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h]

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.train_loss.append((state.global_step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.eval_loss.append((state.global_step, float(logs["eval_loss"])))

    def on_train_end(self, args, state, control, **kwargs):
        self._finish(state)

    def _finish(self, state) -> None:
        if self._start is not None:
            self.train_seconds = time.perf_counter() - self._start
            self.tokens = int(state.num_input_tokens_seen or 0) - self._tokens_at_start

    def finish(self, state) -> None:
        """Close the timing when training ended without ``on_train_end`` (an exception)."""
        if self._start is not None and not self.train_seconds:
            self._finish(state)
