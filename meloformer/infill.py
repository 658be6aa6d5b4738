"""Infilling: regenerate bars A..B of one track of a prompt and keep every other note exactly.

The region is left empty in place and written in a fill pass after the last track (``meloformer.fill``), as
the model is trained to (a share of its training rows carry one), so it hears the whole piece, the track's
own bars after B included; every other bar is copied token for token. Regions of several tracks are filled
one track after another, each hearing the result of the ones before.

On top, the sampler steers the region with what surrounds it (``RegionFit``): its pitches stay inside the
range of the track's other notes, each is drawn towards consonance with the lowest note the other tracks
sound at its onset, and the region's first and last bars towards the track's notes just before and after it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from meloformer.features import CONSONANT, lowest_sounding
from meloformer.fill import assemble
from meloformer.hid import BAR, TRACK_DRUMS, HIDTokenizer
from meloformer.instruments import instrument_name
from meloformer.metrics import COL
from meloformer.model import MeloFormer
from meloformer.sampler import GenerationRequest, check_request, generate

# Log-probability added to a pitch consonant with the lowest other note sounding at its onset.
CONSONANCE_BIAS = 2.0
# Log-probability taken per semitone that a pitch in the region's first (last) bar lies more than a whole tone
# from the track's last note before (first note after) the region.
LEAP_PENALTY = 0.3

_REGION = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


@dataclasses.dataclass(frozen=True)
class Region:
    """Bars ``first``..``last`` (inclusive) of instrument track ``track``, all counted from 1."""

    track: int
    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> Region:
        """``"2:5-8"`` (track 2, bars 5 to 8) or ``"2:5"`` (bar 5 alone)."""
        match = _REGION.match(text)
        if not match:
            raise ValueError(f"infill region {text!r}: write TRACK:FIRST-LAST, e.g. 2:5-8 (counted from 1)")
        track, first, last = (int(g) if g else None for g in match.groups())
        region = cls(track, first, last or first)
        if min(region.track, region.first) < 1 or region.last < region.first:
            raise ValueError(f"infill region {text!r}: track and bars count from 1, and FIRST <= LAST")
        return region

    def __str__(self) -> str:
        return f"{self.track}:{self.first}-{self.last}"

    def as_tuple(self) -> tuple[int, int, int]:
        return self.track, self.first, self.last


def track_list(tok: HIDTokenizer, prompt: np.ndarray) -> str:
    """The prompt's instrument tracks as numbered for ``--infill``: ``1 Drums, 2 Electric Bass (finger), ...``."""
    tracks = tok.parse(prompt).tracks
    return ", ".join(f"{n} {instrument_name(token)}" for n, (token, _) in enumerate(tracks, start=1))


def check_regions(tok: HIDTokenizer, prompt: np.ndarray, regions: list[Region]) -> None:
    """ValueError naming the first region outside the prompt (its tracks are listed with their numbers)."""
    piece = tok.parse(prompt)
    for region in regions:
        if region.track > len(piece.tracks):
            raise ValueError(
                f"infill region {region}: track {region.track} is out of range; the prompt's tracks are "
                f"{track_list(tok, prompt)}"
            )
        if region.last > piece.n_bars:
            raise ValueError(
                f"infill region {region}: bars {region.first}-{region.last} are outside the prompt's "
                f"{piece.n_bars} bars"
            )


def check_infill(tok: HIDTokenizer, request: GenerationRequest, regions: list[Region]) -> None:
    """ValueError (one line) for a region outside ``request.prompt``, or a request the sampler refuses."""
    check_regions(tok, request.prompt, regions)
    for track, bars in _bars_by_track(regions).items():
        check_request(tok, _track_request(request, request.prompt, track, bars))


