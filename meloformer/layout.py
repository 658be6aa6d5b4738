"""Side channels of HID token sequences (docs/design.md section 3): one pure function of the tokens.

``layout(tokens, kinds)`` works on one sequence ``[N]`` or a batch ``[B, N]`` (rows may pack several pieces, each
starting with ``BOS``) and is vectorised numpy, so training, evaluation and generation all call it.

Per token:

- ``kind``: the ``TokenKind``;
- ``doc``: document id within the row (pieces counted by ``BOS``), -1 for padding;
- ``track``: index of the token's track within its piece (0 = conductor), -1 for BOS, the ensemble's Track
  tokens before the conductor, EOS and padding;
- ``track_token``: id of the ``Track`` token of that track (0 where there is none);
- ``bar``: bar index within the track, -1 outside a segment;
- ``segment``: segment id, counting (track, bar) segments along the row, -1 outside a segment;
- ``segment_end``: position of the last token of the token's segment, -1 outside a segment;
- ``onset_group``: id of the group of tokens sharing one onset (a ``Pos`` and its notes), -1 outside a segment;
- ``is_global``: BOS, Track (the ensemble's too) and EOS tokens, which every later token of the piece sees;
- ``is_pad``.

A segment is a ``Bar`` token and the tokens up to the next ``Bar``, ``Track`` or ``EOS``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from meloformer.hid import BAR, BOS, EOS, PAD, TRACK_CONDUCTOR, TokenKind


@dataclasses.dataclass
class Layout:
    kind: np.ndarray
    doc: np.ndarray
    track: np.ndarray
    track_token: np.ndarray
    bar: np.ndarray
    segment: np.ndarray
    segment_end: np.ndarray
    onset_group: np.ndarray
    is_global: np.ndarray
    is_pad: np.ndarray

    def num_segments(self) -> np.ndarray:
        """Segments per row (``[B]``) or in the sequence (scalar)."""
        return self.segment.max(axis=-1) + 1

    def segment_table(self, num_slots: int | None = None) -> dict[str, np.ndarray]:
        """Per-segment ``end``, ``track``, ``bar``, ``doc`` and ``track_token``, shape ``[B, S]``.

        ``S`` is ``num_slots`` (or the largest segment count of the batch); unused slots hold -1 (and 0 for
        ``track_token``). Segment ids are the slot indices: segment s sits in slot s.
        """
        fields = {k: np.atleast_2d(getattr(self, k)) for k in ("segment", "segment_end", "track", "bar", "doc")}
        track_token = np.atleast_2d(self.track_token)
        rows = fields["segment"].shape[0]
        counts = np.atleast_1d(self.num_segments())
        slots = int(counts.max(initial=0)) if num_slots is None else num_slots
        if counts.max(initial=0) > slots:
            raise ValueError(f"a row has {int(counts.max())} segments but only {slots} summary slots")
        table = {k: np.full((rows, slots), -1, dtype=np.int64) for k in ("end", "track", "bar", "doc")}
        table["track_token"] = np.zeros((rows, slots), dtype=np.int64)
        for r in range(rows):
            seg = fields["segment"][r]
            first = np.flatnonzero((seg >= 0) & (np.diff(seg, prepend=-1) != 0))
            ids = seg[first]
            table["end"][r, ids] = fields["segment_end"][r, first]
            table["track"][r, ids] = fields["track"][r, first]
            table["bar"][r, ids] = fields["bar"][r, first]
            table["doc"][r, ids] = fields["doc"][r, first]
            table["track_token"][r, ids] = track_token[r, first]
        return table


def _last_index_where(mask: np.ndarray) -> np.ndarray:
    """For each position, the index of the latest True at or before it (-1 if none), along the last axis."""
    idx = np.broadcast_to(np.arange(mask.shape[-1]), mask.shape)
    return np.maximum.accumulate(np.where(mask, idx, -1), axis=-1)


def _gather(values: np.ndarray, index: np.ndarray, fill: int) -> np.ndarray:
    out = np.take_along_axis(values, np.maximum(index, 0), axis=-1)
    return np.where(index >= 0, out, fill)


def layout(tokens, kinds: np.ndarray) -> Layout:
    """Side channels of ``tokens`` (``[N]`` or ``[B, N]``).

    ``kinds`` is the tokenizer's kind table (``HIDTokenizer.kinds``, token id -> ``TokenKind``): which id is
    a ``Pos`` or a ``Track`` depends on the tokenizer's settings, so it is always passed, never assumed.
    """
    tokens = np.asarray(tokens).astype(np.int64)
    one_row = tokens.ndim == 1
    tokens = np.atleast_2d(tokens)
    kinds = np.asarray(kinds)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= len(kinds)):
        raise ValueError(f"token ids must lie in [0, {len(kinds)}) for this tokenizer's kind table")
    kind = kinds[tokens]
    n = tokens.shape[-1]

    is_pad = tokens == PAD
    is_bos = tokens == BOS
    is_eos = tokens == EOS
    is_bar = tokens == BAR
    is_global = is_bos | is_eos | (kind == TokenKind.TRACK)
    structural = is_global | is_bar | is_pad

    doc = np.where(is_pad, -1, np.cumsum(is_bos, axis=-1))

    last_bos = _last_index_where(is_bos)
    # A Track token opens a track from the conductor on; the ones before it (the ensemble) open none.
    is_track = (kind == TokenKind.TRACK) & (_last_index_where(tokens == TRACK_CONDUCTOR) > last_bos)
    last_track = _last_index_where(is_track)
    track_in_doc = last_track > last_bos
    track_count = np.cumsum(is_track, axis=-1)
    track = track_count - _gather(track_count, last_bos, 0) - 1
    track = np.where(track_in_doc & ~is_bos & ~is_eos & ~is_pad, track, -1)
    track_token = np.where(track >= 0, _gather(tokens, last_track, 0), 0)

    last_structural = _last_index_where(structural)
    in_segment = _gather(tokens, last_structural, PAD) == BAR
    in_segment &= track >= 0
    bar_count = np.cumsum(is_bar, axis=-1)
    bar = np.where(in_segment, bar_count - _gather(bar_count, last_track, 0) - 1, -1)
    segment = np.where(in_segment, bar_count - 1, -1)
    # Renumber so that segment ids count only segments that really exist in this row (0, 1, 2, ...).
    seg_start = in_segment & (is_bar | (np.diff(segment, axis=-1, prepend=-1) != 0))
    segment = np.where(in_segment, np.cumsum(seg_start, axis=-1) - 1, -1)

    idx = np.broadcast_to(np.arange(n), tokens.shape)
    next_seg = np.concatenate([segment[..., 1:], np.full(segment.shape[:-1] + (1,), -2)], axis=-1)
    is_end = in_segment & (next_seg != segment)
    ends = np.where(is_end, idx, n)
    next_end = np.minimum.accumulate(ends[..., ::-1], axis=-1)[..., ::-1]
    segment_end = np.where(in_segment, next_end, -1)

    group_start = structural | (kind == TokenKind.POS)
    onset_group = np.where(in_segment, np.cumsum(group_start, axis=-1) - 1, -1)

    fields = dict(
        kind=kind.astype(np.int64),
        doc=doc,
        track=track,
        track_token=track_token,
        bar=bar,
        segment=segment,
        segment_end=segment_end,
        onset_group=onset_group,
        is_global=is_global,
        is_pad=is_pad,
    )
    if one_row:
        fields = {k: v[0] for k, v in fields.items()}
    return Layout(**fields)
