"""``PhaseSwitchCallback``: batch size and DataLoader workers by optimizer step (docs/design.md section 7).

Lightning builds the training DataLoader once per epoch, so every phase boundary ends a Lightning epoch:

- the callback makes the Trainer reload dataloaders every epoch and registers itself as the DataModule's
  ``loader_schedule``;
- ``HIDDataModule.train_dataloader()`` asks ``plan(trainer)`` for the next epoch. Lightning calls it after
  a checkpoint's ``global_step`` is restored and before ``on_train_epoch_start``, so the phase is read from
  ``trainer.global_step``; the epoch gets exactly (optimizer steps left in the phase, or until
  ``max_steps``) x ``accumulate_grad_batches`` batches, so it ends on the boundary;
- a checkpoint saved inside an epoch restores the DataModule's stream (and the loader's state), so the
  resumed run finishes that epoch with the batches it had not seen and switches at the same step.

At every logged step it logs ``phase``, ``batch_size`` and ``num_workers`` as the step really got them: the
batch's row count, the worker count that the batch's own loader process reported, and the loader's plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from meloformer.datamodules import LoaderPlan


@dataclass(frozen=True)
class Phase:
    """From optimizer step ``start_step`` (counted from 0) on, load ``batch_size`` rows per rank with
    ``num_workers`` DataLoader processes."""

    start_step: int
    batch_size: int
    num_workers: int = 0


class PhaseSwitchCallback(pl.Callback):
    """Switch batch size and DataLoader workers at optimizer-step boundaries.

    Args:
        phases: ordered by ``start_step``; the first starts at 0. Plain dicts are accepted too.
    """

    def __init__(self, phases: Sequence[Phase]) -> None:
        self.phases = [Phase(**p) if isinstance(p, dict) else p for p in phases]
        check_phases(self.phases)
        self._announced: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "loader_schedule"):
            raise ValueError(
                "PhaseSwitchCallback needs a DataModule with a `loader_schedule` (such as HIDDataModule); "
                f"got {type(datamodule).__name__}"
            )
        if trainer.limit_train_batches not in (1.0, None):
            raise ValueError(
                "PhaseSwitchCallback sizes every epoch to end on a phase boundary; "
                f"limit_train_batches={trainer.limit_train_batches} would cut epochs short"
            )
        datamodule.loader_schedule = self
        trainer.reload_dataloaders_every_n_epochs = 1

    def phase_at(self, step: int) -> int:
        """Index of the phase that optimizer step ``step`` belongs to."""
        return max(i for i, p in enumerate(self.phases) if p.start_step <= step)

    def plan(self, trainer: pl.Trainer) -> LoaderPlan:
        """The next epoch: the current phase's loader, up to the next boundary or ``max_steps``."""
        step = trainer.global_step
        index = self.phase_at(step)
        phase = self.phases[index]
        ends = [p.start_step for p in self.phases[index + 1 : index + 2]]
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            ends.append(trainer.max_steps)
        num_batches = None
        if ends:
            num_batches = max(1, min(ends) - step) * trainer.accumulate_grad_batches
        return LoaderPlan(phase.batch_size, phase.num_workers, num_batches, phase=index)

    def observed(self, trainer: pl.Trainer, batch: Any) -> tuple[int, int, int]:
        """(phase, batch size, worker count) of ``batch`` as it was really loaded."""
        loader = trainer.train_dataloader
        plan: LoaderPlan | None = getattr(loader, "plan", None)
        phase = plan.phase if plan is not None and plan.phase is not None else self.phase_at(trainer.global_step)
        tokens = batch["tokens"] if isinstance(batch, dict) else batch[0]
        if isinstance(batch, dict) and "num_workers" in batch:
            workers = int(batch["num_workers"][0])
        else:
            workers = int(getattr(loader, "num_workers", 0))
        return phase, int(tokens.shape[0]), workers

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        phase, batch_size, workers = self.observed(trainer, batch)
        if phase != self._announced:
            self._announced = phase
            rank_zero_info(
                f"phase {phase + 1}/{len(self.phases)} from optimizer step {trainer.global_step}: "
                f"batch_size {batch_size}, num_workers {workers}"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        phase, batch_size, workers = self.observed(trainer, batch)
        for name, value in (("phase", phase + 1), ("batch_size", batch_size), ("num_workers", workers)):
            pl_module.log(name, float(value), on_step=True, on_epoch=False, batch_size=batch_size)


def check_phases(phases: Sequence[Phase]) -> None:
    """Raise ValueError naming the first problem: empty, not starting at 0, out of order, bad sizes."""
    if not phases:
        raise ValueError("phases: give at least one phase")
    if phases[0].start_step != 0:
        raise ValueError(f"phases: the first phase must start at step 0, not {phases[0].start_step}")
    for i, (a, b) in enumerate(zip(phases, phases[1:]), start=2):
        if b.start_step <= a.start_step:
            raise ValueError(
                f"phases: phase {i} starts at step {b.start_step}, not after phase {i - 1} ({a.start_step}); "
                "list phases in increasing start_step"
            )
    for i, p in enumerate(phases, start=1):
        if p.batch_size < 1:
            raise ValueError(f"phases: phase {i} has batch_size {p.batch_size}; it must be at least 1")
        if p.num_workers < 0:
            raise ValueError(f"phases: phase {i} has num_workers {p.num_workers}; it must be at least 0")
