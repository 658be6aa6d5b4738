"""Key and dynamics as people write them -> what the grammar may allow (``meloformer.grammar``).

A key is a tonic and a mode: ``D minor``, ``Dm``, ``F# major``, ``Bb`` (major). Its pitch classes are the
major scale, or for minor the natural minor scale plus the raised seventh (the leading tone of the harmonic
minor, which minor-key music such as the chorales uses at every cadence). In a key, pitched notes take only
those pitch classes and the conductor's chords only those whose tones all lie in them.

A forced chord progression (``--chords``) binds the notes of its bars (``ChordBinding``): chord tones are
favoured, and the bass track takes the chord's root at the downbeat.

Dynamics are velocity ranges ``LO-HI`` (MIDI 1-127), spread evenly over the bars: ``40-70`` holds for every
bar, ``50-70 70-100 50-70`` is an arch in thirds. Notes take only the velocity steps inside their bar's range.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from meloformer.chords import ACCIDENTALS, LETTERS
from meloformer.hid import CHORD_QUALITIES, TRACK_DRUMS, TRACK_PROGRAM0, HIDTokenizer

# A first sample from what the shipped model knows best (the chorales): four voices in 4/4, with an arch of
# dynamics (its own velocities barely move: the training data's are nearly constant).
DEFAULT_INSTRUMENTS = ("choir-aahs", "choir-aahs", "voice-oohs", "voice-oohs")
DEFAULT_METER = "4/4"
DEFAULT_DYNAMICS = ("55-70", "70-85", "85-100", "70-85")

MODES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10, 11)}
_MODE_WORDS = {"": "major", "maj": "major", "major": "major", "m": "minor", "min": "minor", "minor": "minor"}
_KEY = re.compile(r"^\s*([A-Ga-g])([#b]?)\s*([A-Za-z]*)\s*$")
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_key(name: str) -> tuple[int, str]:
    """``"D minor"`` -> ``(2, "minor")``: tonic pitch class and mode; ValueError with the accepted forms."""
    match = _KEY.match(name)
    word = match.group(3) if match else "?"
    mode = "major" if word == "M" else _MODE_WORDS.get(word.lower())
    if mode is None:
        raise ValueError(f"key {name!r}: write a tonic A-G (with # or b) and major or minor, e.g. 'D minor', 'Bb'")
    letter, accidental = match.group(1).upper(), match.group(2)
    return (LETTERS[letter] + ACCIDENTALS[accidental]) % 12, mode


def key_pitch_classes(name: str) -> np.ndarray:
    """The 12 booleans of the key's pitch classes (C = 0)."""
    tonic, mode = parse_key(name)
    out = np.zeros(12, dtype=bool)
    out[[(tonic + step) % 12 for step in MODES[mode]]] = True
    return out


def parse_dynamics(ranges: Sequence[str], tok: HIDTokenizer) -> list[tuple[int, int]]:
    """``["40-70"]`` -> ``[(40, 70)]``; ValueError for a malformed range or one holding no velocity step."""
    if not ranges:
        raise ValueError("dynamics: give at least one velocity range, e.g. 40-70")
    out = []
    for text in ranges:
        match = _RANGE.match(text)
        low, high = (int(g) for g in match.groups()) if match else (0, 0)
        if not match or not 1 <= low <= high <= 127:
            raise ValueError(f"dynamics {text!r}: write a velocity range LO-HI within 1-127, e.g. 40-70")
        if not ((tok.velocity_values >= low) & (tok.velocity_values <= high)).any():
            steps = ", ".join(map(str, tok.velocity_values[:4]))
            raise ValueError(f"dynamics {text!r}: no velocity step inside (the steps are {steps}, ...)")
        out.append((low, high))
    return out


