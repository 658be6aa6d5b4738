"""`meloformer generate --chords` and `--infill` end to end, through the console script."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import symusic

from _music import REPO, demo_files
from meloformer.cli import main
from meloformer.edits import crop_bars
from meloformer.hid import NOTE_COLUMNS, HIDTokenizer

TOK = HIDTokenizer()
TRACK, BAR = NOTE_COLUMNS.index("track"), NOTE_COLUMNS.index("bar")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_shards):
    """A tiny model fitted 3 steps on the demo shards, in this process (a console script costs ~10 s more)."""
    work = tmp_path_factory.mktemp("fit")
    with contextlib.chdir(work):
        code = main([
            "fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.data_dir", str(demo_shards),
            "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
            "--trainer.enable_model_summary", "false",
            "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--model.n_kv_head", "1",
        ])  # fmt: skip
    assert code == 0
    (last,) = (work / "runs" / "demo").rglob("last.ckpt")
    return last


def generate(*args: str, capsys) -> tuple[int, str, str]:
    """``meloformer generate ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main(["generate", "--no_progress", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_chords_are_the_markers_of_the_written_midi(checkpoint, tmp_path, capsys):
    args = ["--ckpt_path", str(checkpoint), "--bars", "5", "--instruments", "0", "--time_signature", "3/4"]
    code, _, err = generate(*args, "--chords", "C", "G", "Am", "F#m7", "--out", str(tmp_path), capsys=capsys)
    assert code == 0, err
    score = symusic.Score(str(tmp_path / "sample_0.mid"))
    bar = 3 * score.ticks_per_quarter  # a 3/4 bar
    assert [(m.time, m.text) for m in score.markers] == [
        (0, "Cmaj"), (bar, "Gmaj"), (2 * bar, "Amin"), (3 * bar, "F#min7"), (4 * bar, "Cmaj"),
    ]  # fmt: skip


def test_infill_keeps_the_prompt_outside_the_region(checkpoint, tmp_path, capsys):
    chorale = next(f for f in demo_files() if "bach" in str(f))
    args = ["--ckpt_path", str(checkpoint), "--prompt", str(chorale), "--prompt_bars", "3", "--num_samples", "2"]
    code, out, err = generate(*args, "--infill", "2:2-3", "4:1", "--out", str(tmp_path), capsys=capsys)
    assert code == 0, err
    assert "prompt tracks: 1 program 52, 2 program 52, 3 program 53, 4 program 53" in out
    prompt = crop_bars(TOK, TOK.encode(chorale), 0, 3)

    def outside(notes: np.ndarray) -> list[tuple[int, ...]]:
        inside = ((notes[:, TRACK] == 1) & (notes[:, BAR] >= 1)) | ((notes[:, TRACK] == 3) & (notes[:, BAR] == 0))
        return sorted(map(tuple, notes[~inside].tolist()))

    for k in range(2):
        written = tmp_path / f"sample_{k}.mid"
        tokens = TOK.encode(written)  # back from the file: on the grid, in MeloFormer's track order
        assert [t for t, _ in TOK.parse(tokens).tracks] == [t for t, _ in TOK.parse(prompt).tracks]
        assert outside(TOK.note_table(tokens)) == outside(TOK.note_table(prompt))
        assert [t.program for t in symusic.Score(str(written)).tracks] == [52, 52, 53, 53]
    assert (tmp_path / "sample_0.mid").read_bytes() != (tmp_path / "sample_1.mid").read_bytes()


def test_bad_chords_and_regions_are_one_line_errors(checkpoint, tmp_path, capsys):
    chorale = next(f for f in demo_files() if "bach" in str(f))
    prompt = ["--prompt", str(chorale), "--prompt_bars", "3"]
    for args, problem in [
        (["--chords", "C", "H7"], "unknown chord 'H7'; accepted forms, shown on C: C Cmaj CM | Cm"),
        ([*prompt, "--infill", "5:1-2"], "track 5 is out of range; the prompt's tracks are 1 program 52, 2 prog"),
        ([*prompt, "--infill", "1:2-4"], "bars 2-4 are outside the prompt's 3 bars"),
        ([*prompt, "--infill", "1-2"], "write TRACK:FIRST-LAST"),
        (["--infill", "1:1-2"], "--infill needs --prompt"),
        ([*prompt, "--infill", "1:1", "--chords", "C"], "--infill needs --prompt and keeps"),
        ([*prompt, "--add_track", "0", "--chords", "C"], "adding a track or regenerating bars keeps"),
    ]:
        code, _, err = generate("--ckpt_path", str(checkpoint), "--out", str(tmp_path), *args, capsys=capsys)
        assert code == 2 and problem in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written
