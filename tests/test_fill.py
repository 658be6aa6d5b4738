"""The fill pass (meloformer.fill): a region of one track written after the whole piece, in training rows and
when infilling."""

from __future__ import annotations

import numpy as np
import pytest

from _music import demo_files
from meloformer.datamodules.rows import MAX_FILL_BARS, RowBuilder
from meloformer.datamodules.shards import ShardReader
from meloformer.edits import crop_bars
from meloformer.fill import FILL_CONTEXT_BARS, fill_row, merge
from meloformer.grammar import HIDGrammar
from meloformer.hid import BAR, BOS, EOS, PAD, TRACK_CONDUCTOR, HIDError, HIDTokenizer, TokenKind
from meloformer.layout import layout
from meloformer.masks import full_dense_mask, summary_mask_mod
from meloformer.row_layout import row_layout

TOK = HIDTokenizer()


@pytest.fixture(scope="module")
def chorale() -> np.ndarray:
    """16 bars of a chorale: 4 tracks, every bar with notes."""
    path = next(f for f in demo_files() if "bach" in str(f))
    return crop_bars(TOK, TOK.encode(path), 0, 16)


@pytest.mark.parametrize("track, first, last", [(0, 0, 0), (1, 2, 3), (3, 5, 5), (2, 0, 5), (0, 11, 12)])
def test_fill_row_moves_the_region_after_the_piece_and_merge_puts_it_back(chorale, track, first, last):
    row = fill_row(TOK, chorale, track, first, last)
    lay, original = layout(row, TOK.kinds), layout(chorale, TOK.kinds)
    copied = range(max(first - FILL_CONTEXT_BARS, 0), first)  # the track's bars the pass copies
    own = (original.track == track + 1) & (chorale != BAR)
    # The pass's Track token, a Bar per bar up to the last, and the copies; the region's tokens only move.
    assert len(row) == len(chorale) + 1 + last + 1 + int((own & np.isin(original.bar, copied)).sum())
    fill = lay.track == 5  # after the conductor and the four tracks
    assert row[fill][0] == row[1 + track] and row[-1] == EOS  # the target's Track token, from the ensemble
    assert lay.bar[fill].max() == last
    for b in range(16):
        own = (lay.track == track + 1) & (lay.bar == b) & (row != BAR)
        was = chorale[(original.track == track + 1) & (original.bar == b) & (chorale != BAR)]
        written = row[fill & (lay.bar == b) & (row != BAR)]
        if first <= b <= last:  # empty in place, written in the pass under its own bar number
            assert not own.any() and np.array_equal(written, was) and len(was)
        elif b in copied:
            assert np.array_equal(row[own], was) and np.array_equal(written, was)
        else:
            assert np.array_equal(row[own], was) and len(written) == 0
    assert np.array_equal(merge(TOK, row, track, set(range(first, last + 1))), chorale)


def test_fill_row_refuses_a_region_outside_the_piece(chorale):
    for track, first, last in [(4, 0, 0), (0, 15, 16), (0, 3, 2)]:
        with pytest.raises(HIDError, match="outside the piece"):
            fill_row(TOK, chorale, track, first, last)


def test_merge_refuses_another_tracks_pass(chorale):
    """The soprano and alto share a program, so the check is by position: bass (Voice Oohs) is not soprano."""
    with pytest.raises(HIDError, match="not the track the pass writes"):
        merge(TOK, fill_row(TOK, chorale, 3, 1, 1), 0, {1})


def test_the_grammar_takes_a_fill_pass_only_when_asked(chorale):
    row = fill_row(TOK, chorale, 1, 2, 3)
    HIDGrammar.from_tokens(TOK, row, fill=(int(row[2]), 4))
    with pytest.raises(HIDError, match="Track"):
        HIDGrammar.from_tokens(TOK, row)  # after the last track only EOS
    grammar = HIDGrammar.from_tokens(TOK, row[:-1], fill=(int(row[2]), 4))
    assert grammar.in_fill and grammar.allowed()[EOS] and not grammar.allowed()[BAR]  # 4 bars, then EOS
    start = int(np.flatnonzero(layout(row, TOK.kinds).track == 5)[0])
    allowed = HIDGrammar.from_tokens(TOK, row[:start], fill=(int(row[2]), 4)).allowed()
    tracks = np.flatnonzero(allowed & (TOK.kinds == TokenKind.TRACK))
    assert tracks.tolist() == [int(row[2])] and not allowed[EOS]  # the pass comes, with its Track token


def test_a_region_of_empty_bars_leaves_the_pass_to_write_the_first_note():
    """A piece whose only notes lie in the region is a valid fill row: the first pass may close without one."""
    piece = TOK.encode(next(f for f in demo_files() if "bach" in str(f)))
    one_bar = crop_bars(TOK, piece, 0, 1)
    lay = layout(one_bar, TOK.kinds)
    solo = one_bar[(lay.track <= 1) | (lay.track == -1)]  # conductor and soprano: the ensemble trimmed below
    solo = np.concatenate([[BOS, solo[1]], solo[np.flatnonzero(solo == TRACK_CONDUCTOR)[0] :]])
    row = fill_row(TOK, solo, 0, 0, 0)
    HIDGrammar.from_tokens(TOK, row, fill=(int(row[1]), 1))


