"""kill -9 at random moments of `generate`, `export`, `render` and `preprocess`: every file they leave is either
complete and valid or absent (a hidden ``.NAME.PID.tmp`` may remain; it is never read as a result).

Each command is run once whole to learn its duration, then killed (its whole process group, SIGKILL) at 20
moments drawn uniformly over that duration, and its output checked after every kill.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import wave
from collections.abc import Callable
from pathlib import Path

import pytest
import symusic
from PIL import Image

from _music import demo_files
from meloformer.datamodules.shards import read_index, verify_shards
from meloformer.hid import read_midi
from meloformer.pretrained import verify_model_folder

KILLS = 20
pytestmark = pytest.mark.slow


def visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def run_whole(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([shutil.which("meloformer"), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - started


def kill_at_random_moments(args: list[str], cwd: Path, check: Callable[[], None], seed: int) -> list[float]:
    """Run ``args`` KILLS times, each killed with SIGKILL after a random part of its whole duration, and
    ``check`` the outputs after each kill; returns the moments."""
    duration = run_whole(args, cwd)
    check()
    rng = random.Random(seed)
    moments = []
    for _ in range(KILLS):
        moment = rng.uniform(0.2, duration)
        process = subprocess.Popen(
            [shutil.which("meloformer"), *args],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(moment)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the command and any worker it started
        process.wait(timeout=60)
        moments.append(moment)
        check()
    return moments


def check_wav(path: Path) -> None:
    with wave.open(str(path)) as wav:
        frames = wav.getnframes()
        assert wav.getnchannels() == 2 and frames > 0
        assert path.stat().st_size == 44 + 4 * frames  # a 16-bit stereo WAV: header plus every frame


def test_generate_killed_at_random_leaves_only_whole_samples(tiny_checkpoint, tmp_path):
    out = tmp_path / "samples"
    args = ["generate", "--ckpt_path", str(tiny_checkpoint), "--out", str(out), "--bars", "2", "--instruments", "0"]
    args += ["--num_samples", "3", "--audio", "--overwrite", "--no_progress"]

    def check() -> None:
        for path in visible(out):
            assert path.name.startswith("sample_"), path
            if path.suffix == ".mid":
                assert read_midi(path).note_num() >= 0
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
            else:
                assert path.suffix == ".wav", path
                check_wav(path)

    kill_at_random_moments(args, tmp_path, check, seed=1)


def test_export_killed_at_random_leaves_a_whole_model_folder_or_none(tiny_checkpoint, tmp_path):
    out = tmp_path / "model"
    args = ["export", "--ckpt_path", str(tiny_checkpoint), "--out", str(out), "--overwrite"]

    def check() -> None:
        if out.exists():
            verify_model_folder(out)
            assert {p.name for p in visible(out)} == {"model.safetensors", "config.json", "README.md", "checksums.json"}

    kill_at_random_moments(args, tmp_path, check, seed=2)


def test_render_killed_at_random_leaves_a_whole_wav_or_none(tmp_path):
    midi = next(f for f in demo_files() if "bach" in str(f))
    wav = tmp_path / "out.wav"
    seconds = symusic.Score(str(midi)).to("second").end()

    def check() -> None:
        assert [p.name for p in visible(tmp_path)] in ([], ["out.wav"])
        if wav.exists():
            check_wav(wav)
            with wave.open(str(wav)) as audio:
                assert abs(audio.getnframes() / audio.getframerate() - seconds) < 0.05

    kill_at_random_moments(["render", str(midi), str(wav), "--overwrite"], tmp_path, check, seed=3)


def test_preprocess_killed_at_random_leaves_a_consistent_dataset_that_a_rerun_completes(tmp_path):
    source = tmp_path / "midi"
    source.mkdir()
    files = demo_files()[:12]
    for number, path in enumerate(files):
        shutil.copy(path, source / f"{number:02d}{path.suffix}")
    out = tmp_path / "shards"
    args = ["preprocess", str(source), str(out), "--shard_files", "2", "--workers", "2", "--no_progress"]

    def check() -> None:
        if (out / "index.json").exists():
            index = read_index(out)
            assert verify_shards(out) == []
            listed = {shard["file"] for shard in index["shards"]}
            for shard in out.glob("shard_*.u16"):  # at most the next shard, written whole, not yet in the index
                assert shard.name in listed or shard.name == f"shard_{len(listed):05d}.u16", shard
        if (out / "report.txt").exists():
            assert "\nduplicates:\n" in (out / "report.txt").read_text()

    checks = []

    def check_then_sometimes_start_over() -> None:
        check()
        checks.append(1)
        if len(checks) % 2:  # every other kill lands on a fresh run, the rest on a resumed one
            shutil.rmtree(out, ignore_errors=True)

    kill_at_random_moments(args, tmp_path, check_then_sometimes_start_over, seed=4)
    run_whole(args, tmp_path)  # over what the last kill left: a rerun completes the dataset
    check()
    index = read_index(out)
    assert len(index["pieces"]) + len(index["skipped"]) + len(index["duplicates"]) == len(files)
