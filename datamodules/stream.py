"""The resumable, rank-split row stream behind the training DataLoader (docs/design.md sections 6 and 7).

Training rows form one endless stream of row indices (``RowBuilder`` turns an index into a row). The
stream's cursor, ``StreamState.position``, counts the rows that all ranks together have consumed. A
global batch of ``batch_size`` rows per rank covers the next ``world_size * batch_size`` indices; rank
``k`` takes the ``k``-th block of ``batch_size`` of them. So the stream does not depend on the number of
workers, and a run resumed with the same world size sees exactly the batches it has not seen yet.

A Lightning epoch is a slice of ``StreamState.num_batches`` batches of the stream. The DataModule counts a
batch as consumed when the training loop takes it (``on_before_batch_transfer``), not when a worker
prefetches it, so the state saved in a checkpoint is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate, get_worker_info

from meloformer.datamodules.rows import RowBuilder


@dataclass
class LoaderPlan:
    """How the next training epoch is loaded: per-rank batch size, worker processes and its length.

    ``num_batches`` None means one pass over the training pieces; ``phase`` is a label for logging.
    """

    batch_size: int
    num_workers: int = 0
    num_batches: int | None = None
    phase: int | None = None


@dataclass
class StreamState:
    """Cursor of the training stream; what checkpoints save and restore."""

    position: int = 0  # global rows consumed so far (all ranks)
    batch_size: int = 0  # per rank, in the current epoch
    num_batches: int = 0  # batches in the current epoch
    consumed: int = 0  # batches of the current epoch already consumed

    @property
    def epoch_finished(self) -> bool:
        return self.consumed >= self.num_batches

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("position", "batch_size", "num_batches", "consumed"):
            setattr(self, key, int(state[key]))


class RowDataset(Dataset):
    """Map-style dataset: index -> ``{"tokens", "row", "num_workers"}`` of one row of ``builder``.

    ``num_workers`` is what the process that built the row saw (0 in the main process), so a consumer can
    check how the batch was really loaded.
    """

    def __init__(self, builder: RowBuilder) -> None:
        self.builder = builder

    def __len__(self) -> int:
        return self.builder.rows_per_pass

    def __getitem__(self, index: int) -> dict[str, Any]:
        worker = get_worker_info()
        return {
            "tokens": torch.from_numpy(self.builder.row(index)),
            "row": index,
            "num_workers": 0 if worker is None else worker.num_workers,
        }


@dataclass
class CollateWithPlan:
    """Collate rows, then add what ``plan`` computes from their tokens (the model's ``MaskPlan``: side channels
    as ``batch["layout"]`` and the attention mask as ``batch["mask"]``), so that work runs in the DataLoader
    workers, off the training step's critical path. The plan is handed in: the data side knows no model."""

    plan: Callable[[Tensor], dict[str, Any]]

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(samples)
        return batch | self.plan(batch["tokens"])


class StreamSampler(DistributedSampler):
    """Yields this rank's row indices for the rest of the current epoch of ``state`` (for the whole next
    epoch when the epoch is over: Lightning iterates a loader again when it does not reload it).

    A ``DistributedSampler`` so that Lightning does not wrap it in another one under DDP: the split across
    ranks is done here. ``set_epoch`` is ignored: the data pass follows from the stream position.
    """

    def __init__(self, dataset: RowDataset, state: StreamState, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        self.state = state

    def __iter__(self) -> Iterator[int]:
        if self.state.epoch_finished:  # a loader iterated again (no reload between epochs): next epoch
            self.state.consumed = 0
        state, size = self.state, self.state.batch_size
        start = state.position + self.rank * size
        for batch in range(state.num_batches - state.consumed):
            first = start + batch * self.num_replicas * size
            yield from range(first, first + size)

    def __len__(self) -> int:
        """Rows of the whole epoch, consumed ones included (Lightning counts resumed epochs that way)."""
        return self.state.num_batches * self.state.batch_size

    def set_epoch(self, epoch: int) -> None:
        pass


class StreamLoader(DataLoader):
    """A DataLoader over a ``StreamSampler`` with ``state_dict``/``load_state_dict``, so Lightning resumes
    a checkpoint saved inside an epoch without warning and without splitting the epoch.

    ``plan`` is the plan the loader was built from (read by callbacks that log it).
    """

    def __init__(self, dataset: RowDataset, sampler: StreamSampler, plan: LoaderPlan, **kwargs: Any) -> None:
        super().__init__(
            dataset,
            batch_size=sampler.state.batch_size,
            sampler=sampler,
            drop_last=True,
            **kwargs,
        )
        self.plan = plan
        self.stream = sampler.state

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpoint's epoch; a finished one needs nothing (this loader starts the next)."""
        saved = StreamState()
        saved.load_state_dict(state_dict)
        if saved.epoch_finished:
            return
        if saved.batch_size != self.stream.batch_size:
            raise ValueError(
                f"the checkpoint's loader ran at batch size {saved.batch_size}, this one at {self.stream.batch_size}"
            )
        self.stream.load_state_dict(state_dict)


def worker_init(worker_id: int) -> None:
    """Keep each worker to one thread: rows are numpy work, and the model wants the cores."""
    torch.set_num_threads(1)
