"""Per-piece musical features for the two-sample report of `meloformer evaluate --against` (numpy only).

Every feature is computed on the HID view of a piece (quantised notes, bars from the conductor track), so
generated and real music are measured on the same grid. A voice's *line* is its track's highest note at
each onset. Voices are the pitched tracks, ordered from the highest mean pitch down.

- ``repetition``: share of a track's non-empty bars whose notes, as (position, pitch, duration), are at
  least ``REPEAT_SIMILARITY`` similar (|A ∩ B| / |A ∪ B|) to an earlier bar of the same track, over all
  tracks.
- ``stepwise``: share of melodic moves (consecutive line notes of a voice with different pitches) of one
  or two semitones.
- ``parallels``: share of voice-pair motions that are parallel fifths or octaves. Both voices move the same
  way and keep a fifth or an octave (unison, modulo octaves). A motion is a pair of voices sounding at two
  consecutive onsets of the piece, at least one of them changing pitch. The value is null with one voice.
- ``crossings``: share of (onset, adjacent voice pair) where both sound and the upper voice is below the
  lower. The value is null with one voice.
- ``meter``: the time signature of most bars; ``bar_quarters`` is its length in quarter notes, and
  ``triple_meter`` is 1 when its numerator divides by 3 (3/4, 6/8, 9/8, 12/8).
- ``chord_tone_rate``: share of the pitched notes that start in a bar with a chord and belong to that chord.
  The same notes scored against the chord of the bar before give ``chord_tone_rate_shifted``, the control;
  only bars where both chords are known count. ``bass_on_root`` is the share of chord bars whose lowest
  note sounding at the downbeat is the chord's root. ``chord_tone_rate_own`` scores the notes against the
  tokens' own conductor chords even where ``chords`` are given (for an encoded file, the chords detected from
  its notes: how real pieces are scored), so a generated file whose chords are its markers (the chords it
  planned) can be compared like for like.
- ``key`` (Krumhansl-Kessler profiles on duration-weighted pitch classes); ``key_agrees`` with a given key.
- For a region (track, bars) of an infilled piece: ``leap_in`` and ``leap_out`` (semitones between the
  line's last note before the region and its first note inside, and between its last note inside and
  its first note after). ``region_in_range`` is the share of the region's notes inside the pitch range
  of the track's other notes. ``region_consonance`` is the share of them consonant with the lowest other
  note sounding at their onset (interval classes 0, 3, 4, 7, 8, 9).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from meloformer.hid import CHORD_QUALITIES, PITCH_CLASS_NAMES, TRACK_DRUMS, HIDTokenizer, Piece
from meloformer.metrics import COL, MusicMetrics

REPEAT_SIMILARITY = 0.75
BAR_NOTE = [COL["pos"], COL["pitch"], COL["duration"]]  # a note of a track's bar, for repetition
PIECE_NOTE = [COL["track"], *BAR_NOTE]  # a note of a bar of the piece, for self-similarity
CONSONANT = (0, 3, 4, 7, 8, 9)
# The fixed vector of the Fréchet distance and the classifier; parallels and crossings count 0 for one voice.
FEATURE_VECTOR = (
    "pitch_class_entropy",
    "notes_per_bar",
    "polyphony",
    "groove_consistency",
    "empty_bar_rate",
    "repetition",
    "stepwise",
    "parallels",
    "crossings",
    "bar_quarters",
    "triple_meter",
)
# Krumhansl & Kessler (1982) key profiles, tonic first.
MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def jaccard(a: set, b: set) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def repetition(bars_per_track: list[list[set]]) -> float:
    """Share of non-empty track bars that repeat or nearly repeat an earlier bar of their track."""
    repeated = total = 0
    for bars in bars_per_track:
        earlier: list[set] = []
        for notes in bars:
            if not notes:
                continue
            total += 1
            repeated += any(jaccard(notes, e) >= REPEAT_SIMILARITY for e in earlier)
            earlier.append(notes)
    return repeated / total if total else 0.0


def line(notes: np.ndarray) -> np.ndarray:
    """The highest note at each onset of one track's note rows: rows of (onset, pitch, end, bar), by onset."""
    rows = notes[np.lexsort((-notes[:, COL["pitch"]], notes[:, COL["onset"]]))]
    rows = rows[np.append(True, rows[1:, COL["onset"]] != rows[:-1, COL["onset"]])]
    onset, pitch = rows[:, COL["onset"]], rows[:, COL["pitch"]]
    return np.stack([onset, pitch, onset + rows[:, COL["duration"]], rows[:, COL["bar"]]], 1)