def infill(
    model: MeloFormer,
    tok: HIDTokenizer,
    request: GenerationRequest,
    regions: list[Region],
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Regenerate ``regions`` of ``request.prompt`` with the request's sampling settings; returns the tokens.

    Outside the regions every token of the prompt is kept.
    """
    check_regions(tok, request.prompt, regions)
    tokens = request.prompt
    for track, bars in _bars_by_track(regions).items():
        fit = RegionFit(tok, tokens, track + 1, bars)
        track_request = _track_request(request, tokens, track, bars)
        out = generate(model, tok, track_request, seed=seed, progress=progress, steer=fit)
        tokens = end_before_repeats(tok, out, track, bars)
    return tokens


def end_before_repeats(tok: HIDTokenizer, tokens: np.ndarray, track: int, bars: set[int]) -> np.ndarray:
    """The piece with each note of ``bars`` of instrument track ``track`` (both from 0) that is held into the
    next onset of its pitch shortened to the longest duration step that ends by it. MIDI cannot hold two
    overlapping notes of one pitch on a channel: a reader pairs their note-offs either way, which would change
    the length of a kept note after the region in the written file."""
    piece = tok.parse(tokens)
    notes = tok.note_table(piece)
    own = notes[notes[:, COL["track"]] == track]
    onset, pitch, duration = own[:, COL["onset"]], own[:, COL["pitch"]], own[:, COL["duration"]]
    order = np.lexsort((onset, pitch))
    gap = np.full(len(own), np.iinfo(np.int64).max, dtype=np.int64)
    same = pitch[order[:-1]] == pitch[order[1:]]
    gap[order[:-1][same]] = onset[order[1:][same]] - onset[order[:-1][same]]
    held = np.isin(own[:, COL["bar"]], sorted(bars)) & (duration > gap)
    if not held.any():
        return tokens
    steps = tok.duration_values
    duration = np.where(held, steps[np.maximum(np.searchsorted(steps, gap, "right") - 1, 0)], duration)
    rows = np.stack([onset, pitch, duration, own[:, COL["velocity"]]], axis=1)
    written = np.array(tok.track_tokens(rows, False, piece.bar_starts(tok)))
    rewritten = [bar[1:] for bar in np.split(written, np.flatnonzero(written == BAR)[1:])]  # each after its Bar
    token, kept = piece.tracks[track]
    tracks = list(piece.tracks)
    tracks[track] = (token, [rewritten[b] if b in bars else bar for b, bar in enumerate(kept)])
    return assemble(piece.conductor, tracks)


def _bars_by_track(regions: list[Region]) -> dict[int, set[int]]:
    """Track -> bars to regenerate, both from 0; tracks in the order first named."""
    bars_of: dict[int, set[int]] = {}
    for region in regions:
        bars_of.setdefault(region.track - 1, set()).update(range(region.first - 1, region.last))
    return bars_of


def _track_request(request: GenerationRequest, tokens: np.ndarray, track: int, bars: set[int]) -> GenerationRequest:
    """The request that regenerates ``bars`` of instrument track ``track`` (both from 0) of ``tokens``."""
    regenerate = [(track, b) for b in sorted(bars)]
    return dataclasses.replace(request, prompt=tokens, bars=None, add_track=None, regenerate=regenerate)


class RegionFit:
    """``steering.Steer`` for the regenerated ``bars`` (from 0) of track ``track`` (its number; the conductor
    is 0) of ``tokens``: the region's pitches within the range of the track's other notes, a bias of
    ``CONSONANCE_BIAS`` towards consonance (interval classes 0, 3, 4, 7, 8, 9) with the lowest note the other
    tracks sound at the onset, and ``LEAP_PENALTY`` per semitone beyond a whole tone from the track's note
    next to the region in its first and last bars. The region is written in the fill pass, after the last
    track, so it steers that pass."""

    def __init__(self, tok: HIDTokenizer, tokens: np.ndarray, track: int, bars: set[int]) -> None:
        self.tok, self.bars = tok, set(bars)
        piece = tok.parse(tokens)
        self.track = len(piece.tracks) + 1  # the fill pass's number
        self.bar_starts = piece.bar_starts(tok)
        notes = tok.note_table(piece)
        drums = [number for number, (token, _) in enumerate(piece.tracks) if token == TRACK_DRUMS]
        pitched = notes[~np.isin(notes[:, COL["track"]], drums)]
        self.drums = track - 1 in drums  # drums have no pitch to steer
        own = pitched[pitched[:, COL["track"]] == track - 1]
        self.others = pitched[pitched[:, COL["track"]] != track - 1]
        kept = own[~np.isin(own[:, COL["bar"]], sorted(self.bars))]
        self.pitch = np.arange(128)
        self.range = None
        if len(kept):
            self.range = np.ones(tok.vocab_size, dtype=bool)
            low, high = kept[:, COL["pitch"]].min(), kept[:, COL["pitch"]].max()
            self.range[tok.pitch0 : tok.pitch0 + 128] = (self.pitch >= low) & (self.pitch <= high)
        self.near: dict[int, list[int]] = {}  # bar -> the pitches its notes are drawn towards
        first, last = min(self.bars), max(self.bars)
        before, after = kept[kept[:, COL["bar"]] < first], kept[kept[:, COL["bar"]] > last]
        for bar, side, edge in ((first, before, np.max), (last, after, np.min)):
            if len(side):  # the top note at the onset next to the region
                at = side[side[:, COL["onset"]] == edge(side[:, COL["onset"]])]
                self.near.setdefault(bar, []).append(int(at[:, COL["pitch"]].max()))

    def __call__(
        self, bar: int, track: int, onset: int, written: Sequence[int] = ()
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        if track != self.track or bar not in self.bars or onset < 0 or self.drums:
            return None, None
        score = np.zeros(128, dtype=np.float32)
        bass = lowest_sounding(self.others, self.bar_starts[bar] + onset)
        if bass is not None:
            score += CONSONANCE_BIAS * np.isin(np.abs(self.pitch - bass) % 12, CONSONANT)
        for pitch in self.near.get(bar, ()):
            score -= LEAP_PENALTY * np.maximum(np.abs(self.pitch - pitch) - 2, 0)
        bias = np.zeros(self.tok.vocab_size, dtype=np.float32)
        bias[self.tok.pitch0 : self.tok.pitch0 + 128] = score
        return bias, self.range
