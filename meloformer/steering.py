"""Key and dynamics as people write them -> what the grammar may allow (``meloformer.grammar``).

A key is a tonic and a mode: ``D minor``, ``Dm``, ``F# major``, ``Bb`` (major). Its pitch classes are the
major scale, or for minor the natural minor scale plus the raised seventh (the leading tone of the harmonic
minor, which minor-key music such as the chorales uses at every cadence). In a key, pitched notes take only
those pitch classes and the conductor's chords only those whose tones all lie in them.

Dynamics are velocity ranges ``LO-HI`` (MIDI 1-127), spread evenly over the bars: ``40-70`` holds for every
bar, ``50-70 70-100 50-70`` is an arch in thirds. Notes take only the velocity steps inside their bar's range.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from meloformer.chords import ACCIDENTALS, LETTERS
from meloformer.hid import HIDTokenizer

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
