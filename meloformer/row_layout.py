"""The side channels of a batch of attention rows (docs/design.md section 4): what every mask rule reads.

A row of the attention holds ``L`` regular tokens and then one contiguous block of ``S`` summary slots;
slot ``s`` summarises segment ``s`` of the row and sits at the logical position where that segment ends.
``row_layout`` builds them with one call to ``meloformer.layout.layout`` (numpy), in the DataLoader workers
during training, so the step only moves them to the device.

Every position also gets one packed int64 ``code`` (``Code``): the few fields the mask compares (document,
track, bar, global, dead, position within the document), so a mask rule loads one number per side and tests
constant bits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from meloformer.arith import ceil_div
from meloformer.hid import BAR, BOS, EOS, PAD, TRACK_CONDUCTOR, TokenKind
from meloformer.layout import layout

SLOT_MULTIPLE = 128

# Kind classes of the optional token-kind sparsity: a token of a class sees tokens of its own class (and of
# class 0, which is unrestricted). Durations, like velocities, only see their own kind.
KIND_CLASS = np.zeros(len(TokenKind), dtype=np.int64)
KIND_CLASS[[TokenKind.POS, TokenKind.PITCH]] = 1
KIND_CLASS[TokenKind.VEL] = 2
KIND_CLASS[TokenKind.DUR] = 3


class Code:
    """Bit fields of a position's packed code (int64); ``bar`` and ``track`` are stored plus one (0: none).

    The position is counted from the start of the position's document in the row (a slot's: its segment's
    end), so rules that compare positions (only ever within one document) also see where a document's
    ``CHUNK``-token chunks begin, whatever its offset in a packed row.
    """

    BAR_BITS, TRACK_BITS, DOC_BITS, POS_BITS = 18, 8, 16, 19
    TRACK_SHIFT = BAR_BITS
    DOC_SHIFT = TRACK_SHIFT + TRACK_BITS
    GLOBAL_SHIFT = DOC_SHIFT + DOC_BITS
    DEAD_SHIFT = GLOBAL_SHIFT + 1
    POS_SHIFT = DEAD_SHIFT + 1
    BAR = (1 << BAR_BITS) - 1
    TRACK = ((1 << TRACK_BITS) - 1) << TRACK_SHIFT
    DOC = ((1 << DOC_BITS) - 1) << DOC_SHIFT
    GLOBAL = 1 << GLOBAL_SHIFT
    DEAD = 1 << DEAD_SHIFT  # padding and unused slots: they see only themselves and are never seen
    CHUNK_BITS = 7  # the window variant's chunks: 128 tokens, one flex tile on CUDA
    CHUNK_SHIFT = POS_SHIFT + CHUNK_BITS

    @classmethod
    def pack(cls, pos: np.ndarray, doc: np.ndarray, track: np.ndarray, bar: np.ndarray, is_global: np.ndarray):
        """The codes of positions with these side channels (doc -1: dead; ``pos`` within the document)."""
        limits = {"pos": (pos, cls.POS_BITS), "doc": (doc, cls.DOC_BITS), "track": (track + 1, cls.TRACK_BITS),
                  "bar": (bar + 1, cls.BAR_BITS)}  # fmt: skip
        for name, (values, bits) in limits.items():
            if values.size and values.max() >= 1 << bits:
                raise ValueError(f"a row's {name} reaches {int(values.max())}, past the mask code's {bits} bits")
        dead = doc < 0
        code = (pos.astype(np.int64) << cls.POS_SHIFT) | (bar + 1) | ((track + 1) << cls.TRACK_SHIFT)
        code |= np.where(dead, cls.DEAD, np.maximum(doc, 0) << cls.DOC_SHIFT)
        return code | (is_global.astype(np.int64) << cls.GLOBAL_SHIFT)


@dataclasses.dataclass
class RowLayout:
    """Side channels of each attention row: ``L`` regular tokens, then ``S`` summary slots; all ``[B, L + S]``.

    ``doc`` is -1 for padding and for unused slots (nobody sees them, they see only themselves). For a slot,
    ``pos`` is its segment's end, ``segment`` its own index, and ``track``/``bar``/``track_token`` those of
    its segment; ``is_global``, ``kind_class`` and ``onset_group`` only matter for regular tokens. ``code``
    packs what the mask compares (``Code``); ``kind_code`` packs ``kind_class`` and ``onset_group`` for the
    optional kind sparsity.
    """

    num_regular: int
    pos: Tensor
    doc: Tensor
    segment: Tensor
    track: Tensor
    bar: Tensor
    track_token: Tensor
    is_global: Tensor
    kind_class: Tensor
    onset_group: Tensor
    code: Tensor
    kind_code: Tensor

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def length(self) -> int:
        return self.pos.shape[1]

    @property
    def num_slots(self) -> int:
        return self.length - self.num_regular

    def tensors(self) -> dict[str, Tensor]:
        """The side channels as a dict of tensors: how a batch carries them from the DataLoader workers."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "num_regular"}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], num_regular: int) -> RowLayout:
        return cls(num_regular=num_regular, **tensors)

    def without_slots(self) -> RowLayout:
        """The regular tokens' side channels alone (attention variants without summary slots)."""
        n = self.num_regular
        return dataclasses.replace(self, **{k: v[:, :n] for k, v in self.tensors().items()})

    def with_dead_slots(self, dead: Tensor) -> RowLayout:
        """These rows with the slots where ``dead`` ``[B, S]`` is True unused: doc -1, seeing only themselves."""
        n = self.num_regular
        doc = torch.cat([self.doc[:, :n], self.doc[:, n:].masked_fill(dead, -1)], dim=1)
        slot_code = torch.where(dead, (self.code[:, n:] & ~Code.DOC) | Code.DEAD, self.code[:, n:])
        return dataclasses.replace(self, doc=doc, code=torch.cat([self.code[:, :n], slot_code], dim=1))

    def to(self, device: torch.device | str) -> RowLayout:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})


