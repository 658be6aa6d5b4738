"""Chord progressions: spellings mapped to the HID chord vocabulary, and the sampler writes exactly them."""

from __future__ import annotations

import numpy as np
import pytest

from _music import demo_files
from meloformer.chords import SPELLINGS, parse_chord, progression
from meloformer.edits import crop_bars
from meloformer.grammar import HIDGrammar
from meloformer.hid import CHORD_QUALITIES, PITCH_CLASS_NAMES, TRACK_PROGRAM0, HIDTokenizer, TokenKind
from meloformer.sampler import GenerationRequest, check_request, generate

TOK = HIDTokenizer()


def vocab_name(name: str) -> str:
    return TOK.vocab[TOK.chord0 + TOK.chords.index(parse_chord(name))]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("C", "Chord_Cmaj"),
        ("Cm", "Chord_Cmin"),
        ("C7", "Chord_C7"),
        ("Cmaj7", "Chord_Cmaj7"),
        ("CM7", "Chord_Cmaj7"),
        ("Cdim", "Chord_Cdim"),
        ("Csus4", "Chord_Csus4"),
        ("Bb", "Chord_Bbmaj"),
        ("F#m", "Chord_F#min"),
        ("Gbm", "Chord_F#min"),
        ("Db", "Chord_C#maj"),
        ("Cb", "Chord_Bmaj"),
        ("E#", "Chord_Fmaj"),
        ("Am7b5", "Chord_Ahdim7"),
        ("Ebm7", "Chord_Ebmin7"),
        ("D+", "Chord_Daug"),
        ("Bo", "Chord_Bdim"),
        ("G-", "Chord_Gmin"),
        (" a ", "Chord_Amaj"),
        ("bm", "Chord_Bmin"),
    ],
)
def test_common_spellings_map_to_the_hid_chord(name, expected):
    assert vocab_name(name) == expected


# Each accepted suffix's pitch classes above the root, written out by hand (independent of CHORD_QUALITIES).
INTERVALS = {
    "": {0, 4, 7}, "maj": {0, 4, 7}, "M": {0, 4, 7}, "m": {0, 3, 7}, "min": {0, 3, 7}, "-": {0, 3, 7},
    "dim": {0, 3, 6}, "o": {0, 3, 6}, "aug": {0, 4, 8}, "+": {0, 4, 8}, "sus4": {0, 5, 7}, "sus": {0, 5, 7},
    "7": {0, 4, 7, 10}, "dom7": {0, 4, 7, 10}, "maj7": {0, 4, 7, 11}, "M7": {0, 4, 7, 11},
    "m7": {0, 3, 7, 10}, "min7": {0, 3, 7, 10}, "-7": {0, 3, 7, 10},
    "m7b5": {0, 3, 6, 10}, "hdim7": {0, 3, 6, 10}, "ø": {0, 3, 6, 10}, "ø7": {0, 3, 6, 10},
}  # fmt: skip


@pytest.mark.parametrize("root", ["C", "C#", "Db", "D", "Eb", "E", "F", "F#", "Gb", "G", "Ab", "A", "Bb", "B"])
def test_every_spelling_on_every_root_names_the_right_pitch_classes(root):
    assert set(INTERVALS) == set(SPELLINGS)
    semitone = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}[root[0]] + {"#": 1, "b": -1}.get(root[1:], 0)
    for suffix, intervals in INTERVALS.items():
        pc, quality = parse_chord(root + suffix)
        assert pc == semitone % 12
        assert {(pc + k) % 12 for k in CHORD_QUALITIES[quality]} == {(semitone + k) % 12 for k in intervals}


def test_every_hid_chord_name_is_accepted_back():
    for index, (root, quality) in enumerate(TOK.chords):
        assert TOK.chords.index(parse_chord(PITCH_CLASS_NAMES[root] + quality)) == index


@pytest.mark.parametrize("name", ["H", "Cmaj9", "C/G", "", "Cadd9", "C##", "Xm", "Cmin9"])
def test_unknown_chord_is_one_line_listing_the_accepted_forms(name):
    with pytest.raises(ValueError) as err:
        parse_chord(name)
    message = str(err.value)
    assert message.startswith(f"unknown chord {name!r}") and "\n" not in message
    for form in ("Cm", "C7", "Cmaj7", "Cdim", "Csus4", "Cm7b5", "Bb"):
        assert form in message


