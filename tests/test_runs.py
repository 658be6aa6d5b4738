"""Training runs: one folder per run, last.ckpt always the run's newest state, atomic checkpoint files, one
learning curve across resumes, signals inside accumulated steps, machine mistakes as one line, and the
plain progress lines of a log file."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import TINY_MODEL, model_flags

from _music import REPO
from meloformer import runs
from meloformer.callbacks import PhaseSwitchCallback, StopCheckpoint, TrainingStopped
from meloformer.cli import main
from meloformer.datamodules import HIDDataModule
from meloformer.module import MeloFormerModule

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),
]
DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.fixture
def output(capsys, caplog):
    """What ``main`` printed: stdout, and stderr with Lightning's log lines (its handler holds the real stderr)."""
    caplog.set_level(logging.INFO)

    def read() -> tuple[str, str]:
        out, err = capsys.readouterr()
        lines = caplog.text
        caplog.clear()
        return out, lines + err

    return read


def fit(output, tmp_path, shards, *args: str) -> tuple[int, str, str]:
    """``meloformer fit`` of the demo config with the tiny model in ``tmp_path``: exit code, stdout, stderr."""
    tiny = model_flags(TINY_MODEL)
    with contextlib.chdir(tmp_path):
        code = main(
            ["fit", "--config", DEMO, *tiny, "--data.data_dir", str(shards), "--trainer.limit_val_batches", "1",
             "--trainer.val_check_interval", "2", "--trainer.max_steps", "2", *args]
        )  # fmt: skip
    out, err = output()
    return code, out, err


def step_of(path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


# ---------------------------------------------------------------------------------------------- run folders
def test_each_fresh_fit_gets_a_run_folder_and_a_resume_continues_it(demo_shards, tmp_path, output):
    """Two fresh fits: two run folders, each with its own last.ckpt (no last-v1.ckpt). A resume from the first
    continues its folder: last.ckpt becomes the newest step, and metrics.csv keeps the first steps' rows."""
    code, out, err = fit(output, tmp_path, demo_shards)
    assert code == 0, err[-3000:]
    first = tmp_path / "runs" / "demo" / "version_0"
    assert "run folder: runs/demo/version_0" in err
    assert f"checkpoint: {(first / 'checkpoints' / 'last.ckpt').resolve()}" in err
    assert list(first.glob("events.out.tfevents.*"))  # TensorBoard on the CPU path
    code, out, err = fit(output, tmp_path, demo_shards, "--trainer.max_steps", "4")
    assert code == 0, err[-3000:]
    second = tmp_path / "runs" / "demo" / "version_1"
    assert "run folder: runs/demo/version_1" in err
    assert step_of(first / "checkpoints" / "last.ckpt") == 2 and step_of(second / "checkpoints" / "last.ckpt") == 4

    last = first / "checkpoints" / "last.ckpt"
    code, out, err = fit(output, tmp_path, demo_shards, "--trainer.max_steps", "4", "--ckpt_path", str(last))
    assert code == 0, err[-3000:]
    assert f"run folder: {first.resolve()} (continued)" in err
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == ["last.ckpt"]
    assert step_of(last) == 4
    assert not (tmp_path / "runs" / "demo" / "version_2").exists()
    with open(first / "metrics.csv") as f:
        steps = sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("val/loss")})
    assert len(steps) == 2 and steps[0] == 1  # the first run's validation stays: one curve across the resume
    assert len(list(first.glob("events.out.tfevents.*"))) == 2  # TensorBoard reads both files as one run


def test_default_root_dir_moves_everything(demo_shards, tmp_path, output):
    code, _, err = fit(output, tmp_path, demo_shards, "--trainer.default_root_dir", "elsewhere/mine")
    assert code == 0, err[-3000:]
    assert not (tmp_path / "runs").exists()
    assert (tmp_path / "elsewhere" / "mine" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "elsewhere" / "mine" / "version_0" / "metrics.csv").is_file()


