"""Piano rolls: instruments by name, drums on a lane of their own, infilled bars shaded, chord labels apart."""

from __future__ import annotations

import symusic

from meloformer.hid import HIDTokenizer
from meloformer.pianoroll import MARK_COLOUR, _chord_rows, render_pianoroll

TOK = HIDTokenizer()


def piece_with_drums() -> symusic.Score:
    score = symusic.Score(480)
    score.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    piano, drums = symusic.Track("piano", program=0), symusic.Track("drums", program=0, is_drum=True)
    for beat in range(16):
        piano.notes.append(symusic.Note(beat * 480, 480, 60 + beat % 5, 80))
        drums.notes.append(symusic.Note(beat * 480, 120, 36 if beat % 2 == 0 else 38, 100))
    score.tracks.extend([piano, drums])
    return score


def test_drums_get_their_own_lane_and_tracks_their_names(tmp_path):
    score = piece_with_drums()
    score.dump_midi(tmp_path / "p.mid")
    tokens = TOK.encode(tmp_path / "p.mid")
    fig = render_pianoroll(TOK, tokens, marked=[(2, 2, 3)])
    pitched, lane = fig.axes
    assert lane.get_ylabel() == "drum key" and lane.get_ylim()[0] <= 36 and lane.get_ylim()[1] >= 38
    assert pitched.get_ylim()[0] > 50  # the piano's range, not stretched down to the drum keys
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["1: Drums", "2: Acoustic Grand Piano", "regenerated (infill): 2:2-3"]
    shaded = [
        p
        for p in pitched.patches
        if p.get_facecolor()[:3] == tuple(int(MARK_COLOUR[i : i + 2], 16) / 255 for i in (1, 3, 5))
    ]
    assert len(shaded) == 1 and shaded[0].get_x() == 4.0  # bars 2-3 of 4/4: quarters 4 to 12


def test_chord_labels_stagger_when_bars_are_narrower_than_names():
    assert _chord_rows([20.0, 30.0], bar_width=40.0) == 1
    assert _chord_rows([20.0, 30.0], bar_width=20.0) == 2
    assert _chord_rows([90.0], bar_width=10.0) == 3
