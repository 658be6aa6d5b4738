"""Audio: the SoundFont synthesizer renders sound where the notes are and silence elsewhere, as long as the
MIDI; `meloformer render` and `meloformer generate --audio` write such WAV files."""

from __future__ import annotations

import subprocess
import sys
import wave

import numpy as np
import pytest
import symusic

from _music import demo_files, make_score
from meloformer.audio import SAMPLE_RATE, playable, render_midi, render_score, soundfont_path
from meloformer.cli import main


def read_wav(path) -> tuple[np.ndarray, int]:
    """[channels, samples] float audio and the sample rate of a 16-bit WAV file."""
    with wave.open(str(path)) as wav:
        assert wav.getsampwidth() == 2
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768
        return data.reshape(-1, wav.getnchannels()).T, wav.getframerate()


def rms(audio: np.ndarray, start_s: float, end_s: float, rate: int = SAMPLE_RATE) -> float:
    return float(np.sqrt(np.mean(audio[:, int(start_s * rate) : int(end_s * rate)] ** 2)))


def test_soundfont_ships_with_pretty_midi():
    path = soundfont_path()
    assert path.name == "TimGM6mb.sf2" and path.read_bytes()[:4] == b"RIFF"


@pytest.mark.parametrize("program, is_drum, pitch", [(0, False, 60), (73, False, 72), (0, True, 38)])
def test_sound_only_where_the_note_is(program, is_drum, pitch):
    # 120 bpm: quarter = 0.5 s. Rest 1 s, a 1 s note, and the piece ends with the note at 2 s.
    score = make_score([(program, is_drum, [(2.0, 2.0, pitch, 100)])])
    audio = render_score(score)
    assert audio.shape[0] == 2 and audio.dtype == np.float32
    assert abs(audio.shape[1] / SAMPLE_RATE - 2.0) < 0.05
    assert rms(audio, 0.0, 0.95) < 1e-4  # silence before the onset
    loud = rms(audio, 1.0, 1.2)
    assert loud > 0.01 and np.abs(audio).max() <= 1.0


def test_more_notes_are_louder_and_clipping_is_avoided():
    one = render_score(make_score([(0, False, [(0.0, 2.0, 60, 100)])]))
    three = render_score(make_score([(0, False, [(0.0, 2.0, p, 100) for p in (60, 64, 67)])]))
    assert rms(three, 0.0, 0.5) > 1.5 * rms(one, 0.0, 0.5)
    cluster = [(0.0, 4.0, p, 127) for p in range(36, 96)]  # 60 loud notes at once would clip unscaled
    assert np.abs(render_score(make_score([(0, False, cluster)] * 4))).max() <= 0.99 + 1e-6


SWEEP = """
import symusic
from meloformer.audio import render_score
for program in range(-1, 128):  # -1: drums
    score = symusic.Score(480)
    track = symusic.Track(program=max(program, 0), is_drum=program < 0)
    for pitch in range(128):
        track.notes.append(symusic.Note(pitch * 120, 240, pitch, 90))
    score.tracks.append(track)
    render_score(score)
print("all rendered")
"""


@pytest.mark.slow
def test_every_program_and_pitch_renders_without_hanging():
    # symusic 0.5.9's synthesizer loops forever, holding the GIL, on some very high notes (see audio.py):
    # a child process, so that a regression fails here instead of hanging the suite.
    done = subprocess.run([sys.executable, "-c", SWEEP], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "all rendered" in done.stdout, done.stderr[-2000:]


def test_notes_above_the_highest_pitch_move_down_whole_octaves():
    score = make_score(
        [(0, False, [(0.0, 1.0, p, 90) for p in (60, 101, 102, 113, 114, 127)]), (0, True, [(0, 1, 110, 90)])]
    )
    moved = playable(score)
    assert [n.pitch for n in moved.tracks[0].notes] == [60, 101, 90, 101, 90, 103 - 12]
    assert [n.pitch for n in moved.tracks[1].notes] == [110]  # drums keep their keys
    assert [n.pitch for n in score.tracks[0].notes] == [60, 101, 102, 113, 114, 127]  # the input is untouched


def test_symusic_0_6_0_render_error_names_the_fix(monkeypatch):
    class Broken:  # what symusic 0.6.0's Synthesizer.render does
        def render(self, score, stereo):
            raise TypeError("Unable to convert function return value to a Python type! The signature was\n ...")

    monkeypatch.setattr("meloformer.audio._synthesizer", Broken)
    with pytest.raises(RuntimeError, match=r"cannot render audio \(Unable to convert .*symusic>=0.5.8,!=0.6.0"):
        render_score(make_score([(0, False, [(0.0, 1.0, 60, 90)])]))


def test_render_cli_writes_a_wav_as_long_as_the_midi(tmp_path):
    midi = next(f for f in demo_files() if "bach" in str(f))
    assert main(["render", str(midi), str(tmp_path / "out.wav")]) == 0
    audio, rate = read_wav(tmp_path / "out.wav")
    seconds = symusic.Score(str(midi)).to("second").end()
    assert rate == SAMPLE_RATE and audio.shape[0] == 2
    assert abs(audio.shape[1] / rate - seconds) < 0.05
    for start in np.arange(0, seconds - 2, 2.0):  # a chorale never pauses for 2 s: sound in every window
        assert rms(audio, start, start + 2.0) > 0.005, start
    assert render_midi(midi, tmp_path / "again.wav") == pytest.approx(seconds, abs=0.05)


@pytest.mark.parametrize(
    "args, problem",
    [
        (["missing.mid", "out.wav"], "missing.mid: no such file"),
        (["bad.mid", "out.wav"], "bad.mid: not a readable MIDI file"),
        (["good.mid", "nofolder/out.wav"], "out.wav: its folder does not exist"),
        (["truncated.mid", "out.wav"], "truncated.mid: not a readable MIDI file (cannot parse MIDI file: truncated"),
    ],
)
def test_render_cli_rejects_bad_input_in_one_line(args, problem, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.mid").write_bytes(b"not midi")
    make_score([(0, False, [(0.0, 1.0, 60, 90)])]).dump_midi(str(tmp_path / "good.mid"))
    whole = next(f for f in demo_files() if "bach" in str(f)).read_bytes()
    (tmp_path / "truncated.mid").write_bytes(whole[: len(whole) // 2])
    assert main(["render", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_generate_audio_writes_a_wav_beside_each_midi(tiny_checkpoint, tmp_path):
    args = ["generate", "--ckpt_path", str(tiny_checkpoint), "--out", str(tmp_path), "--bars", "2"]
    assert main([*args, "--instruments", "0", "--tempo", "120", "--num_samples", "2", "--audio", "--no_progress"]) == 0
    for k in range(2):
        audio, rate = read_wav(tmp_path / f"sample_{k}.wav")
        seconds = symusic.Score(str(tmp_path / f"sample_{k}.mid")).to("second").end()
        assert abs(audio.shape[1] / rate - seconds) < 0.05 and rms(audio, 0, seconds) > 0.001