def test_the_cpu_config_trains_on_a_folder_into_default_root_dir(demo_shards, tmp_path, output):
    """The README's "train on your own folder": configs/cpu.yaml, a dataset folder, a root of one's own."""
    tiny = model_flags(TINY_MODEL)
    with contextlib.chdir(tmp_path):
        code = main(
            ["fit", "--config", "cpu.yaml", *tiny, "--data.data_dir", str(demo_shards), "--trainer.max_steps", "2",
             "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
             "--trainer.default_root_dir", "mine"]
        )  # fmt: skip
    _, err = output()
    assert code == 0, err[-3000:]
    run = tmp_path / "mine" / "version_0"
    assert step_of(run / "checkpoints" / "last.ckpt") == 2
    assert list(run.glob("events.out.tfevents.*")) and (run / "metrics.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_dirpath_holding_another_runs_checkpoints_is_refused(demo_shards, tmp_path, output):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"another run")
    code, _, err = fit(output, tmp_path, demo_shards, "--trainer.callbacks+=ModelCheckpoint",
                       f"--trainer.callbacks.dirpath={folder}")  # fmt: skip
    assert code == 2 and "holds another run's checkpoints" in err and "Traceback" not in err
    assert (folder / "last.ckpt").read_bytes() == b"another run"


def test_a_log_file_gets_progress_lines_and_no_adverts(demo_shards, tmp_path, output, recwarn):
    """stdout is not a terminal under pytest: plain lines instead of a progress bar; no Lightning adverts, no
    pytree deprecation warning, and the CPU thread count said."""
    code, out, err = fit(output, tmp_path, demo_shards, "--trainer.log_every_n_steps", "1")
    assert code == 0, err[-3000:]
    lines = out.splitlines()
    assert [line.split(",")[0] for line in lines if line.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert any(line.startswith("validation at step 2: val/loss ") for line in lines)
    assert "Tip:" not in out + err and "litlogger" not in out + err
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]
    assert "CPU threads: " in err


# ---------------------------------------------------------------------------------------------- atomic saves
def test_a_full_disk_keeps_the_previous_last_ckpt_whole(demo_shards, tmp_path, output, monkeypatch):
    code, _, err = fit(output, tmp_path, demo_shards)
    assert code == 0, err[-3000:]
    last = tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs.torch, "save", full_disk)
    code, _, err = fit(output, tmp_path, demo_shards, "--trainer.max_steps", "4", "--ckpt_path", str(last))
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"meloformer: error: {last.resolve()}: could not write the checkpoint (No space left on device); "
        "the previous last.ckpt is unchanged"
    )
    assert "Traceback" not in err
    assert last.read_bytes() == before and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def test_atomic_save_replaces_whole_files(tmp_path):
    io = runs.AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "ckpt" / "last.ckpt")
    io.save_checkpoint({"step": 2}, tmp_path / "ckpt" / "last.ckpt")
    assert torch.load(tmp_path / "ckpt" / "last.ckpt")["step"] == 2
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.ckpt"]


# ---------------------------------------------------------------------------------------------- machine mistakes
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--trainer.accelerator", "cuda"], ["trainer.accelerator cuda: this machine has no CUDA GPU"]),
        (["--config", "small.yaml"], ["no CUDA GPU", "small.yaml is a GPU config", "--config cpu.yaml"]),
        (["--trainer.devices", "0"], ["trainer.devices 0"]),
        (["--trainer.num_nodes", "2"], ["trainer.num_nodes 2", "wait forever", "NODE_RANK"]),
        (["--model.config.summary_slots", "1"], ["model.config.summary_slots 1 is too few", "raise it"]),
    ],
    ids=["cuda", "gpu-config", "devices-0", "two-nodes", "one-summary-slot"],
)
def test_machine_mistakes_are_one_line(demo_shards, tmp_path, output, monkeypatch, args, needles):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("MASTER_ADDR", "NODE_RANK", "SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    with contextlib.chdir(tmp_path):
        code = main(["fit", "--config", DEMO, "--data.data_dir", str(demo_shards), *args])
    _, err = output()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("meloformer: error: ")
    for needle in needles:
        assert needle in last


def test_an_empty_validation_or_test_split_is_warned(demo_shards, tmp_path):
    import json
    import shutil

    shards = shutil.copytree(demo_shards, tmp_path / "shards")
    index = json.loads((shards / "index.json").read_text())
    for piece in index["pieces"]:
        piece["split"] = "train"
    (shards / "index.json").write_text(json.dumps(index))
    data = HIDDataModule(str(shards), max_seq_len=256, max_segments=64)
    with pytest.warns(UserWarning) as caught:
        data.setup("fit")
    messages = " ".join(str(w.message) for w in caught)
    assert "'val' split has no pieces: training runs without validation" in messages
    assert "'test' split has no pieces" in messages


# ---------------------------------------------------------------------------------------------- signals
class SendSignal(pl.Callback):
    """SIGTERM to this process at the end of training batch ``at`` (counted from the run's start)."""

    def __init__(self, at: int) -> None:
        self.at, self.batches = at, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.batches == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.batches += 1


def _fit_accumulating(shards, root, max_steps, *callbacks, ckpt_path=None) -> MeloFormerModule:
    """Tiny model, 3 batches per optimizer step."""
    pl.seed_everything(0)
    module = MeloFormerModule(**TINY_MODEL)
    trainer = pl.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=root, accumulate_grad_batches=3,
        callbacks=[PhaseSwitchCallback([{"start_step": 0, "batch_size": 1}]), StopCheckpoint(), *callbacks],
    )  # fmt: skip
    trainer.fit(module, HIDDataModule(str(shards), max_seq_len=256, max_segments=64), ckpt_path=ckpt_path)
    return module