def slots_for(num_segments: int, minimum: int) -> int:
    """Summary slots for a batch: ``minimum`` (static shapes), or the next multiple of 128 that fits."""
    if num_segments <= minimum:
        return minimum
    return ceil_div(num_segments, SLOT_MULTIPLE) * SLOT_MULTIPLE


def row_layout(
    tokens: np.ndarray | Tensor,
    kinds: np.ndarray | Tensor,
    min_slots: int | None = None,
    with_slots: bool = True,
) -> RowLayout:
    """Build the per-row side channels of a batch ``[B, L]`` with one call to ``meloformer.layout.layout``.

    ``kinds`` is the tokenizer's kind table (``HIDTokenizer.kinds``; the model carries it as ``model.kinds``).
    Documents are the pieces of a row, each opened by ``BOS``.

    Rows get ``min_slots`` summary slots, or ``slots_for`` more when a row has more segments; ``None`` gives
    exactly the largest segment count. ``with_slots=False`` gives rows without summary slots (the ``causal``
    and ``local`` attention variants).
    """
    if isinstance(tokens, Tensor):
        tokens = tokens.detach().cpu().numpy()
    if isinstance(kinds, Tensor):
        kinds = kinds.detach().cpu().numpy()
    tokens = np.atleast_2d(tokens)
    lay = layout(tokens, kinds)
    if with_slots:
        segments = int(np.max(lay.num_segments(), initial=0))
        table = lay.segment_table(segments if min_slots is None else slots_for(segments, min_slots))
    else:
        table = {
            k: np.zeros((tokens.shape[0], 0), dtype=np.int64) for k in ("end", "track", "bar", "doc", "track_token")
        }
    n = tokens.shape[1]
    regular = dict(doc=lay.doc, segment=lay.segment, track=lay.track, bar=lay.bar, track_token=lay.track_token,
                   is_global=lay.is_global, kind_class=KIND_CLASS[lay.kind], onset_group=lay.onset_group)  # fmt: skip
    # Where each regular token's document begins in the row (a document's first token: its id, counted by BOS,
    # exceeds every id before it; padding may lie inside a document); a slot's is its end's.
    before = np.maximum.accumulate(np.pad(lay.doc, ((0, 0), (1, 0)), constant_values=-1)[:, :-1], axis=1)
    opens = lay.doc > before
    doc_start = np.maximum.accumulate(np.where(opens, np.arange(n), 0), axis=1)
    slot_start = np.take_along_axis(doc_start, np.clip(table["end"], 0, n - 1), 1)
    in_doc = np.concatenate([np.arange(n) - doc_start, table["end"] - slot_start], axis=1)
    return _assemble(regular, table, in_doc)