def test_the_region_hears_its_tracks_next_bar_and_the_piece_does_not_hear_the_region(chorale):
    """In the summary mask, a note of the pass's last region bar sees the notes of its own track's next bar
    (the first pass, within the cross-track window) and of the other tracks there; nothing before the pass
    sees the pass."""
    row = fill_row(TOK, chorale, 0, 1, 2)
    rows = row_layout(row[None].astype(np.int64), TOK.kinds)
    dense = full_dense_mask(summary_mask_mod(rows), rows)[0, 0].numpy()
    lay = layout(row, TOK.kinds)
    pitch = lay.kind == TokenKind.PITCH
    region_note = np.flatnonzero(pitch & (lay.track == 5) & (lay.bar == 2))[-1]
    for track in (1, 2, 4):  # soprano (the first pass), alto, bass
        after = np.flatnonzero(pitch & (lay.track == track) & (lay.bar == 3))
        assert dense[region_note, after].all(), track
    pass_tokens = np.flatnonzero(lay.track == 5)
    before = np.arange(pass_tokens[0])
    assert not dense[np.ix_(before, pass_tokens)].any()


@pytest.fixture(scope="module")
def reader(demo_shards) -> ShardReader:
    return ShardReader(demo_shards)


def test_training_rows_carry_fill_passes_that_parse_and_fit(reader):
    builder = RowBuilder(reader, "train", TOK, 1024, max_segments=256, seed=3, fill_share=1.0)
    passes = 0
    for index in range(12):
        row = builder.row(index)
        assert (layout(row, TOK.kinds).segment.max() + 1) <= 256
        for start, end in zip(np.flatnonzero(row == BOS), np.flatnonzero(row == EOS)):
            doc = row[start : end + 1]
            lay = layout(doc, TOK.kinds)
            ensemble = int(np.argmax(doc == TRACK_CONDUCTOR)) - 1
            if lay.track.max() == ensemble:
                continue  # a crop the pass did not fit
            passes += 1
            fill = lay.track == ensemble + 1
            bars = int(lay.bar[fill].max()) + 1
            HIDGrammar.from_tokens(TOK, doc, fill=(int(doc[fill][0]), bars))
            targets = [t for t in range(ensemble) if doc[1 + t] == doc[fill][0]]
            assert any(_is_pass_of(doc, lay, fill, t, bars) for t in targets)
    assert passes >= 12  # every anchor crop at least (share 1)


def _is_pass_of(doc: np.ndarray, lay, fill: np.ndarray, track: int, bars: int) -> bool:
    """Is ``fill`` a fill pass of instrument track ``track``: each bar empty, a copy of the track's bar (at
    most FILL_CONTEXT_BARS of them, before the region) or written where the track's bar is empty (the region,
    at most MAX_FILL_BARS), and the piece back in place a valid one?"""
    kinds = []
    for b in range(bars):
        mine = doc[fill & (lay.bar == b) & (doc != BAR)]
        kept = doc[(lay.track == track + 1) & (lay.bar == b) & (doc != BAR)]
        kinds.append(
            "empty" if not len(mine) else "copy" if np.array_equal(mine, kept) else "fill" if not len(kept) else "?"
        )
    region = {b for b, kind in enumerate(kinds) if kind == "fill"}
    if "?" in kinds or kinds.count("copy") > FILL_CONTEXT_BARS or len(region) > MAX_FILL_BARS:
        return False
    return bool(TOK.parse(merge(TOK, doc, track, region)).tracks)


def test_fill_share_zero_keeps_the_rows_and_validation_never_fills(reader):
    plain = RowBuilder(reader, "train", TOK, 1024, seed=3)
    assert all(np.array_equal(plain.row(i), RowBuilder(reader, "train", TOK, 1024, seed=3, fill_share=0.0).row(i))
               for i in range(4))  # fmt: skip
    val = RowBuilder(reader, "val", TOK, 1024, seed=3, fill_share=1.0)
    for index in range(3):
        row = val.row(index)
        for start, end in zip(np.flatnonzero(row == BOS), np.flatnonzero(row == EOS)):
            TOK.parse(row[start : end + 1])  # a plain piece: parse refuses a repeated Track token
    assert (plain.row(0) != PAD).any()


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_fill_share_outside_0_1_is_refused_naming_it(demo_shards, share):
    from meloformer.datamodules.hid_datamodule import HIDDataModule

    with pytest.raises(ValueError, match=rf"^data: fill_share must lie in 0\.\.1, got {share}$"):
        HIDDataModule(data_dir=str(demo_shards), fill_share=share)
