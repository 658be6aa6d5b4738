"""Voice-leading steering (``--voice_leading``): no track crosses the voices written before it, nor moves with
one of them in parallel fifths or octaves."""

from __future__ import annotations

from functools import partial

import numpy as np

from _music import quarter_note
from meloformer.features import piece_features
from meloformer.hid import BAR, BOS, NOTE_COLUMNS, TRACK_CONDUCTOR, TRACK_PROGRAM0, HIDTokenizer
from meloformer.module import module_from_folder
from meloformer.pretrained import default_model_folder
from meloformer.sampler import GenerationRequest, generate
from meloformer.steering import CHOIR_RANGES, VoiceLeading, choir_ranges, sung

TOK = HIDTokenizer()
TRACK, PITCH = NOTE_COLUMNS.index("track"), NOTE_COLUMNS.index("pitch")
SATB = [TRACK_PROGRAM0 + 52, TRACK_PROGRAM0 + 52, TRACK_PROGRAM0 + 53, TRACK_PROGRAM0 + 53]


note = partial(quarter_note, TOK)


def soprano_and_alto(alto: list[int]) -> list[int]:
    """One 4/4 bar of SATB: the soprano sings C5 then D5 (positions 0 and 12); the alto's first tokens are
    ``alto``."""
    conductor = [BAR, TOK.timesig0 + TOK.time_signatures.index((4, 4)), TOK.pos0, TOK.tempo0 + 20]
    soprano = [TRACK_PROGRAM0 + 52, BAR, *note(0, 72), *note(12, 74)]
    return [BOS, *SATB, TRACK_CONDUCTOR, *conductor, *soprano, TRACK_PROGRAM0 + 52, BAR, *alto]


def test_a_choir_is_every_track_a_voice():
    assert sung(SATB) and sung([TRACK_PROGRAM0 + 54])
    assert not sung([*SATB, TRACK_PROGRAM0 + 0]) and not sung([TRACK_PROGRAM0 + 40] * 4) and not sung([])


def allowed_pitches_of(steer: VoiceLeading, written: list[int], track: int, onset: int) -> set[int]:
    bias, mask = steer(0, track, onset, written)
    assert bias is None
    return set(np.flatnonzero(mask[TOK.pitch0 : TOK.pitch0 + 128]).tolist())


def allowed_pitches(steer: VoiceLeading, written: list[int], onset: int) -> set[int]:
    """What the alto (track 2) may sing at ``onset``."""
    return allowed_pitches_of(steer, written, 2, onset)


def test_a_voice_stays_below_the_voice_above_it():
    """The alto (its first note G4, under the soprano) may not rise above the soprano's D5 at position 12."""
    written = soprano_and_alto([*note(0, 67), TOK.pos0 + 12])
    allowed = allowed_pitches(VoiceLeading(TOK), written, 12)
    assert max(allowed) == 74 and {60, 67, 71, 74} <= allowed


def test_parallel_fifths_and_octaves_are_refused():
    """Alto F4 under the soprano's C5 is a fifth; as the soprano rises to D5, G4 (a fifth again, rising) is
    refused, G3 (falling: contrary motion) and A4 are not. From C4 (an octave) C4+2 = D4 rising is refused."""
    fifth = allowed_pitches(VoiceLeading(TOK), soprano_and_alto([*note(0, 65), TOK.pos0 + 12]), 12)
    assert 67 not in fifth and {55, 69, 64} <= fifth
    octave = allowed_pitches(VoiceLeading(TOK), soprano_and_alto([*note(0, 60), TOK.pos0 + 12]), 12)
    assert 62 not in octave and {50, 64, 65} <= octave


def test_nothing_is_steered_before_a_voice_has_a_note_or_a_voice_to_lead_against():
    steer = VoiceLeading(TOK)
    assert steer(0, 2, 0, soprano_and_alto([TOK.pos0])) == (None, None)  # the alto's first note is free
    assert steer(0, 1, 12, soprano_and_alto([])[:-3]) == (None, None)  # the first voice is free
    assert steer(0, 2, -1, soprano_and_alto([*note(0, 67)])) == (None, None)  # no onset yet


def test_a_choirs_voice_keeps_its_place_in_the_list_from_its_first_note():
    """Ordered (a choir): the alto's first note may not rise above the soprano's C5 at the downbeat nor fall
    below the alto's range; and an alto whose first note went above the soprano (C6) stays below it, where by
    its mean pitch it would stay above."""
    first = allowed_pitches(VoiceLeading(TOK, ordered=True), soprano_and_alto([TOK.pos0]), 0)
    assert first == set(range(CHOIR_RANGES[1][0], 73))
    above = soprano_and_alto([*note(0, 84), TOK.pos0 + 12])
    assert max(allowed_pitches(VoiceLeading(TOK, ordered=True), above, 12)) == 74
    assert min(allowed_pitches(VoiceLeading(TOK), above, 12)) == 74


