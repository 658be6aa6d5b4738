"""Audio from MIDI: symusic's SoundFont synthesizer with the General MIDI SoundFont that pretty_midi ships.

``TimGM6mb.sf2`` (6 MB, GPL-2) comes inside pretty_midi's wheel, so rendering needs no download. symusic
0.6.0's ``Synthesizer.render`` cannot return its buffer (``TypeError: Unable to convert function return
value``); ``pyproject.toml`` excludes that release and ``render_score`` names the fix if it is installed.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import symusic

from meloformer.hid import HIDError, read_midi

SAMPLE_RATE = 22050
SOUNDFONT = "TimGM6mb.sf2"


def soundfont_path() -> Path:
    """The General MIDI SoundFont inside the installed pretty_midi package."""
    spec = importlib.util.find_spec("pretty_midi")
    path = Path(spec.origin).parent / SOUNDFONT if spec and spec.origin else None
    if path is None or not path.is_file():
        raise OSError(f"no {SOUNDFONT}: audio needs the pretty_midi package (pip install pretty_midi)")
    return path


@lru_cache(maxsize=2)
def _synthesizer(sample_rate: int):
    return symusic.Synthesizer(str(soundfont_path()), sample_rate=sample_rate)


def render_score(score: symusic.Score, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Stereo float32 audio [2, samples] of a score, scaled down only if it would clip."""
    try:
        audio = np.asarray(_synthesizer(sample_rate).render(score, stereo=True), dtype=np.float32)
    except TypeError as err:
        raise RuntimeError(
            f"symusic {symusic.__version__} cannot render audio ({str(err).splitlines()[0]}); "
            "pip install 'symusic>=0.5.8,!=0.6.0'"
        ) from err
    peak = float(np.abs(audio).max(initial=0.0))
    return audio * (0.99 / peak) if peak > 0.99 else audio


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write [channels, samples] float audio in [-1, 1] as 16-bit PCM."""
    symusic.dump_wav(str(path), np.asfortranarray(audio, dtype=np.float32), sample_rate, use_int16=True)


def render_midi(midi: str | Path | symusic.Score, wav: str | Path, sample_rate: int = SAMPLE_RATE) -> float:
    """Render a MIDI file (or score) to a WAV file; returns its duration in seconds."""
    if isinstance(midi, symusic.Score):
        score = midi
    else:
        try:
            score = read_midi(midi)
        except HIDError as err:
            raise ValueError(f"{midi}: not a readable MIDI file ({err})") from err
    audio = render_score(score, sample_rate)
    if not Path(wav).parent.is_dir():
        raise OSError(f"{wav}: its folder does not exist")
    write_wav(wav, audio, sample_rate)
    return audio.shape[-1] / sample_rate
