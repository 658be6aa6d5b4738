"""Fixed-length training rows packed from bar-window crops of pieces (docs/design.md section 6).

Every row is a pure function of ``(seed, split, row index)``, so any row can be rebuilt on its own: a
resumed run, a DataLoader worker and another DDP rank all get the same row for the same index.

Row ``r`` of the training stream belongs to data pass ``e = r // N`` (N training pieces) and is anchored
at piece ``perm_e[r % N]``, where ``perm_e`` is a permutation seeded by ``(seed, e)``: every piece anchors
one row per pass. The anchor's crop window is random (train) or starts at bar 0 (validation/test); the rest
of the row is filled with crops of randomly drawn pieces, then padded with ``PAD``. Each crop is a complete
piece (``BOS`` ... ``EOS``), so ``layout`` gives every crop its own document id.

Windows are sized before cropping from per-bar token counts, so a crop always fits the room left in the
row (tokens) and in the model's summary slots (segments, one per track and bar).

With ``fill_share``, that share of training crops carries a fill pass (``meloformer.fill``): bars of one
track left empty in place and written after the last track, so the model learns to write a region hearing
both sides (infilling). Validation and test rows never do, so their losses stay comparable.

With ``weights`` (one per training piece, from ``source_weights``) a pass draws its N anchors, and every
row its filler pieces, with probability proportional to the weight instead of uniformly: a data mixture
that shows some sources more often. Without weights rows are exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meloformer.datamodules.shards import PieceTable, ShardReader
from meloformer.edits import crop_bars, pitch_range, transpose
from meloformer.fill import FILL_CONTEXT_BARS, fill_row
from meloformer.hid import PAD, HIDTokenizer
from meloformer.layout import Layout, layout

# A crop adds at most TimeSig, Pos and Tempo to its first conductor bar (the meter and tempo in force).
CROP_HEAD_EXTRA = 3
# The shortest possible crop: BOS Track (the ensemble), Track Bar TimeSig Pos Tempo, Track Bar Pos Pitch Dur Vel, EOS.
MIN_CROP_TOKENS = 14
_SPLIT_TAGS = {"train": 0, "val": 1, "test": 2}
# The longest region a fill pass of a training crop rewrites, in bars.
MAX_FILL_BARS = 8


@dataclass(frozen=True)
class PieceShape:
    """What window sizing needs to know about one piece."""

    bar_tokens: np.ndarray  # int64 [n_bars + 1]: prefix sums of tokens per bar, summed over all tracks
    n_tracks: int  # including the conductor: segments per bar

    @property
    def n_bars(self) -> int:
        return len(self.bar_tokens) - 1

    def fixed_tokens(self) -> int:
        """Tokens of a crop outside its bars: BOS, the ensemble, one Track token per track, the crop head, EOS."""
        return 1 + (self.n_tracks - 1) + self.n_tracks + CROP_HEAD_EXTRA + 1

    def crop_tokens(self, b0: int, b1: int) -> int:
        """Upper bound of the length of ``crop_bars(b0, b1)``."""
        return int(self.bar_tokens[b1] - self.bar_tokens[b0]) + self.fixed_tokens()


def piece_shape(lay: Layout) -> PieceShape:
    """The shape of one piece from its layout."""
    counts = np.bincount(lay.bar[lay.bar >= 0])
    return PieceShape(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), int(lay.track.max()) + 1)


def fit_window(
    shape: PieceShape, room: int, segment_room: int, rng: np.random.Generator | None
) -> tuple[int, int] | None:
    """The bar window ``[b0, b1)`` to crop so the crop fits ``room`` tokens and ``segment_room`` segments.

    The whole piece when it fits. Otherwise the longest window from a start drawn by ``rng`` (bar 0 without
    one), moved back when it runs into the end of the piece so the room is used. None if no bar fits.
    """
    n = shape.n_bars
    max_bars = min(n, segment_room // shape.n_tracks)
    budget = room - shape.fixed_tokens()  # tokens available for the bars themselves
    if max_bars <= 0 or budget <= 0:
        return None
    prefix = shape.bar_tokens
    if max_bars == n and prefix[n] <= budget:
        return 0, n
    b0 = int(rng.integers(n)) if rng is not None else 0
    b1 = min(int(np.searchsorted(prefix, prefix[b0] + budget, side="right")) - 1, b0 + max_bars)
    if b1 <= b0:
        return None
    if b1 == n and rng is not None:
        b0 = max(int(np.searchsorted(prefix, prefix[n] - budget, side="left")), n - max_bars)
    return b0, b1


class RowBuilder:
    """Builds row ``index`` of one split: the anchor piece's crop, then filler crops, then padding.

    ``max_segments`` is the model's number of summary slots (None: unlimited). ``transpose`` is the largest
    random transposition in semitones (train only; drums stay, pitches stay within 0..127). ``doc_align``:
    every crop starts at a multiple of it (padding in between), so a mask laid out for tiles of that size
    (the ``window`` attention's 128-token chunks) finds documents on tile boundaries. ``fill_share``: the
    share of training crops written with a fill pass of 1 to ``MAX_FILL_BARS`` bars of one instrument track.
    ``weights``: per piece of the training split, how often it is drawn relative to the others (None: evenly).
    """

    def __init__(
        self,
        reader: ShardReader,
        split: str,
        tokenizer: HIDTokenizer,
        max_seq_len: int,
        max_segments: int | None = None,
        seed: int = 0,
        random_windows: bool = True,
        transpose: int = 0,
        fill_attempts: int = 8,
        doc_align: int = 1,
        fill_share: float = 0.0,
        weights: np.ndarray | None = None,
    ) -> None:
        self.reader = reader
        self.split = split
        self.table: PieceTable = reader.pieces(split)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_segments = max_segments if max_segments is not None else max_seq_len
        self.seed = seed
        self.random = split == "train"
        self.random_windows = random_windows and self.random
        self.transpose = transpose if self.random else 0
        self.fill_attempts = fill_attempts
        self.doc_align = doc_align
        self.fill_share = fill_share if self.random else 0.0
        self.draw_p = None
        if weights is not None and self.random:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (len(self.table),) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"weights: one non-negative weight per {split} piece, not all zero")
            self.draw_p = weights / weights.sum()
        self._permutation: tuple[int, np.ndarray] | None = None

    @property
    def rows_per_pass(self) -> int:
        """Rows per pass over the split: one anchored at each piece."""
        return len(self.table)

    def anchor(self, index: int) -> int:
        """The piece that row ``index`` starts with."""
        n = len(self.table)
        if not self.random:
            return index % n
        data_pass = index // n
        if self._permutation is None or self._permutation[0] != data_pass:
            rng = np.random.default_rng([self.seed, _SPLIT_TAGS[self.split], data_pass])
            order = rng.permutation(n) if self.draw_p is None else rng.choice(n, size=n, p=self.draw_p)
            self._permutation = (data_pass, order)
        return int(self._permutation[1][index % n])

    def row(self, index: int) -> np.ndarray:
        """Row ``index`` as int64 ``[max_seq_len]`` (``PAD`` after the last crop)."""
        if len(self.table) == 0:
            raise ValueError(f"the {self.split!r} split has no pieces")
        rng = np.random.default_rng([self.seed, _SPLIT_TAGS[self.split], 1 << 32, index])
        window_rng = rng if self.random_windows else None
        row = np.full(self.max_seq_len, PAD, dtype=np.int64)
        used, segment_room = 0, self.max_segments
        piece = self.anchor(index)
        for attempt in range(self.fill_attempts + 1):
            room = self.max_seq_len - used
            if room < MIN_CROP_TOKENS:
                break
            if attempt > 0:
                n = len(self.table)
                piece = int(rng.integers(n) if self.draw_p is None else rng.choice(n, p=self.draw_p))
            crop = self._crop(piece, room, segment_room, window_rng, rng)
            if crop is not None:
                row[used : used + len(crop[0])] = crop[0]
                used = -(-(used + len(crop[0])) // self.doc_align) * self.doc_align
                segment_room -= crop[1]
        return row

    def _crop(
        self,
        piece: int,
        room: int,
        segment_room: int,
        window_rng: np.random.Generator | None,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, int] | None:
        """The crop of ``piece`` that fits, and its number of segments; None when not even one bar fits."""
        tracks = int(self.table.tracks[piece]) + 1  # with the conductor
        if segment_room < tracks or room < 2 * tracks + CROP_HEAD_EXTRA + 2:  # not one bar: skip the read
            return None
        tokens = self.reader.tokens(self.table, piece)
        lay = layout(tokens, self.tokenizer.kinds)
        shape = piece_shape(lay)
        fill = self.fill_share > 0 and shape.n_tracks > 1 and rng.random() < self.fill_share
        # A fill pass adds its Track token, a Bar token (and a segment) per bar up to the region's last, and
        # the copied bars before the region: room for twice a track's share of the densest bars.
        extra = min(shape.n_bars, segment_room // (shape.n_tracks + 1)) if fill else 0
        copies = 2 * FILL_CONTEXT_BARS * int(np.diff(shape.bar_tokens).max()) // shape.n_tracks if fill else 0
        window = fit_window(shape, room - extra - 1 - copies if fill else room, segment_room - extra, window_rng)
        if window is None:
            return None
        b0, b1 = window
        if (b0, b1) == (0, shape.n_bars):
            crop = tokens.astype(np.int64)
        else:
            crop = crop_bars(self.tokenizer, tokens, b0, b1, lay=lay)
        if self.transpose:
            crop = self._transposed(crop, rng)
        segments = (b1 - b0) * shape.n_tracks
        if fill:
            crop, segments = self._with_fill_pass(crop, b1 - b0, shape.n_tracks, room, segment_room, rng)
        if len(crop) > room:  # cannot happen while CROP_HEAD_EXTRA bounds what crop_bars adds
            raise AssertionError(f"crop of {len(crop)} tokens exceeds the {room} left in the row")
        return crop.astype(np.int64), segments

    def _with_fill_pass(
        self, crop: np.ndarray, bars: int, tracks: int, room: int, segment_room: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        """The crop with a fill pass of a random region of a random instrument track, and its segments; the
        crop as it is when the pass would not fit."""
        track = int(rng.integers(tracks - 1))
        length = int(rng.integers(1, min(MAX_FILL_BARS, bars) + 1))
        first = int(rng.integers(bars - length + 1))
        last = first + length - 1
        row = fill_row(self.tokenizer, crop, track, first, last)
        if len(row) > room or bars * tracks + last + 1 > segment_room:
            return crop, bars * tracks
        return row.astype(np.int64), bars * tracks + last + 1

    def _transposed(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pitches = pitch_range(self.tokenizer, crop)
        if pitches is None:
            return crop
        low = max(-self.transpose, -pitches[0])
        high = min(self.transpose, 127 - pitches[1])
        shift = int(rng.integers(low, high + 1))
        return transpose(self.tokenizer, crop, shift) if shift else crop
