"""Where a ``meloformer fit`` writes: one run folder per run, and checkpoint files that land whole.

A run folder is ``<trainer.default_root_dir>/version_N``: TensorBoard events, ``metrics.csv``,
``hparams.yaml``, ``config.yaml`` and ``checkpoints/``. A fresh fit takes the next free ``version_N``, so
it never writes over another run's files; a resume from ``<run>/checkpoints/*.ckpt`` continues that run's
folder and logs (one learning curve). Checkpoints are written to a temporary name in their own folder and
renamed into place, so ``last.ckpt`` is either the previous state or the new one, never a torn file.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

RUN_PREFIX = "version_"


def run_folder(root: str | Path, ckpt_path: str | None = None) -> Path:
    """The run folder of a fit: the one ``ckpt_path`` lives in (``<run>/checkpoints/*.ckpt``), else the next
    free ``version_N`` under ``root``."""
    if ckpt_path is not None and Path(ckpt_path).is_file():
        checkpoints = Path(ckpt_path).resolve().parent
        if checkpoints.name == "checkpoints" and checkpoints.parent.name.startswith(RUN_PREFIX):
            return checkpoints.parent
    taken = [p.name.removeprefix(RUN_PREFIX) for p in Path(root).glob(f"{RUN_PREFIX}*")]
    return Path(root) / f"{RUN_PREFIX}{max((int(n) for n in taken if n.isdigit()), default=-1) + 1}"


def run_loggers(folder: Path) -> list[Logger]:
    """TensorBoard and CSV loggers that both write into ``folder`` (continuing what is there)."""
    return [
        TensorBoardLogger(folder.parent, name="", version=folder.name, default_hp_metric=False),
        ContinuingCSVLogger(folder.parent, name="", version=folder.name),
    ]


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run appends to it instead."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume into the same version."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder); the previous file is kept."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a hidden temporary file in the checkpoint's own folder, ``fsync``, then rename.

    A crash or a kill leaves the previous checkpoint (or none) and at most a ``.NAME.tmp`` file, which the
    next save of that name removes."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself reaches the disk
            finally:
                os.close(folder)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
            raise CheckpointWriteError(
                f"{path}: could not write the checkpoint ({err.strerror or err}); {kept}"
            ) from None
