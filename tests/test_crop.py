"""``crop_bars`` starts a crop with the tempo in force at its first bar's start."""

from __future__ import annotations

import pytest

from _music import make_score
from meloformer.edits import crop_bars
from meloformer.hid import HIDTokenizer

TOK = HIDTokenizer()


def tempos(tokens) -> list[tuple[int, float]]:
    return [(t.time, round(t.qpm, 1)) for t in TOK.decode(tokens).tempos]


@pytest.mark.parametrize("change_at", [6, 4], ids=["mid-bar", "on-the-bar-line"])
def test_a_crop_starts_at_the_tempo_in_force_at_its_first_bar(change_at):
    """Tempo 90, then 148 from beat ``change_at`` (bar 1 spans beats 4-8): a crop from bar 1 starts at 90 and
    changes where the piece does, or starts at 148 when the change is on its first bar line."""
    notes = [(beat, 1, 60 + beat, 90) for beat in range(12)]
    tokens = TOK.encode(make_score([(0, False, notes)], tempos=[(0, 90.0), (change_at, 148.0)]))
    (_, slow), (change, fast) = tempos(tokens)
    assert abs(slow - 90) < 2 and abs(fast - 148) < 3
    bar = 4 * TOK.decode(tokens).ticks_per_quarter
    expected = [(0, slow), (change - bar, fast)] if change_at == 6 else [(0, fast)]
    assert tempos(crop_bars(TOK, tokens, 1, 3)) == expected
