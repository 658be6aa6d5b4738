"""Piano-roll pictures of HID pieces: one colour per track (named by General MIDI instrument), bar lines,
chord names, drums on a lane of their own, and the bars an infill regenerated marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from meloformer.files import atomic_path
from meloformer.hid import NOTE_COLUMNS, PITCH_CLASS_NAMES, TRACK_DRUMS, HIDTokenizer
from meloformer.instruments import instrument_name

COL = {name: i for i, name in enumerate(NOTE_COLUMNS)}
CHORD_FONT = 7  # points
MARK_COLOUR = "#fff3b0"


def _chord_rows(label_widths: list[float], bar_width: float) -> int:
    """Rows to stagger chord labels over so that neighbours do not overlap (at most 3)."""
    widest = max(label_widths, default=0.0)
    return int(min(3, max(1, np.ceil(widest / max(bar_width, 1e-6)))))


def render_pianoroll(
    tok: HIDTokenizer, tokens: np.ndarray, title: str = "", marked: Sequence[tuple[int, int, int]] = ()
):
    """A matplotlib Figure of the piece (x in quarter notes); no pyplot state, so nothing to close.

    ``marked`` are regenerated regions (track, first bar, last bar; all from 1, as ``--infill`` counts them):
    their bars are shaded and their notes outlined.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    piece = tok.parse(tokens)
    notes = tok.note_table(piece)
    starts = piece.bar_starts(tok) / tok.resolution
    lengths = piece.bar_lengths(tok) / tok.resolution
    end = starts[-1] + lengths[-1]
    drum_tracks = [n for n, (token, _) in enumerate(piece.tracks) if token == TRACK_DRUMS]
    is_drum = np.isin(notes[:, COL["track"]], drum_tracks)
    width = max(8.0, min(40.0, end / 4))
    fig = Figure(figsize=(width, 6 if drum_tracks else 5), dpi=100)
    if drum_tracks:
        ax, drum_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (4, 1)})
    else:
        ax, drum_ax = fig.subplots(), None
    colours = colormaps["tab10"]
    marks = {(track - 1, bar) for track, first, last in marked for bar in range(first - 1, last)}
    for number, (track_token, _) in enumerate(piece.tracks):
        target = drum_ax if track_token == TRACK_DRUMS else ax
        rows = notes[notes[:, COL["track"]] == number]
        for onset, duration, pitch, bar in rows[:, [COL["onset"], COL["duration"], COL["pitch"], COL["bar"]]]:
            outlined = (number, int(bar)) in marks
            target.broken_barh(
                [(onset / tok.resolution, max(duration, 1) / tok.resolution)],
                (pitch - 0.4, 0.8),
                color=colours(number % 10),
                edgecolor="black" if outlined else "none",
                linewidth=0.8 if outlined else 0,
            )
        ax.plot([], [], color=colours(number % 10), lw=6, label=f"{number + 1}: {instrument_name(track_token)}")
    for _, first, last in marked:
        for target in (ax, drum_ax) if drum_ax is not None else (ax,):
            target.axvspan(starts[first - 1], starts[last - 1] + lengths[last - 1], color=MARK_COLOUR, zorder=0)
    if marked:
        ax.plot(
            [],
            [],
            color=MARK_COLOUR,
            lw=6,
            label="regenerated (infill): "
            + ", ".join(f"{t}:{f}" + (f"-{la}" if la > f else "") for t, f, la in marked),
        )
    pitched = notes[~is_drum]
    low, high = (int(pitched[:, COL["pitch"]].min()), int(pitched[:, COL["pitch"]].max())) if len(pitched) else (48, 72)
    for target in (ax, drum_ax) if drum_ax is not None else (ax,):
        for start in starts:
            target.axvline(start, color="0.8", lw=0.6, zorder=0.5)
    _chord_labels(tok, piece, ax, starts, lengths, high, width * 72 / end)
    ax.set_xlim(0, end)
    ax.set_ylim(low - 2, high + 6)
    ax.set_ylabel("MIDI pitch")
    ax.set_title(title or f"{piece.n_bars} bars, {len(piece.tracks)} tracks, {len(notes)} notes")
    bottom = ax
    if drum_ax is not None:
        drums = notes[is_drum]
        keys = drums[:, COL["pitch"]] if len(drums) else np.array([35, 50])
        drum_ax.set_ylim(int(keys.min()) - 1, int(keys.max()) + 1)
        drum_ax.set_ylabel("drum key")
        bottom = drum_ax
    bottom.set_xlabel("quarter notes")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=min(6, max(1, len(labels))), frameon=False)
    fig.tight_layout(rect=(0, 0.05 * np.ceil(len(labels) / 6), 1, 1))
    return fig


def _chord_labels(tok, piece, ax, starts: np.ndarray, lengths: np.ndarray, high: int, points_per_quarter: float):
    """Chord names above the notes: a name only where the chord changes, staggered over rows when the bars
    are narrower than the names."""
    labels, last = [], None
    for bar, chord in piece.conductor_events(tok)[2]:
        root, quality = tok.chords[chord]
        name = PITCH_CLASS_NAMES[root] + quality
        if name != last:
            labels.append((bar, name))
        last = name
    widths = [0.6 * CHORD_FONT * len(name) for _, name in labels]  # points, roughly
    rows = _chord_rows(widths, float(lengths.min()) * points_per_quarter if len(lengths) else 1.0)
    for i, (bar, name) in enumerate(labels):
        ax.text(starts[bar] + 0.1, high + 1.5 + 1.5 * (i % rows), name, fontsize=CHORD_FONT, color="0.3")


def save_pianoroll(
    tok: HIDTokenizer,
    tokens: np.ndarray,
    path: str | Path,
    title: str = "",
    marked: Sequence[tuple[int, int, int]] = (),
) -> None:
    """Write the piano roll of ``tokens`` as a PNG file (whole, or not at all)."""
    figure = render_pianoroll(tok, tokens, title, marked)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
