"""Resume across run-time changes: the architecture is compared, the run-time knobs are free, old checkpoints
resume by path, and reading what a checkpoint says about itself stays cheap."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
import zipfile

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_MODEL, model_flags
from lightning.pytorch.callbacks import ModelCheckpoint

from _music import REPO
from meloformer.callbacks import PhaseSwitchCallback
from meloformer.checkpoint import CheckpointError, read_checkpoint, read_checkpoint_metadata
from meloformer.cli import main
from meloformer.datamodules import HIDDataModule
from meloformer.model import RUNTIME_FIELDS, MeloFormerConfig
from meloformer.module import MeloFormerModule, load_checkpoint, model_card

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
]
TINY_FIT = [
    "fit", "--config", str(REPO / "configs" / "demo.yaml"),
    *model_flags(TINY_MODEL),
    "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
]  # fmt: skip


class Losses(pl.Callback):
    """The training loss of every batch, by the optimizer step it belongs to."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((trainer.global_step, float(outputs["loss"])))


def fit(shards, root, max_steps: int, ckpt_path=None, **runtime) -> list[tuple[int, float]]:
    pl.seed_everything(0)
    module = MeloFormerModule(TINY_MODEL["config"], TINY_MODEL["runtime"] | runtime, lr=2e-3, warmup_steps=2)
    losses = Losses()
    every_step = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)
    phases = PhaseSwitchCallback([{"start_step": 0, "batch_size": 2}])
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[phases, every_step, losses],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    data = HIDDataModule(str(shards), max_seq_len=256, max_segments=64, transpose=3)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return losses.losses


@pytest.mark.parametrize(
    "runtime",
    [{"gradient_checkpointing": "block"}, {"gradient_checkpointing": "ffn", "flex_block_size": 64}],
    ids=["checkpointing-block", "checkpointing-ffn-tiles-64"],
)
def test_resume_with_other_run_time_knobs_continues_with_the_same_losses(demo_shards, tmp_path, runtime):
    whole = fit(demo_shards, tmp_path / "whole", max_steps=5)
    (ckpt,) = (tmp_path / "whole").glob("*-step=2.ckpt")
    assert not set(RUNTIME_FIELDS) & set(torch.load(ckpt, weights_only=True)["meloformer"]["model_config"])
    resumed = fit(demo_shards, tmp_path / "resumed", 5, ckpt, **runtime)
    assert [step for step, _ in resumed] == [step for step, _ in whole[2:]] == [3, 4, 5]  # after each step
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in whole[2:]], rel=1e-4)


@pytest.fixture(scope="module")
def cli_checkpoint(demo_shards, tmp_path_factory):
    """``last.ckpt`` of two steps of ``meloformer fit`` with the tiny model (a read-only original)."""
    root = tmp_path_factory.mktemp("tiny-run")
    with contextlib.chdir(root):
        assert main([*TINY_FIT, "--data.data_dir", str(demo_shards), "--trainer.max_steps", "2"]) == 0
    (last,) = root.rglob("last.ckpt")
    return last


def resume_by_path(ckpt, shards, root, *args: str) -> int:
    with contextlib.chdir(root):
        return main(
            [*TINY_FIT, "--data.data_dir", str(shards), "--trainer.max_steps", "3", "--ckpt_path", str(ckpt), *args]
        )


# The hyperparameters of older checkpoints: the model fields one by one (the run-time knobs at None), and
# before them ``overrides``; both with a ``size``.
FLAT = {"size": "small", **TINY_MODEL["config"]}
FLAT |= {"attention_backend": None, "gradient_checkpointing": None, "flex_block_size": None}
OVERRIDES = {"size": "small", "max_seq_len": 256, "summary_slots": 64, "attention_backend": "sdpa"}
OVERRIDES |= {"overrides": {k: v for k, v in TINY_MODEL["config"].items() if k not in ("max_seq_len", "summary_slots")}}


