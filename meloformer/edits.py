"""Token-level edits of HID pieces: crop a window of bars, transpose, and the pitch range a transposition
must respect.

They read the tokens' layout, so they sit above both ``meloformer.hid`` and ``meloformer.layout``; numpy only.
"""

from __future__ import annotations

import numpy as np

from meloformer.hid import (
    BAR,
    BOS,
    CHORD_QUALITIES,
    EOS,
    TRACK_CONDUCTOR,
    TRACK_DRUMS,
    HIDError,
    HIDTokenizer,
    TokenKind,
)
from meloformer.layout import Layout, layout


def crop_bars(tok: HIDTokenizer, tokens: np.ndarray, b0: int, b1: int, lay: Layout | None = None) -> np.ndarray:
    """Bars [b0, b1) of every track, renumbered from 0, as a complete piece.

    Bar b0 of the conductor gets the time signature and tempo in force there, so the crop decodes to
    exactly the notes, meter and tempo of those bars. The piece's grammar is checked first (token by
    token: 0.2 s for a 20k-token piece) unless its ``lay``out is given, as the data loader does for
    shards, which hold encoder output.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if lay is None:
        n = tok.parse(tokens).n_bars
        lay = layout(tokens, tok.kinds)
    else:
        n = int(lay.bar[lay.track == 0].max()) + 1
    if not 0 <= b0 < b1 <= n:
        raise HIDError(f"bar window [{b0}, {b1}) is outside the piece's {n} bars")
    kind, bar, conductor = lay.kind, lay.bar, lay.track == 0
    signatures = np.flatnonzero(conductor & (kind == TokenKind.TIMESIG) & (bar <= b0))
    tempos = np.flatnonzero(conductor & (kind == TokenKind.TEMPO))
    at_start = (bar[tempos] < b0) | ((bar[tempos] == b0) & (tokens[tempos - 1] == tok.pos0))
    first = conductor & (bar == b0)
    first_tokens, first_kinds = tokens[first], kind[first]
    body = first_tokens[(first_kinds == TokenKind.POS) | (first_kinds == TokenKind.TEMPO)]
    if not (len(body) >= 2 and body[0] == tok.pos0):
        body = np.concatenate([[tok.pos0, tokens[tempos[at_start][-1]]], body])
    later_conductor = conductor & (bar > b0) & (bar < b1)
    tracks = (lay.track > 0) & ((kind == TokenKind.TRACK) | ((bar >= b0) & (bar < b1)))
    ensemble = tokens[1 : int(np.argmax(tokens == TRACK_CONDUCTOR))]
    parts = [
        [BOS],
        ensemble,
        [TRACK_CONDUCTOR, BAR, tokens[signatures[-1]]],
        first_tokens[first_kinds == TokenKind.CHORD],
        body,
        tokens[later_conductor | tracks],
        [EOS],
    ]
    return np.concatenate(parts).astype(np.uint16)


def transpose(tok: HIDTokenizer, tokens: np.ndarray, semitones: int) -> np.ndarray:
    """Move every pitched (non-drum) note and every chord root by ``semitones``; drums stay."""
    tokens = np.asarray(tokens)
    lay = layout(tokens, tok.kinds)
    pitch = (lay.kind == TokenKind.PITCH) & (lay.track_token != TRACK_DRUMS)
    moved = tokens.astype(np.int64)
    new_pitch = moved[pitch] - tok.pitch0 + semitones
    if new_pitch.size and (new_pitch.min() < 0 or new_pitch.max() > 127):
        raise HIDError(f"transposing by {semitones} moves a pitch outside 0..127")
    moved[pitch] = tok.pitch0 + new_pitch
    chord = lay.kind == TokenKind.CHORD
    index = moved[chord] - tok.chord0
    n_q = len(CHORD_QUALITIES)
    moved[chord] = tok.chord0 + ((index // n_q + semitones) % 12) * n_q + index % n_q
    return moved.astype(np.uint16)


def pitch_range(tok: HIDTokenizer, tokens: np.ndarray) -> tuple[int, int] | None:
    """Lowest and highest non-drum pitch, or None; tells which transpositions stay in range."""
    lay = layout(np.asarray(tokens), tok.kinds)
    pitch = (lay.kind == TokenKind.PITCH) & (lay.track_token != TRACK_DRUMS)
    if not pitch.any():
        return None
    values = np.asarray(tokens)[pitch].astype(np.int64) - tok.pitch0
    return int(values.min()), int(values.max())
