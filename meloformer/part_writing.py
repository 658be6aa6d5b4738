"""Which pitches would write parallel fifths or octaves, per token of a row: the training signal behind
``MeloFormerModule(parallels_weight=...)`` (numpy only).

HID writes a piece track by track, so when a note of a pitched track is written, the voices of the pitched
tracks before it are complete. A pitch is *parallel* when, against one of those earlier voices that moves at
this onset, it would keep the fifth or octave (modulo octaves) that the two held at the previous onset,
moving the same way: the fault ``features.parallels_and_crossings`` counts and ``steering.VoiceLeading``
refuses while sampling. Voices are lines (the highest note at each onset, ``features.line``).

Training lowers the probability of these pitches (an unlikelihood term) wherever the music itself moves
otherwise: the pitch written there is never among them.
"""

from __future__ import annotations

import numpy as np

from meloformer.features import line, sounding
from meloformer.hid import BOS, TRACK_DRUMS, HIDError, HIDTokenizer, TokenKind
from meloformer.layout import layout
from meloformer.metrics import COL

PITCHES = np.arange(128)


def parallel_pitches(tok: HIDTokenizer, tokens: np.ndarray) -> np.ndarray:
    """``[..., 128]`` booleans for ``tokens`` (``[N]`` or ``[B, N]``, rows packing pieces from ``BOS``): at each
    ``Pitch`` token of a pitched track with earlier pitched tracks, the pitches that would move in parallel
    fifths or octaves with one of them; False everywhere else (drums, the first voice, padding, and pieces
    that do not parse whole, such as those with a fill pass, whose bars come out of order)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    rows = np.atleast_2d(tokens)
    out = np.zeros((*rows.shape, 128), dtype=bool)
    for row, forbidden in zip(rows, out):
        starts = np.flatnonzero(row == BOS)
        for start, stop in zip(starts, [*starts[1:], len(row)]):
            forbidden[start:stop] = _piece_parallels(tok, row[start:stop])
    return out.reshape(*tokens.shape, 128)


def _piece_parallels(tok: HIDTokenizer, tokens: np.ndarray) -> np.ndarray:
    """``parallel_pitches`` of one piece (``BOS`` ... ``EOS``, then perhaps padding)."""
    out = np.zeros((len(tokens), 128), dtype=bool)
    try:
        piece = tok.parse(tokens)
    except HIDError:
        return out
    notes = tok.note_table(piece)
    lay = layout(tokens, tok.kinds)
    # note_table lists notes track by track in token order: row i is the i-th Pitch token of an instrument.
    at = np.flatnonzero((lay.kind == TokenKind.PITCH) & (lay.track >= 1))
    voices: list[np.ndarray] = []
    for number, (track_token, _) in enumerate(piece.tracks):
        own = np.flatnonzero(notes[:, COL["track"]] == number)
        if track_token == TRACK_DRUMS or len(own) == 0:
            continue
        voice = line(notes[own])
        if voices:
            marked = parallel_moves(voice, voices, notes[own, COL["onset"]])
            marked[np.arange(len(own)), notes[own, COL["pitch"]]] = False  # never the pitch the music writes
            out[at[own]] = marked
        voices.append(voice)
    return out


def parallel_moves(own: np.ndarray, voices: list[np.ndarray], times: np.ndarray) -> np.ndarray:
    """``[len(times), 128]``: for a voice whose line so far is ``own``, the pitches that, sounded at each of
    ``times``, would move in parallel fifths or octaves with one of the earlier ``voices`` (lines) from the
    previous onset of any of them. The rule itself, shared by training and ``steering.VoiceLeading``."""
    onsets = np.unique(np.concatenate([own[:, 0], *(v[:, 0] for v in voices)]))
    index = np.searchsorted(onsets, times, side="left") - 1
    previous = onsets[np.maximum(index, 0)]
    mine = np.where(index >= 0, sounding(own, previous), -1)
    out = np.zeros((len(times), 128), dtype=bool)
    for voice in voices:
        then, now = sounding(voice, previous), sounding(voice, times)
        interval = np.abs(then - mine) % 12
        held = (mine >= 0) & (then >= 0) & (now >= 0) & (now != then) & np.isin(interval, (0, 7))
        same_way = np.sign(PITCHES[None, :] - mine[:, None]) == np.sign(now - then)[:, None]
        keeps = np.abs(PITCHES[None, :] - now[:, None]) % 12 == interval[:, None]
        out |= held[:, None] & same_way & keeps
    return out
