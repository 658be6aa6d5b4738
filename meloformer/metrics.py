"""Music metrics for `meloformer evaluate --generated DIR --reference DIR` (numpy only).

Every metric is computed on the HID view of a file (quantised notes, bars from the conductor track), so
generated and reference music are measured on the same grid:

- ``pitch_class_entropy``: Shannon entropy (bits) of the piece's pitch-class histogram, pitched notes only.
- ``groove_consistency``: 1 - mean Hamming distance between the onset patterns of consecutive bars (all
  tracks, drums included), divided by the bar's grid length (Wu & Yang's MusDr definition).
- ``polyphony``: mean number of pitched notes sounding at grid steps where at least one sounds (MusPy).
- ``empty_bar_rate``: fraction of bars in which no track has an onset.
- ``notes_per_bar``: notes divided by bars.
- ``bar_similarity``: L_t, the mean similarity of bar pairs at distance t, where the similarity of two bars is
  |A ∩ B| / |A ∪ B| over their notes as (track program, position, pitch, duration) (Museformer's statistic).
  For a folder, ``similarity_error`` = mean over t of |L_t(generated) - L_t(reference)| (Museformer's SE).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meloformer.hid import NOTE_COLUMNS, TRACK_DRUMS, HIDTokenizer, Piece

PIECE_METRICS = ("pitch_class_entropy", "groove_consistency", "polyphony", "empty_bar_rate", "notes_per_bar")
COL = {name: i for i, name in enumerate(NOTE_COLUMNS)}


def pitch_class_entropy(pitches: np.ndarray) -> float:
    if len(pitches) == 0:
        return 0.0
    p = np.bincount(np.asarray(pitches) % 12, minlength=12) / len(pitches)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def groove_consistency(bar_patterns: list[np.ndarray]) -> float:
    """``bar_patterns``: per bar, a boolean onset vector over its grid positions."""
    if len(bar_patterns) < 2:
        return 1.0
    distances = []
    for a, b in zip(bar_patterns[:-1], bar_patterns[1:]):
        width = max(len(a), len(b))
        a = np.pad(a, (0, width - len(a)))
        b = np.pad(b, (0, width - len(b)))
        distances.append(np.count_nonzero(a != b) / width)
    return float(1 - np.mean(distances))


def polyphony(onsets: np.ndarray, durations: np.ndarray) -> float:
    if len(onsets) == 0:
        return 0.0
    end = int((onsets + durations).max())
    sounding = np.zeros(end + 1, dtype=np.int64)
    np.add.at(sounding, onsets, 1)
    np.add.at(sounding, onsets + durations, -1)
    sounding = np.cumsum(sounding)[:end]
    active = sounding[sounding > 0]
    return float(active.mean()) if len(active) else 0.0


def bar_similarity_by_distance(bar_sets: list[set], max_distance: int) -> np.ndarray:
    """Sum of similarities and pair counts at each distance t = 1..max_distance, shape [max_distance, 2]."""
    sums = np.zeros((max_distance, 2))
    for t in range(1, min(max_distance, len(bar_sets) - 1) + 1):
        for a, b in zip(bar_sets[:-t], bar_sets[t:]):
            union = len(a | b)
            sums[t - 1, 0] += len(a & b) / union if union else 1.0
            sums[t - 1, 1] += 1
    return sums


class MusicMetrics:
    """Per-piece metrics and folder aggregates on the grid of ``tokenizer``."""

    def __init__(self, tokenizer: HIDTokenizer | None = None, max_distance: int = 16) -> None:
        self.tok = tokenizer or HIDTokenizer()
        self.max_distance = max_distance

    def piece(self, tokens: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
        """Metrics of one piece, and its bar-similarity sums (for folder aggregation)."""
        piece = Piece.parse(self.tok, np.asarray(tokens))
        notes = self.tok.note_table(piece)
        drum_tracks = [i for i, (token, _) in enumerate(piece.tracks) if token == TRACK_DRUMS]
        programs = [token for token, _ in piece.tracks]
        pitched = notes[~np.isin(notes[:, COL["track"]], drum_tracks)]
        lengths = piece.bar_lengths(self.tok)
        patterns, bar_sets = [], []
        for b in range(piece.n_bars):
            in_bar = notes[notes[:, COL["bar"]] == b]
            pattern = np.zeros(lengths[b], dtype=bool)
            pattern[in_bar[:, COL["pos"]]] = True
            patterns.append(pattern)
            bar_sets.append(
                {
                    (programs[r[COL["track"]]], r[COL["pos"]], r[COL["pitch"]], r[COL["duration"]])
                    for r in in_bar.tolist()
                }
            )
        metrics = {
            "pitch_class_entropy": pitch_class_entropy(pitched[:, COL["pitch"]]),
            "groove_consistency": groove_consistency(patterns),
            "polyphony": polyphony(pitched[:, COL["onset"]], pitched[:, COL["duration"]]),
            "empty_bar_rate": float(np.mean([not p.any() for p in patterns])),
            "notes_per_bar": len(notes) / piece.n_bars,
        }
        return metrics, bar_similarity_by_distance(bar_sets, self.max_distance)

    def folder(self, folder: str | Path) -> dict:
        """Mean of each piece metric over the MIDI files of a folder, L_t by distance, and files skipped."""
        from meloformer.hid import HIDError

        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".mid", ".midi"))
        rows, sims, skipped = [], np.zeros((self.max_distance, 2)), {}
        for path in files:
            try:
                metrics, sim = self.piece(self.tok.encode(path))
            except HIDError as err:
                skipped[str(path)] = str(err)
                continue
            rows.append(metrics)
            sims += sim
        if not rows:
            raise ValueError(f"{folder}: no readable MIDI files ({len(skipped)} skipped)")
        means = {k: float(np.mean([r[k] for r in rows])) for k in PIECE_METRICS}
        return {"files": len(rows), "skipped": skipped, "metrics": means, "bar_similarity": similarity_curve(sims)}


def similarity_curve(sums: np.ndarray) -> list[float]:
    """L_t from the summed similarities and pair counts ``[max_distance, 2]`` of ``bar_similarity_by_distance``
    (NaN at a distance without pairs)."""
    return np.where(sums[:, 1] > 0, sums[:, 0] / np.maximum(sums[:, 1], 1), np.nan).tolist()


def similarity_error(generated: list[float], reference: list[float]) -> float:
    """Museformer's SE: mean absolute difference of L_t over the distances both folders have."""
    g, r = np.array(generated, dtype=float), np.array(reference, dtype=float)
    both = ~np.isnan(g) & ~np.isnan(r)
    return float(np.abs(g[both] - r[both]).mean()) if both.any() else float("nan")
