"""kill -9 at random moments of `generate`, `export`, `render` and `preprocess`: every file they leave is either
complete and valid or absent (a hidden ``.NAME.PID.tmp`` may remain; it is never read as a result).

Each command is run once whole to learn its duration, then killed (its whole process group, SIGKILL) at 20
moments drawn uniformly over that duration, and its output checked after every kill. The runs are forked from
one process that has imported the package (as a fork server does), so each costs the command's work, not the
seconds of importing torch; until the command runs nothing is written, so a kill there would prove nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator
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

# Reads one JSON argument list per line; forks a child that runs `meloformer ARGS` in a session of its own,
# prints its pid, waits for it and prints its exit status.
SERVER = """
import contextlib, json, os, sys, tempfile
import torch
from meloformer.cli import main
import meloformer.audio, meloformer.infill, meloformer.module, meloformer.pianoroll, meloformer.pretrained
import meloformer.preprocess, meloformer.sampler
torch.set_num_threads(1)  # no thread pool to fork
with tempfile.TemporaryDirectory() as warm, contextlib.redirect_stdout(sys.stderr):
    main(json.loads(sys.argv[1]) + ["--out", warm])  # loads what generate loads lazily (~8 s a run)
for line in sys.stdin:
    args = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os._exit(main(args))
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


@pytest.fixture(scope="module")
def server(tiny_checkpoint) -> Iterator[subprocess.Popen]:
    warm = ["generate", "--ckpt_path", str(tiny_checkpoint), "--bars", "1", "--instruments", "0", "--no_progress"]
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, json.dumps(warm)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    yield process
    process.stdin.close()
    process.wait(timeout=60)


def run(server: subprocess.Popen, args: list[str], kill_after: float | None = None) -> int:
    """Run ``meloformer ARGS`` in a child of ``server``, killed with SIGKILL after ``kill_after`` seconds
    (with every process it started); returns its wait status."""
    server.stdin.write(json.dumps(args) + "\n")
    server.stdin.flush()
    pid = int(server.stdout.readline())
    if kill_after is not None:
        time.sleep(kill_after)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass
    return int(server.stdout.readline())


def visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def kill_at_random_moments(server, args: list[str], check: Callable[[], None], seed: int) -> list[float]:
    """Run ``args`` whole once, then KILLS times killed after a random part of that duration, and ``check``
    the outputs after each run; returns the moments."""
    started = time.perf_counter()
    assert run(server, args) == 0
    duration = time.perf_counter() - started
    check()
    rng = random.Random(seed)
    moments = []
    for _ in range(KILLS):
        moments.append(rng.uniform(0, duration))
        run(server, args, kill_after=moments[-1])
        check()
    return moments


def check_wav(path: Path) -> None:
    with wave.open(str(path)) as wav:
        frames = wav.getnframes()
        assert wav.getnchannels() == 2 and frames > 0
        assert path.stat().st_size == 44 + 4 * frames  # a 16-bit stereo WAV: header plus every frame


def test_generate_killed_at_random_leaves_only_whole_samples(server, tiny_checkpoint, tmp_path):
    out = tmp_path / "samples"
    args = ["generate", "--ckpt_path", str(tiny_checkpoint), "--out", str(out), "--bars", "2", "--instruments", "0"]
    args += ["--num_samples", "2", "--audio", "--overwrite", "--no_progress"]

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

    kill_at_random_moments(server, args, check, seed=1)


def test_export_killed_at_random_leaves_a_whole_model_folder_or_none(server, tiny_checkpoint, tmp_path):
    out = tmp_path / "model"
    args = ["export", "--ckpt_path", str(tiny_checkpoint), "--out", str(out), "--overwrite"]

    def check() -> None:
        if out.exists():
            verify_model_folder(out)
            assert {p.name for p in visible(out)} == {"model.safetensors", "config.json", "README.md", "checksums.json"}

    kill_at_random_moments(server, args, check, seed=2)


def test_render_killed_at_random_leaves_a_whole_wav_or_none(server, tmp_path):
    midi = next(f for f in demo_files() if "bach" in str(f))
    wav = tmp_path / "out.wav"
    seconds = symusic.Score(str(midi)).to("second").end()

    def check() -> None:
        assert [p.name for p in visible(tmp_path)] in ([], ["out.wav"])
        if wav.exists():
            check_wav(wav)
            with wave.open(str(wav)) as audio:
                assert abs(audio.getnframes() / audio.getframerate() - seconds) < 0.05

    kill_at_random_moments(server, ["render", str(midi), str(wav), "--overwrite"], check, seed=3)


def test_preprocess_killed_at_random_leaves_a_consistent_dataset_that_a_rerun_completes(server, tmp_path):
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

    kill_at_random_moments(server, args, check_then_sometimes_start_over, seed=4)
    assert run(server, args) == 0  # over what the last kill left: a rerun completes the dataset
    check()
    index = read_index(out)
    assert len(index["pieces"]) + len(index["skipped"]) + len(index["duplicates"]) == len(files)
