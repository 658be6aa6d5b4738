"""Piano-roll pictures of HID pieces: one colour per track, bar lines, chord names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meloformer.files import atomic_path
from meloformer.hid import NOTE_COLUMNS, PITCH_CLASS_NAMES, TRACK_DRUMS, HIDTokenizer

COL = {name: i for i, name in enumerate(NOTE_COLUMNS)}


def track_label(track_token: int) -> str:
    return "drums" if track_token == TRACK_DRUMS else f"program {track_token - 6}"


def render_pianoroll(tok: HIDTokenizer, tokens: np.ndarray, title: str = ""):
    """A matplotlib Figure of the piece (x in quarter notes); no pyplot state, so nothing to close."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    piece = tok.parse(tokens)
    notes = tok.note_table(piece)
    starts = piece.bar_starts(tok) / tok.resolution
    end = (piece.bar_starts(tok)[-1] + piece.bar_lengths(tok)[-1]) / tok.resolution
    fig = Figure(figsize=(max(8.0, min(40.0, end / 4)), 5), dpi=100)
    ax = fig.subplots()
    colours = colormaps["tab10"]
    for number, (track_token, _) in enumerate(piece.tracks):
        rows = notes[notes[:, COL["track"]] == number]
        bars = [(o / tok.resolution, d / tok.resolution) for o, d in rows[:, [COL["onset"], COL["duration"]]]]
        for (onset, duration), pitch in zip(bars, rows[:, COL["pitch"]]):
            ax.broken_barh([(onset, duration)], (pitch - 0.4, 0.8), color=colours(number % 10))
        ax.plot([], [], color=colours(number % 10), lw=6, label=f"{number + 1}: {track_label(track_token)}")
    low, high = (int(notes[:, COL["pitch"]].min()), int(notes[:, COL["pitch"]].max())) if len(notes) else (48, 72)
    for start in starts:
        ax.axvline(start, color="0.8", lw=0.6, zorder=0)
    for bar, chord in piece.conductor_events(tok)[2]:
        root, quality = tok.chords[chord]
        ax.text(starts[bar] + 0.1, high + 1.5, PITCH_CLASS_NAMES[root] + quality, fontsize=7, color="0.3")
    ax.set_xlim(0, end)
    ax.set_ylim(low - 2, high + 4)
    ax.set_xlabel("quarter notes")
    ax.set_ylabel("MIDI pitch")
    ax.set_title(title or f"{piece.n_bars} bars, {len(piece.tracks)} tracks, {len(notes)} notes")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7, ncol=min(6, max(1, len(piece.tracks))))
    fig.tight_layout()
    return fig


def save_pianoroll(tok: HIDTokenizer, tokens: np.ndarray, path: str | Path, title: str = "") -> None:
    """Write the piano roll of ``tokens`` as a PNG file (whole, or not at all)."""
    figure = render_pianoroll(tok, tokens, title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