def test_a_signal_inside_an_accumulated_step_finishes_that_step(demo_shards, tmp_path):
    """SIGTERM after the first of the three batches of optimizer step 3: the next batch is still inside the
    step, so the checkpoint is of step 3 once its third batch is done, and a resume equals an uninterrupted run."""
    whole = _fit_accumulating(demo_shards, tmp_path / "whole", 4)
    with pytest.raises(TrainingStopped, match="after optimizer step 3"):
        _fit_accumulating(demo_shards, tmp_path / "cut", 4, SendSignal(at=6))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert step_of(last) == 3
    resumed = _fit_accumulating(demo_shards, tmp_path / "resumed", 4, ckpt_path=last)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_ranks_agree_on_a_stop_only_every_n_steps():
    """Under DDP the stop decision is a collective: asked every ``sync_every_n_steps`` steps, not every step."""
    asked = []
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: asked.append(decision) or False)
    trainer = SimpleNamespace(global_step=0, max_steps=100, world_size=2, strategy=strategy)
    stop = StopCheckpoint(sync_every_n_steps=10)
    for step in range(1, 31):
        stop.on_train_batch_start(trainer, None, None, 0)
        trainer.global_step = step
        stop.on_train_batch_end(trainer, None, None, None, 0)
    assert asked == [False, False, False]


# ---------------------------------------------------------------------------------------------- kill -9
_KILLS = textwrap.dedent(
    """
    import json, os, random, signal, sys, threading, time
    from pathlib import Path

    from meloformer.checkpoint import read_checkpoint
    from meloformer.cli import main

    config, root, kills = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    rng, checked, resumed = random.Random(0), {}, 0
    for _ in range(kills):
        lasts = sorted(root.glob("runs/demo/version_*/checkpoints/last.ckpt"))
        resume = ["--ckpt_path", str(lasts[-1])] if lasts else []
        resumed += bool(resume)
        read, write = os.pipe()
        child = os.fork()  # `meloformer fit` without paying for the imports again
        if child == 0:
            os.close(read)
            os.dup2(write, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os._exit(main(["fit", "--config", config, *resume]))
        os.close(write)
        stderr = os.fdopen(read)
        for line in stderr:  # set-up is done: the run folder is chosen, the trainer comes next
            if line.startswith("run folder:"):
                break
        threading.Thread(target=stderr.read, daemon=True).start()  # drain the rest
        time.sleep(rng.uniform(0.2, 3.0))
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        for path in root.glob("runs/demo/version_*/checkpoints/*.ckpt"):
            stamp = [path.stat().st_mtime_ns, path.stat().st_size]
            if checked.get(str(path)) != stamp:
                read_checkpoint(path)  # every entry against its CRC, then torch.load; raises if torn
                checked[str(path)] = stamp
    print(json.dumps({"checked": len(checked), "resumed": resumed}))
    """
)


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_only_whole_checkpoints(demo_shards, tmp_path):
    """20 `meloformer fit` runs (a checkpoint every step, each resuming the newest last.ckpt) killed with
    SIGKILL at random moments (setting up, training, saving): every checkpoint file left is whole and loads."""
    config = yaml.safe_load(open(DEMO))
    config["model"].update(TINY_MODEL)
    config["data"]["data_dir"] = str(demo_shards)
    config["trainer"].update(max_steps=100_000, limit_val_batches=0, enable_progress_bar=False)
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=1, save_top_k=2, monitor="step",
                                                           mode="max")  # fmt: skip
    config["trainer"]["callbacks"][1]["init_args"]["phases"] = [{"start_step": 0, "batch_size": 2}]
    (tmp_path / "kill.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "kills.py").write_text(_KILLS)
    # Temporary files on another file system, where one is: Lightning's own save copies its temporary file
    # over the checkpoint from there, which a kill can cut short.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "kills.py"), str(tmp_path / "kill.yaml"), str(tmp_path), "20"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["checked"] >= 2 and summary["resumed"] >= 10  # checkpoints were written, runs resumed them


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    from meloformer import machine

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for busy, threads in ((0.1, 2), (0.9, 1), (1.6, 1), (2.0, 1)):
        monkeypatch.setattr(machine, "busy_cores", lambda busy=busy: busy)
        assert machine.cpu_threads()[0] == threads, busy
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert machine.cpu_threads() == (3, "OMP_NUM_THREADS")
    assert 0 <= machine.busy_cores(0.05) <= os.cpu_count() + 1e-6
