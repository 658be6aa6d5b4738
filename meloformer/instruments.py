"""Instruments by General MIDI name: ``"Choir Aahs"``, ``"violin"``, ``"drums"`` or a program number 0-127.

A name matches case-insensitively with any punctuation ignored (``choir-aahs``, ``Choir Aahs`` and
``choir_aahs`` are one name); a few short names (``piano``, ``organ``, ``choir``, ``strings``, ...) stand
for the program people usually mean. The names are pretty_midi's table of the 128 General MIDI programs.
"""

from __future__ import annotations

import difflib
import re

from pretty_midi.constants import INSTRUMENT_MAP

from meloformer.hid import TRACK_DRUMS, TRACK_PROGRAM0

GM_NAMES: tuple[str, ...] = tuple(INSTRUMENT_MAP)  # index = General MIDI program (0-based)
DRUMS = "Drums"
SHORT_NAMES = {
    "piano": 0,
    "grand piano": 0,
    "electric piano": 4,
    "organ": 19,
    "guitar": 24,
    "bass": 32,
    "electric bass": 33,
    "harp": 46,
    "strings": 48,
    "choir": 52,
    "voice": 53,
    "sax": 65,
    "horn": 60,
}


def _key(name: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9+]+", " ", name.lower()).split())


_BY_KEY = {  # matching key -> Track token
    **{_key(name): TRACK_PROGRAM0 + program for program, name in enumerate(GM_NAMES)},
    **{name: TRACK_PROGRAM0 + program for name, program in SHORT_NAMES.items()},
    "drums": TRACK_DRUMS,
    "drum kit": TRACK_DRUMS,
}


def instrument_name(track_token: int) -> str:
    """The General MIDI name of an instrument ``Track`` token: ``"Choir Aahs"``, ``"Drums"``."""
    return DRUMS if track_token == TRACK_DRUMS else GM_NAMES[track_token - TRACK_PROGRAM0]


def instrument_token(text: str) -> int:
    """The ``Track`` token of a name or program number; ValueError listing the closest names."""
    key = _key(str(text))
    if key.isdigit():
        if not 0 <= int(key) <= 127:
            raise ValueError(f"instrument {text!r}: a General MIDI program is 0-127")
        return TRACK_PROGRAM0 + int(key)
    if key in _BY_KEY:
        return _BY_KEY[key]
    close = difflib.get_close_matches(key, _BY_KEY, n=4, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else "e.g. piano, violin, choir aahs, drums"
    raise ValueError(f"unknown instrument {text!r} (a General MIDI name or program 0-127; {hint})")


def instrument_choices() -> list[str]:
    """Every instrument by name, drums first: the web app's choices."""
    return [DRUMS, *GM_NAMES]
