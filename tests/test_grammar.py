"""The HID grammar: it accepts real pieces, and anything sampled under it decodes to MIDI with notes."""

from __future__ import annotations

import numpy as np
import pytest

from _music import demo_files, make_score, write_and_read_back
from meloformer.grammar import HIDGrammar
from meloformer.hid import (
    BAR,
    BOS,
    EOS,
    TRACK_CONDUCTOR,
    TRACK_DRUMS,
    TRACK_PROGRAM0,
    HIDError,
    HIDTokenizer,
    TokenKind,
)

TOK = HIDTokenizer()


def sample_under_grammar(grammar: HIDGrammar, rng: np.random.Generator, limit: int = 4000) -> np.ndarray:
    """Uniform sampling among allowed tokens, with structure tokens favoured so pieces stay short."""
    out = []
    while not grammar.done and len(out) < limit:
        candidates = np.flatnonzero(grammar.allowed())
        assert len(candidates), f"dead end after {TOK.describe(out[-8:])}"
        weights = np.where(np.isin(TOK.kinds[candidates], (2, 3, 4)), 8.0, 1.0)
        token = int(rng.choice(candidates, p=weights / weights.sum()))
        grammar.advance(token)
        out.append(token)
    assert grammar.done, "sampling did not finish"
    return np.array(out)


@pytest.mark.parametrize("seed", range(40))
def test_sampled_sequences_decode_to_midi_both_readers_open(seed, tmp_path):
    rng = np.random.default_rng(seed)
    controls = [
        {},
        {"n_bars": 3},
        {"n_bars": 2, "time_signature": (3, 4), "tempo_bin": 20, "instruments": [TRACK_DRUMS, TRACK_PROGRAM0 + 33]},
    ][seed % 3]
    tokens = sample_under_grammar(HIDGrammar(TOK, **controls), rng)
    score = write_and_read_back(TOK, tokens, tmp_path / "sample.mid")
    piece = TOK.parse(tokens)
    if "n_bars" in controls:
        assert piece.n_bars == controls["n_bars"]
    if "instruments" in controls:
        assert [t for t, _ in piece.tracks] == controls["instruments"]
        assert [(ts.numerator, ts.denominator) for ts in score.time_signatures] == [(3, 4)]
        assert [round(t.qpm, 1) for t in score.tempos] == [round(float(TOK.tempo_values[20]), 1)]


def test_grammar_accepts_every_demo_piece():
    files = demo_files()
    assert files
    for path in files:
        tokens = TOK.encode(path)
        HIDGrammar.from_tokens(TOK, tokens)  # raises HIDError on the first token it would have masked


def test_grammar_masks_what_parse_rejects():
    tokens = TOK.encode(make_score([(0, False, [(0, 1, 60, 90), (4, 1, 62, 90)])]))
    grammar = HIDGrammar.from_tokens(TOK, tokens[:-1])
    assert grammar.allowed()[EOS]
    with pytest.raises(HIDError, match="not allowed"):
        HIDGrammar.from_tokens(TOK, tokens[:-1], n_bars=1)  # the piece has 2 bars
    bar0 = HIDGrammar.from_tokens(TOK, tokens[:4])  # BOS Track_0 Track_conductor Bar
    assert np.flatnonzero(bar0.allowed()).tolist() == list(range(TOK.timesig0, TOK.timesig0 + len(TOK.time_signatures)))
    after_pos = HIDGrammar.from_tokens(TOK, tokens[: np.flatnonzero(TOK.kinds[tokens] == 7)[1] + 1])
    assert set(TOK.kinds[np.flatnonzero(after_pos.allowed())]) == {9}  # only pitches after a note position


def test_the_ensemble_comes_first_and_decides_the_tracks():
    """Without instruments the model names the ensemble (at least one track, in canonical order) before the
    conductor; after the conductor every track is the ensemble's next one; given instruments are the ensemble."""
    bass, flute = TRACK_PROGRAM0 + 33, TRACK_PROGRAM0 + 73
    grammar = HIDGrammar.from_tokens(TOK, [BOS])
    allowed = grammar.allowed()
    assert not allowed[TRACK_CONDUCTOR] and allowed[bass] and allowed[flute] and allowed[TRACK_DRUMS]
    grammar.advance(bass)
    allowed = grammar.allowed()
    assert allowed[TRACK_CONDUCTOR] and allowed[flute] and not allowed[TRACK_DRUMS]  # drums come before a bass
    grammar.advance(flute)
    walk = [TRACK_CONDUCTOR, BAR, TOK.timesig0 + TOK.time_signatures.index((4, 4)), TOK.pos0, TOK.tempo0]
    for token in walk:
        grammar.advance(token)
    assert np.flatnonzero(grammar.allowed() & (TOK.kinds == TokenKind.TRACK)).tolist() == [bass]
    assert grammar.instruments == [bass, flute]
    given = HIDGrammar.from_tokens(TOK, [BOS], instruments=[flute, bass])  # given: any order
    assert np.flatnonzero(given.allowed()).tolist() == [flute]
    given.advance(flute)
    given.advance(bass)
    assert np.flatnonzero(given.allowed()).tolist() == [TRACK_CONDUCTOR]
