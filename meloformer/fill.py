"""The fill pass: how a piece carries bars of one track after everything around them (docs/design.md
section 2).

Bar-infilling models (MMM, the Anticipatory Music Transformer) write a region after its context on both
sides. In HID the region's bars of track T are left empty in place and the piece is followed by a second
pass of T's ``Track`` token (which no piece otherwise repeats): bars 0 to the region's last, empty up to
``FILL_CONTEXT_BARS`` bars before the region, those bars copied from T, then the region written, then
``EOS``. The region is thus written after every track in full, its own track's bars after it included, with
its true bar numbers, so the layout and the mask need nothing new. The copied bars tell the model which
track it continues (tracks may share a program) and lead into the region as the track itself does.

    BOS ensemble | conductor | ... T: Bar a Bar (empty) Bar (empty) Bar d ... | ... | T: Bar a Bar b' Bar c' EOS

Training rows carry a share of crops in this form (``RowBuilder(fill_share=...)``); the sampler writes one
to regenerate bars (``GenerationRequest.regenerate``) and ``merge`` puts the region back. numpy only.
"""

from __future__ import annotations

import numpy as np

from meloformer.hid import BAR, BOS, EOS, TRACK_CONDUCTOR, HIDError, HIDTokenizer
from meloformer.layout import layout

# Bars of the track before the region that its fill pass copies (the ones before them stay empty).
FILL_CONTEXT_BARS = 4


def assemble(conductor: list[np.ndarray], tracks: list[tuple[int, list[np.ndarray]]]) -> np.ndarray:
    """The tokens of a piece from its conductor's bars and its (``Track`` token, bars) tracks, each bar the
    tokens after its ``Bar``."""
    parts: list[list[int] | np.ndarray] = [[BOS], [track_token for track_token, _ in tracks]]
    for track_token, bars in [(TRACK_CONDUCTOR, conductor), *tracks]:
        parts.append([track_token])
        for bar in bars:
            parts += [[BAR], bar]
    parts.append([EOS])
    return np.concatenate(parts).astype(np.uint16)


def fill_row(tok: HIDTokenizer, tokens: np.ndarray, track: int, first: int, last: int) -> np.ndarray:
    """``tokens`` (a piece) with bars ``first``..``last`` of instrument track ``track`` (all from 0) emptied in
    place and written in a fill pass after the last track, after a copy of the ``FILL_CONTEXT_BARS`` before."""
    tokens = np.asarray(tokens, dtype=np.int64)
    lay = layout(tokens, tok.kinds)
    n_bars = int(lay.bar[lay.track == 0].max()) + 1
    own = lay.track == track + 1
    if not own.any() or not 0 <= first <= last < n_bars:
        raise HIDError(f"fill region: track {track}, bars {first}..{last} is outside the piece")
    region = own & (lay.bar >= first) & (lay.bar <= last) & (tokens != BAR)
    track_token = tokens[own][0]
    copied = max(first - FILL_CONTEXT_BARS, 0)
    fill = [[track_token], [BAR] * copied]
    for b in range(copied, last + 1):
        fill += [[BAR], tokens[own & (lay.bar == b) & (tokens != BAR)]]
    return np.concatenate([tokens[~region][:-1], *fill, [EOS]]).astype(np.uint16)


def merge(tok: HIDTokenizer, tokens: np.ndarray, track: int, bars: set[int]) -> np.ndarray:
    """The piece of a fill row: ``bars`` of instrument track ``track`` (from 0) taken from the fill pass, the
    fill pass dropped."""
    tokens = np.asarray(tokens, dtype=np.int64)
    lay = layout(tokens, tok.kinds)
    fill = lay.track == lay.track.max()
    piece = tok.parse(tokens[~fill])
    if not 0 <= track < len(piece.tracks) or tokens[fill][0] != piece.tracks[track][0]:
        raise HIDError(f"fill pass: track {track} is not the track the pass writes")
    written = {b: tokens[fill & (lay.bar == b) & (tokens != BAR)] for b in bars}
    token, kept = piece.tracks[track]
    tracks = list(piece.tracks)
    tracks[track] = (token, [written.get(b, bar) for b, bar in enumerate(kept)])
    return assemble(piece.conductor, tracks)