def test_a_choirs_voices_keep_their_parts_ranges():
    """A choir of four sings SATB's ranges, one of another size gives its voices two parts' ranges each; the
    first voice of a choir is held to its range too, and the bass stays under the tenor within its own."""
    soprano, alto, tenor, bass = CHOIR_RANGES
    assert choir_ranges(4) == [soprano, alto, tenor, bass]
    assert choir_ranges(2) == [(alto[0], soprano[1]), (bass[0], tenor[1])]
    assert choir_ranges(3)[1] == (tenor[0], alto[1]) and choir_ranges(1) == [(bass[0], soprano[1])]
    start = soprano_and_alto([])[: -len(note(0, 72)) * 2 - 2]  # up to the soprano's Bar
    first = allowed_pitches_of(VoiceLeading(TOK, ordered=True), [*start, TOK.pos0], 1, 0)
    assert first == set(range(soprano[0], soprano[1] + 1))
    assert VoiceLeading(TOK)(0, 1, 0, [*start, TOK.pos0]) == (None, None)  # unordered: the first voice is free
    tenor = [TRACK_PROGRAM0 + 53, BAR, *note(0, 60)]
    lowest = soprano_and_alto([*note(0, 65)]) + tenor + [TRACK_PROGRAM0 + 53, BAR, TOK.pos0]
    assert allowed_pitches_of(VoiceLeading(TOK, ordered=True), lowest, 4, 0) == set(range(bass[0], 61))  # under C4


def test_an_ordered_fill_pass_stays_between_the_voices_listed_around_it():
    """Regenerating the alto of soprano, alto, tenor: under the soprano's C5 and over the tenor's E3."""
    conductor = [BAR, TOK.timesig0 + TOK.time_signatures.index((4, 4)), TOK.pos0, TOK.tempo0 + 20]
    soprano = [TRACK_PROGRAM0 + 52, BAR, *note(0, 72)]
    alto = [TRACK_PROGRAM0 + 52, BAR]  # its bar empty in place: the pass writes it
    tenor = [TRACK_PROGRAM0 + 53, BAR, *note(0, 52)]
    written = [BOS, *SATB[:3], TRACK_CONDUCTOR, *conductor, *soprano, *alto, *tenor, TRACK_PROGRAM0 + 52, BAR]
    _, mask = VoiceLeading(TOK, rewrites=1, ordered=True)(0, 4, 0, [*written, TOK.pos0])
    allowed = np.flatnonzero(mask[TOK.pitch0 : TOK.pitch0 + 128])
    assert allowed.min() == 52 and allowed.max() == 72


def test_a_fill_pass_leads_against_the_other_voices_and_counts_its_tracks_kept_bars_as_its_own():
    """Regenerating the alto's bar 1 of two: the pass (track 3) leads against the soprano only, and the alto's
    kept C4 of bar 2 counts as its own line, not as a voice to stay above."""
    conductor = [BAR, TOK.timesig0 + TOK.time_signatures.index((4, 4)), TOK.pos0, TOK.tempo0 + 20, BAR]
    soprano = [TRACK_PROGRAM0 + 52, BAR, *note(0, 72), *note(12, 74), BAR, *note(0, 72)]
    alto = [TRACK_PROGRAM0 + 52, BAR, BAR, *note(0, 60)]  # bar 1 empty in place: the pass writes it
    written = [BOS, *SATB[:2], TRACK_CONDUCTOR, *conductor, *soprano, *alto, TRACK_PROGRAM0 + 52, BAR]
    written += [*note(0, 65), TOK.pos0 + 12]
    steer = VoiceLeading(TOK, rewrites=1)
    bias, mask = steer(0, 3, 12, written)
    allowed = set(np.flatnonzero(mask[TOK.pitch0 : TOK.pitch0 + 128]).tolist())
    assert max(allowed) == 74 and 67 not in allowed  # under the soprano; F4-C5 rising to G4-D5: fifths
    assert [voice[:, 1].tolist() for voice in steer._voices] == [[72, 74, 72]]
    assert steer._kept[:, NOTE_COLUMNS.index("pitch")].tolist() == [60]
    plain = VoiceLeading(TOK)
    plain(0, 3, 12, written)
    assert len(plain._voices) == 2  # without rewrites the alto's first pass would be an earlier voice


def test_the_shipped_models_satb_samples_keep_their_voices_apart():
    """With voice-leading, no parallel fifth or octave, the voices in the order listed and in their parts'
    ranges, and crossings on average within issue 19's goal (6%), where the same seeds cross far more. (The
    steering acts at a voice's onsets, against the voice listed before it, so a single sample can still cross,
    which is why the mean is over ten.)"""
    model = module_from_folder(default_model_folder()).model
    measured = {}
    for steer in (False, True):
        request = GenerationRequest(bars=8, instruments=SATB, time_signature=(4, 4), voice_leading=steer)
        pieces = [generate(model, TOK, request, seed=s) for s in range(10)]
        measured[steer] = [(f["parallels"], f["crossings"]) for f in (piece_features(TOK, p) for p in pieces)]
    for notes in (TOK.note_table(tokens) for tokens in pieces):  # the steered ones
        means = [notes[notes[:, TRACK] == t][:, PITCH].mean() for t in range(4)]
        assert np.all(np.diff(means) < 0), means  # soprano over alto over tenor over bass, as listed
        for t, (low, high) in enumerate(CHOIR_RANGES):
            pitches = notes[notes[:, TRACK] == t][:, PITCH]
            assert low <= pitches.min() and pitches.max() <= high, (t, pitches.min(), pitches.max())
    assert all(parallels == 0 for parallels, _ in measured[True]), measured
    crossings = {steer: np.mean([c for _, c in pairs]) for steer, pairs in measured.items()}
    assert crossings[True] <= 0.06 and crossings[False] > 2 * crossings[True], measured
