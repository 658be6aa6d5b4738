"""Infilling: regenerate bars A..B of one track of a prompt and keep every other note exactly.

The target track is moved last, as ``--add_track`` places a new one, so while its bars are written it hears
every other track in full; its bars before A and after B are copied token for token, A..B are sampled
under the grammar, and the tracks are written back in the prompt's order. Regions of several tracks are
filled one track after another, each hearing the result of the ones before.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from meloformer.hid import BAR, BOS, EOS, TRACK_CONDUCTOR, HIDTokenizer
from meloformer.instruments import instrument_name
from meloformer.model import MeloFormer
from meloformer.sampler import GenerationRequest, check_request, generate

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


def reorder_tracks(tok: HIDTokenizer, tokens: np.ndarray, order: list[int]) -> np.ndarray:
    """The piece with its instrument tracks in ``order`` (indices from 0); every bar's tokens unchanged."""
    piece = tok.parse(tokens)
    parts: list[list[int] | np.ndarray] = [[BOS, TRACK_CONDUCTOR]]
    for track_token, bars in [(TRACK_CONDUCTOR, piece.conductor)] + [piece.tracks[i] for i in order]:
        if track_token != TRACK_CONDUCTOR:
            parts.append([track_token])
        for bar in bars:
            parts += [[BAR], bar]
    parts.append([EOS])
    return np.concatenate(parts).astype(np.uint16)


def check_infill(tok: HIDTokenizer, request: GenerationRequest, regions: list[Region]) -> None:
    """ValueError (one line) for a region outside ``request.prompt``, or a request the sampler refuses."""
    check_regions(tok, request.prompt, regions)
    for track, bars in _bars_by_track(regions).items():
        check_request(tok, _track_request(tok, request, request.prompt, track, bars)[1])


def infill(
    model: MeloFormer,
    tok: HIDTokenizer,
    request: GenerationRequest,
    regions: list[Region],
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Regenerate ``regions`` of ``request.prompt`` with the request's sampling settings; returns the tokens.

    Outside the regions every token of the prompt is kept, and the track order is the prompt's.
    """
    check_regions(tok, request.prompt, regions)
    tokens = request.prompt
    for track, bars in _bars_by_track(regions).items():
        order, track_request = _track_request(tok, request, tokens, track, bars)
        out = generate(model, tok, track_request, seed=seed, progress=progress)
        tokens = reorder_tracks(tok, out, list(np.argsort(order)))
    return tokens


def _bars_by_track(regions: list[Region]) -> dict[int, set[int]]:
    """Track -> bars to regenerate, both from 0; tracks in the order first named."""
    bars_of: dict[int, set[int]] = {}
    for region in regions:
        bars_of.setdefault(region.track - 1, set()).update(range(region.first - 1, region.last))
    return bars_of


def _track_request(
    tok: HIDTokenizer, request: GenerationRequest, tokens: np.ndarray, track: int, bars: set[int]
) -> tuple[list[int], GenerationRequest]:
    """The track order with ``track`` moved last, and the request that regenerates its ``bars`` there."""
    n_tracks = len(tok.parse(tokens).tracks)
    order = [t for t in range(n_tracks) if t != track] + [track]
    regenerate = [(n_tracks - 1, b) for b in sorted(bars)]
    moved = reorder_tracks(tok, tokens, order)
    return order, dataclasses.replace(request, prompt=moved, bars=None, add_track=None, regenerate=regenerate)
