"""Restatement (``--restatement``): a bar the model begins as a copy of an earlier bar of its track is drawn to
end as one."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from _music import quarter_note
from meloformer.features import piece_features
from meloformer.hid import BAR, BOS, TRACK_CONDUCTOR, TRACK_PROGRAM0, HIDTokenizer
from meloformer.module import module_from_folder
from meloformer.pretrained import default_model_folder
from meloformer.sampler import GenerationRequest, check_request, generate
from meloformer.steering import Restatement

TOK = HIDTokenizer()
DUR, VEL = TOK.dur0 + 11, TOK.vel0 + 20


note = partial(quarter_note, TOK)


def piano(*bars: list[int]) -> list[int]:
    """A piece whose piano track (written after the conductor's two empty bars) has ``bars`` so far."""
    return [BOS, TRACK_PROGRAM0, TRACK_CONDUCTOR, BAR, BAR, TRACK_PROGRAM0, *(t for b in bars for t in [BAR, *b])]


def favoured(written: list[int], onset: int) -> set[int]:
    bias, mask = Restatement(TOK, 2.0)(1, 1, onset, written)
    if bias is None:
        return set()
    assert mask is None and set(bias[bias != 0]) == {2.0}
    return set(np.flatnonzero(bias).tolist())


def test_a_bar_begun_as_a_copy_is_drawn_on_token_by_token():
    """Bar 0: C4 at 0, D4 at 12. Bar 1 has copied C4 so far: the next token of bar 0 is favoured, each in turn,
    and once the whole bar is copied, its end."""
    first = [*note(0, 60), *note(12, 62)]
    assert favoured(piano(first, note(0, 60)), 0) == {TOK.pos0 + 12}
    assert favoured(piano(first, [*note(0, 60), TOK.pos0 + 12]), 12) == {TOK.pitch0 + 62}
    assert favoured(piano(first, [*note(0, 60), TOK.pos0 + 12, TOK.pitch0 + 62]), 12) == {DUR}
    assert favoured(piano(first, first), 12) == {BAR}


def test_only_a_faithful_copy_with_a_note_is_drawn_on():
    first = [*note(0, 60), *note(12, 62)]
    assert favoured(piano(first, note(0, 64)), 0) == set()  # a new pitch: new material stays free
    assert favoured(piano(first, [TOK.pos0]), 0) == set()  # no note yet: the model chooses how to begin
    assert favoured(piano(first, []), -1) == set()
    assert favoured(piano(note(0, 60)), 0) == set()  # no earlier bar


def test_the_nearest_earlier_bar_leads():
    """Two earlier bars begin with C4; the nearer one (E4 next) is the model, not the older (D4 next)."""
    older, nearer = [*note(0, 60), *note(12, 62)], [*note(0, 60), *note(12, 64)]
    assert favoured(piano(older, nearer, [*note(0, 60), TOK.pos0 + 12]), 12) == {TOK.pitch0 + 64}


def test_a_negative_restatement_is_refused():
    with pytest.raises(ValueError, match="restatement must be 0 \\(off\\) or more, got -1"):
        check_request(TOK, GenerationRequest(bars=4, instruments=[TRACK_PROGRAM0], restatement=-1.0))


def test_the_shipped_model_restates_more_bars_with_it():
    """Single lines of 16 bars in the model's meter, four seeds: with the default restatement more bars repeat
    an earlier bar than with it off (the 16-sample sets of docs/results.md: 23-31% off, 48-53% on)."""
    model = module_from_folder(default_model_folder()).model
    rates = {}
    for strength in (0.0, 2.0):
        request = GenerationRequest(bars=16, instruments=[TRACK_PROGRAM0], top_p=0.95, restatement=strength)
        rates[strength] = np.mean([piece_features(TOK, generate(model, TOK, request, seed=s))["repetition"]
                                   for s in range(4)])  # fmt: skip
    assert rates[2.0] > rates[0.0] + 0.1, rates


def test_under_forced_chords_only_a_bar_of_the_same_chord_is_restated():
    """Bars 0 and 1 begin alike; bar 2 has copied their start. Under chords (by index) 0, 7, 0 only bar 0 leads;
    under 0, 7, 7 only bar 1; under 0, 7, 5 neither."""
    bar0, bar1 = [*note(0, 60), *note(12, 62)], [*note(0, 60), *note(12, 67)]
    after_onset = piano(bar0, bar1, [*note(0, 60), TOK.pos0 + 12])
    for chords, expected in (([0, 7, 0], TOK.pitch0 + 62), ([0, 7, 7], TOK.pitch0 + 67), ([0, 7, 5], None)):
        bias, _ = Restatement(TOK, 2.0, chords)(2, 1, 12, after_onset)
        assert (bias is None) if expected is None else set(np.flatnonzero(bias).tolist()) == {expected}
