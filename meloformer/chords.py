"""Chord names as people write them (C, Cm, C7, Cmaj7, Cdim, Csus4, Bb, F#m, ...) -> the HID chord vocabulary.

A name is a root (a letter A-G, then ``#`` or ``b`` at most once) and a quality suffix from ``SPELLINGS``.
Enharmonic roots are one pitch class (Db = C#, Cb = B). The result indexes ``HIDTokenizer.chords``, the
(root pitch class, quality) pairs whose tokens the conductor writes once per bar.
"""

from __future__ import annotations

from collections.abc import Sequence

from meloformer.hid import CHORD_QUALITIES, HIDTokenizer

LETTERS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
ACCIDENTALS = {"": 0, "#": 1, "b": -1}

# Suffix -> HID quality. Case matters: M is major, m is minor.
SPELLINGS: dict[str, str] = {
    "": "maj",
    "maj": "maj",
    "M": "maj",
    "m": "min",
    "min": "min",
    "-": "min",
    "dim": "dim",
    "o": "dim",
    "aug": "aug",
    "+": "aug",
    "sus4": "sus4",
    "sus": "sus4",
    "7": "7",
    "dom7": "7",
    "maj7": "maj7",
    "M7": "maj7",
    "m7": "min7",
    "min7": "min7",
    "-7": "min7",
    "m7b5": "hdim7",
    "hdim7": "hdim7",
    "ø": "hdim7",
    "ø7": "hdim7",
}
ACCEPTED = (
    "accepted forms, shown on C: "
    + " | ".join(" ".join("C" + s for s in SPELLINGS if SPELLINGS[s] == quality) for quality in CHORD_QUALITIES)
    + "; any root A-G, optionally with # or b (Bb, F#m)"
)


def parse_chord(name: str) -> tuple[int, str]:
    """``"F#m"`` -> ``(6, "min")``: root pitch class and HID quality; ValueError naming the accepted forms."""
    text = name.strip()
    letter = text[:1].upper()
    accidental = text[1:2] if text[1:2] in ("#", "b") else ""
    suffix = text[1 + len(accidental) :]
    if letter not in LETTERS or suffix not in SPELLINGS:
        raise ValueError(f"unknown chord {name!r}; {ACCEPTED}")
    return (LETTERS[letter] + ACCIDENTALS[accidental]) % 12, SPELLINGS[suffix]


def progression(tok: HIDTokenizer, names: Sequence[str], bars: int) -> list[int]:
    """Indices into ``tok.chords`` for ``bars`` bars: the named chords, one per bar, repeated to fill them."""
    if not names:
        raise ValueError("give at least one chord")
    chords = [tok.chords.index(parse_chord(name)) for name in names]
    return [chords[b % len(chords)] for b in range(bars)]
