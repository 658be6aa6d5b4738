"""Grammar-constrained sampling: always-valid MIDI, prompts kept note for note, seeds reproducible, and every
piece inside the token budget."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from _music import demo_files, write_and_read_back
from meloformer.edits import crop_bars
from meloformer.hid import BAR, EOS, TRACK_DRUMS, TRACK_PROGRAM0, HIDTokenizer, TokenKind
from meloformer.sampler import (
    GenerationRequest,
    check_request,
    filter_logits,
    fit_to_context,
    fold_bar_into_closing,
    generate,
)

TOK = HIDTokenizer()


@pytest.fixture(scope="module")
def prompt() -> np.ndarray:
    chorale = next(f for f in demo_files() if "bach" in str(f))
    return crop_bars(TOK, TOK.encode(chorale), 0, 2)


@pytest.mark.parametrize("seed", range(4))
def test_untrained_model_samples_decode_to_midi_with_notes(model, seed, tmp_path):
    request = GenerationRequest(
        bars=2, instruments=[TRACK_DRUMS, TRACK_PROGRAM0 + 33], tempo=100, time_signature=(3, 4)
    )
    tokens = generate(model, TOK, request, seed=seed)
    score = write_and_read_back(TOK, tokens, tmp_path / "sample.mid")
    piece = TOK.parse(tokens)
    assert piece.n_bars == 2 and [t for t, _ in piece.tracks] == request.instruments
    assert [(ts.numerator, ts.denominator) for ts in score.time_signatures] == [(3, 4)]


def test_same_seed_same_piece_other_seed_other_piece(model):
    request = GenerationRequest(bars=2, instruments=[TRACK_PROGRAM0])
    first = generate(model, TOK, request, seed=7)
    assert np.array_equal(first, generate(model, TOK, request, seed=7))
    assert not np.array_equal(first, generate(model, TOK, request, seed=8))


def test_continuation_keeps_the_prompt_notes(model, prompt):
    tokens = generate(model, TOK, GenerationRequest(bars=3, prompt=prompt), seed=1)
    before, after = TOK.note_table(prompt), TOK.note_table(tokens)
    assert TOK.parse(tokens).n_bars == 3
    assert np.array_equal(
        after[after[:, 1] < 2][np.lexsort(after[after[:, 1] < 2].T[::-1])], before[np.lexsort(before.T[::-1])]
    )


def test_add_track_keeps_every_prompt_track_note_for_note(model, prompt):
    flute = TRACK_PROGRAM0 + 73
    tokens = generate(model, TOK, GenerationRequest(bars=None, prompt=prompt, add_track=flute), seed=2)
    piece, original = TOK.parse(tokens), TOK.parse(prompt)
    assert [t for t, _ in piece.tracks] == [t for t, _ in original.tracks] + [flute]
    for (_, bars), (_, prompt_bars) in zip(piece.tracks, original.tracks):
        assert all(np.array_equal(a, b) for a, b in zip(bars, prompt_bars))
    notes = TOK.note_table(tokens)
    assert np.array_equal(notes[notes[:, 0] < len(original.tracks)], TOK.note_table(prompt))


def test_continuation_must_ask_for_more_bars(model, prompt):
    with pytest.raises(ValueError, match="more bars"):
        generate(model, TOK, GenerationRequest(bars=2, prompt=prompt))


def test_filter_logits_masks_and_truncates():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, 5.0])
    allowed = np.array([True, True, True, True, False])
    assert torch.isinf(filter_logits(logits, allowed, 1.0, 0, 1.0)[4])
    top1 = filter_logits(logits, allowed, 1.0, 1, 1.0)
    assert torch.isfinite(top1).tolist() == [True, False, False, False, False]
    nucleus = filter_logits(logits, allowed, 1.0, 0, 0.7)  # p(3.0) ~ 0.64 < 0.7, with 2.0 it passes
    assert torch.isfinite(nucleus).tolist() == [True, True, False, False, False]
    sharp = filter_logits(logits, allowed, 0.5, 0, 1.0)
    assert torch.allclose(sharp[:4], logits[:4] * 2)


def _bars_per_track(tokens: np.ndarray) -> list[int]:
    piece = TOK.parse(tokens)
    return [len(piece.conductor)] + [len(bars) for _, bars in piece.tracks]


@pytest.mark.parametrize(
    ("instruments", "budget"),
    [([TRACK_DRUMS, TRACK_PROGRAM0, TRACK_PROGRAM0 + 33], 120), ([TRACK_PROGRAM0 + 40], 90), (None, 150)],
)
def test_every_track_gets_every_bar_inside_the_budget(model, instruments, budget, tmp_path):
    """16 bars in a budget far below what an untrained model writes freely (about 25 tokens a bar)."""
    for seed in range(2):
        request = GenerationRequest(bars=16, instruments=instruments, max_tokens=budget)
        tokens = generate(model, TOK, request, seed=seed)
        assert len(tokens) <= budget
        bars = _bars_per_track(tokens)
        assert bars == [16] * len(bars) and len(bars) >= 2
        if instruments is not None:
            assert [t for t, _ in TOK.parse(tokens).tracks] == instruments
        write_and_read_back(TOK, tokens, tmp_path / f"{seed}.mid")


def test_budget_holds_when_the_model_chooses_bars_and_tracks(model):
    """bars=None: the conductor decides how many bars; instruments=None: the model decides the tracks."""
    for seed in range(3):
        tokens = generate(model, TOK, GenerationRequest(bars=None, max_tokens=60), seed=seed)
        bars = _bars_per_track(tokens)
        assert len(tokens) <= 60 and len(bars) >= 2 and bars == [bars[0]] * len(bars)


def test_tightest_budget_is_the_hand_counted_minimum(model):
    """Two bars, drums and piano. The shortest piece: BOS Track_drums Track_0 Track_conductor, Bar TimeSig Pos_0
    Tempo, Bar; Track_drums Bar Bar; Track_0 Bar Bar; EOS (16 tokens), plus one note held back as Pos Pitch Dur
    Vel (4)."""
    request = GenerationRequest(bars=2, instruments=[TRACK_DRUMS, TRACK_PROGRAM0], max_tokens=20)
    for seed in range(3):
        tokens = generate(model, TOK, request, seed=seed)
        assert len(tokens) <= 20 and _bars_per_track(tokens) == [2, 2, 2]
        assert len(TOK.note_table(tokens)) == 1
    with pytest.raises(ValueError, match="need at least 20 tokens; the model's context holds 19"):
        check_request(TOK, request, capacity=19)


def test_budget_is_shared_across_tracks(model):
    """No track is starved: with room for a few notes per bar, every track of 8 bars gets notes."""
    instruments = [TRACK_PROGRAM0, TRACK_PROGRAM0 + 33, TRACK_PROGRAM0 + 73]
    tokens = generate(model, TOK, GenerationRequest(bars=8, instruments=instruments, max_tokens=260), seed=3)
    notes = TOK.note_table(tokens)
    assert len(tokens) <= 260
    assert sorted(set(notes[:, 0].tolist())) == [0, 1, 2]
    per_track = np.bincount(notes[:, 0], minlength=3)
    assert per_track.min() >= per_track.max() // 4, per_track


@pytest.fixture(scope="module")
def long_prompt() -> np.ndarray:
    chorale = next(f for f in demo_files() if "bach" in str(f))
    tokens = TOK.encode(chorale)
    assert TOK.parse(tokens).n_bars >= 12 and len(tokens) > 512
    return tokens


def test_a_long_prompt_is_cropped_to_its_last_bars_that_fit(model, long_prompt):
    n = TOK.parse(long_prompt).n_bars
    request = GenerationRequest(bars=n + 4, prompt=long_prompt, max_tokens=400)
    fitted, notice = fit_to_context(TOK, request, 400)
    kept = TOK.parse(fitted.prompt).n_bars
    assert notice and f"using its last {kept} bars" in notice and 1 <= kept < n
    assert np.array_equal(fitted.prompt, crop_bars(TOK, long_prompt, n - kept, n)) and fitted.bars == kept + 4
    room = 4 * (1 + len(TOK.parse(long_prompt).tracks)) * 5  # a Bar and one note per new segment
    assert len(fitted.prompt) + room <= 400 < len(crop_bars(TOK, long_prompt, n - kept - 1, n)) + room  # the most
    assert fit_to_context(TOK, fitted, 400) == (fitted, None)

    tokens = generate(model, TOK, request, seed=0)
    assert len(tokens) <= 400 and _bars_per_track(tokens) == [kept + 4] * (1 + len(TOK.parse(long_prompt).tracks))
    before, after = TOK.note_table(fitted.prompt), TOK.note_table(tokens)
    assert np.array_equal(after[after[:, 1] < kept], before)


def test_adding_a_track_to_a_long_prompt_crops_it(model, long_prompt):
    request = GenerationRequest(bars=None, prompt=long_prompt, add_track=TRACK_DRUMS, max_tokens=400)
    tokens = generate(model, TOK, request, seed=1)
    piece = TOK.parse(tokens)
    assert len(tokens) <= 400 and piece.tracks[-1][0] == TRACK_DRUMS
    assert _bars_per_track(tokens) == [piece.n_bars] * (2 + len(TOK.parse(long_prompt).tracks))


@pytest.mark.parametrize(
    ("tracks", "add", "problem"),
    [
        ([(p, False) for p in range(15)] + [(0, True)], TRACK_PROGRAM0 + 5, "already has 16 tracks"),
        ([(p, False) for p in range(15)], TRACK_PROGRAM0 + 5, "already has 15 pitched tracks"),
        ([(0, False), (0, True)], TRACK_DRUMS, "already has a drum track"),
    ],
)
def test_add_track_needs_a_free_track_and_channel(tracks, add, problem):
    from _music import make_score

    score = make_score([(program, drum, [(0, 1, 60, 80)]) for program, drum in tracks])
    prompt = TOK.encode(score)
    with pytest.raises(ValueError, match=problem):
        check_request(TOK, GenerationRequest(bars=None, prompt=prompt, add_track=add))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"bars": 0}, "bars must be at least 1"),
        ({"temperature": -1.0}, "temperature must be 0"),
        ({"top_k": -3}, "top_k must be 0"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"tempo": 0.0}, "tempo 0 is outside"),
        ({"tempo": 400.0}, "tempo 400 is outside"),
    ],
)
def test_bad_controls_are_refused(change, problem):
    with pytest.raises(ValueError, match=problem):
        check_request(TOK, GenerationRequest(**{"bars": 2, **change}))


@pytest.mark.parametrize("instruments", [[TRACK_DRUMS, TRACK_PROGRAM0], None], ids=["given", "chosen-by-the-model"])
def test_progress_bar_counts_instrument_bars_against_a_total(model, capsys, instruments):
    """The bar counts the bars of instrument tracks (not the conductor's) against a total; when the model
    chooses the instruments, the total grows with each track it opens."""
    tokens = generate(model, TOK, GenerationRequest(bars=3, instruments=instruments), seed=0, progress=True)
    tracks = len(TOK.parse(tokens).tracks)
    counts = re.findall(r"(\d+)/(\d+) ", capsys.readouterr().err.replace("\r", "\n"))
    assert counts[-1] == (str(3 * tracks), str(3 * tracks))


def test_a_wish_for_another_bar_closes_a_finished_track():
    """In a track's last bar the grammar forbids Bar; the model's probability of Bar goes to Track/EOS."""
    vocab = TOK.vocab_size
    probs = torch.full((vocab,), 1e-3)
    probs[BAR], probs[EOS], probs[TRACK_PROGRAM0] = 0.5, 0.1, 0.1
    logits = (probs / probs.sum()).log() + 3.0  # unnormalised, as the model gives them
    closing = np.isin(TOK.kinds, (TokenKind.TRACK, TokenKind.EOS))
    allowed = np.ones(vocab, dtype=bool)
    assert torch.allclose(fold_bar_into_closing(logits, allowed, closing), logits.log_softmax(-1))  # Bar allowed
    allowed[BAR] = False
    folded = fold_bar_into_closing(logits, allowed, closing).exp()
    p = probs / probs.sum()
    close, others = torch.from_numpy(closing), torch.from_numpy(allowed & ~closing)
    # Every closing token (EOS, each Track) grows in proportion to its own share; nothing else moves.
    grown = p[close] * (p[close].sum() + p[BAR]) / p[close].sum()
    assert torch.allclose(folded[close], grown) and torch.allclose(folded[others], p[others])
    assert torch.allclose(folded[torch.from_numpy(allowed)].sum(), torch.tensor(1.0))
    assert folded[EOS] > 2 * p[EOS]  # most of Bar's mass went to EOS and the likely track token
    allowed[[EOS, TRACK_PROGRAM0]] = False
    allowed[closing] = False  # nothing closes: nothing to fold into
    assert torch.allclose(fold_bar_into_closing(logits, allowed, closing), logits.log_softmax(-1))
