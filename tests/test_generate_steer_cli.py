"""`meloformer generate --chords` and `--infill` end to end, through the console script."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import symusic

from _music import REPO, demo_files
from meloformer.chords import parse_chord
from meloformer.cli import main
from meloformer.edits import crop_bars
from meloformer.hid import CHORD_QUALITIES, NOTE_COLUMNS, HIDTokenizer

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
            "--model.config.n_layer", "1", "--model.config.n_embd", "32", "--model.config.ffn_hidden", "128",
            "--model.config.n_head", "2", "--model.config.n_kv_head", "1",
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
    assert "prompt tracks: 1 Choir Aahs, 2 Choir Aahs, 3 Voice Oohs, 4 Voice Oohs" in out
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
        ([*prompt, "--infill", "5:1-2"], "track 5 is out of range; the prompt's tracks are 1 Choir Aahs, 2 Choir"),
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


D_MINOR = {2, 4, 5, 7, 9, 10, 0, 1}  # D E F G A Bb C, and the leading tone C#


def test_key_dynamics_and_named_instruments_bound_the_written_midi(checkpoint, tmp_path, capsys):
    args = ["--ckpt_path", str(checkpoint), "--bars", "4", "--instruments", "piano", "Violin", "drums", "--seed", "1"]
    code, _, err = generate(*args, "--key", "D minor", "--dynamics", "20-40", "90-110", "--out", str(tmp_path),
                            capsys=capsys)  # fmt: skip
    assert code == 0, err
    score = symusic.Score(str(tmp_path / "sample_0.mid"))
    assert sorted((t.is_drum, t.program) for t in score.tracks) == [(False, 0), (False, 40), (True, 0)]
    pitched = [n for t in score.tracks if not t.is_drum for n in t.notes]
    assert pitched and {n.pitch % 12 for n in pitched} <= D_MINOR
    (meter,) = score.time_signatures  # the model's choice, held
    bar = score.ticks_per_quarter * 4 * meter.numerator // meter.denominator
    for note in (n for t in score.tracks for n in t.notes):
        assert (20 <= note.velocity <= 40) if note.time < 2 * bar else (90 <= note.velocity <= 110)
    for marker in score.markers:  # the conductor's own chords stay in the key too
        root, quality = parse_chord(marker.text)
        assert {(root + k) % 12 for k in CHORD_QUALITIES[quality]} <= D_MINOR, marker.text


def test_dynamics_change_the_velocities_and_nothing_else(checkpoint, tmp_path, capsys):
    """Dynamics shape the written piece: the model samples its notes with its own velocities, so two ranges give
    the same notes (steering the Vel tokens instead changed what the model wrote next)."""
    notes = {}
    for dynamics in ("20-40", "100-120"):
        out = tmp_path / dynamics
        args = ("--ckpt_path", str(checkpoint), "--bars", "4", "--seed", "3", "--dynamics", dynamics)
        code, _, err = generate(*args, "--out", str(out), capsys=capsys)
        assert code == 0, err
        score = symusic.Score(str(out / "sample_0.mid"))
        notes[dynamics] = [[(n.time, n.pitch, n.duration, n.velocity) for n in t.notes] for t in score.tracks]
    soft, loud = notes["20-40"], notes["100-120"]
    assert [[n[:3] for n in t] for t in soft] == [[n[:3] for n in t] for t in loud] and sum(map(len, soft)) > 8
    assert all(20 <= n[3] <= 40 for t in soft for n in t) and all(100 <= n[3] <= 120 for t in loud for n in t)


def test_the_default_sample_is_a_four_voice_choir_in_one_meter(checkpoint, tmp_path, capsys):
    code, _, err = generate("--ckpt_path", str(checkpoint), "--out", str(tmp_path), capsys=capsys)
    assert code == 0, err
    score = symusic.Score(str(tmp_path / "sample_0.mid"))
    assert [t.program for t in score.tracks] == [52, 52, 53, 53]
    assert len(score.time_signatures) == 1  # one meter, the model's choice (this untrained model's is random)
    assert len({n.velocity for t in score.tracks for n in t.notes}) > 1  # the default dynamics move


def test_voice_leading_reaches_the_written_midi(checkpoint, tmp_path, capsys):
    """An untrained model's four voices leap anywhere; with ``--voice_leading`` they cross less than the same
    seeds do with ``--voice_leading off``, and a choir gets it without asking (``auto``). (Parallels are counted
    on the written MIDI, where a MIDI reader may shorten a note held into the next onset of its pitch, so a few
    can appear; ``test_voice_leading.py`` counts them on the sampled tokens.)"""
    from meloformer.features import piece_features

    measured, written = {}, {}
    for flags in (["--voice_leading", "off"], ["--voice_leading"], []):
        out = tmp_path / "-".join(flags or ["auto"])
        code, _, err = generate("--ckpt_path", str(checkpoint), *flags, "--num_samples", "2", "--seed", "3",
                                "--bars", "4", "--out", str(out), capsys=capsys)  # fmt: skip
        assert code == 0, err
        features = [piece_features(TOK, TOK.encode(out / f"sample_{k}.mid")) for k in range(2)]
        measured[out.name] = [(f["parallels"], f["crossings"]) for f in features]
        written[out.name] = [(out / f"sample_{k}.mid").read_bytes() for k in range(2)]
    assert all(parallels <= 0.05 for parallels, _ in measured["--voice_leading"]), measured
    assert sum(c for _, c in measured["--voice_leading"]) < sum(c for _, c in measured["--voice_leading-off"])
    assert written["auto"] == written["--voice_leading"]  # the default choir is steered


def test_voice_leading_auto_leaves_other_ensembles_alone(checkpoint, tmp_path, capsys):
    """Piano and violin are not a choir: ``auto`` samples them as ``--voice_leading off`` does, note for note."""
    written = {}
    for flags in (["--voice_leading", "off"], []):
        out = tmp_path / "-".join(flags or ["auto"])
        code, _, err = generate("--ckpt_path", str(checkpoint), *flags, "--instruments", "piano", "violin",
                                "--bars", "4", "--seed", "5", "--out", str(out), capsys=capsys)  # fmt: skip
        assert code == 0, err
        written[out.name] = (out / "sample_0.mid").read_bytes()
    assert written["auto"] == written["--voice_leading-off"]
    code, _, err = generate("--ckpt_path", str(checkpoint), "--voice_leading", "always", "--out", str(tmp_path / "x"),
                            capsys=capsys)  # fmt: skip
    assert code == 2 and "--voice_leading" in err and "'always'" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--instruments", "vilin"], "unknown instrument 'vilin' (a General MIDI name or program 0-127; close"),
        (["--instruments", "200"], "instrument '200': a General MIDI program is 0-127"),
        (["--key", "H minor"], "key 'H minor': write a tonic A-G"),
        (["--key", "D dorian"], "key 'D dorian': write a tonic A-G"),
        (["--dynamics", "70-40"], "dynamics '70-40': write a velocity range LO-HI within 1-127"),
        (["--dynamics", "loud"], "dynamics 'loud': write a velocity range"),
        (["--dynamics", "1-2"], "dynamics '1-2': no velocity step inside"),
        (["--meter_changes", "--time_signature", "3/4"], "--meter_changes lets the model choose the meters"),
        (["--restatement", "-1"], "restatement must be 0 (off) or more, got -1"),
    ],
)  # fmt: skip
def test_bad_instruments_keys_and_dynamics_are_one_line_errors(checkpoint, tmp_path, capsys, args, problem):
    code, _, err = generate("--ckpt_path", str(checkpoint), "--out", str(tmp_path / "out"), *args, capsys=capsys)
    assert code == 2 and problem in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