def per_bar(ranges: Sequence[tuple[int, int]], bars: int) -> list[tuple[int, int]]:
    """The ranges spread evenly over ``bars`` bars, in order."""
    return [ranges[b * len(ranges) // bars] for b in range(bars)]


class Steer(Protocol):
    """A control applied while sampling: for the next token of ``track`` (its number; 0 is the conductor) in
    ``bar`` (from 0), the latest onset ``onset`` of that bar (-1 before any), a log-probability bias over the
    vocabulary and a mask of the tokens still allowed (each None where it has nothing to say). The sampler
    ignores a mask that would leave nothing the grammar allows."""

    def __call__(self, bar: int, track: int, onset: int) -> tuple[np.ndarray | None, np.ndarray | None]: ...


# General MIDI programs that play a bass line: the basses, cello, contrabass, trombone, tuba, bassoon.
BASS_PROGRAMS = frozenset([*range(32, 40), 42, 43, 57, 58, 70])


def bass_track(instruments: Sequence[int]) -> int | None:
    """The number (from 1; the conductor is 0) of the track that carries the bass among ``instruments``
    (``Track`` tokens): the last bass instrument, else the last pitched track; None with fewer than two
    pitched tracks (a single line is a melody, not a bass)."""
    pitched = [n for n, token in enumerate(instruments, start=1) if token != TRACK_DRUMS]
    if len(pitched) < 2:
        return None
    basses = [n for n in pitched if instruments[n - 1] - TRACK_PROGRAM0 in BASS_PROGRAMS]
    return (basses or pitched)[-1]


class ChordBinding:
    """How a forced chord per bar steers the notes written under it.

    ``bias`` adds ``strength`` to the log-probability of every pitch whose pitch class is a tone of the bar's
    chord (pitched tracks only); ``downbeat`` allows only the chord's root among the pitches of the bass
    track's notes at position 0. ``chords`` holds, per bar, an index into ``tok.chords`` or None (free).
    """

    def __init__(
        self, tok: HIDTokenizer, chords: Sequence[int | None], instruments: Sequence[int] | None, strength: float
    ) -> None:
        self.chords, self.instruments = list(chords), list(instruments or [])
        self._anything = np.ones(tok.vocab_size, dtype=bool)
        self.bass = bass_track(self.instruments) if instruments else None
        pitch_class = np.arange(128) % 12
        self._bias, self._roots = {}, {}
        is_pitch = np.zeros(tok.vocab_size, dtype=bool)
        is_pitch[tok.pitch0 : tok.pitch0 + 128] = True
        for index in {c for c in self.chords if c is not None}:
            root, quality = tok.chords[index]
            tones = np.isin(pitch_class, [(root + k) % 12 for k in CHORD_QUALITIES[quality]])
            bias = np.zeros(tok.vocab_size, dtype=np.float32)
            bias[tok.pitch0 : tok.pitch0 + 128] = strength * tones
            self._bias[index] = bias
            roots = ~is_pitch
            roots[tok.pitch0 : tok.pitch0 + 128] = pitch_class == root
            self._roots[index] = roots

    def __call__(self, bar: int, track: int, onset: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``Steer``: the chord-tone bias, and at the downbeat the bass's root."""
        return self.bias(bar, track), self.downbeat(bar, track) if onset == 0 else None

    def _chord(self, bar: int, track_number: int) -> int | None:
        if track_number < 1 or not 0 <= bar < len(self.chords):
            return None
        if track_number <= len(self.instruments) and self.instruments[track_number - 1] == TRACK_DRUMS:
            return None
        return self.chords[bar]

    def bias(self, bar: int, track_number: int) -> np.ndarray | None:
        """The log-probability bias over the vocabulary for a note of ``track_number`` in ``bar`` (from 0), or
        None where no chord binds (the conductor, drums, free bars)."""
        chord = self._chord(bar, track_number)
        return None if chord is None else self._bias[chord]

    def downbeat(self, bar: int, track_number: int) -> np.ndarray:
        """What the tokens at the downbeat of ``bar`` may be: the root among pitches in the bass track, any
        token elsewhere."""
        chord = self._chord(bar, track_number)
        if chord is None or track_number != self.bass:
            return self._anything
        return self._roots[chord]
