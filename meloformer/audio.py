"""Audio from MIDI: symusic's SoundFont synthesizer with the General MIDI SoundFont that pretty_midi ships.

``TimGM6mb.sf2`` (6 MB, GPL-2) comes inside pretty_midi's wheel, so rendering needs no download. symusic
0.6.0's ``Synthesizer.render`` cannot return its buffer (``TypeError: Unable to convert function return
value``); ``pyproject.toml`` excludes that release and ``render_score`` names the fix if it is installed.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import symusic

from meloformer.files import atomic_path
from meloformer.hid import HIDError, read_midi

SAMPLE_RATE = 48000
SOUNDFONT = "TimGM6mb.sf2"
# symusic 0.5.9's synthesizer never returns on some pitched notes far above a TimGM6mb instrument's samples
# (at 48 kHz: pitches 102-108 of about a third of the programs, found by rendering every program x pitch; at
# 22.05 kHz from 93 on). Such notes sound whole octaves lower instead; tests render every program x pitch.
HIGHEST_PITCH = 101
# 20 minutes of 16-bit stereo at 48 kHz is 230 MB: the most a render writes unless told otherwise.
MAX_SECONDS = 1200.0


def soundfont_path() -> Path:
    """The General MIDI SoundFont inside the installed pretty_midi package."""
    spec = importlib.util.find_spec("pretty_midi")
    path = Path(spec.origin).parent / SOUNDFONT if spec and spec.origin else None
    if path is None or not path.is_file():
        raise OSError(f"no {SOUNDFONT}: audio needs the pretty_midi package (pip install pretty_midi)")
    return path


@lru_cache(maxsize=1)
def _synthesizer():
    return symusic.Synthesizer(str(soundfont_path()), sample_rate=SAMPLE_RATE)


def playable(score: symusic.Score) -> symusic.Score:
    """A copy of the score whose pitched notes above HIGHEST_PITCH move down by whole octaves."""
    score = score.copy(deep=True)
    for track in score.tracks:
        if not track.is_drum:
            for note in track.notes:
                if note.pitch > HIGHEST_PITCH:
                    note.pitch -= 12 * math.ceil((note.pitch - HIGHEST_PITCH) / 12)
    return score


def render_score(score: symusic.Score) -> np.ndarray:
    """Stereo float32 audio [2, samples] at SAMPLE_RATE of a score, scaled down only if it would clip."""
    try:
        audio = np.asarray(_synthesizer().render(playable(score), stereo=True), dtype=np.float32)
    except TypeError as err:
        raise RuntimeError(
            f"symusic {symusic.__version__} cannot render audio ({str(err).splitlines()[0]}); "
            "pip install 'symusic>=0.5.8,!=0.6.0'"
        ) from err
    peak = float(np.abs(audio).max(initial=0.0))
    return audio * (0.99 / peak) if peak > 0.99 else audio


def write_wav(path: str | Path, audio: np.ndarray) -> None:
    """Write [channels, samples] float audio in [-1, 1] at SAMPLE_RATE as 16-bit PCM (whole, or not at all)."""
    with atomic_path(path) as tmp:
        symusic.dump_wav(str(tmp), np.asfortranarray(audio, dtype=np.float32), SAMPLE_RATE, use_int16=True)


def render_midi(midi: str | Path | symusic.Score, wav: str | Path, max_seconds: float = MAX_SECONDS) -> float:
    """Render a MIDI file (or score) to a WAV file; returns its duration in seconds. A piece longer than
    ``max_seconds`` is refused before any audio is made (a tiny file can hold a note of days)."""
    if isinstance(midi, symusic.Score):
        score = midi
    else:
        try:
            score = read_midi(midi)
        except HIDError as err:
            raise ValueError(f"{midi}: not a readable MIDI file ({err})") from err
    seconds = score.to("second").end()
    if seconds > max_seconds:
        raise ValueError(
            f"{midi if not isinstance(midi, symusic.Score) else 'the piece'}: {seconds:,.0f} s of audio is more "
            f"than the limit of {max_seconds:,.0f} s (raise it with --max_seconds)"
        )
    if not Path(wav).parent.is_dir():
        raise OSError(f"{wav}: its folder does not exist")
    audio = render_score(score)
    write_wav(wav, audio)
    return audio.shape[-1] / SAMPLE_RATE
