"""``layout`` against a plain token-by-token reference, on packed demo rows with padding on both sides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _music import demo_files
from meloformer.edits import crop_bars
from meloformer.hid import BAR, BOS, EOS, PAD, TRACK_CONDUCTOR, HIDTokenizer, TokenKind
from meloformer.layout import layout
from meloformer.row_layout import GrowingRowLayout, row_layout

TOK = HIDTokenizer()


def reference(tokens: np.ndarray) -> dict[str, list]:
    """The side channels of one row, read off the module docstring one token at a time."""
    kinds = TOK.kinds[tokens]
    n = len(tokens)
    out = {k: [-1] * n for k in ("doc", "track", "bar", "segment", "segment_end", "onset_group")}
    out["track_token"] = [0] * n
    doc, track, track_token, bar, segment, group = 0, -1, 0, -1, -1, -1
    in_segment = conducted = False  # conducted: the piece's conductor has begun (the ensemble opens no track)
    for i, (t, kind) in enumerate(zip(tokens.tolist(), kinds.tolist())):
        if t == BOS:
            doc, track, track_token, conducted = doc + 1, -1, 0, False
        conducted |= t == TRACK_CONDUCTOR
        if kind == TokenKind.TRACK and conducted:
            track, track_token, bar = track + 1, t, -1
        if t in (BOS, EOS, PAD) or kind == TokenKind.TRACK:
            in_segment = False
        if t == BAR and track >= 0:
            in_segment, bar, segment = True, bar + 1, segment + 1
        if t == BAR or kind == TokenKind.POS:
            group += 1
        out["doc"][i] = -1 if t == PAD else doc
        if t not in (BOS, EOS, PAD) and track >= 0:
            out["track"][i], out["track_token"][i] = track, track_token
        if in_segment:
            out["bar"][i], out["segment"][i], out["onset_group"][i] = bar, segment, group
    for i in range(n - 1, -1, -1):
        if out["segment"][i] >= 0:
            last = i + 1 < n and out["segment"][i + 1] == out["segment"][i]
            out["segment_end"][i] = out["segment_end"][i + 1] if last else i
    return out


def same_partition(a: np.ndarray, b: list[int]) -> bool:
    """Equal up to renaming the ids (-1 stays -1)."""
    pairs = {(x, y) for x, y in zip(a.tolist(), b)}
    return len({x for x, _ in pairs}) == len({y for _, y in pairs}) == len(pairs) and all(
        (x < 0) == (y < 0) for x, y in pairs
    )


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """Packed crops of demo pieces (whole pieces, single bars, a drum track), shifted behind 0..20 PADs."""
    pieces = [TOK.encode(p) for p in demo_files()[::12]]
    crops = [crop_bars(TOK, p, b, b + 1 + b % 3) for b, p in enumerate(pieces)]
    packed = np.concatenate(crops)
    out = np.full((8, len(packed) + 24), PAD)
    for r, shift in enumerate((0, 1, 2, 3, 5, 8, 13, 20)):
        out[r, shift : shift + len(packed)] = packed
    return out


def test_layout_equals_the_token_by_token_reference(rows: np.ndarray):
    batch = layout(rows, TOK.kinds)
    for r, row in enumerate(rows):
        expected = reference(row)
        single = layout(row, TOK.kinds)
        for name in ("doc", "track", "track_token", "bar", "segment", "segment_end"):
            assert getattr(batch, name)[r].tolist() == expected[name], (r, name)
            assert getattr(single, name).tolist() == expected[name], (r, name)
        assert same_partition(batch.onset_group[r], expected["onset_group"]), r
        assert batch.kind[r].tolist() == TOK.kinds[row].tolist()
        assert batch.is_pad[r].tolist() == (row == PAD).tolist()
        is_global = (row == BOS) | (row == EOS) | (TOK.kinds[row] == TokenKind.TRACK)
        assert batch.is_global[r].tolist() == is_global.tolist()
    assert batch.num_segments().tolist() == [max(reference(row)["segment"]) + 1 for row in rows]


def test_segment_table(rows: np.ndarray):
    lay = layout(rows, TOK.kinds)
    table = lay.segment_table(200)
    for r in range(len(rows)):
        count = int(lay.num_segments()[r])
        for s in range(count):
            first = int(np.flatnonzero(lay.segment[r] == s)[0])
            assert rows[r, first] == BAR
            assert table["end"][r, s] == lay.segment_end[r, first]
            assert (table["track"][r, s], table["bar"][r, s]) == (lay.track[r, first], lay.bar[r, first])
            assert (table["doc"][r, s], table["track_token"][r, s]) == (lay.doc[r, first], lay.track_token[r, first])
        assert (table["end"][r, count:] == -1).all() and (table["track_token"][r, count:] == 0).all()
    with pytest.raises(ValueError, match="summary slots"):
        lay.segment_table(int(lay.num_segments().max()) - 1)


@pytest.mark.parametrize("with_slots", [True, False])
def test_growing_row_layout_equals_row_layout_at_every_step(rows: np.ndarray, with_slots: bool):
    """Decoding's side channels, grown one token at a time, equal ``row_layout`` of the prefix at every length:
    packed documents, leading padding, a row cut inside a piece, single bars, the slot table past
    ``min_slots`` (it grows by 128)."""
    mid_piece = np.concatenate([[PAD, PAD], rows[0, 5:], [PAD] * 3])  # padding, then a row cut inside a piece
    picked = np.stack([rows[0], rows[4], rows[7], mid_piece])
    grown = GrowingRowLayout(TOK.kinds, len(picked), picked.shape[1], with_slots)
    grown.extend(picked[:, :1])
    for p in range(1, picked.shape[1] + 1):
        if p > 1:
            grown.append(picked[:, p - 1])
        min_slots = 8 if p % 2 else None
        got, want = grown.rows(min_slots), row_layout(picked[:, :p], TOK.kinds, min_slots, with_slots)
        assert got.num_regular == want.num_regular == p
        for name, expected in want.tensors().items():
            actual = got.tensors()[name]
            assert actual.dtype == expected.dtype and torch.equal(actual, expected), (p, name)
    assert grown.rows(8).num_slots == (128 if with_slots else 0)  # 79 segments: the next multiple of 128
