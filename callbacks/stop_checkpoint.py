"""``StopCheckpoint``: SIGTERM or Ctrl-C ends ``fit`` with a checkpoint of the step reached.

A cluster scheduler sends SIGTERM some time before it kills a job; a person presses Ctrl-C. Either signal
only sets a flag. At the end of the optimizer step in progress (never inside one, nor between the batches of
an accumulated step) ``last.ckpt`` is saved exactly as ``ModelCheckpoint`` saves
an interval checkpoint at that point (the DataModule's stream cursor included), so resuming from it continues
with the next step as if nothing had happened; then fit ends with ``TrainingStopped``. A second Ctrl-C
interrupts at once, without a checkpoint.

With several processes the ranks must stop at the same step, and asking them costs a collective (and a
host-device sync): they agree every ``sync_every_n_steps`` optimizer steps, so a signal stops the run at the
next multiple of it. One process checks its flag after every step, at no cost.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class TrainingStopped(Exception):
    """Fit stopped by a signal after saving a checkpoint (``signum``: which signal)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopCheckpoint(pl.Callback):
    """Save ``last.ckpt`` (in the ``ModelCheckpoint`` folder, else ``default_root_dir/checkpoints``) and stop
    at the next optimizer-step boundary after SIGTERM or the first Ctrl-C."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, sync_every_n_steps: int = 10) -> None:
        if sync_every_n_steps < 1:
            raise ValueError(f"StopCheckpoint: sync_every_n_steps must be at least 1, got {sync_every_n_steps}")
        self.sync_every = sync_every_n_steps
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = 0
        self._pid = os.getpid()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's own SIGTERM handler is registered, which would stop inside an accumulated step.
        self.received = None
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker (Ctrl-C reaches them too): the main process decides
            return
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.received is None:
            self.received = signum
            print(
                f"\n{signal.Signals(signum).name}: stopping after this optimizer step, with a checkpoint "
                "(Ctrl-C again: stop now, without one)",
                flush=True,
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.global_step in (self._step_at_batch_start, trainer.max_steps):  # mid-step, or done anyway
            return
        if trainer.world_size == 1:
            if self.received is None:
                return
        elif trainer.global_step % self.sync_every or not trainer.strategy.reduce_boolean_decision(
            self.received is not None, all=False
        ):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        signum = self.received or signal.SIGTERM  # another rank got the signal
        message = (
            f"stopped by {signal.Signals(signum).name} after optimizer step {trainer.global_step}; saved {path} "
            f"(resume: the same command with --ckpt_path {path})"
        )
        rank_zero_info(message)
        raise TrainingStopped(message, signum)

    @staticmethod
    def checkpoint_path(trainer: pl.Trainer) -> Path:
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is not None:
            folder = Path(checkpoint.dirpath)
        else:
            folder = Path(trainer.default_root_dir) / "checkpoints"
        return folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
