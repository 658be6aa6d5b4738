"""Forced chords bind the notes written under them: chord tones are favoured, and the bass takes the root at
the downbeat."""

from __future__ import annotations

import numpy as np

from meloformer import sampler
from meloformer.hid import (
    BOS,
    CHORD_QUALITIES,
    NOTE_COLUMNS,
    TRACK_CONDUCTOR,
    TRACK_DRUMS,
    TRACK_PROGRAM0,
    HIDTokenizer,
)
from meloformer.module import module_from_folder
from meloformer.pretrained import default_model_folder
from meloformer.sampler import GenerationRequest, generate
from meloformer.steering import ChordBinding, bass_track

TOK = HIDTokenizer()
SATB = [TRACK_PROGRAM0 + 52, TRACK_PROGRAM0 + 52, TRACK_PROGRAM0 + 53, TRACK_PROGRAM0 + 53]
COLUMN = {name: i for i, name in enumerate(NOTE_COLUMNS)}


def test_the_bass_is_a_bass_instrument_else_the_lowest_listed_pitched_track():
    violin, viola, cello, piano = (TRACK_PROGRAM0 + p for p in (40, 41, 42, 0))
    assert bass_track(SATB) == 4
    assert bass_track([cello, violin, viola]) == 1  # the cello, wherever it is listed
    assert bass_track([violin, viola, TRACK_DRUMS]) == 2  # drums carry no bass line
    assert bass_track([piano]) is None  # a single line is a melody
    assert bass_track([piano, TRACK_DRUMS]) is None


def test_chord_tones_get_the_bias_and_the_bass_the_root_at_the_downbeat():
    c_major, a_minor = TOK.chords.index((0, "maj")), TOK.chords.index((9, "min"))
    binding = ChordBinding(TOK, [c_major, None, a_minor], SATB, strength=1.5)
    bias = binding.bias(0, 1)[TOK.pitch0 : TOK.pitch0 + 128]
    assert set(np.flatnonzero(bias) % 12) == {0, 4, 7} and set(bias[bias > 0]) == {1.5}
    assert set(np.flatnonzero(binding.bias(2, 3)[TOK.pitch0 :]) % 12) == {9, 0, 4}
    assert binding.bias(1, 1) is None  # a free bar
    assert binding.bias(0, 0) is None  # the conductor
    roots = binding.downbeat(2, 4)
    assert set(np.flatnonzero(roots[TOK.pitch0 : TOK.pitch0 + 128]) % 12) == {9}
    assert roots[: TOK.pitch0].all()  # only pitches are narrowed (a Dur or Vel may follow the root)
    assert binding.downbeat(2, 1).all()  # the soprano is free
    drums = ChordBinding(TOK, [c_major], [TRACK_DRUMS, TRACK_PROGRAM0 + 33, TRACK_PROGRAM0], strength=1.5)
    assert drums.bias(0, 1) is None
    chosen = ChordBinding(TOK, [c_major, None, a_minor], None, strength=1.5)  # the model names the ensemble
    assert chosen(0, -1, -1, [BOS, *SATB[:2]]) == (None, None)  # the ensemble is not complete yet
    chosen(0, 0, -1, [BOS, *SATB, TRACK_CONDUCTOR])
    assert chosen.bass == 4 and np.array_equal(chosen.downbeat(2, 4), roots)


def _chord_notes(tokens: np.ndarray, chords: list[str], bass_track: int) -> tuple[float, list[int]]:
    """Share of pitched notes that are tones of their bar's chord; the bass's intervals above the root at
    downbeats (``bass_track`` counted from 0)."""
    from meloformer.chords import parse_chord

    piece = TOK.parse(tokens)
    notes = TOK.note_table(piece)
    wanted = [parse_chord(chords[b % len(chords)]) for b in range(piece.n_bars)]
    tones = [{(root + k) % 12 for k in CHORD_QUALITIES[q]} for root, q in wanted]
    hits = [n[COLUMN["pitch"]] % 12 in tones[n[COLUMN["bar"]]] for n in notes]
    bass = [
        (n[COLUMN["pitch"]] - wanted[n[COLUMN["bar"]]][0]) % 12
        for n in notes
        if n[COLUMN["track"]] == bass_track and n[COLUMN["pos"]] == 0
    ]
    return float(np.mean(hits)), bass


def test_forced_chords_lift_the_chord_tones_of_an_untrained_model(model, monkeypatch):
    """Near-uniform logits put about 3 of 12 notes on a triad's tones; the bias lifts that well above. Without
    the bias (strength 0) the share stays near chance."""
    chords = ["C", "G", "Am", "F"]
    request = GenerationRequest(bars=4, instruments=SATB[1:3], time_signature=(4, 4), chords=chords)
    bound = [_chord_notes(generate(model, TOK, request, seed=s), chords, 1)[0] for s in range(3)]
    monkeypatch.setattr(sampler, "CHORD_TONE_BIAS", 0.0)
    free = [_chord_notes(generate(model, TOK, request, seed=s), chords, 1)[0] for s in range(3)]
    assert np.mean(bound) > 0.45 and np.mean(free) < 0.35, (bound, free)


def test_the_shipped_models_bass_takes_the_root_at_every_downbeat():
    """The trained model writes downbeats (the untrained one hardly does): each bass note there is the root."""
    model = module_from_folder(default_model_folder()).model
    chords = ["C", "G", "Am", "F"]
    request = GenerationRequest(bars=4, instruments=SATB, time_signature=(4, 4), chords=chords)
    downbeats = [i for s in range(2) for i in _chord_notes(generate(model, TOK, request, seed=s), chords, 3)[1]]
    assert len(downbeats) >= 4 and set(downbeats) == {0}, downbeats
