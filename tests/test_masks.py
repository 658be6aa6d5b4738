"""Summary-token attention mask (docs/design.md section 4) on a hand-written two-track piece, rule by rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _reference_mask import reference_mask_mod
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

from _music import demo_files
from meloformer.decoder import open_last_segment
from meloformer.edits import crop_bars
from meloformer.hid import BAR, BOS, EOS, PAD, TRACK_CONDUCTOR, TRACK_PROGRAM0, HIDTokenizer
from meloformer.masks import (
    BlockSparseMask,
    MaskPlan,
    MaskRules,
    attention_mask,
    block_mask,
    block_sparse_mask,
    candidate_tiles,
    dense_mask,
    evaluate_tiles,
    flex_blocks,
    full_dense_mask,
    summary_mask_mod,
    tile_visibility,
)
from meloformer.model import compiled_flex_attention
from meloformer.row_layout import row_layout, slots_for

TOK = HIDTokenizer()
BARS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def pos(k: int) -> int:
    return TOK.pos0 + k


def pitch(p: int) -> int:
    return TOK.pitch0 + p


def build_piece() -> tuple[list[int], dict[str, int]]:
    """BOS, the ensemble, conductor, piano and bass tracks over four bars; ``at`` names every token's position.

    Names: ``"<track>.<bar>.<what>"`` with track ``cond``, ``piano`` or ``bass``; ``Track_<track>``; the
    ensemble's ``Ensemble_<track>``; BOS, EOS.
    """
    tokens: list[int] = []
    at: dict[str, int] = {}

    def add(token: int, name: str) -> None:
        at[name] = len(tokens)
        tokens.append(token)

    add(BOS, "BOS")
    add(TRACK_PROGRAM0, "Ensemble_piano")
    add(TRACK_PROGRAM0 + 33, "Ensemble_bass")
    add(TRACK_CONDUCTOR, "Track_cond")
    for b in range(BARS):
        add(BAR, f"cond.{b}.Bar")
        if b == 0:
            add(TOK.timesig0 + TOK.time_signatures.index((4, 4)), "cond.0.TimeSig")
            add(pos(0), "cond.0.Pos")
            add(TOK.tempo0 + 20, "cond.0.Tempo")
    for name, program, base in (("piano", 0, 60), ("bass", 33, 36)):
        add(TRACK_PROGRAM0 + program, f"Track_{name}")
        for b in range(BARS):
            add(BAR, f"{name}.{b}.Bar")
            add(pos(0), f"{name}.{b}.Pos")
            add(pitch(base + b), f"{name}.{b}.Pitch")
            add(TOK.dur0 + 11, f"{name}.{b}.Dur")
            add(TOK.vel0 + 20, f"{name}.{b}.Vel")
            add(pos(24), f"{name}.{b}.Pos2")
            add(pitch(base + b + 7), f"{name}.{b}.Pitch2")
    add(EOS, "EOS")
    return tokens, at


TOKENS, AT = build_piece()
TRACKS = {"cond": 0, "piano": 1, "bass": 2}


class Mask:
    """The dense mask of a batch, addressed by token names and ``sigma(track, bar)`` slot names."""

    def __init__(self, tokens: np.ndarray, min_slots: int | None = None, row: int = 0, offset: int = 0, **settings):
        self.rows = row_layout(tokens, TOK.kinds, min_slots)
        self.dense = full_dense_mask(summary_mask_mod(self.rows, **settings), self.rows)[row, 0]
        self.row, self.offset = row, offset

    def index(self, name: str) -> int:
        if name.startswith("sigma("):
            track, bar = name[6:-1].split(",")
            rows, n = self.rows, self.rows.num_regular
            hit = (rows.track[self.row, n:] == TRACKS[track]) & (rows.bar[self.row, n:] == int(bar))
            hit &= rows.pos[self.row, n:] >= self.offset
            return n + int(torch.nonzero(hit)[0])
        return AT[name] + self.offset

    def sees(self, q: str, kv: str) -> bool:
        return bool(self.dense[self.index(q), self.index(kv)])


@pytest.fixture(scope="module")
def mask() -> Mask:
    return Mask(np.array(TOKENS))


def check(mask: Mask, visible: list[tuple[str, str]], hidden: list[tuple[str, str]]) -> None:
    wrong = [f"{q} -> {kv} should be visible" for q, kv in visible if not mask.sees(q, kv)]
    wrong += [f"{q} -> {kv} should be hidden" for q, kv in hidden if mask.sees(q, kv)]
    assert not wrong, wrong


def test_layout_of_the_hand_written_piece(mask: Mask):
    assert TOK.parse(np.array(TOKENS)).n_bars == BARS
    assert mask.rows.num_slots == 3 * BARS  # conductor, piano and bass segments
    n = mask.rows.num_regular
    assert mask.rows.pos[0, mask.index("sigma(piano,1)")] == AT["piano.1.Pitch2"]
    assert (mask.rows.pos[0, n:].diff() > 0).all(), "slot s is segment s, in the order segments end"


def test_sr_summary_sees_exactly_its_segment(mask: Mask):
    segment = [k for k in AT if k.startswith("piano.1.")]
    check(
        mask,
        visible=[("sigma(piano,1)", k) for k in segment] + [("sigma(piano,1)", "sigma(piano,1)")],
        hidden=[
            ("sigma(piano,1)", "piano.0.Pitch2"),
            ("sigma(piano,1)", "piano.2.Bar"),
            ("sigma(piano,1)", "bass.1.Pitch"),
            ("sigma(piano,1)", "Track_piano"),
            ("sigma(piano,1)", "BOS"),
        ],
    )


def test_ss_summary_sees_summaries_that_ended_before(mask: Mask):
    check(
        mask,
        visible=[
            ("sigma(piano,1)", "sigma(piano,0)"),
            ("sigma(piano,1)", "sigma(cond,3)"),
            ("sigma(bass,0)", "sigma(piano,3)"),
            ("sigma(bass,3)", "sigma(cond,0)"),
        ],
        hidden=[
            ("sigma(piano,1)", "sigma(piano,2)"),
            ("sigma(piano,1)", "sigma(bass,0)"),
            ("sigma(cond,0)", "sigma(cond,1)"),
        ],
    )


def test_rs_regular_sees_summaries_that_ended_before_it(mask: Mask):
    check(
        mask,
        visible=[
            ("piano.2.Bar", "sigma(piano,1)"),
            ("piano.2.Pitch", "sigma(piano,0)"),
            ("piano.2.Pitch", "sigma(cond,3)"),
            ("Track_bass", "sigma(piano,3)"),
            ("bass.0.Pitch", "sigma(piano,3)"),
            ("EOS", "sigma(bass,3)"),
        ],
        hidden=[
            ("piano.1.Pitch2", "sigma(piano,1)"),  # the last token of a segment: its summary is not yet made
            ("piano.1.Pitch", "sigma(piano,1)"),
            ("piano.1.Pitch", "sigma(piano,2)"),
            ("piano.3.Pitch", "sigma(bass,0)"),
        ],
    )


def test_rr_global_same_segment_and_causality(mask: Mask):
    check(
        mask,
        visible=[
            ("bass.3.Vel", "BOS"),
            ("bass.3.Vel", "Track_cond"),
            ("bass.3.Vel", "Track_piano"),
            ("bass.3.Vel", "Track_bass"),
            ("bass.3.Vel", "bass.3.Bar"),
            ("bass.3.Vel", "bass.3.Pitch"),
            ("bass.3.Vel", "bass.3.Vel"),
            ("Track_bass", "Track_piano"),
            ("EOS", "Track_bass"),
            ("cond.0.TimeSig", "Ensemble_bass"),  # the conductor's meter is chosen knowing the instruments
            ("cond.0.Tempo", "Ensemble_piano"),
            ("bass.3.Vel", "Ensemble_bass"),
            ("Ensemble_bass", "Ensemble_piano"),
            ("Ensemble_piano", "BOS"),
        ],
        hidden=[
            ("Ensemble_piano", "Ensemble_bass"),  # the ensemble is written left to right like the rest
            ("bass.3.Pitch", "bass.3.Vel"),  # later in the same segment
            ("piano.1.Pitch", "bass.1.Pitch"),  # same bar of a later track is the future
            ("piano.0.Pitch", "Track_bass"),  # a later global token
            ("Track_bass", "piano.3.Pitch"),  # Track/EOS see regular tokens only through summaries
            ("EOS", "bass.3.Pitch2"),
        ],
    )


def test_rr_fine_bars_in_the_same_track(mask: Mask):
    check(
        mask,
        visible=[("piano.3.Pitch", "piano.2.Pitch2"), ("piano.3.Pitch", "piano.1.Bar")],  # offsets 1, 2
        hidden=[("piano.3.Pitch", "piano.0.Pitch"), ("bass.3.Bar", "bass.0.Vel")],  # offset 3
    )
    other = Mask(np.array(TOKENS), fine_bars=(3,))
    check(
        other,
        visible=[("piano.3.Pitch", "piano.0.Pitch"), ("bass.3.Bar", "bass.0.Vel")],
        hidden=[("piano.3.Pitch", "piano.2.Pitch2"), ("piano.3.Pitch", "piano.1.Bar")],
    )


def test_rr_cross_track_window(mask: Mask):
    check(
        mask,
        visible=[
            ("bass.2.Pitch", "piano.1.Pitch"),
            ("bass.2.Pitch", "piano.2.Pitch"),
            ("bass.2.Pitch", "piano.3.Pitch2"),  # a later bar of an earlier track is in the past
            ("bass.2.Pitch", "cond.3.Bar"),
            ("piano.0.Pos", "cond.0.Tempo"),
            ("piano.0.Pos", "cond.1.Bar"),
        ],
        hidden=[
            ("bass.2.Pitch", "piano.0.Pitch"),
            ("bass.2.Pitch", "cond.0.Tempo"),
            ("piano.0.Pos", "cond.2.Bar"),
            # Track and EOS tokens have no bar: they read other tracks only through summaries.
            ("Track_bass", "piano.0.Pitch"),
            ("Track_bass", "cond.0.Bar"),
            ("Track_piano", "cond.1.Bar"),
            ("EOS", "bass.0.Pitch"),
            ("EOS", "piano.0.Bar"),
        ],
    )
    narrow = Mask(np.array(TOKENS), cross_window=0)
    check(
        narrow,
        visible=[("bass.2.Pitch", "piano.2.Pitch")],
        hidden=[("bass.2.Pitch", "piano.1.Pitch"), ("bass.2.Pitch", "piano.3.Pitch2")],
    )


def test_kind_sparsity_rule():
    sparse = Mask(np.array(TOKENS), kind_sparsity=True)
    check(
        sparse,
        visible=[
            ("piano.2.Pitch", "piano.1.Pitch2"),  # pitch sees onset/pitch
            ("piano.2.Pitch", "piano.1.Pos"),
            ("piano.2.Vel", "piano.1.Vel"),  # velocity sees velocity
            ("piano.2.Vel", "piano.2.Pitch"),  # the same onset group is always visible
            ("piano.2.Vel", "piano.2.Pos"),
            ("piano.2.Vel", "piano.2.Bar"),  # structural tokens are not restricted
            ("piano.2.Vel", "Track_piano"),
            ("piano.2.Vel", "sigma(piano,1)"),
            ("piano.2.Dur", "piano.1.Dur"),  # duration sees duration
            ("piano.2.Dur", "piano.2.Pitch"),  # its own onset group
        ],
        hidden=[
            ("piano.2.Dur", "piano.1.Vel"),  # durations and velocities are separate classes
            ("piano.2.Vel", "piano.1.Dur"),
            ("piano.2.Dur", "piano.1.Pitch"),
            ("piano.2.Pitch", "piano.1.Dur"),
            ("piano.2.Vel", "piano.1.Pitch"),
            ("piano.2.Pitch", "piano.1.Vel"),
            ("piano.2.Pitch2", "piano.2.Vel"),  # same bar, another onset group
            ("bass.2.Pitch", "piano.2.Dur"),
        ],
    )
    dense = Mask(np.array(TOKENS))
    check(dense, visible=[("piano.2.Vel", "piano.1.Pitch"), ("piano.2.Pitch2", "piano.2.Vel")], hidden=[])


def test_window_sees_recent_chunks_of_its_document_and_the_slots_before_them():
    """``window``: a regular token sees the regular tokens of its document whose 128-token chunk (counted from
    the document's first token, wherever it lies in the row) is at most one before its own (window 256), or
    of its own segment, and the slots of segments that ended two or more chunks before; slots keep SR and SS."""
    piece = TOK.encode(max(demo_files()[:40], key=lambda path: path.stat().st_size))[:700]
    tokens = np.array(TOKENS[:53] + list(piece))  # the second document starts at row position 53
    rows = row_layout(tokens, TOK.kinds)
    dense = full_dense_mask(summary_mask_mod(rows, attention="window", token_window=256), rows)[0, 0]
    summary = full_dense_mask(summary_mask_mod(rows), rows)[0, 0]
    n, doc_pos = rows.num_regular, np.arange(len(piece))
    start = 53
    chunk = np.concatenate([np.arange(53) // 128, doc_pos // 128])  # the first document: 53 tokens, chunk 0
    segment = rows.segment[0].numpy()
    for q in range(start + 200, n, 37):
        regular = [k for k in range(start, q + 1) if chunk[q] - chunk[k] <= 1 or segment[k] == segment[q]]
        assert torch.nonzero(dense[q, :n]).flatten().tolist() == regular, q
        slots = [n + s for s in range(rows.num_slots) if rows.doc[0, n + s] == rows.doc[0, q] and
                 (int(rows.pos[0, n + s]) - start) // 128 <= chunk[q] - 2]  # fmt: skip
        assert torch.nonzero(dense[q, n:]).flatten().add(n).tolist() == slots, q
    assert torch.equal(dense[n:], summary[n:])  # SR and SS as in the summary mask
    assert dense[n + 5 :, :n].any()


def test_documents_in_a_packed_row_are_isolated():
    n = len(TOKENS)
    packed = np.array(TOKENS + TOKENS)
    first, second = Mask(packed), Mask(packed, offset=n)
    # The second copy behaves exactly like the piece alone.
    alone = Mask(np.array(TOKENS)).dense
    n_slots = alone.shape[0] - n
    reg = torch.cat([torch.arange(n, 2 * n), 2 * n + n_slots + torch.arange(n_slots)])
    assert torch.equal(first.dense[reg][:, reg], alone)
    for name in ("BOS", "Track_piano", "piano.3.Pitch2", "EOS", "sigma(bass,3)", "sigma(piano,0)"):
        assert not first.dense[second.index("bass.3.Vel"), first.index(name)], name
        assert not first.dense[second.index("sigma(piano,0)"), first.index(name)], name
        assert not first.dense[second.index("BOS"), first.index(name)], name
    assert first.dense[second.index("bass.3.Vel"), second.index("BOS")]
    assert first.dense[second.index("bass.3.Vel"), second.index("sigma(piano,0)")]


def test_padding_and_unused_slots_see_only_themselves_and_are_never_seen():
    n_pad = 5
    tokens = np.array([TOKENS + [PAD] * n_pad, TOKENS[:-20] + [PAD] * (n_pad + 20)])
    m = Mask(tokens, min_slots=40)
    rows = m.rows
    for r in range(2):
        dense = full_dense_mask(summary_mask_mod(rows), rows)[r, 0]
        dead = rows.doc[r] < 0
        assert dead[rows.num_regular - n_pad : rows.num_regular].all()
        assert dead[rows.num_regular :].sum() == 40 - (rows.doc[r, rows.num_regular :] >= 0).sum() > 0
        assert torch.equal(dense[dead], torch.eye(rows.length, dtype=torch.bool)[dead])
        assert not (dense[:, dead] & ~torch.eye(rows.length, dtype=torch.bool)[:, dead]).any()
        assert dense.any(dim=1).all(), "every row attends somewhere: no NaN"


def test_open_last_segment_leaves_its_slot_unused():
    """In decoding (``generate.open_last_segment``), the segment of a row's last token has no summary yet: only
    its slot is dead."""
    for cut in (AT["piano.1.Pitch2"] + 1, AT["piano.1.Pos2"] + 1):
        tokens = np.array(TOKENS[:cut])
        closed = row_layout(tokens, TOK.kinds, 16)
        open_ = open_last_segment(closed)
        n = closed.num_regular
        changed = (closed.doc[0, n:] != open_.doc[0, n:]).nonzero().flatten().tolist()
        assert changed == [int(closed.segment[0, cut - 1])] and open_.doc[0, n + changed[0]] == -1


def test_slots_round_up_to_a_multiple_of_128():
    assert slots_for(10, 64) == 64
    assert slots_for(64, 64) == 64
    assert slots_for(65, 64) == 128
    assert slots_for(300, 256) == 384
    assert row_layout(np.array(TOKENS), TOK.kinds, 4).num_slots == 128


def test_broadcast_evaluation_equals_torch_vmap_evaluation():
    tokens = np.array([TOKENS + [PAD] * 5, TOKENS[:40] + TOKENS[:35]])
    for settings in ({}, {"kind_sparsity": True, "fine_bars": (1, 3), "cross_window": 2}):
        rows = row_layout(tokens, TOK.kinds, 16)
        mod = summary_mask_mod(rows, **settings)
        reference = create_mask(mod, 2, 1, rows.length, rows.length, device="cpu")
        assert torch.equal(full_dense_mask(mod, rows), reference)


@pytest.fixture(scope="module")
def shifted_demo_rows() -> np.ndarray:
    """Packed rows of demo-corpus crops, each behind 0..63 leading PADs: segments end on every tile offset."""
    pieces = [crop_bars(TOK, TOK.encode(path), 0, 2) for path in demo_files()[::23]]
    packs = [np.concatenate(pieces[:3]), np.concatenate(pieces[3:])]
    length = max(map(len, packs)) + 64
    rows = np.full((2 * 64, length), PAD)
    for i, packed in enumerate(packs):
        for shift in range(64):
            rows[64 * i + shift, shift : shift + len(packed)] = packed
    return rows


def test_tiles_skip_no_visible_pair_wherever_segments_end(shifted_demo_rows: np.ndarray):
    """Dense and block masks against torch's own evaluation of the same ``mask_mod``, at four tile sizes."""
    rows = row_layout(shifted_demo_rows, TOK.kinds)
    mod = summary_mask_mod(rows)
    reference = create_mask(mod, rows.batch_size, 1, rows.length, rows.length, device="cpu")
    for size in (8, 16, 32, 128):
        dense = full_dense_mask(mod, rows, size)
        wrong = (dense != reference).flatten(1).any(1).nonzero().flatten().tolist()
        assert not wrong, f"block size {size}: rows {wrong} differ from create_mask"
        n_blocks = -(-rows.length // size)
        fill = n_blocks * size - rows.length
        tiles = F.pad(reference, (0, fill, 0, fill)).view(rows.batch_size, 1, n_blocks, size, n_blocks, size)
        assert torch.equal(block_mask(mod, rows, size).to_dense().bool(), tiles.any(5).any(3)), size


def test_tiles_between_documents_are_skipped():
    """Two pieces packed in a row: no tile with queries of one and keys of the other is evaluated."""
    n = len(TOKENS)
    rows = row_layout(np.array(TOKENS + TOKENS + [PAD] * (256 - 2 * n)), TOK.kinds, 16)
    candidates = candidate_tiles(rows, 8)[0]
    doc = torch.cat([rows.doc[0], torch.full((-rows.length % 8,), -1, dtype=rows.doc.dtype)]).view(-1, 8)
    first, second = (doc == 1).all(1), (doc == 2).all(1)
    assert first.sum() > 5 and second.sum() > 5
    assert not candidates[second][:, first].any() and not candidates[first][:, second].any()
    assert candidates[second][:, second].any() and candidates[first][:, first].any()


def test_mask_rows_of_decoding_equal_the_full_mask(shifted_demo_rows: np.ndarray):
    """``dense_mask`` on chosen queries (shared or per sample, in small chunks) and a key range."""
    rows = row_layout(shifted_demo_rows[::16], TOK.kinds)
    mod = summary_mask_mod(rows)
    full = full_dense_mask(mod, rows)
    kv = torch.arange(rows.length)
    queries = torch.tensor([0, 5, 64, 65, rows.num_regular - 1, rows.num_regular, rows.length - 1])
    assert torch.equal(dense_mask(mod, rows.batch_size, queries, kv, chunk=3), full[:, :, queries])
    per_sample = torch.stack(
        [torch.randperm(rows.length, generator=torch.Generator().manual_seed(b))[:9] for b in range(rows.batch_size)]
    )
    expected = torch.stack([full[b, :, per_sample[b]] for b in range(rows.batch_size)])
    assert torch.equal(dense_mask(mod, rows.batch_size, per_sample, kv, chunk=4), expected)
    assert torch.equal(dense_mask(mod, rows.batch_size, queries, kv[:100]), full[:, :, queries, :100])


@pytest.mark.parametrize("size", [16, 32, 128])
def test_block_mask_equals_torch_create_block_mask(size: int):
    tokens = np.array([TOKENS + TOKENS[:30], TOKENS[:50] + [PAD] * (len(TOKENS) - 20)])
    rows = row_layout(tokens, TOK.kinds, 24)
    mod = summary_mask_mod(rows)
    ours = block_mask(mod, rows, size)
    reference = create_block_mask(mod, 2, None, rows.length, rows.length, "cpu", size)
    assert torch.equal(ours.to_dense(), reference.to_dense())
    assert ours.full_kv_num_blocks is not None and torch.equal(ours.full_kv_num_blocks, reference.full_kv_num_blocks)


@pytest.mark.parametrize(("query_block", "key_block"), [(16, 16), (32, 8), (64, 32)])
def test_block_sparse_mask_holds_exactly_the_dense_mask(query_block: int, key_block: int):
    """Scattered back to (query, key) positions, the calls' masks rebuild the dense mask: every visible pair is
    in exactly one call, no gathered key block is empty, and the query blocks are each in one call."""
    tokens = np.array([TOKENS + TOKENS[:-30] + [PAD] * 37, TOKENS + TOKENS[::-1] + TOKENS[:7]])
    rows = row_layout(tokens, TOK.kinds, 24)
    for settings in ({}, {"kind_sparsity": True, "fine_bars": (1, 3)}):
        mod = summary_mask_mod(rows, **settings)
        dense, sparse = full_dense_mask(mod, rows)[:, 0], block_sparse_mask(mod, rows, query_block, key_block)
        t, n_queries, n_keys = rows.length, -(-rows.length // query_block), -(-rows.length // key_block)
        rebuilt = torch.zeros(2, n_queries * query_block, n_keys * key_block, dtype=torch.int64)
        for call in sparse.calls:
            g, m = call.keys.shape
            batch, block = call.query // n_queries, call.query % n_queries
            assert torch.equal(call.keys // n_keys, batch[:, None].expand(g, m)), "keys from the query's own row"
            q = block[:, None] * query_block + torch.arange(query_block)
            k = ((call.keys % n_keys)[:, :, None] * key_block + torch.arange(key_block)).flatten(1)
            mask = call.mask[:, 0]
            real = (q < t)[:, :, None]
            assert (mask & real).view(g, query_block, m, key_block).any(dim=(1, 3)).all()
            rebuilt.index_put_((batch[:, None, None], q[:, :, None], k[:, None, :]), (mask & real).long(), True)
        assert torch.equal(rebuilt[:, :t, :t], dense.long())
        assert torch.equal(torch.sort(torch.cat([c.query for c in sparse.calls]))[0], torch.arange(2 * n_queries))


def test_attention_mask_builds_each_backends_representation():
    rows = row_layout(np.array([TOKENS]), TOK.kinds, 24)
    mod = summary_mask_mod(rows)
    assert isinstance(attention_mask(mod, rows, "sdpa"), BlockSparseMask)
    flex = attention_mask(mod, rows, "flex")
    assert flex.BLOCK_SIZE == (32, 32) and torch.equal(flex.to_dense(), block_mask(mod, rows, 32).to_dense())
    assert torch.equal(attention_mask(mod, rows, "dense"), full_dense_mask(mod, rows))
    with pytest.raises(ValueError, match="'sparse'"):
        attention_mask(mod, rows, "sparse")


# Shared with test_model/test_decode: one compiled-flex shape for the whole test session.
FLEX_LEN, FLEX_SLOTS = 192, 64


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_eager_and_compiled_equal_sdpa_with_the_dense_mask():
    torch.manual_seed(0)
    pad = FLEX_LEN - 2 * len(TOKENS) + 30
    rest = FLEX_LEN - 2 * len(TOKENS)
    tokens = np.array([TOKENS + TOKENS[:-30] + [PAD] * pad, TOKENS + TOKENS[::-1] + TOKENS[:rest]])
    rows = row_layout(tokens, TOK.kinds, FLEX_SLOTS)
    mod = summary_mask_mod(rows)
    dense, blocks = full_dense_mask(mod, rows), block_mask(mod, rows, 32)
    q = torch.randn(2, 4, rows.length, 8)
    k, v = torch.randn(2, 2, rows.length, 8), torch.randn(2, 2, rows.length, 8)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    eager = flex_attention(q, k, v, block_mask=blocks, enable_gqa=True)
    compiled = compiled_flex_attention(q, k, v, block_mask=blocks, enable_gqa=True)
    assert torch.allclose(eager, reference, atol=1e-5)
    assert torch.allclose(compiled, reference, atol=1e-5)
    assert not reference.isnan().any()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"kind_sparsity": True, "fine_bars": (1, 3), "cross_window": 2},
        {"fine_bars": (2, 62), "cross_window": 0},
        {"attention": "causal"},
        {"attention": "local", "kind_sparsity": True},
        {"attention": "window", "token_window": 256},
        {"attention": "window", "token_window": 128},
    ],
)
def test_packed_codes_give_the_mask_of_the_separate_side_channels(shifted_demo_rows: np.ndarray, settings: dict):
    """The one-load-per-side rules equal the rules written over the separate side channels, on real rows."""
    rows = row_layout(shifted_demo_rows[::5], TOK.kinds, with_slots=MaskRules(**settings).with_slots)
    ours = full_dense_mask(summary_mask_mod(rows, **settings), rows)
    reference = full_dense_mask(reference_mask_mod(rows, **settings), rows)
    assert ours.any(-1).all() and torch.equal(ours, reference)


def test_fine_bars_past_the_code_table_are_refused():
    rows = row_layout(np.array([TOKENS]), TOK.kinds, 24)
    with pytest.raises(ValueError, match="fine_bars must lie in 1..62"):
        summary_mask_mod(rows, fine_bars=(1, 63))


def test_flex_blocks_equal_torch_block_mask_from_kv_blocks(shifted_demo_rows: np.ndarray):
    """The q side computed with the kv side (so the step transposes nothing) equals torch's own transpose."""
    rows = row_layout(shifted_demo_rows[::9], TOK.kinds)
    mod = summary_mask_mod(rows)
    blocks = flex_blocks(mod, rows, 32)
    ours = blocks.block_mask(mod)
    reference = BlockMask.from_kv_blocks(
        blocks.kv_num_blocks, blocks.kv_indices, blocks.full_kv_num_blocks, blocks.full_kv_indices, 32, mod
    )
    for name in ("q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(reference, name)), name
    for count, name in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        used = torch.arange(ours.q_indices.shape[-1]) < getattr(ours, count)[..., None]
        assert torch.equal(getattr(ours, name)[used], getattr(reference, name)[used]), name
    counts = blocks.tile_counts()
    assert counts["computed"] == int(ours.to_dense().sum()) and counts["full"] == int(blocks.full_kv_num_blocks.sum())


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_a_mask_plan_builds_what_the_step_would(backend: str):
    """A batch through ``MaskPlan`` (the DataLoader workers) carries the same side channels and mask as the
    model computes from the tokens."""
    tokens = torch.tensor([TOKENS + TOKENS[:30], TOKENS[:50] + [PAD] * (len(TOKENS) - 20)])
    plan = MaskPlan(TOK.kinds, MaskRules(), 24, backend, 32)
    planned = plan(tokens)
    rows = row_layout(tokens, TOK.kinds, 24)
    assert all(torch.equal(planned["layout"][k], v) for k, v in rows.tensors().items())
    mod = summary_mask_mod(rows)
    mask = planned["mask"].mask(mod)
    if backend == "flex":
        assert torch.equal(mask.to_dense(), block_mask(mod, rows, 32).to_dense())
    else:
        reference = block_sparse_mask(mod, rows)
        assert all(torch.equal(a.mask, b.mask) for a, b in zip(mask.calls, reference.calls))
        assert torch.equal(mask.order, reference.order)


@pytest.mark.parametrize(
    "settings", [{}, {"attention": "local"}, {"kind_sparsity": True}, {"attention": "window", "token_window": 256}]
)
def test_tile_visibility_by_runs_equals_every_element(shifted_demo_rows: np.ndarray, settings: dict):
    """Which tiles hold a visible pair and which hold only visible pairs, from one evaluation per run, equal
    the element-by-element evaluation at every tile size, wherever segments and chunks end."""
    rows = row_layout(shifted_demo_rows[::3], TOK.kinds, with_slots=MaskRules(**settings).with_slots)
    mod = summary_mask_mod(rows, **settings)
    runs = MaskRules(**settings).runs
    for size in (8, 32, 128):
        index, tiles = evaluate_tiles(mod, rows, size)
        same_index, visible, full = tile_visibility(mod, rows, size, runs)
        assert all(torch.equal(a, b) for a, b in zip(index, same_index))
        assert torch.equal(visible, tiles.any((1, 2))), size
        assert torch.equal(full, tiles.all((1, 2))), size
        assert full.any() or size > 8  # the test meets full tiles


def test_block_sparse_mask_by_runs_equals_every_element():
    tokens = np.array([TOKENS + TOKENS[:-30] + [PAD] * 37, TOKENS + TOKENS[::-1] + TOKENS[:7]])
    rows = row_layout(tokens, TOK.kinds, 24)
    mod = summary_mask_mod(rows)
    fast, slow = block_sparse_mask(mod, rows, runs=True), block_sparse_mask(mod, rows)
    assert len(fast.calls) == len(slow.calls) and torch.equal(fast.order, slow.order)
    for a, b in zip(fast.calls, slow.calls):
        assert torch.equal(a.query, b.query) and torch.equal(a.keys, b.keys) and torch.equal(a.mask, b.mask)
