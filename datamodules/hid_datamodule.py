"""``HIDDataModule``: packed, resumable, rank-split rows of HID tokens from a shard folder (docs/design.md section 6).

Batches are dicts: ``tokens`` int64 ``[B, max_seq_len]`` (crops that each start with ``BOS``, then
``PAD``), ``row`` (the stream index of each row) and ``num_workers`` (the worker count of the loader that
built the batch).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from meloformer.datamodules.rows import RowBuilder
from meloformer.datamodules.shards import INDEX_NAME, SPLITS, ShardError, ShardReader, read_index
from meloformer.datamodules.stream import (
    CollateWithPlan,
    LoaderPlan,
    RowDataset,
    StreamLoader,
    StreamSampler,
    StreamState,
    worker_init,
)
from meloformer.hid import PAD, HIDTokenizer


class LoaderSchedule(Protocol):
    """Decides how each training epoch is loaded (``PhaseSwitchCallback`` is one)."""

    def plan(self, trainer: pl.Trainer) -> LoaderPlan: ...


def find_demo_corpus() -> Path:
    """The bundled demo MIDI folder, shipped as package data (``meloformer.demo``; ``demo/`` in a checkout)."""
    corpus = Path(str(resources.files("meloformer.demo") / "midi"))
    if not corpus.is_dir():
        raise FileNotFoundError(
            f"no data_dir given and the bundled demo corpus is missing (looked in {corpus}); "
            "pass --data.data_dir with a folder made by `meloformer preprocess`"
        )
    return corpus


def demo_cache_dir(tokenizer: HIDTokenizer) -> Path:
    """Where the demo corpus is preprocessed to: ``data/demo-shards`` (one folder per tokenizer setting), in
    the checkout the corpus lives in, or in the working folder when the package is installed."""
    checkout = find_demo_corpus().parents[1]
    root = (checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()) / "data"
    if tokenizer.settings == HIDTokenizer().settings:
        return root / "demo-shards"
    digest = hashlib.sha256(json.dumps(tokenizer.settings, sort_keys=True).encode()).hexdigest()[:10]
    return root / f"demo-shards-{digest}"


class HIDDataModule(pl.LightningDataModule):
    """Rows of ``max_seq_len`` tokens packed from bar-window crops of the pieces in ``data_dir``.

    Args:
        data_dir: a folder made by ``meloformer preprocess``; None uses the bundled demo corpus, preprocessed
            on first use into ``data/demo-shards``.
        max_seq_len: tokens per row (the model's context).
        max_segments: most (track, bar) segments per row: the model's summary slots. None: no limit.
        mask_plan: what the DataLoader workers add to each batch from its tokens: the model's ``MaskPlan``
            (side channels and attention mask; ``meloformer fit`` links it from the model). None: tokens only,
            and the model computes the rest in the step. A plan's ``doc_align`` sets where rows start their
            documents (``RowBuilder``).
        batch_size: rows per batch and rank (a ``LoaderSchedule`` such as ``PhaseSwitchCallback`` overrides it).
        val_batch_size: rows per validation/test batch; None: ``batch_size``.
        num_workers: DataLoader worker processes (overridden per phase for training, as ``batch_size``).
        seed: the training stream is a pure function of the seed and the row index.
        transpose: largest random transposition in semitones of training crops (0: off).
        fill_share: share of training crops written with a fill pass (``meloformer.fill``), which teaches the
            model to infill a region hearing both sides (0: off).
        source_weights: a data mixture: a training piece whose source path (as preprocess recorded it, relative
            to the MIDI folder) lies under a key's folder is drawn that many times as often as the others (weight
            1), for example ``{bach: 4}``. Every key must name a folder of the training split. None: evenly.
        random_windows: random crop windows for training rows (else windows start at bar 0).
        tokenizer: HID tokenizer settings the shards must have been made with (None: the defaults).
        max_open_shards: bound of the LRU of memory-mapped shards.
        verify_checksums: check every shard's sha256 when the shards are opened; a shard unchanged (size and
            mtime) since it last passed is not hashed again. False: sizes only.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        max_seq_len: int = 2048,
        max_segments: int | None = None,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        transpose: int = 0,
        fill_share: float = 0.0,
        source_weights: dict[str, float] | None = None,
        random_windows: bool = True,
        tokenizer: dict[str, Any] | None = None,
        max_open_shards: int = 8,
        verify_checksums: bool = True,
        mask_plan: Callable[[Tensor], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("max_seq_len", max_seq_len, 16),
            ("batch_size", batch_size, 1),
            ("val_batch_size", val_batch_size, 1),
            ("max_segments", max_segments, 1),
            ("num_workers", num_workers, 0),
            ("transpose", transpose, 0),
            ("max_open_shards", max_open_shards, 1),
        ):
            if value is not None and value < low:
                raise ValueError(f"data: {name} must be at least {low}, got {value}")
        if not 0 <= fill_share <= 1:
            raise ValueError(f"data: fill_share must lie in 0..1, got {fill_share}")
        for folder, weight in (source_weights or {}).items():
            if not weight >= 0:
                raise ValueError(f"data: source_weights[{folder!r}] must be at least 0, got {weight}")
        try:
            self.tokenizer = HIDTokenizer(**(tokenizer or {}))
        except TypeError as err:
            raise ValueError(f"data: bad tokenizer settings {tokenizer}: {err}") from err
        self.save_hyperparameters(ignore=["mask_plan"])  # the model's, not a data setting
        self.data_dir = data_dir
        self.max_seq_len = max_seq_len
        self.max_segments = max_segments
        self.mask_plan = mask_plan
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.transpose = transpose
        self.fill_share = fill_share
        self.source_weights = dict(source_weights or {})
        self.random_windows = random_windows
        self.max_open_shards = max_open_shards
        self.verify_checksums = verify_checksums
        self.loader_schedule: LoaderSchedule | None = None
        self.stream = StreamState()
        self.reader: ShardReader | None = None
        self._builders: dict[str, RowBuilder] = {}
        if data_dir is None:
            find_demo_corpus()  # fail now, not at the first batch, if it is missing
        else:
            self._open_reader()  # a missing folder or other tokenizer settings fail here, before training

    # ------------------------------------------------------------------ data preparation
    @property
    def root(self) -> Path:
        return Path(self.data_dir) if self.data_dir is not None else demo_cache_dir(self.tokenizer)

    def prepare_data(self) -> None:
        """Preprocess the demo corpus on first use (once per machine; a file lock guards concurrent runs)."""
        if self.data_dir is not None:
            return
        from meloformer.preprocess import preprocess  # only needed for the demo corpus

        cache = self.root
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.parent / f".{cache.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (cache / INDEX_NAME).is_file() and read_index(cache)["tokenizer"] != self.tokenizer.settings:
                rank_zero_info(f"the demo corpus cache {cache} is of another HID format: preprocessing it again")
                shutil.rmtree(cache)  # a cache of bundled files: nothing is lost
            if not (cache / INDEX_NAME).is_file() or not (cache / "report.txt").is_file():
                rank_zero_info(f"preprocessing the demo corpus {find_demo_corpus()} into {cache} (first use)")
                summary = preprocess(find_demo_corpus(), cache, self.tokenizer, progress=False)
                for line in summary.lines():
                    rank_zero_info(f"  {line}")

    def _open_reader(self) -> ShardReader:
        if self.reader is None:
            if not (self.root / INDEX_NAME).is_file():
                raise ShardError(
                    f"data_dir {self.root}: no dataset here (no {INDEX_NAME}); "
                    f"make one with `meloformer preprocess MIDI_FOLDER {self.root}`"
                )
            self.reader = ShardReader(
                self.root,
                max_open_shards=self.max_open_shards,
                expected_settings=self.tokenizer.vocab_settings(),
                verify_checksums=self.verify_checksums,
            )
        return self.reader

    def setup(self, stage: str | None = None) -> None:
        """Open the shards; the split the stage needs (train, val or test) must not be empty."""
        reader = self._open_reader()
        needed = {"fit": "train", "validate": "val", "test": "test"}.get(stage or "fit")
        if needed is not None and len(reader.pieces(needed)) == 0:
            raise ShardError(
                f"{self.root}: the {needed!r} split has no pieces (rerun `meloformer preprocess` with more files "
                "or smaller --val_fraction/--test_fraction)"
            )
        for split in SPLITS:
            if split not in self._builders and len(reader.pieces(split)) > 0:
                self._builders[split] = RowBuilder(
                    reader,
                    split,
                    self.tokenizer,
                    self.max_seq_len,
                    max_segments=self.max_segments,
                    seed=self.seed,
                    random_windows=self.random_windows,
                    transpose=self.transpose,
                    doc_align=getattr(self.mask_plan, "doc_align", 1),
                    fill_share=self.fill_share,
                    weights=self._piece_weights(reader.split_sources(split)) if split == "train" else None,
                )
        if needed == "train":
            self._check_rows_hold_pieces()
            for split, what in (("val", "training runs without validation"), ("test", "`meloformer test` has no rows")):
                if len(reader.pieces(split)) == 0:
                    rank_zero_warn(
                        f"{self.root}: the {split!r} split has no pieces: {what} (rerun `meloformer preprocess` "
                        f"with more files or a larger --{split}_fraction)"
                    )

    def _piece_weights(self, sources: list[str]) -> np.ndarray | None:
        """One weight per piece from ``source_weights``; a key no training piece lies under is refused by name."""
        if not self.source_weights:
            return None
        weights = np.ones(len(sources))
        for folder, weight in self.source_weights.items():
            prefix = folder.strip("/") + "/"
            under = np.array([src.startswith(prefix) for src in sources], dtype=bool)
            if not under.any():
                raise ShardError(f"{self.root}: data.source_weights: no training piece lies under {folder!r}")
            weights[under] = weight
        if weights.sum() == 0:
            raise ShardError(f"{self.root}: data.source_weights gives every training piece the weight 0")
        return weights

    def _check_rows_hold_pieces(self, probe: int = 32) -> None:
        """Refuse rows too short (or with too few summary slots) for a bar of most training pieces: most rows
        would be only padding, and a batch of them trains at a loss of 0."""
        builder = self._builders["train"]
        rows = range(min(probe, builder.rows_per_pass))

        def padding_only(builder: RowBuilder) -> int:
            return sum(not (builder.row(i) != PAD).any() for i in rows)

        empty = padding_only(builder)
        if 2 * empty > len(rows) and self.max_segments is not None:
            unlimited = RowBuilder(
                builder.reader,
                "train",
                self.tokenizer,
                self.max_seq_len,
                seed=self.seed,
                random_windows=self.random_windows,
                transpose=self.transpose,
            )
            if 2 * padding_only(unlimited) <= len(rows):  # the rows are long enough; the slots are too few
                raise ValueError(
                    f"model.config.summary_slots {self.max_segments} is too few for the pieces in {self.root}: "
                    f"{empty} of the first {len(rows)} training rows would be only padding (a bar needs a slot per "
                    "track); raise it"
                )
        if 2 * empty > len(rows):
            raise ValueError(
                f"model.config.max_seq_len {self.max_seq_len} (with {self.max_segments} summary slots) is too "
                f"short for the pieces in {self.root}: {empty} of the first {len(rows)} training rows would be "
                "only padding (not one bar fits); raise it"
            )

    # ------------------------------------------------------------------ loaders
    def _topology(self) -> tuple[int, int, int]:
        """(rank, world size, accumulated batches per optimizer step)."""
        if self.trainer is None:
            return 0, 1, 1
        return self.trainer.global_rank, self.trainer.world_size, self.trainer.accumulate_grad_batches

    def train_dataloader(self) -> StreamLoader:
        """The loader of the next epoch: continues an unfinished epoch (a resumed run), else starts one."""
        rank, world_size, accumulate = self._topology()
        if self.loader_schedule is not None:
            plan = self.loader_schedule.plan(self.trainer)
        else:
            plan = LoaderPlan(self.batch_size, self.num_workers)
        stream = self.stream
        if stream.epoch_finished:
            stream.batch_size = plan.batch_size
            if plan.num_batches is None:  # one pass over the pieces, in whole optimizer steps
                rows = self._builders["train"].rows_per_pass
                plan.num_batches = max(1, rows // (world_size * plan.batch_size * accumulate)) * accumulate
            stream.num_batches = plan.num_batches
            stream.consumed = 0
        elif stream.batch_size != plan.batch_size:
            raise ValueError(
                f"the checkpoint was saved inside an epoch loaded at batch size {stream.batch_size}, "
                f"but the schedule now asks for {plan.batch_size} at this step"
            )
        dataset = RowDataset(self._builders["train"])
        sampler = StreamSampler(dataset, stream, rank=rank, world_size=world_size)
        return StreamLoader(dataset, sampler, plan, **self._loader_kwargs(plan.num_workers))

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader | list:
        """Deterministic rows: one anchored at each piece of the split, split across ranks without repeating a
        row (``DistributedSampler`` pads the last round with repeated rows, which would count twice), so the
        loss is the same on any number of ranks (none: no loader)."""
        if split not in self._builders:
            return []
        rank, world_size, _ = self._topology()
        dataset = RowDataset(self._builders[split])
        if world_size > len(dataset):
            raise ValueError(
                f"{self.root}: the {split!r} split has {len(dataset)} pieces, fewer than the {world_size} ranks; "
                "every rank needs one"
            )
        sampler = UnrepeatedDistributedSampler(dataset, world_size, rank, shuffle=False) if world_size > 1 else None
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size or self.batch_size,
            sampler=sampler,
            **self._loader_kwargs(self.num_workers),
        )

    def _loader_kwargs(self, num_workers: int) -> dict[str, Any]:
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        collate = None if self.mask_plan is None else CollateWithPlan(self.mask_plan)
        return {
            "num_workers": num_workers,
            "worker_init_fn": worker_init if num_workers else None,
            "pin_memory": on_gpu,
            "collate_fn": collate,
        }

    # ------------------------------------------------------------------ the stream cursor
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a training batch as consumed when the loop takes it (prefetched batches are not)."""
        if self.trainer is not None and self.trainer.training:
            _, world_size, _ = self._topology()
            self.stream.position += world_size * self.stream.batch_size
            self.stream.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            rank_zero_info(f"data seed changed from {state_dict['seed']} to {self.seed}: the stream changes")
        self.stream.load_state_dict(state_dict["stream"])