def sounding(voice: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The pitch of a voice's line at each time, or -1 where it rests."""
    i = np.searchsorted(voice[:, 0], times, side="right") - 1
    held = (i >= 0) & (times < voice[np.maximum(i, 0), 2])
    return np.where(held, voice[np.maximum(i, 0), 1], -1)


def stepwise(voices: list[np.ndarray]) -> float | None:
    moves = np.concatenate([np.abs(np.diff(v[:, 1])) for v in voices]) if voices else np.zeros(0)
    moves = moves[moves > 0]
    return float(np.mean(moves <= 2)) if len(moves) else None


def parallels_and_crossings(voices: list[np.ndarray]) -> tuple[float | None, float | None]:
    """(share of voice-pair motions in parallel fifths or octaves, share of adjacent voices crossed)."""
    if len(voices) < 2:
        return None, None
    times = np.unique(np.concatenate([v[:, 0] for v in voices]))
    pitch = np.stack([sounding(v, times) for v in voices])  # [voices, onsets], highest voice first
    motions = parallel = 0
    for i in range(len(voices)):
        for j in range(i + 1, len(voices)):
            a, b = pitch[i], pitch[j]
            both = (a[:-1] >= 0) & (a[1:] >= 0) & (b[:-1] >= 0) & (b[1:] >= 0)
            da, db = np.diff(a), np.diff(b)
            moving = both & ((da != 0) | (db != 0))
            interval = np.abs(a - b) % 12
            perfect = np.isin(interval[:-1], (0, 7)) & (interval[:-1] == interval[1:])
            motions += int(moving.sum())
            parallel += int((moving & perfect & (np.sign(da) == np.sign(db)) & (da != 0)).sum())
    upper, lower = pitch[:-1], pitch[1:]
    both = (upper >= 0) & (lower >= 0)
    crossed = both & (upper < lower)
    return (parallel / motions if motions else None), (float(crossed.sum() / both.sum()) if both.any() else None)


def key_of(pitches: np.ndarray, durations: np.ndarray) -> str | None:
    """``"C major"``/``"A minor"``: the Krumhansl-Kessler profile best correlated with the pitch classes."""
    if len(pitches) == 0:
        return None
    histogram = np.bincount(pitches % 12, weights=durations, minlength=12)
    if np.ptp(histogram) == 0:
        return None
    best = max(
        (np.corrcoef(histogram, np.roll(profile, tonic))[0, 1], tonic, mode)
        for mode, profile in (("major", MAJOR), ("minor", MINOR))
        for tonic in range(12)
    )
    return f"{PITCH_CLASS_NAMES[best[1]]} {best[2]}"


def meter(tok: HIDTokenizer, piece: Piece) -> tuple[int, int]:
    """The time signature of most bars (the earlier one on a tie)."""
    changes, sig, per_bar = dict(piece.conductor_events(tok)[0]), None, []
    for b in range(piece.n_bars):
        sig = changes.get(b, sig)
        per_bar.append(sig)
    return Counter(per_bar).most_common(1)[0][0]


def chord_rates(
    tok: HIDTokenizer, notes: np.ndarray, chords: list[int], bar_starts: np.ndarray
) -> dict[str, float | None]:
    """Chord-tone rate against each bar's chord and against the bar before's, and the bass on the root."""
    templates = np.zeros((len(tok.chords), 12), dtype=np.int64)
    for i, (root, quality) in enumerate(tok.chords):
        templates[i, [(root + k) % 12 for k in CHORD_QUALITIES[quality]]] = 1
    own = shifted = counted = 0
    for b in range(1, len(chords)):
        if chords[b] < 0 or chords[b - 1] < 0:
            continue
        pcs = notes[notes[:, COL["bar"]] == b, COL["pitch"]] % 12
        own += int(templates[chords[b], pcs].sum())
        shifted += int(templates[chords[b - 1], pcs].sum())
        counted += len(pcs)
    roots = on_root = 0
    onset, end = notes[:, COL["onset"]], notes[:, COL["onset"]] + notes[:, COL["duration"]]
    for b, chord in enumerate(chords):
        if chord < 0 or b >= len(bar_starts):
            continue
        held = notes[(onset <= bar_starts[b]) & (end > bar_starts[b]), COL["pitch"]]
        if len(held):
            roots += 1
            on_root += int(held.min() % 12 == tok.chords[chord][0])
    return {
        "chord_tone_rate": own / counted if counted else None,
        "chord_tone_rate_shifted": shifted / counted if counted else None,
        "bass_on_root": on_root / roots if roots else None,
    }


def lowest_sounding(notes: np.ndarray, time: int) -> int | None:
    """The lowest pitch among ``notes`` (note-table rows) that sounds at ``time``; None where none does."""
    held = notes[(notes[:, COL["onset"]] <= time) & (notes[:, COL["onset"]] + notes[:, COL["duration"]] > time)]
    return int(held[:, COL["pitch"]].min()) if len(held) else None


def region_features(notes: np.ndarray, track: int, first: int, last: int) -> dict[str, float | None]:
    """Boundary leaps, range and consonance of bars ``first..last`` (0-based) of instrument track ``track``
    (``notes``: the pitched notes of the piece)."""
    none = dict.fromkeys(("leap_in", "leap_out", "region_in_range", "region_consonance"))
    own = notes[notes[:, COL["track"]] == track]
    if len(own) == 0:
        return none
    voice = line(own)
    before, inside, after = voice[:, 3] < first, (voice[:, 3] >= first) & (voice[:, 3] <= last), voice[:, 3] > last
    out = dict(none)
    if inside.any():
        pitches = voice[inside, 1]
        if before.any():
            out["leap_in"] = float(abs(int(pitches[0]) - int(voice[before, 1][-1])))
        if after.any():
            out["leap_out"] = float(abs(int(voice[after, 1][0]) - int(pitches[-1])))
    in_region = (own[:, COL["bar"]] >= first) & (own[:, COL["bar"]] <= last)
    region, rest = own[in_region], own[~in_region]
    if len(region) and len(rest):
        low, high = rest[:, COL["pitch"]].min(), rest[:, COL["pitch"]].max()
        out["region_in_range"] = float(np.mean((region[:, COL["pitch"]] >= low) & (region[:, COL["pitch"]] <= high)))
    others = notes[notes[:, COL["track"]] != track]
    consonant = counted = 0
    for onset, pitch in region[:, [COL["onset"], COL["pitch"]]].tolist():
        bass = lowest_sounding(others, onset)
        if bass is not None:
            counted += 1
            consonant += abs(pitch - bass) % 12 in CONSONANT
    if counted:
        out["region_consonance"] = consonant / counted
    return out


def piece_features(
    tok: HIDTokenizer,
    tokens: np.ndarray,
    chords: list[int] | None = None,
    region: tuple[int, int, int] | None = None,
    key: str | None = None,
) -> dict[str, float | str | None]:
    """Every feature of one piece. ``chords``: a chord index per bar (-1: none), default the conductor's.
    ``region``: (track, first bar, last bar), 0-based. ``key``: a key to agree with (``"C major"``)."""
    piece = tok.parse(tokens)
    notes = tok.note_table(piece)
    drums = [i for i, (token, _) in enumerate(piece.tracks) if token == TRACK_DRUMS]
    pitched = notes[~np.isin(notes[:, COL["track"]], drums)]
    tracks = sorted(set(pitched[:, COL["track"]].tolist()))
    voices = sorted((line(pitched[pitched[:, COL["track"]] == t]) for t in tracks), key=lambda v: -v[:, 1].mean())
    parallels, crossings = parallels_and_crossings(voices)
    bars_per_track = [
        [
            {tuple(r) for r in notes[(notes[:, COL["track"]] == t) & (notes[:, COL["bar"]] == b)][:, BAR_NOTE].tolist()}
            for b in range(piece.n_bars)
        ]
        for t in range(len(piece.tracks))
    ]
    n, d = meter(tok, piece)
    own = [-1] * piece.n_bars
    for b, c in piece.conductor_events(tok)[2]:
        own[b] = c
    rates = chord_rates(tok, pitched, own if chords is None else chords, piece.bar_starts(tok))
    own_rate = rates if chords is None else chord_rates(tok, pitched, own, piece.bar_starts(tok))
    found_key = key_of(pitched[:, COL["pitch"]], pitched[:, COL["duration"]])
    features: dict[str, float | str | None] = {
        **MusicMetrics(tok).piece(tokens)[0],
        "repetition": repetition(bars_per_track),
        "stepwise": stepwise(voices),
        "parallels": parallels,
        "crossings": crossings,
        "voices": float(len(voices)),
        "bars": float(piece.n_bars),
        "meter": f"{n}/{d}",
        "bar_quarters": 4 * n / d,
        "triple_meter": float(n % 3 == 0),
        **rates,
        "chord_tone_rate_own": own_rate["chord_tone_rate"],
        "key": found_key,
        "key_agrees": None if key is None or found_key is None else float(found_key == key),
    }
    if region is not None:
        features.update(region_features(pitched, *region))
    return features


def feature_vector(features: dict) -> list[float]:
    """``FEATURE_VECTOR`` of one piece's features; a feature that one voice leaves undefined counts 0."""
    return [float(features[name] or 0.0) for name in FEATURE_VECTOR]


def self_similarity(tok: HIDTokenizer, tokens: np.ndarray) -> np.ndarray:
    """[bars, bars]: the similarity of every two bars' notes as (track, position, pitch, duration)."""
    piece = tok.parse(tokens)
    notes = tok.note_table(piece)
    bars = [{tuple(r) for r in notes[notes[:, COL["bar"]] == b][:, PIECE_NOTE].tolist()} for b in range(piece.n_bars)]
    return np.array([[jaccard(a, b) for b in bars] for a in bars])
