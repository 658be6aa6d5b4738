"""Small helpers shared by tests: build scores by hand and find the bundled demo corpus."""

from __future__ import annotations

from pathlib import Path

import symusic

from meloformer.hid import HIDTokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO_MIDI = REPO / "demo" / "midi"


def quarter_note(tok: HIDTokenizer, pos: int, pitch: int) -> list[int]:
    """The HID tokens of a quarter note (the grid has 12 steps per quarter) at ``pos`` of its bar."""
    return [tok.pos0 + pos, tok.pitch0 + pitch, tok.dur0 + 11, tok.vel0 + 20]


def demo_files() -> list[Path]:
    return sorted(p for p in DEMO_MIDI.rglob("*") if p.suffix.lower() in (".mid", ".midi"))


def downbeats(score: symusic.Score) -> list[int]:
    """Bar lines in ticks as a MIDI reader counts them: each time signature starts a bar where it stands
    (4/4 before the first), up to the score's end. Equals symusic 0.6's ``Score.get_downbeats`` on every demo
    file and its decoding; written here because symusic 0.5.x lacks it and 0.6.0 cannot render audio."""
    marks = [(t.time, t.numerator, t.denominator) for t in sorted(score.time_signatures, key=lambda t: t.time)]
    if not marks or marks[0][0] > 0:
        marks.insert(0, (0, 4, 4))
    lines = []
    for i, (start, numerator, denominator) in enumerate(marks):
        stop = marks[i + 1][0] if i + 1 < len(marks) else score.end()
        lines += range(start, stop, numerator * 4 * score.ticks_per_quarter // denominator)
    return lines


def make_score(
    tracks: list[tuple[int, bool, list[tuple[float, float, int, int]]]],
    tempos: list[tuple[float, float]] = ((0, 120.0),),
    time_signatures: list[tuple[float, int, int]] = ((0, 4, 4),),
    tpq: int = 480,
) -> symusic.Score:
    """tracks: (program, is_drum, [(onset, duration, pitch, velocity)]) with times in quarter notes."""
    score = symusic.Score(tpq)
    ticks = lambda q: int(round(q * tpq))  # noqa: E731
    for q, n, d in time_signatures:
        score.time_signatures.append(symusic.TimeSignature(ticks(q), n, d))
    for q, bpm in tempos:
        score.tempos.append(symusic.Tempo(ticks(q), qpm=bpm))
    for program, is_drum, notes in tracks:
        track = symusic.Track(program=program, is_drum=is_drum)
        for onset, duration, pitch, velocity in notes:
            track.notes.append(symusic.Note(ticks(onset), ticks(duration), pitch, velocity))
        score.tracks.append(track)
    return score


def write_and_read_back(tok, tokens, path: Path) -> symusic.Score:
    """Decode ``tokens`` to a MIDI file and check that symusic and miditoolkit both read it, with notes."""
    import miditoolkit

    tok.decode_to_file(tokens, path)
    score = symusic.Score(str(path))
    assert score.note_num() > 0
    assert sum(len(i.notes) for i in miditoolkit.MidiFile(str(path)).instruments) == score.note_num()
    return score
