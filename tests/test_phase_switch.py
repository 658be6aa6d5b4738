"""PhaseSwitchCallback: the batch size and worker count a training step receives change at the configured
optimizer steps, in a fresh run and in runs resumed from every checkpoint, including ones inside a phase."""

from __future__ import annotations

import csv
import logging
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from meloformer.callbacks import Phase, PhaseSwitchCallback
from meloformer.datamodules import HIDDataModule
from meloformer.hid import HIDTokenizer

PHASES = [
    {"start_step": 0, "batch_size": 1, "num_workers": 0},
    {"start_step": 3, "batch_size": 2, "num_workers": 1},
    {"start_step": 6, "batch_size": 3, "num_workers": 2},
]
ACCUMULATE = 2
MAX_STEPS = 8


class Probe(pl.LightningModule):
    """A minimal trainable module that records what every training step receives."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(HIDTokenizer().vocab_size, 4)
        self.received: list[tuple[int, int, int, tuple[int, ...]]] = []

    def training_step(self, batch, batch_idx):
        rows = tuple(batch["row"].tolist())
        self.received.append((self.global_step, len(batch["tokens"]), int(batch["num_workers"][0]), rows))
        return self.embedding(batch["tokens"]).float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(shards, root, ckpt_path=None, phases=PHASES, max_steps=MAX_STEPS):
    """Fit the probe with a checkpoint after every optimizer step; returns (probe, trainer, warnings)."""
    probe = Probe()
    data = HIDDataModule(str(shards), max_seq_len=128, max_segments=32)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=[
            PhaseSwitchCallback(phases),
            ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1),
        ],
        logger=CSVLogger(root, name="logs"),
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(probe, data, ckpt_path=ckpt_path)
    return probe, trainer, [str(w.message) for w in caught]


def per_step(received):
    """{optimizer step: (batch size, worker count)} and check every batch of a step agrees."""
    steps: dict[int, set] = {}
    for step, size, workers, _ in received:
        steps.setdefault(step, set()).add((size, workers))
    assert all(len(v) == 1 for v in steps.values()), steps
    return {step: v.pop() for step, v in steps.items()}


EXPECTED = {s: (1, 0) for s in range(3)} | {s: (2, 1) for s in range(3, 6)} | {s: (3, 2) for s in range(6, 8)}


@pytest.fixture(scope="module")
def fresh(demo_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    return run(demo_shards, root) + (root,)


def test_switches_at_the_configured_steps(fresh, caplog):
    probe, trainer, _, root = fresh
    assert per_step(probe.received) == EXPECTED
    assert len(probe.received) == MAX_STEPS * ACCUMULATE  # every step got exactly its accumulated batches
    assert trainer.global_step == MAX_STEPS
    rows = [row for *_, batch_rows in probe.received for row in batch_rows]
    assert rows == list(range(len(rows)))  # the stream is consumed in order, nothing skipped or repeated


def test_logs_what_the_step_really_got(fresh):
    *_, root = fresh
    with open(root / "logs" / "version_0" / "metrics.csv") as f:
        logged = {int(r["step"]): r for r in csv.DictReader(f) if r.get("phase")}
    assert sorted(logged) == list(range(MAX_STEPS))
    phases = [1, 1, 1, 2, 2, 2, 3, 3]  # phase of optimizer steps 0..7, read off PHASES
    for step, (size, workers) in EXPECTED.items():
        row = logged[step]
        phase = phases[step]
        assert (float(row["phase"]), float(row["batch_size"]), float(row["num_workers"])) == (phase, size, workers)


def test_prints_one_line_per_switch(demo_shards, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run(demo_shards, tmp_path, max_steps=7)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("phase ")]
    assert lines == [
        "phase 1/3 from optimizer step 0: batch_size 1, num_workers 0",
        "phase 2/3 from optimizer step 3: batch_size 2, num_workers 1",
        "phase 3/3 from optimizer step 6: batch_size 3, num_workers 2",
    ]


@pytest.mark.parametrize("resume_step", [4, 3, 1, 6, 7])
def test_resumed_runs_switch_at_the_same_steps(fresh, demo_shards, tmp_path, resume_step):
    """Resume from the checkpoint saved after ``resume_step`` optimizer steps: the rest of the run receives
    exactly what the uninterrupted run received, and Lightning neither warns nor splits the epoch."""
    probe, trainer, _, root = fresh
    (ckpt,) = (root / "checkpoints").glob(f"*-step={resume_step}.ckpt")
    resumed, resumed_trainer, caught = run(demo_shards, tmp_path, ckpt_path=ckpt)
    expected = [r for r in probe.received if r[0] >= resume_step]
    assert resumed.received == expected
    assert per_step(resumed.received) == {s: v for s, v in EXPECTED.items() if s >= resume_step}
    assert not [w for w in caught if "resumable" in w], caught
    assert resumed_trainer.current_epoch == trainer.current_epoch  # the interrupted epoch was not split


@pytest.mark.parametrize("reload", [0, 1])
def test_without_phases_an_epoch_is_a_pass_and_the_stream_goes_on(demo_shards, tmp_path, reload):
    """No callback: epochs of one pass over the pieces in whole optimizer steps; the next epoch (a reloaded
    loader, or the same loader iterated again) continues the stream."""
    probe = Probe()
    data = HIDDataModule(str(demo_shards), max_seq_len=128, max_segments=32, batch_size=4, num_workers=1)
    trainer = pl.Trainer(
        max_steps=30, accumulate_grad_batches=3, reload_dataloaders_every_n_epochs=reload, logger=False,
        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(probe, data)
    pieces = len(data.reader.pieces("train"))
    batches_per_epoch = pieces // (4 * 3) * 3
    assert trainer.num_training_batches == batches_per_epoch
    assert trainer.current_epoch == math.ceil(30 * 3 / batches_per_epoch)  # counts the one max_steps cut
    rows = [row for *_, batch_rows in probe.received for row in batch_rows]
    assert rows == list(range(30 * 3 * 4))


@pytest.mark.parametrize(
    ("phases", "problem"),
    [
        ([], "at least one phase"),
        ([{"start_step": 2, "batch_size": 1}], "must start at step 0"),
        (
            [
                {"start_step": 0, "batch_size": 1},
                {"start_step": 9, "batch_size": 2},
                {"start_step": 5, "batch_size": 3},
            ],
            "phase 3 starts at step 5, not after phase 2",
        ),
        ([{"start_step": 0, "batch_size": 1}, {"start_step": 0, "batch_size": 2}], "phase 2 starts at step 0"),
        ([{"start_step": 0, "batch_size": 0}], "batch_size 0"),
        ([{"start_step": 0, "batch_size": 1, "num_workers": -1}], "num_workers -1"),
    ],
)
def test_bad_phases_are_refused(phases, problem):
    with pytest.raises(ValueError, match=problem):
        PhaseSwitchCallback(phases)


def test_phases_accept_dataclasses_and_dicts():
    callback = PhaseSwitchCallback([Phase(0, 1), {"start_step": 10, "batch_size": 6, "num_workers": 8}])
    assert callback.phases == [Phase(0, 1, 0), Phase(10, 6, 8)]
    assert [callback.phase_at(s) for s in (0, 9, 10, 500)] == [0, 0, 1, 1]


def test_needs_a_datamodule_with_a_loader_schedule(tmp_path):
    class Loose(pl.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([{"tokens": torch.ones(4, dtype=torch.long)}])

    trainer = pl.Trainer(max_steps=1, callbacks=[PhaseSwitchCallback(PHASES)], logger=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a DataModule with a `loader_schedule`"):
        trainer.fit(Probe(), Loose())
