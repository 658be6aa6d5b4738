"""HIDDataModule: packed rows of valid crops, determinism, augmentation, rank split, errors, host memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from _music import demo_files, make_score
from meloformer.datamodules import HIDDataModule, StreamState, hid_datamodule
from meloformer.datamodules.rows import PieceShape, RowBuilder, fit_window, piece_shape
from meloformer.datamodules.shards import ShardError, ShardReader, empty_index, write_index, write_shard
from meloformer.datamodules.stream import StreamSampler
from meloformer.edits import crop_bars
from meloformer.hid import BOS, CHORD_QUALITIES, PAD, TRACK_DRUMS, HIDTokenizer, TokenKind
from meloformer.layout import layout
from meloformer.masks import MaskPlan, MaskRules
from meloformer.preprocess import preprocess
from meloformer.row_layout import row_layout

TOKENIZER = HIDTokenizer()


def builder(shards, split="train", **kwargs) -> RowBuilder:
    kwargs.setdefault("max_seq_len", 1024)
    return RowBuilder(ShardReader(shards), split, TOKENIZER, **kwargs)


def documents(row: np.ndarray) -> list[np.ndarray]:
    """The packed pieces of a row (padding removed)."""
    body = row[row != PAD]
    starts = np.flatnonzero(body == BOS)
    return np.split(body, starts[1:])


def _window(tokens: np.ndarray, b0: int, b1: int) -> dict:
    """What bars [b0, b1) of a piece sound like, from its decoded score: notes per track (times from b0), and
    the time signature and tempo in force at b0."""
    starts = np.append(TOKENIZER.parse(tokens).bar_starts(TOKENIZER), np.iinfo(np.int64).max)
    lo, hi = int(starts[b0]), int(starts[b1])
    score = TOKENIZER.decode(tokens)
    notes = [
        sorted((n.time - lo, n.pitch, n.duration, n.velocity) for n in t.notes if lo <= n.time < hi)
        for t in score.tracks
    ]
    signature = [(s.numerator, s.denominator) for s in score.time_signatures if s.time <= lo][-1]
    tempo = [round(t.qpm, 3) for t in score.tempos if t.time <= lo][-1]
    return {
        "programs": [(t.program, t.is_drum) for t in score.tracks],
        "notes": notes,
        "meter": signature,
        "tempo": tempo,
    }


def test_crops_sound_like_their_bars_of_the_piece(demo_shards):
    """Every fourth demo piece cropped at a first, last or random window, with and without the loader's layout,
    decodes to the notes, meter and tempo of those bars of the whole piece (read from its decoded score)."""
    reader = ShardReader(demo_shards)
    rng = np.random.default_rng(0)
    checked = 0
    for split in ("train", "val", "test"):
        table = reader.pieces(split)
        for i in range(0, len(table), 4):
            tokens = np.array(reader.tokens(table, i))
            lay = layout(tokens, TOKENIZER.kinds)
            n = int(table.bars[i])
            b0, b1 = [(0, 1), (n - 1, n), sorted(rng.choice(n + 1, 2, replace=False))][checked % 3]
            crop = crop_bars(TOKENIZER, tokens, b0, b1, lay=lay)
            assert np.array_equal(crop, crop_bars(TOKENIZER, tokens, b0, b1))
            assert TOKENIZER.parse(crop).n_bars == b1 - b0
            assert _window(crop, 0, b1 - b0) == _window(tokens, b0, b1), (split, i, b0, b1)
            checked += 1
    assert checked > 25


@pytest.mark.parametrize("split", ["train", "val"])
def test_rows_are_full_length_packs_of_valid_pieces(demo_shards, split):
    rows = builder(demo_shards, split, max_seq_len=1024, max_segments=256, transpose=5)
    fill = []
    for index in range(24):
        row = rows.row(index)
        assert row.shape == (1024,) and row.dtype == np.int64
        assert row[0] == BOS
        used = int((row != PAD).sum())
        assert (row[used:] == PAD).all(), "padding only at the end"
        pieces = documents(row)
        for piece in pieces:
            TOKENIZER.parse(piece)  # every crop is a complete, valid piece
        lay = layout(row, TOKENIZER.kinds)
        assert len(set(lay.doc[lay.doc >= 0].tolist())) == len(pieces)
        assert lay.num_segments() <= 256
        fill.append(used / len(row))
    assert np.mean(fill) > 0.9


def test_aligned_rows_start_every_piece_on_a_tile_boundary(demo_shards):
    """``doc_align`` (the window attention's 128-token chunks): each crop starts at a multiple of 128, with
    padding only between crops and at the end; the first crop is the unaligned row's."""
    aligned, plain = (builder(demo_shards, max_seq_len=2048, transpose=5, doc_align=a) for a in (128, 1))
    packed = 0
    for index in range(12):
        row, reference = aligned.row(index), plain.row(index)
        starts = np.flatnonzero(row == BOS)
        assert (starts % 128 == 0).all()
        packed += len(starts) >= 2
        for a, b in zip(starts, [*starts[1:], len(row)]):
            piece = row[a:b][row[a:b] != PAD]
            TOKENIZER.parse(piece)
            assert (row[a + len(piece) : b] == PAD).all(), "a crop is contiguous, padding follows it"
        first = documents(reference)[0]
        assert np.array_equal(row[: len(first)], first)
    assert packed >= 6, "most rows should pack several pieces"


def test_a_window_plan_aligns_the_loader_rows(demo_shards):
    kinds = HIDTokenizer().kinds
    for attention, align in (("window", 128), ("summary", 1)):
        plan = MaskPlan(kinds, MaskRules(attention=attention), 64, "sdpa")
        data = HIDDataModule(str(demo_shards), max_seq_len=1024, max_segments=64, mask_plan=plan)
        data.setup("fit")
        assert data._builders["train"].doc_align == align


class FixedStart:
    """Stands in for the window generator: the window starts at bar ``start``."""

    def __init__(self, start: int) -> None:
        self.start = start

    def integers(self, n: int) -> int:
        assert self.start < n
        return self.start


def test_fit_window_by_hand():
    """Four bars of 10, 20, 30 and 40 tokens over two tracks: 8 tokens outside the bars (BOS, the ensemble's
    Track token, two Track tokens, at most 3 for the crop head, EOS), two segments per bar."""
    shape = PieceShape(np.array([0, 10, 30, 60, 100]), n_tracks=2)
    assert shape.fixed_tokens() == 8 and shape.n_bars == 4 and shape.crop_tokens(1, 3) == 58
    assert fit_window(shape, 108, 8, None) == (0, 4)  # the whole piece fits exactly
    assert fit_window(shape, 108, 8, FixedStart(2)) == (0, 4)  # whole pieces ignore the start
    assert fit_window(shape, 107, 8, None) == (0, 3)  # one token short: bars 0-2 (60 tokens)
    assert fit_window(shape, 108, 5, None) == (0, 2)  # 5 segments: two bars of two tracks
    assert fit_window(shape, 58, 8, FixedStart(1)) == (1, 3)  # 50 tokens: bars 1-2 exactly
    assert fit_window(shape, 103, 8, FixedStart(2)) == (1, 4)  # from bar 2 it hits the end: moved back to 1
    assert fit_window(shape, 98, 8, FixedStart(2)) == (1, 4)  # moved back as far as 90 tokens allow, exactly
    assert fit_window(shape, 103, 4, FixedStart(3)) == (2, 4)  # moved back, but only 2 bars of segments
    assert fit_window(shape, 17, 8, None) is None  # 9 tokens: not even bar 0
    assert fit_window(shape, 8, 8, None) is None and fit_window(shape, 100, 1, None) is None


def test_piece_shape_by_hand():
    """Bass and piano over two bars: conductor bar 0 holds Bar TimeSig Chord Pos Tempo, bar 1 Bar Chord; each
    instrument bar Bar Pos Pitch Dur Vel; so 5 + 5 + 5 = 15 tokens in bar 0 and 2 + 5 + 5 = 12 in bar 1."""
    score = make_score([(33, False, [(0, 1, 36, 90), (4, 1, 38, 90)]), (0, False, [(0, 1, 60, 90), (4, 1, 62, 90)])])
    tokens = TOKENIZER.encode(score)
    assert len(tokens) == 1 + 2 + 27 + 3 + 1  # BOS, the ensemble, the bars, three Track tokens, EOS
    shape = piece_shape(layout(tokens, TOKENIZER.kinds))
    assert shape.bar_tokens.tolist() == [0, 15, 27] and shape.n_tracks == 3


def test_a_piece_whose_tracks_just_fit_the_segments_is_cropped_to_one_bar(demo_shards):
    reader = ShardReader(demo_shards)
    table = reader.pieces("val")
    tracks = int(table.tracks[0]) + 1
    rows = builder(demo_shards, "val", max_seq_len=1024, max_segments=tracks)
    first = documents(rows.row(0))[0]
    assert np.array_equal(first, crop_bars(TOKENIZER, np.array(reader.tokens(table, 0)), 0, 1))


def test_fill_attempts_bound_the_crops_of_a_row(demo_shards):
    """The anchor, then at most ``fill_attempts`` fillers (a filler that does not fit is skipped)."""
    alone = builder(demo_shards, max_seq_len=4096, max_segments=4096, fill_attempts=0)
    assert [len(documents(alone.row(i))) for i in range(6)] == [1] * 6
    two = builder(demo_shards, max_seq_len=4096, max_segments=4096, fill_attempts=2)
    counts = [len(documents(two.row(i))) for i in range(6)]
    assert max(counts) == 3 and min(counts) >= 1, counts


def test_rows_respect_a_small_segment_budget(demo_shards):
    rows = builder(demo_shards, max_seq_len=2048, max_segments=24)
    counts = [int(layout(rows.row(i), TOKENIZER.kinds).num_segments()) for i in range(20)]
    assert max(counts) <= 24 and min(counts) > 0


def test_rows_are_a_function_of_seed_and_index(demo_shards):
    a, b = builder(demo_shards, seed=3, transpose=4), builder(demo_shards, seed=3, transpose=4)
    order = [7, 2, 40, 2, 0]
    first = {i: a.row(i) for i in order}
    for i in reversed(order):
        assert np.array_equal(b.row(i), first[i])
    other = builder(demo_shards, seed=4, transpose=4)
    assert sum(not np.array_equal(other.row(i), first[i]) for i in first) >= 3
    val_a, val_b = builder(demo_shards, "val", seed=3), builder(demo_shards, "val", seed=3)
    assert all(np.array_equal(val_a.row(i), val_b.row(i)) for i in range(5))


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_rows_are_untransposed_crops_from_bar_0(demo_shards, split):
    """Validation and test rows ignore the augmentation settings: each crop is a piece's opening bars as
    stored, and row i opens with piece i. Training rows with the same settings do not."""
    reader = ShardReader(demo_shards)

    def pieces(split: str) -> list[tuple[np.ndarray, object]]:
        table = reader.pieces(split)
        tokens = [np.array(reader.tokens(table, i), dtype=np.int64) for i in range(len(table))]
        return [(t, layout(t, TOKENIZER.kinds)) for t in tokens]

    def openings(doc: np.ndarray, stored: list) -> set[int]:
        """The pieces whose first bars ``doc`` is."""
        bars, tracks = TOKENIZER.parse(doc).n_bars, doc[TOKENIZER.kinds[doc] == TokenKind.TRACK]
        return {
            i
            for i, (s, lay) in enumerate(stored)
            if np.array_equal(s[lay.kind == TokenKind.TRACK], tracks)
            and lay.bar.max() + 1 >= bars
            and np.array_equal(doc, crop_bars(TOKENIZER, s, 0, bars, lay=lay))
        }

    stored = pieces(split)
    rows = builder(demo_shards, split, max_seq_len=256, max_segments=64, transpose=6, random_windows=True)
    for index in range(2 * len(stored)):
        docs = documents(rows.row(index))
        assert index % len(stored) in openings(docs[0], stored)
        assert all(openings(doc, stored) for doc in docs[1:])
    train = builder(demo_shards, "train", max_seq_len=256, max_segments=64, transpose=6, random_windows=True)
    stored = pieces("train")
    assert sum(not openings(documents(train.row(i))[0], stored) for i in range(30)) > 20


def test_every_piece_anchors_one_row_per_pass(demo_shards):
    rows = builder(demo_shards)
    n = rows.rows_per_pass
    first, second = [rows.anchor(i) for i in range(n)], [rows.anchor(i) for i in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second  # each pass has its own order


def test_transposition_moves_pitched_notes_and_chords_not_drums(demo_shards):
    plain, moved = builder(demo_shards, transpose=0), builder(demo_shards, transpose=6)
    shifts = set()
    for index in range(30):
        a, b = documents(plain.row(index))[0], documents(moved.row(index))[0]  # the anchor crop: same window
        assert len(a) == len(b)
        lay = layout(a, TOKENIZER.kinds)
        pitched = (lay.kind == TokenKind.PITCH) & (lay.track_token != TRACK_DRUMS)
        delta = set((b[pitched] - a[pitched]).tolist())
        assert len(delta) == 1, "one shift for every pitched note of a crop"
        shift = delta.pop()
        assert abs(shift) <= 6
        shifts.add(shift)
        assert np.array_equal(a[~pitched & (lay.kind != TokenKind.CHORD)], b[~pitched & (lay.kind != TokenKind.CHORD)])
        chords = lay.kind == TokenKind.CHORD
        roots_a, roots_b = [(x[chords] - TOKENIZER.chord0) // len(CHORD_QUALITIES) for x in (a, b)]
        assert ((roots_b - roots_a) % 12 == shift % 12).all()
    assert len(shifts) > 3


def test_transposition_stays_within_the_pitch_range(tmp_path):
    """Melodies near the top (pitches 100..125) are never moved above 127, however far up is allowed."""
    src = tmp_path / "midi"
    src.mkdir()
    for i in range(6):
        notes = [(q, 1, 100 + (5 * q + i) % 26, 90) for q in range(8 + i)]
        make_score([(0, False, notes), (0, True, [(0, 1, 36, 90)])]).dump_midi(str(src / f"high{i}.mid"))
    preprocess(src, tmp_path / "shards", TOKENIZER, workers=1, val_fraction=0, test_fraction=0, progress=False)
    plain = builder(tmp_path / "shards", max_seq_len=512)
    moved = builder(tmp_path / "shards", max_seq_len=512, transpose=12)
    room_up, shifts = [], []
    for index in range(40):
        a, b = documents(plain.row(index))[0], documents(moved.row(index))[0]  # raises if a shift left 0..127
        lay = layout(a, TOKENIZER.kinds)
        pitched = (lay.kind == TokenKind.PITCH) & (lay.track_token != TRACK_DRUMS)
        room_up.append(127 - int(a[pitched].max() - TOKENIZER.pitch0))
        shifts.append(int(b[pitched][0]) - int(a[pitched][0]))
    assert all(shift <= room for shift, room in zip(shifts, room_up))
    assert max(room_up) < 12 and min(shifts) < -6  # the limit binds upwards only
    with pytest.raises(ValueError, match="^the 'val' split has no pieces$"):
        builder(tmp_path / "shards", "val").row(0)


def test_sampler_splits_the_stream_across_ranks_in_batches():
    state = StreamState(position=40, batch_size=3, num_batches=4, consumed=1)
    dataset = range(1000)  # the sampler only needs a length
    ranks = [list(StreamSampler(dataset, state, rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] == [40, 41, 42, 46, 47, 48, 52, 53, 54]
    assert ranks[1] == [43, 44, 45, 49, 50, 51, 55, 56, 57]
    assert len(StreamSampler(dataset, state, rank=0, world_size=2)) == 12  # the whole epoch, for Lightning


def test_loader_batches_carry_rows_and_worker_count(demo_shards):
    plan = MaskPlan(HIDTokenizer().kinds, MaskRules(), 64, "sdpa")
    data = HIDDataModule(
        str(demo_shards), max_seq_len=256, max_segments=64, batch_size=2, num_workers=2, mask_plan=plan
    )
    data.setup("fit")
    loader = data.train_dataloader()
    batches = [batch for _, batch in zip(range(4), loader)]
    assert [b["row"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(b["num_workers"].tolist() == [2, 2] for b in batches)
    assert all(b["tokens"].shape == (2, 256) for b in batches)
    for b in batches:  # the side channels and the mask come from the workers, as the model would compute them
        expected = row_layout(b["tokens"], data.tokenizer.kinds, 64).tensors()
        assert b["layout"].keys() == expected.keys()
        assert all(torch.equal(b["layout"][k], v) for k, v in expected.items())
        assert b["mask"].backend == "sdpa" and b["mask"].structure.calls
    assert loader.state_dict() == {"position": 0, "batch_size": 2, "num_batches": len(loader), "consumed": 0}


def test_bad_data_settings_are_clear_errors(demo_shards, tmp_path):
    with pytest.raises(ShardError, match="no dataset here"):
        HIDDataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="bad tokenizer settings"):
        HIDDataModule(str(demo_shards), tokenizer={"resolutoin": 24})
    with pytest.raises(ValueError, match="max_seq_len"):
        HIDDataModule(str(demo_shards), max_seq_len=4)
    other = tmp_path / "other"
    src = tmp_path / "few"
    src.mkdir()
    for path in demo_files()[:3]:
        (src / path.name).write_bytes(path.read_bytes())
    preprocess(src, other, HIDTokenizer(resolution=24), workers=1, progress=False)
    with pytest.raises(ShardError, match=r"other tokenizer settings \(resolution: data 24 vs expected 12"):
        HIDDataModule(str(other))
    index = json.loads((other / "index.json").read_text())
    index["tokenizer"] = {**HIDTokenizer().settings, "format_version": 1}  # shards of the format before the ensemble
    (other / "index.json").write_text(json.dumps(index))
    with pytest.raises(
        ShardError, match=r"made with HID format version 1, this MeloFormer reads version 2: preprocess"
    ):
        HIDDataModule(str(other))


def test_demo_corpus_is_preprocessed_once_on_first_use(tmp_path, monkeypatch):
    cache = tmp_path / "data" / "demo-shards"
    monkeypatch.setattr(hid_datamodule, "demo_cache_dir", lambda tokenizer: cache)
    data = HIDDataModule(max_seq_len=256)
    data.prepare_data()
    stamp = (cache / "index.json").stat().st_mtime_ns
    assert len(ShardReader(cache).pieces("train")) > 80
    data.prepare_data()
    assert (cache / "index.json").stat().st_mtime_ns == stamp
    data.setup("fit")
    assert next(iter(data.train_dataloader()))["tokens"].shape == (1, 256)
    index = json.loads((cache / "index.json").read_text())
    index["tokenizer"]["format_version"] = 1  # a cache left by a MeloFormer that wrote format version 1
    (cache / "index.json").write_text(json.dumps(index))
    data.prepare_data()
    assert ShardReader(cache).tokenizer_settings["format_version"] == 2  # made again, not refused


# ---------------------------------------------------------------------------------------------- host memory
_MEMORY_PROBE = r"""
import json, sys
import numpy as np
from meloformer.datamodules import HIDDataModule

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmHWM", "RssAnon")}

root, rows, load_all = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
data = HIDDataModule(root, max_seq_len=2048, max_segments=512, batch_size=2, max_open_shards=2)
data.setup("fit")
hoard = [np.fromfile(p, dtype=np.uint16) for p in sorted(data.root.glob("*.u16"))] if load_all else []
before = status()
peak_anon = before["RssAnon"]
for _, batch in zip(range(rows // 2), data.train_dataloader()):
    peak_anon = max(peak_anon, status()["RssAnon"])
print(json.dumps({"hwm_mb": status()["VmHWM"], "anon_peak_mb": peak_anon, "before": before}))
"""


def _synthetic_dataset(root, copies: int, piece: np.ndarray, bars: int, tracks: int) -> int:
    """``copies`` pieces in shards of 100 pieces each; returns the size of the token files in bytes."""
    root.mkdir()
    index = empty_index(TOKENIZER.settings, 0.0, 0.0)
    for number in range(-(-copies // 100)):
        count = min(100, copies - 100 * number)
        index["shards"].append(write_shard(root, number, [piece] * count))
        for k in range(count):
            source = f"piece_{number:03d}_{k:03d}.mid"
            entry = {"shard": number, "offset": k * len(piece), "length": len(piece), "bars": bars}
            index["pieces"].append(entry | {"tracks": tracks, "notes": 0, "source": source, "split": "train"})
    write_index(root, index)
    return copies * piece.nbytes


def _probe(root, rows: int, load_all: bool = False) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(root), str(rows), "1" if load_all else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loader_host_memory_stays_flat_when_the_dataset_grows_tenfold(tmp_path):
    """Peak RSS (and peak private memory) of iterating the loader: dataset x10 costs (almost) nothing.

    The probe reads the same number of rows from both datasets. Resident shard pages are bounded by the LRU
    of open memory maps (here 2 shards of ~4.5 MB), not by the dataset; a loader that held the tokens in
    memory would grow with the dataset (checked: the probe holding the shards in memory grows by ~60 MB).
    """
    bars = 800
    melody = [(q * 0.5, 0.5, 60 + (q * 7) % 24, 70 + q % 40) for q in range(bars * 8)]
    bass = [(2.0 * q, 2, 36 + q % 12, 90) for q in range(bars * 2)]
    piece = TOKENIZER.encode(make_score([(0, False, melody), (33, False, bass)]))
    small = _synthetic_dataset(tmp_path / "x1", 150, piece, bars, 2)
    large = _synthetic_dataset(tmp_path / "x10", 1500, piece, bars, 2)
    grown_by_mb = (large - small) / 2**20
    assert grown_by_mb > 50

    one, ten = _probe(tmp_path / "x1", rows=60), _probe(tmp_path / "x10", rows=60)
    assert ten["hwm_mb"] - one["hwm_mb"] < 0.1 * grown_by_mb, (one, ten)
    assert ten["anon_peak_mb"] - one["anon_peak_mb"] < 0.1 * grown_by_mb, (one, ten)
    hoarding = _probe(tmp_path / "x10", rows=60, load_all=True)
    assert hoarding["hwm_mb"] - one["hwm_mb"] > 0.8 * grown_by_mb  # the probe does see memory that grows


class _RecordingBuilder(RowBuilder):
    """A RowBuilder that records every piece it crops (anchors and fillers)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cropped = []

    def _crop(self, piece, *args):
        self.cropped.append(piece)
        return super()._crop(piece, *args)


def test_source_weights_draw_anchors_and_fillers_in_proportion(demo_shards):
    reader = ShardReader(demo_shards)
    chorale = np.array([s.startswith("bach_chorales/") for s in reader.split_sources("train")])
    assert 0 < chorale.sum() < len(chorale)
    module = HIDDataModule(str(demo_shards), max_seq_len=1024, source_weights={"bach_chorales": 4})
    weights = module._piece_weights(reader.split_sources("train"))
    assert (weights[chorale] == 4).all() and (weights[~chorale] == 1).all()
    rows = _RecordingBuilder(reader, "train", TOKENIZER, 1024, weights=weights)
    n_rows = 4 * rows.rows_per_pass
    anchors = np.array([rows.anchor(i) for i in range(n_rows)])
    expected = 4 * chorale.sum() / (4 * chorale.sum() + (~chorale).sum())
    assert abs(chorale[anchors].mean() - expected) < 0.08  # the uniform share is chorale.mean(), far below
    assert chorale[anchors].mean() > chorale.mean() + 0.15
    # weight 0 leaves a folder out of every row, fillers included
    only = np.where(chorale, 1.0, 0.0)
    rows = _RecordingBuilder(reader, "train", TOKENIZER, 1024, weights=only)
    for i in range(20):
        rows.row(i)
    assert len(rows.cropped) > 20 and chorale[rows.cropped].all()
    assert np.array_equal(rows.row(3), _RecordingBuilder(reader, "train", TOKENIZER, 1024, weights=only).row(3))


def test_rows_without_source_weights_are_unchanged(demo_shards):
    module = HIDDataModule(str(demo_shards), max_seq_len=1024)
    module.setup("fit")
    assert module._builders["train"].draw_p is None
    plain = builder(demo_shards)
    assert all(np.array_equal(module._builders["train"].row(i), plain.row(i)) for i in range(3))


def test_bad_source_weights_are_clear_errors(demo_shards):
    with pytest.raises(ValueError, match=r"source_weights\['bach_chorales'\] must be at least 0"):
        HIDDataModule(str(demo_shards), source_weights={"bach_chorales": -1})
    module = HIDDataModule(str(demo_shards), source_weights={"bach_chorale": 2})
    with pytest.raises(ShardError, match="no training piece lies under 'bach_chorale'"):
        module.setup("fit")