def _assemble(regular: dict[str, np.ndarray], table: dict[str, np.ndarray], in_doc: np.ndarray) -> RowLayout:
    """The ``RowLayout`` of the regular tokens' fields (``[B, L]``: doc, segment, track, bar, track_token,
    is_global, kind_class, onset_group), the segment table (``[B, S]``: end, track, bar, doc, track_token) and
    every position's offset from its document's start (``[B, L + S]``; ignored where doc is -1)."""
    batch, n = regular["doc"].shape
    slot_doc = table["doc"]
    slots = slot_doc.shape[1]
    rows = {
        "pos": (np.broadcast_to(np.arange(n), (batch, n)), table["end"]),
        "doc": (regular["doc"], slot_doc),
        "segment": (regular["segment"], np.broadcast_to(np.arange(slots), slot_doc.shape)),
        "track": (regular["track"], table["track"]),
        "bar": (regular["bar"], table["bar"]),
        "track_token": (regular["track_token"], table["track_token"]),
        "is_global": (regular["is_global"], np.zeros_like(slot_doc, dtype=bool)),
        "kind_class": (regular["kind_class"], np.zeros_like(slot_doc)),
        "onset_group": (regular["onset_group"], np.full_like(slot_doc, -1)),
    }
    arrays = {k: np.concatenate([r, s], axis=1) for k, (r, s) in rows.items()}
    in_doc = np.where(arrays["doc"] >= 0, in_doc, 0)
    code = Code.pack(in_doc, arrays["doc"], arrays["track"], arrays["bar"], arrays["is_global"])
    kind_code = arrays["kind_class"] | ((arrays["onset_group"] + 1) << 2)
    # int32 halves memory and speeds up integer arithmetic; the packed code needs int64.
    tensors = {k: torch.from_numpy(v if v.dtype == bool else v.astype(np.int32)) for k, v in arrays.items()}
    tensors["code"], tensors["kind_code"] = torch.from_numpy(code), torch.from_numpy(kind_code.astype(np.int32))
    return RowLayout(num_regular=n, **tensors)


