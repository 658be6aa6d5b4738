"""Music metrics against values worked out by hand on tiny pieces."""

from __future__ import annotations

import numpy as np
import pytest

from _music import make_score
from meloformer.hid import HIDTokenizer
from meloformer.metrics import MusicMetrics, polyphony, similarity_error

TOK = HIDTokenizer()
C_E_G_C = [(0, 1, 60, 90), (1, 1, 64, 90), (2, 1, 67, 90), (3, 1, 60, 90)]


def _piece(last_pitch: int):
    """Bar 0: C E G C in quarters; bar 1 silent; bar 2 like bar 0 but its last note is ``last_pitch``."""
    bar2 = [(8 + q, d, p, v) for q, d, p, v in C_E_G_C[:3]] + [(11, 1, last_pitch, 90)]
    return make_score([(0, False, C_E_G_C + bar2)])


def test_piece_metrics_by_hand():
    metrics, sims = MusicMetrics(max_distance=4).piece(TOK.encode(_piece(60)))
    # pitch classes: C x4, E x2, G x2 -> entropy of (1/2, 1/4, 1/4) = 1.5 bits
    assert metrics["pitch_class_entropy"] == pytest.approx(1.5)
    # onsets at 0, 12, 24, 36 of 48 grid steps, then an empty bar, then the same: two distances of 4/48
    assert metrics["groove_consistency"] == pytest.approx(1 - 4 / 48)
    assert metrics["polyphony"] == pytest.approx(1.0)
    assert metrics["empty_bar_rate"] == pytest.approx(1 / 3)
    assert metrics["notes_per_bar"] == pytest.approx(8 / 3)
    # distance 1: bar pairs (0, 1) and (1, 2) share nothing; distance 2: bar 0 == bar 2
    assert sims[:2].tolist() == [[0.0, 2.0], [1.0, 1.0]]
    assert sims[2:, 1].tolist() == [0.0, 0.0]


def test_polyphony_by_hand():
    # steps 0-11: C and E; 12-23: C and G; 24-35: silence (not counted); 36-47: one note -> (24*2 + 12) / 36
    onsets, durations = np.array([0, 0, 12, 36]), np.array([24, 12, 12, 12])
    assert polyphony(onsets, durations) == pytest.approx(60 / 36)


def test_folder_metrics_and_similarity_error(tmp_path):
    (tmp_path / "gen").mkdir()
    (tmp_path / "ref").mkdir()
    _piece(60).dump_midi(str(tmp_path / "gen" / "a.mid"))
    _piece(64).dump_midi(str(tmp_path / "ref" / "a.mid"))
    (tmp_path / "ref" / "broken.mid").write_bytes(b"MThd")
    metrics = MusicMetrics(max_distance=4)
    gen, ref = metrics.folder(tmp_path / "gen"), metrics.folder(tmp_path / "ref")
    assert gen["files"] == 1 and ref["files"] == 1 and list(ref["skipped"]) == [str(tmp_path / "ref" / "broken.mid")]
    # reference bar 2 shares 3 of 5 distinct notes with bar 0 -> L_2 = 0.6 vs 1.0 generated
    assert ref["bar_similarity"][1] == pytest.approx(0.6)
    assert similarity_error(gen["bar_similarity"], ref["bar_similarity"]) == pytest.approx((0 + 0.4) / 2)
