"""Never train on damage: damaged shards and checkpoints refused, resumes with other settings refused, a
checkpoint of the step reached on SIGTERM / Ctrl-C, and fit mistakes as one short line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import zipfile

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, model_flags
from lightning.pytorch.callbacks import ModelCheckpoint

from _music import REPO
from meloformer import datamodules
from meloformer.callbacks import PhaseSwitchCallback, StopCheckpoint, TrainingStopped
from meloformer.checkpoint import CheckpointError, check_checkpoint_file, read_checkpoint
from meloformer.cli import main
from meloformer.datamodules import HIDDataModule
from meloformer.datamodules.shards import VERIFIED_NAME, ShardError, ShardReader
from meloformer.module import MeloFormerModule, load_checkpoint

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),
]
DEMO = str(REPO / "configs" / "demo.yaml")
# The demo config with the tiny model, quiet and quick.
TINY_FIT = [
    "fit", "--config", DEMO, *model_flags(TINY_MODEL),
    "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
]  # fmt: skip


def flip(path, offset: int, count: int = 64) -> None:
    """Invert ``count`` bytes of a file in place at ``offset`` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    start = offset % len(data)
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def run_main(capsys, *args: str) -> tuple[int, str]:
    """``meloformer ARGS`` in this process: exit code and stderr (an escaping exception fails the test)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err and "usage:" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("meloformer"), err[-2000:]
    for needle in needles:
        assert needle in last, last


@pytest.fixture
def shards(demo_shards, tmp_path):
    """A private copy of the demo shards (tests damage it)."""
    return shutil.copytree(demo_shards, tmp_path / "shards", ignore=shutil.ignore_patterns(VERIFIED_NAME))


@pytest.fixture(scope="module")
def tiny_checkpoint(demo_shards, tmp_path_factory):
    """``last.ckpt`` of two steps of ``meloformer fit`` with the tiny model (a read-only original)."""
    root = tmp_path_factory.mktemp("tiny-run")
    with contextlib.chdir(root):
        assert main([*TINY_FIT, "--data.data_dir", str(demo_shards), "--trainer.max_steps", "2"]) == 0
    (last,) = root.rglob("last.ckpt")
    return last


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    return shutil.copy(tiny_checkpoint, tmp_path / "model.ckpt")


# ---------------------------------------------------------------------------------------------- shards
def test_damaged_shard_is_refused_by_default_naming_it_and_the_repair(shards):
    HIDDataModule(str(shards))  # intact: opens
    flip(shards / "shard_00000.u16", 1000, count=2)
    with pytest.raises(ShardError) as caught:
        HIDDataModule(str(shards))
    message = str(caught.value)
    assert "shard_00000.u16: sha256 mismatch" in message
    assert f"meloformer preprocess MIDI_FOLDER {shards}" in message
    assert "\n" not in message


def test_shards_are_hashed_once_then_only_when_they_change(shards, monkeypatch):
    hashed = []
    real = datamodules.shards.sha256_file
    monkeypatch.setattr(datamodules.shards, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    names = sorted(p.name for p in shards.glob("*.u16"))
    ShardReader(shards)
    assert sorted(hashed) == names
    cache = json.loads((shards / VERIFIED_NAME).read_text())
    assert sorted(cache) == names
    hashed.clear()
    ShardReader(shards)
    assert hashed == []  # nothing changed: nothing hashed
    flip(shards / names[0], 10, count=2)  # a write changes the mtime
    with pytest.raises(ShardError, match=names[0]):
        ShardReader(shards)
    assert hashed == [names[0]]
    flip(shards / names[0], 10, count=2)  # repaired (same bytes as before, a new mtime): passes again
    ShardReader(shards)


def test_a_cache_entry_of_other_content_does_not_pass_a_shard(shards):
    """The cache vouches only for the exact (size, mtime, index sha256) it recorded."""
    ShardReader(shards)
    name = "shard_00000.u16"
    stat = (shards / name).stat()
    flip(shards / name, 4, count=2)
    os.utime(shards / name, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # another mtime, same size
    with pytest.raises(ShardError, match=name):
        ShardReader(shards)


def test_a_dataset_folder_that_cannot_be_written_is_still_verified(shards, monkeypatch):
    def read_only(src, dst):
        raise PermissionError(13, "Read-only file system", str(dst))

    monkeypatch.setattr(datamodules.shards.os, "replace", read_only)
    ShardReader(shards)  # passes, remembers nothing
    assert not (shards / VERIFIED_NAME).exists() and not list(shards.glob(".*.tmp"))
    flip(shards / "shard_00000.u16", 10, count=2)
    with pytest.raises(ShardError, match="shard_00000.u16"):
        ShardReader(shards)


def test_verify_checksums_false_checks_sizes_only(shards):
    flip(shards / "shard_00000.u16", 100, count=2)
    ShardReader(shards, verify_checksums=False)
    with open(shards / "shard_00000.u16", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ShardError, match="shard_00000.u16"):
        ShardReader(shards, verify_checksums=False)


def test_fit_and_evaluate_refuse_a_damaged_shard_in_one_line(shards, checkpoint, capsys, tmp_path):
    flip(shards / "shard_00000.u16", 5000, count=2)
    code, err = run_main(capsys, *TINY_FIT, "--data.data_dir", str(shards), "--trainer.max_steps", "2")
    assert_one_line_error(code, err, "shard_00000.u16", "meloformer preprocess")
    code, err = run_main(capsys, "evaluate", "--ckpt_path", str(checkpoint), "--data", str(shards))
    assert_one_line_error(code, err, "shard_00000.u16", "meloformer preprocess")


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: flip(p, p.stat().st_size // 2), "fails its CRC check"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
        (lambda p: p.write_bytes(b""), "truncated"),
        (lambda p: p.write_text("epoch: 3\n"), "not a checkpoint"),
        (lambda p: torch.save({"weights": torch.ones(3)}, p), "not a MeloFormer checkpoint"),
        (lambda p: zipfile.ZipFile(p, "w").close(), "not a checkpoint"),
        (lambda p: p.unlink(), "no such checkpoint file"),
    ],
    ids=["flipped-mid-file", "truncated", "empty", "text", "other-torch-file", "other-zip", "missing"],
)
def test_damaged_or_foreign_checkpoints_are_refused(checkpoint, damage, problem):
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(checkpoint)


def test_flipped_bytes_anywhere_are_detected(checkpoint):
    """64 flipped bytes at 40 offsets spread over the whole file: never loaded silently."""
    original = checkpoint.read_bytes()
    for offset in np.linspace(0, len(original) - 64, 40).astype(int):
        checkpoint.write_bytes(original)
        flip(checkpoint, int(offset))
        with pytest.raises(CheckpointError):
            read_checkpoint(checkpoint)
    checkpoint.write_bytes(original)
    check_checkpoint_file(checkpoint)  # and the intact file passes


def test_fit_resume_from_a_damaged_checkpoint_is_refused_and_leaves_it(checkpoint, demo_shards, capsys, tmp_path):
    flip(checkpoint, checkpoint.stat().st_size // 2)
    damaged = checkpoint.read_bytes()
    with contextlib.chdir(tmp_path):
        code, err = run_main(
            capsys, *TINY_FIT, "--data.data_dir", str(demo_shards), "--trainer.max_steps", "4",
            "--ckpt_path", str(checkpoint),
        )  # fmt: skip
    assert_one_line_error(code, err, "--ckpt_path", "damaged checkpoint")
    assert checkpoint.read_bytes() == damaged
    assert not (tmp_path / "runs").exists()  # stopped before training


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_generate_and_evaluate_refuse_a_damaged_checkpoint(checkpoint, demo_shards, command, capsys, tmp_path):
    flip(checkpoint, checkpoint.stat().st_size // 2)
    where = ["--out", str(tmp_path / "out")] if command == "generate" else ["--data", str(demo_shards)]
    code, err = run_main(capsys, command, "--ckpt_path", str(checkpoint), *where)
    assert_one_line_error(code, err, "damaged checkpoint")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_checkpoint_of_an_older_hid_format_is_refused_naming_it(checkpoint, capsys, tmp_path):
    """A checkpoint whose tokenizer wrote HID format version 1 (before the ensemble came first)."""
    state = torch.load(checkpoint, weights_only=False)
    state["meloformer"]["tokenizer"]["format_version"] = 1
    old = tmp_path / "v1.ckpt"
    torch.save(state, old)
    code, err = run_main(capsys, "generate", "--ckpt_path", str(old), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, str(old), "HID format version 1 is not supported")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- other settings
@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--model.config.n_embd", "64"], "n_embd: checkpoint 32 vs now"),
        (["--model.config.n_layer", "2"], "n_layer: checkpoint 1 vs now"),
        (["--model.config.max_seq_len", "512"], "max_seq_len: checkpoint 256 vs now 512"),
        (["--model.tokenizer", "{velocity_bins: 16}"], "velocity_bins: checkpoint 32 vs now 16"),
    ],
    ids=["width", "depth", "max_seq_len", "tokenizer"],
)
def test_resume_with_other_settings_is_refused_naming_them(checkpoint, demo_shards, change, named, capsys, tmp_path):
    with contextlib.chdir(tmp_path):
        code, err = run_main(
            capsys, *TINY_FIT, "--data.data_dir", str(demo_shards), "--trainer.max_steps", "4",
            "--ckpt_path", str(checkpoint), *change,
        )  # fmt: skip
    if "tokenizer" in change[0]:  # the demo shards were made with the default tokenizer: refused first
        assert_one_line_error(code, err, "velocity_bins")
    else:
        assert_one_line_error(code, err, str(checkpoint), named)
    assert not (tmp_path / "runs").exists()  # stopped before training


def test_resume_with_the_same_settings_continues(checkpoint, demo_shards, capsys, tmp_path):
    with contextlib.chdir(tmp_path):
        code, err = run_main(
            capsys, *TINY_FIT, "--data.data_dir", str(demo_shards), "--trainer.max_steps", "3",
            "--ckpt_path", str(checkpoint),
        )  # fmt: skip
    assert code == 0, err[-3000:]
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 3


# ---------------------------------------------------------------------------------------------- signals
class SendSignal(pl.Callback):
    """Sends ``signum`` to this process at the end of training batch ``at`` (counted from the run's start)."""

    def __init__(self, signum: int, at: int) -> None:
        self.signum, self.at, self.batches = signum, at, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.batches == self.at:
            os.kill(os.getpid(), self.signum)
        self.batches += 1


class Rows(pl.Callback):
    def __init__(self) -> None:
        self.rows: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.setdefault(trainer.global_step, []).extend(batch["row"].tolist())


def _fit(shards, root, max_steps, *callbacks, ckpt_path=None) -> tuple[MeloFormerModule, dict]:
    """Tiny model, two phases, 2 batches per optimizer step, an interval checkpoint every 3 steps."""
    pl.seed_everything(0)
    module, rows = MeloFormerModule(**TINY_MODEL), Rows()
    phases = [{"start_step": 0, "batch_size": 1}, {"start_step": 3, "batch_size": 2}]
    interval = ModelCheckpoint(root / "ckpt", every_n_train_steps=3, save_last=True)
    trainer = pl.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=root, accumulate_grad_batches=2,
        callbacks=[PhaseSwitchCallback(phases), interval, rows,
                   StopCheckpoint(), *callbacks],
    )  # fmt: skip
    trainer.fit(module, HIDDataModule(str(shards), max_seq_len=256, max_segments=64), ckpt_path=ckpt_path)
    return module, rows.rows


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_leaves_the_step_reached_and_resume_continues_exactly(demo_shards, tmp_path, signum):
    """Signalled in the first of the two batches of optimizer step 4 (inside phase 2's epoch): step 4 ends,
    is saved, fit stops; resuming gives the batches and parameters of an uninterrupted run."""
    whole, whole_rows = _fit(demo_shards, tmp_path / "whole", 6)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped, match=f"stopped by {signal.Signals(signum).name} after optimizer step 4"):
        _fit(demo_shards, tmp_path / "cut", 6, SendSignal(signum, at=6))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # not the interval checkpoint of step 3
    resumed, resumed_rows = _fit(demo_shards, tmp_path / "resumed", 6, ckpt_path=last)
    assert resumed_rows == {s: r for s, r in whole_rows.items() if s >= 4}
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_max_steps_leaves_the_last_step(demo_shards, tmp_path):
    _fit(demo_shards, tmp_path, 3)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "after"),
    [(signal.SIGTERM, "phase 1/2"), (signal.SIGINT, "phase 2/2")],
    ids=["SIGTERM-to-the-process", "Ctrl-C-to-the-group-with-a-worker"],
)
def test_a_signal_to_the_console_script(demo_shards, tmp_path, signum, after):
    """A real `meloformer fit`: SIGTERM from a scheduler, or Ctrl-C (SIGINT to the whole process group, its
    DataLoader worker included, in the demo's second phase): one notice, one line, exit 128 + signal, and
    last.ckpt of the step reached."""
    script = shutil.which("meloformer")
    args = [*TINY_FIT[1:], "--data.data_dir", str(demo_shards), "--trainer.max_steps", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fit = subprocess.Popen(
        [script, "fit", *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    for line in fit.stderr:  # the phase has started
        if line.startswith(after):
            break
    os.killpg(fit.pid, signum) if signum == signal.SIGINT else fit.send_signal(signum)
    out, err = fit.communicate(timeout=300)
    name = signal.Signals(signum).name
    assert fit.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    assert out.count(f"{name}: stopping after this optimizer step") == 1  # the worker stays quiet
    (line,) = [x for x in err.splitlines() if x.startswith(f"stopped by {name}")]
    last = (tmp_path / "runs" / "demo" / "version_0" / "checkpoints").resolve() / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    assert f"after optimizer step {step}; saved {last}" in line
    assert (1 if signum == signal.SIGTERM else 50) <= step < 100000


# ---------------------------------------------------------------------------------------------- fit mistakes
BAD_PHASES = "[{start_step: 0, batch_size: 2}, {start_step: 0, batch_size: 4}]"


def _no_train_split(demo_shards, tmp_path):
    shards = shutil.copytree(demo_shards, tmp_path / "no-train")
    index = json.loads((shards / "index.json").read_text())
    for piece in index["pieces"]:
        piece["split"] = "val" if piece["split"] == "train" else piece["split"]
    (shards / "index.json").write_text(json.dumps(index))
    return shards


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--trainer.max_steps", "-5"], ["trainer.max_steps must be a positive", "-5"]),
        (["--trainer.max_steps", "0"], ["trainer.max_steps must be a positive"]),
        (["--model.config.max_seq_len", "20"], ["model.config.max_seq_len 20", "only padding"]),
        (["--data.data_dir", "{no-train}"], ["'train' split has no pieces"]),
        (["--model.sise", "base"], ["unrecognized arguments: --model.sise"]),
        (["--trainer.max_steps", "many"], ["trainer.max_steps", "int"]),
        (
            ["--trainer.callbacks.init_args.phases", BAD_PHASES],
            ["phase 2 starts at step 0, not after phase 1"],
        ),
    ],
    ids=["max-steps-negative", "max-steps-zero", "rows-shorter-than-a-bar", "empty-train-split", "unknown-key",
         "wrong-type", "union-error"],
)  # fmt: skip
def test_fit_mistakes_are_one_short_last_line(demo_shards, tmp_path, capsys, args, needles):
    if "{no-train}" in args:
        args = [str(_no_train_split(demo_shards, tmp_path)) if a == "{no-train}" else a for a in args]
    else:
        args = ["--data.data_dir", str(demo_shards), *args]
    with contextlib.chdir(tmp_path):
        code, err = run_main(capsys, "fit", "--config", DEMO, "--trainer.enable_progress_bar", "false", *args)
    assert_one_line_error(code, err, *needles)
    assert code == 2
    assert len(err.strip().splitlines()[-1]) < 250
    assert not list(tmp_path.rglob("*.ckpt"))
