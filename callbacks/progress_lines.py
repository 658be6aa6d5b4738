"""``ProgressLines``: the progress of ``fit`` as plain lines, for a log file (``meloformer fit > log``).

A terminal progress bar redraws one line; redirected to a file it shows nothing until the end. The CLI uses
this callback instead whenever stdout is not a terminal: a line every ``every_n_steps`` optimizer steps
(step, loss, speed, time left) and one after each validation.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


class ProgressLines(ProgressBar):
    """Print ``step N/M, train/loss L, S steps/s, T elapsed, ~R left`` every ``every_n_steps`` optimizer steps
    (rank 0), and ``validation at step N: val/loss V`` after each validation."""

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"ProgressLines: every_n_steps must be at least 1, got {every_n_steps}")
        self.every = every_n_steps
        self._enabled = True
        self._started: tuple[float, int] | None = None
        self._printed_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer: pl.Trainer, line: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(line, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._printed_step or step % self.every or self._started is None:
            return
        self._printed_step = step
        started, first_step = self._started
        elapsed = time.monotonic() - started
        rate = (step - first_step) / max(elapsed, 1e-9)
        parts = [f"step {step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"step {step}"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"train/loss {float(loss):.3f}")
        parts += [f"{rate:.2f} steps/s", f"{_clock(elapsed)} elapsed"]
        if trainer.max_steps > 0 and rate > 0:
            parts.append(f"~{_clock((trainer.max_steps - step) / rate)} left")
        self._print(trainer, ", ".join(parts))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or loss is None:
            return
        self._print(trainer, f"validation at step {trainer.global_step}: val/loss {float(loss):.3f}")


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