@pytest.mark.parametrize("hyperparameters", [FLAT, OVERRIDES], ids=["flat-fields", "overrides"])
def test_an_old_checkpoint_resumes_by_path_with_other_run_time_knobs(
    cli_checkpoint, demo_shards, tmp_path, capsys, hyperparameters
):
    """A checkpoint from before ``slot_input``, whose stored configuration still held the run-time knobs, and
    whose hyperparameters are of an older shape: the CLI resumes it, with checkpointing on, as load_checkpoint
    loads it."""
    old = torch.load(cli_checkpoint, weights_only=True)
    stored = old["meloformer"]["model_config"]
    del stored["slot_input"]
    stored |= {"attention_backend": "sdpa", "flex_block_size": None, "gradient_checkpointing": "none"}
    training = {k: v for k, v in old["hyper_parameters"].items() if k not in ("config", "runtime")}
    old["hyper_parameters"] = training | hyperparameters
    torch.save(old, tmp_path / "old.ckpt")
    loaded = load_checkpoint(tmp_path / "old.ckpt")
    assert loaded.config.slot_input == "learned" and loaded.hparams.lr == old["hyper_parameters"]["lr"]
    flag = "--model.runtime.gradient_checkpointing"
    assert resume_by_path(tmp_path / "old.ckpt", demo_shards, tmp_path, flag, "block") == 0, capsys.readouterr().err
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 3 and resumed["hyper_parameters"]["runtime"]["gradient_checkpointing"] == "block"


def test_the_cli_refuses_what_the_module_refuses(cli_checkpoint, demo_shards, tmp_path, capsys):
    """The CLI and Lightning's restore run the same check: another architecture is one line, before training."""
    code = resume_by_path(cli_checkpoint, demo_shards, tmp_path, "--model.config.slot_input", "segment_mean")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "slot_input: checkpoint 'learned' vs now 'segment_mean'" in last, last
    assert not (tmp_path / "runs").exists()


def test_metadata_reads_skip_the_weights_and_full_reads_check_them(cli_checkpoint, tmp_path):
    """Flipped tensor bytes: the metadata read (and so ``model_card``) never looks at them, ``read_checkpoint``
    and ``load_checkpoint`` refuse the file; a damaged pickle is refused by both."""
    tensors, pickle = tmp_path / "tensors.ckpt", tmp_path / "pickle.ckpt"
    corrupt(cli_checkpoint, tensors, lambda name: "/data/" in name)
    corrupt(cli_checkpoint, pickle, lambda name: name.endswith("/data.pkl"))
    assert read_checkpoint_metadata(tensors)["global_step"] == 2
    assert "after 2 optimizer steps" in model_card(load_checkpoint(cli_checkpoint), tensors)
    for read in (read_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match="fails its CRC check"):
            read(tensors)
    with pytest.raises(CheckpointError, match="data.pkl fails its CRC check"):
        read_checkpoint_metadata(pickle)


def corrupt(path, damaged, which) -> None:
    """Copy the checkpoint to ``damaged`` with 16 bytes of its first entry matching ``which`` inverted, in place
    (the zip directory and the entry's recorded CRC stay as they were)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        entry = next(e for e in archive.infolist() if which(e.filename) and e.file_size >= 16)
    assert entry.compress_type == zipfile.ZIP_STORED
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length  # past the entry's local header
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    damaged.write_bytes(bytes(data))


def test_stored_configurations_of_every_age_are_read():
    """Older ones lack later fields or still hold the run-time knobs; a newer one's unknown field is one line."""
    stored = dataclasses.asdict(MeloFormerConfig(n_layer=2))
    del stored["slot_input"]
    old = MeloFormerConfig.from_stored(stored | {"attention_backend": "flex", "gradient_checkpointing": "block"})
    assert old == MeloFormerConfig(n_layer=2) and old.slot_input == "learned"
    del stored["attention"]  # saved before the variants: trained with summary, whatever today's default
    assert MeloFormerConfig.from_stored(stored | {"attention": "window"}).attention == "window"
    assert MeloFormerConfig.from_stored(stored).attention == "summary"
    with pytest.raises(ValueError, match="unknown model fields moe_experts"):
        MeloFormerConfig.from_stored(stored | {"moe_experts": 8})