def test_progression_repeats_to_the_bars():
    names = [TOK.vocab[TOK.chord0 + i] for i in progression(TOK, ["C", "G", "Am", "F"], 6)]
    assert names == ["Chord_Cmaj", "Chord_Gmaj", "Chord_Amin", "Chord_Fmaj", "Chord_Cmaj", "Chord_Gmaj"]
    with pytest.raises(ValueError, match="at least one chord"):
        progression(TOK, [], 4)


def test_grammar_allows_only_the_fixed_chord_in_each_conductor_bar():
    chords = progression(TOK, ["Am", "Dm"], 2)
    grammar = HIDGrammar.from_tokens(TOK, [1, 6, 4, 3, TOK.timesig0 + TOK.time_signatures.index((4, 4))], n_bars=2)
    assert grammar.allowed()[TOK.chord0 : TOK.chord0 + len(TOK.chords)].sum() == len(TOK.chords)
    grammar = HIDGrammar.from_tokens(
        TOK, [1, 6, 4, 3, TOK.timesig0 + TOK.time_signatures.index((4, 4))], n_bars=2, chords=chords
    )
    assert np.flatnonzero(grammar.allowed()).tolist() == [TOK.chord0 + chords[0]]
    for token in [TOK.chord0 + chords[0], TOK.pos0, TOK.tempo0 + 20, 3]:
        grammar.advance(token)
    allowed = grammar.allowed()  # bar 2: a time signature may change, then the chord must come
    assert set(np.flatnonzero(allowed & (TOK.kinds != TokenKind.TIMESIG))) == {TOK.chord0 + chords[1]}


def markers(tokens: np.ndarray) -> list[tuple[int, str]]:
    """Decoded chord markers as (bar, name)."""
    piece = TOK.parse(tokens)
    starts = piece.bar_starts(TOK).tolist()
    return [(starts.index(m.time), m.text) for m in TOK.decode(tokens).markers]


@pytest.mark.parametrize("seed", range(3))
def test_decoded_chord_markers_equal_the_request(model, seed):
    request = GenerationRequest(bars=6, instruments=[TRACK_PROGRAM0 + 33, TRACK_PROGRAM0], chords=["C", "G", "Am", "F"])
    tokens = generate(model, TOK, request, seed=seed)  # time signature free: bars may change meter
    expected = ["Cmaj", "Gmaj", "Amin", "Fmaj", "Cmaj", "Gmaj"]
    assert markers(tokens) == list(enumerate(expected))
    assert len(TOK.note_table(tokens)) > 0


def test_continuation_keeps_the_prompt_chords_and_fixes_the_new_bars(model):
    chorale = next(f for f in demo_files() if "bach" in str(f))
    prompt = crop_bars(TOK, TOK.encode(chorale), 0, 2)
    tokens = generate(model, TOK, GenerationRequest(bars=5, prompt=prompt, chords=["Dm", "G7"]), seed=0)
    assert markers(tokens) == markers(prompt) + [(2, "Dmin"), (3, "G7"), (4, "Dmin")]


def test_chords_need_bars_to_generate():
    chorale = next(f for f in demo_files() if "bach" in str(f))
    prompt = crop_bars(TOK, TOK.encode(chorale), 0, 2)
    with pytest.raises(ValueError, match="--chords needs a number of bars"):
        check_request(TOK, GenerationRequest(bars=None, chords=["C"]))
    for request in [
        GenerationRequest(bars=None, prompt=prompt, add_track=TRACK_PROGRAM0, chords=["C"]),
        GenerationRequest(bars=None, prompt=prompt, regenerate=[(0, 1)], chords=["C"]),
    ]:
        with pytest.raises(ValueError, match="keeps the prompt's chords"):
            check_request(TOK, request)
    with pytest.raises(ValueError, match="unknown chord 'Q'"):
        check_request(TOK, GenerationRequest(bars=4, chords=["C", "Q"]))