class GrowingRowLayout:
    """The side channels of rows that grow by one token per step (decoding): ``rows(min_slots)`` equals
    ``row_layout`` of the tokens so far, without laying the whole prefix out again. Each new token's fields
    follow from a few running values per row (the counts that ``layout`` takes cumulative sums of), and the
    segment table is updated in place, so a step costs O(1) work plus copying the rows out."""

    _REGULAR = ("doc", "segment", "track", "bar", "track_token", "kind_class", "onset_group", "in_doc")
    _SLOT_FILL = {"end": -1, "track": -1, "bar": -1, "doc": -1, "track_token": 0, "in_doc": 0}

    def __init__(self, kinds: np.ndarray, batch: int, capacity: int, with_slots: bool = True) -> None:
        self.kinds, self.with_slots, self.length = np.asarray(kinds), with_slots, 0
        self.regular = {name: np.zeros((batch, capacity), dtype=np.int64) for name in self._REGULAR}
        self.regular["is_global"] = np.zeros((batch, capacity), dtype=bool)
        self.slots = {name: np.full((batch, 0), fill, dtype=np.int64) for name, fill in self._SLOT_FILL.items()}
        zeros, none = np.zeros(batch, dtype=np.int64), np.full(batch, -1, dtype=np.int64)
        self.bos_count, self.max_doc, self.doc_start = zeros.copy(), none.copy(), zeros.copy()
        self.last_bos, self.last_track, self.last_track_token = none.copy(), none.copy(), zeros.copy()
        self.last_conductor = none.copy()
        self.track_count, self.track_count_at_bos = zeros.copy(), zeros.copy()
        self.bar_count, self.bar_count_at_track = zeros.copy(), zeros.copy()
        self.last_structural_token = np.full(batch, PAD, dtype=np.int64)
        self.raw_segment, self.segments, self.groups = none.copy(), zeros.copy(), zeros.copy()

    def extend(self, tokens: np.ndarray) -> None:
        """Append the columns of ``tokens`` ``[B, n]``, one step each."""
        for column in np.asarray(tokens, dtype=np.int64).T:
            self.append(column)

    def append(self, token: np.ndarray) -> None:
        """Append one token per row (``[B]``), with the fields ``layout`` would give it."""
        p, token = self.length, np.asarray(token, dtype=np.int64)
        kind = self.kinds[token]
        is_pad, is_bos, is_eos, is_bar = token == PAD, token == BOS, token == EOS, token == BAR
        is_global = is_bos | is_eos | (kind == TokenKind.TRACK)
        structural = is_global | is_bar | is_pad

        self.bos_count += is_bos
        doc = np.where(is_pad, -1, self.bos_count)
        self.doc_start = np.where(doc > self.max_doc, p, self.doc_start)  # a document's first token
        self.max_doc = np.maximum(self.max_doc, doc)
        self.last_bos = np.where(is_bos, p, self.last_bos)
        self.last_conductor = np.where(token == TRACK_CONDUCTOR, p, self.last_conductor)
        is_track = (kind == TokenKind.TRACK) & (self.last_conductor > self.last_bos)  # not the ensemble's
        self.track_count_at_bos = np.where(is_bos, self.track_count, self.track_count_at_bos)
        self.track_count += is_track
        self.last_track = np.where(is_track, p, self.last_track)
        self.last_track_token = np.where(is_track, token, self.last_track_token)
        self.bar_count_at_track = np.where(is_track, self.bar_count, self.bar_count_at_track)
        self.bar_count += is_bar
        self.last_structural_token = np.where(structural, token, self.last_structural_token)

        track_in_doc = (self.last_track > self.last_bos) & ~is_bos & ~is_eos & ~is_pad
        track = np.where(track_in_doc, self.track_count - self.track_count_at_bos - 1, -1)
        in_segment = (self.last_structural_token == BAR) & (track >= 0)
        bar = np.where(in_segment, self.bar_count - self.bar_count_at_track - 1, -1)
        raw = np.where(in_segment, self.bar_count - 1, -1)
        self.segments += in_segment & (is_bar | (raw != self.raw_segment))
        self.raw_segment = raw
        segment = np.where(in_segment, self.segments - 1, -1)
        self.groups += structural | (kind == TokenKind.POS)
        onset_group = np.where(in_segment, self.groups - 1, -1)
        track_token = np.where(track >= 0, self.last_track_token, 0)
        fields = dict(doc=doc, segment=segment, track=track, bar=bar, track_token=track_token, is_global=is_global,
                      kind_class=KIND_CLASS[kind], onset_group=onset_group, in_doc=p - self.doc_start)  # fmt: skip
        for name, values in fields.items():
            self.regular[name][:, p] = values
        self.length = p + 1
        if self.with_slots:
            self._update_slots(segment, p, fields)

    def _update_slots(self, segment: np.ndarray, p: int, fields: dict[str, np.ndarray]) -> None:
        """The segment a token belongs to now ends at it; a segment's first token also sets its fields."""
        if segment.max() >= self.slots["end"].shape[1]:  # grow the table (doubling)
            grow = max(int(segment.max()) + 1, 2 * self.slots["end"].shape[1])
            for name, table in self.slots.items():
                extra = np.full((table.shape[0], grow - table.shape[1]), self._SLOT_FILL[name], dtype=np.int64)
                self.slots[name] = np.concatenate([table, extra], axis=1)
        rows = np.flatnonzero(segment >= 0)
        at = segment[rows]
        self.slots["end"][rows, at] = p
        for name in ("track", "bar", "doc", "track_token", "in_doc"):
            self.slots[name][rows, at] = fields[name][rows]

    def rows(self, min_slots: int | None = None) -> RowLayout:
        """``row_layout(tokens so far, kinds, min_slots, with_slots)``."""
        n, batch = self.length, self.regular["doc"].shape[0]
        segments = int(self.segments.max(initial=0))
        slots = (segments if min_slots is None else slots_for(segments, min_slots)) if self.with_slots else 0
        table = {name: np.full((batch, slots), fill, dtype=np.int64) for name, fill in self._SLOT_FILL.items()}
        width = min(slots, self.slots["end"].shape[1])
        for name, values in self.slots.items():
            table[name][:, :width] = values[:, :width]
        regular = {name: values[:, :n] for name, values in self.regular.items()}
        in_doc = np.concatenate([regular.pop("in_doc"), table.pop("in_doc")], axis=1)
        return _assemble(regular, table, in_doc)
