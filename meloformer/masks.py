"""Summary-token attention masks (docs/design.md section 4), written as FlexAttention ``mask_mod``s.

A row of the attention holds ``L`` regular tokens and then one contiguous block of ``S`` summary slots;
slot ``s`` summarises segment ``s`` of the row and sits at the logical position where that segment ends.
Keeping the slots together (instead of interleaving them after their segments) leaves whole tiles empty,
which FlexAttention skips.

Every rule is a small ``mask_mod(b, h, q_idx, kv_idx)`` over per-sample side channels (``RowLayout``,
tensors ``[B, L + S]`` indexed by the batch index ``b``), composed with ``and_masks``/``or_masks``. The one
composed function is evaluated on broadcast index tensors, tile by tile (``evaluate_tiles``), to build
every representation of the mask (``attention_mask``): the ``BlockSparseMask`` of the ``sdpa`` backend, the
``BlockMask`` of the ``flex`` backend (which also evaluates it inside its kernel) and the dense boolean
matrix of the tests; and row by row for KV-cached decoding. So the rules exist exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, and_masks, or_masks

from meloformer.arith import ceil_div
from meloformer.hid import TokenKind
from meloformer.layout import layout

DEFAULT_FINE_BARS = (1, 2, 4, 8, 12, 16, 24, 32)
SLOT_MULTIPLE = 128

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# Kind classes of the optional token-kind sparsity: a token of a class sees tokens of its own class (and of
# class 0, which is unrestricted). Durations, like velocities, only see their own kind.
_KIND_CLASS = np.zeros(len(TokenKind), dtype=np.int64)
_KIND_CLASS[[TokenKind.POS, TokenKind.PITCH]] = 1
_KIND_CLASS[TokenKind.VEL] = 2
_KIND_CLASS[TokenKind.DUR] = 3


@dataclasses.dataclass
class RowLayout:
    """Side channels of each attention row: ``L`` regular tokens, then ``S`` summary slots; all ``[B, L + S]``.

    ``doc`` is -1 for padding and for unused slots (nobody sees them, they see only themselves). For a slot,
    ``pos`` is its segment's end, ``segment`` its own index, and ``track``/``bar``/``track_token`` those of
    its segment; ``is_global``, ``kind_class`` and ``onset_group`` only matter for regular tokens.
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
    doc_ids: np.ndarray | Tensor | None = None,
    with_slots: bool = True,
) -> RowLayout:
    """Build the per-row side channels of a batch ``[B, L]`` with one call to ``meloformer.layout.layout``.

    ``kinds`` is the tokenizer's kind table (``HIDTokenizer.kinds``; the model carries it as ``model.kinds``).

    Rows get ``min_slots`` summary slots, or ``slots_for`` more when a row has more segments; ``None`` gives
    exactly the largest segment count. ``with_slots=False`` gives rows without summary slots (the ``causal``
    and ``local`` attention variants).
    """
    if isinstance(tokens, Tensor):
        tokens = tokens.detach().cpu().numpy()
    if isinstance(doc_ids, Tensor):
        doc_ids = doc_ids.detach().cpu().numpy()
    if isinstance(kinds, Tensor):
        kinds = kinds.detach().cpu().numpy()
    tokens = np.atleast_2d(tokens)
    lay = layout(tokens, kinds, doc_ids)
    if with_slots:
        segments = int(np.max(lay.num_segments(), initial=0))
        table = lay.segment_table(segments if min_slots is None else slots_for(segments, min_slots))
    else:
        table = {
            k: np.zeros((tokens.shape[0], 0), dtype=np.int64) for k in ("end", "track", "bar", "doc", "track_token")
        }
    n = tokens.shape[1]
    slot_doc = table["doc"]
    slots = table["end"].shape[1]
    kind_class = _KIND_CLASS[lay.kind]
    rows = {
        "pos": (np.broadcast_to(np.arange(n), tokens.shape), table["end"]),
        "doc": (lay.doc, slot_doc),
        "segment": (lay.segment, np.broadcast_to(np.arange(slots), slot_doc.shape)),
        "track": (lay.track, table["track"]),
        "bar": (lay.bar, table["bar"]),
        "track_token": (lay.track_token, table["track_token"]),
        "is_global": (lay.is_global, np.zeros_like(slot_doc, dtype=bool)),
        "kind_class": (kind_class, np.zeros_like(slot_doc)),
        "onset_group": (lay.onset_group, np.full_like(slot_doc, -1)),
    }
    # int32 halves memory and speeds up the mask's integer arithmetic.
    tensors = {k: np.concatenate([r, s], axis=1) for k, (r, s) in rows.items()}
    tensors = {k: torch.from_numpy(v if v.dtype == bool else v.astype(np.int32)) for k, v in tensors.items()}
    return RowLayout(num_regular=n, **tensors)


ATTENTION_VARIANTS = ("summary", "causal", "local")


def summary_mask_mod(
    rows: RowLayout,
    fine_bars: Sequence[int] = DEFAULT_FINE_BARS,
    cross_window: int = 1,
    kind_sparsity: bool = False,
    attention: str = "summary",
) -> MaskMod:
    """The mask of one attention variant for the rows of ``rows`` (query and key index the same row).

    ``summary`` is the full mask of docs/design.md section 4 (SR, SS, RS and RR). The two ablations use rows without
    summary slots: ``causal`` lets a regular token see every earlier token of its document (full attention),
    and ``local`` keeps only the RR rules (what the summaries add on top of them).
    """
    if attention not in ATTENTION_VARIANTS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_VARIANTS)}, got {attention!r}")
    n = rows.num_regular
    doc, pos, seg, track, bar = rows.doc, rows.pos, rows.segment, rows.track, rows.bar
    is_global, kind_class, onset_group = rows.is_global, rows.kind_class, rows.onset_group
    max_offset = max(fine_bars, default=0)
    fine = torch.zeros(max_offset + 1, dtype=torch.bool, device=doc.device)
    fine[[o for o in fine_bars if o > 0]] = True

    def itself(b, h, q, kv):
        """Every row sees itself, so padding and unused slots (which see nothing else) give no NaN."""
        return q == kv

    def same_doc(b, h, q, kv):
        """All four rules stay inside one document; padding and unused slots (doc -1) are never seen."""
        return (doc[b, q] == doc[b, kv]) & (doc[b, q] >= 0)

    def sr(b, h, q, kv):
        """The summary slot of segment s sees every regular token of s."""
        return (q >= n) & (kv < n) & (seg[b, kv] == seg[b, q])

    def ss(b, h, q, kv):
        """The summary slot of segment s sees the slot of every segment s' that ended before s ended."""
        return (q >= n) & (kv >= n) & (pos[b, kv] < pos[b, q])

    def rs(b, h, q, kv):
        """A regular token at position p sees the slot of every segment s' that ended before p."""
        return (q < n) & (kv >= n) & (pos[b, kv] < pos[b, q])

    def rr_causal(b, h, q, kv):
        """A regular token sees only regular tokens at or before its own position (one of the rules below)."""
        return (q < n) & (kv <= q)

    def rr_global(b, h, q, kv):
        """A regular token sees every earlier global token of its piece: BOS, Track and EOS."""
        return is_global[b, kv]

    def rr_same_segment(b, h, q, kv):
        """A regular token sees the earlier tokens of its own segment."""
        return (seg[b, q] == seg[b, kv]) & (seg[b, q] >= 0)

    def rr_fine_bar(b, h, q, kv):
        """A regular token sees the tokens of its own track whose bar lies ``fine_bars`` bars before its own."""
        offset = bar[b, q] - bar[b, kv]
        in_table = (offset > 0) & (offset <= max_offset) & fine[offset.clamp(0, max_offset)]
        return (track[b, q] == track[b, kv]) & (bar[b, kv] >= 0) & in_table

    def rr_cross_track(b, h, q, kv):
        """A regular token sees the tokens of other tracks within ``cross_window`` bars of its own bar (causality
        keeps only the tracks before it)."""
        near = (bar[b, q] - bar[b, kv]).abs() <= cross_window
        return (track[b, q] != track[b, kv]) & (bar[b, q] >= 0) & (bar[b, kv] >= 0) & near

    def rr_kind(b, h, q, kv):
        """With ``kind_sparsity``, the three local rules only pair kinds of one class: onsets and pitches see
        onsets and pitches, velocities velocities, durations durations; an onset group always sees itself, and
        other kinds (Bar, conductor events) are not restricted."""
        cq, ck = kind_class[b, q], kind_class[b, kv]
        same_onset = (onset_group[b, q] == onset_group[b, kv]) & (onset_group[b, q] >= 0)
        return (cq == 0) | (ck == 0) | (cq == ck) | same_onset

    local = or_masks(rr_same_segment, rr_fine_bar, rr_cross_track)
    if kind_sparsity:
        local = and_masks(local, rr_kind)
    rr = and_masks(rr_causal, or_masks(rr_global, local))
    visible = {"summary": or_masks(sr, ss, rs, rr), "causal": rr_causal, "local": rr}[attention]
    return or_masks(itself, and_masks(same_doc, visible))


def dense_mask(mask_mod: MaskMod, batch_size: int, q_idx: Tensor, kv_idx: Tensor, chunk: int = 128) -> Tensor:
    """Evaluate ``mask_mod`` on broadcast index tensors: a boolean ``[B, 1, Q, KV]`` matrix (True = attend).

    ``q_idx`` is ``[Q]`` or per sample ``[B, Q]``; ``kv_idx`` is ``[KV]``. Used for the mask rows of
    incremental decoding; queries go in chunks so the integer intermediates stay small.
    """
    device = kv_idx.device
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q_idx = q_idx.expand(batch_size, -1) if q_idx.ndim == 1 else q_idx
    kv = kv_idx[None, None, None, :]
    out = torch.empty(batch_size, 1, q_idx.shape[1], kv_idx.shape[0], dtype=torch.bool, device=device)
    for start in range(0, q_idx.shape[1], chunk):
        q = q_idx[:, None, start : start + chunk, None]
        out[:, :, start : start + chunk] = mask_mod(b, h, q, kv)
    return out


def candidate_tiles(rows: RowLayout, block_size: int) -> Tensor:
    """``[B, n, n]``: the tiles that may hold a visible pair, a superset used only to skip evaluating the rest.

    Every rule of section 3 keeps ``doc(kv) == doc(q)`` and ``pos(kv) <= pos(q)``, and the remaining pairs
    (a token or slot seeing itself) lie on the diagonal; so a tile is skipped when its queries' and keys'
    documents are disjoint or all its keys come after all its queries. Packed rows skip most tiles this way.
    """
    n_blocks = ceil_div(rows.length, block_size)
    fill = n_blocks * block_size - rows.length
    big = torch.iinfo(torch.int32).max
    live = F.pad(rows.doc >= 0, (0, fill), value=False).view(rows.batch_size, n_blocks, block_size)
    doc = F.pad(rows.doc, (0, fill), value=-1).view_as(live)
    pos = F.pad(rows.pos, (0, fill)).view_as(live)
    doc_lo, doc_hi = doc.masked_fill(~live, big).amin(-1), doc.masked_fill(~live, -1).amax(-1)
    pos_lo, pos_hi = pos.masked_fill(~live, big).amin(-1), pos.masked_fill(~live, -1).amax(-1)
    docs_meet = (doc_lo[:, :, None] <= doc_hi[:, None, :]) & (doc_lo[:, None, :] <= doc_hi[:, :, None])
    past = pos_lo[:, None, :] <= pos_hi[:, :, None]
    return (docs_meet & past) | torch.eye(n_blocks, dtype=torch.bool, device=live.device)


def evaluate_tiles(
    mask_mod: MaskMod, rows: RowLayout, block_size: int, elements: int = 1 << 20
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """``mask_mod`` on every candidate tile: their (batch, query block, key block) indices and ``[C, bs, bs]``.

    The same broadcast evaluation feeds the dense ``sdpa`` matrix and the flex ``BlockMask``; tiles go in
    chunks of about ``elements`` entries, so memory stays small at any context length.
    """
    t, device = rows.length, rows.pos.device
    index = torch.nonzero(candidate_tiles(rows, block_size), as_tuple=True)
    offsets = torch.arange(block_size, device=device)
    h = torch.zeros(1, 1, 1, dtype=torch.long, device=device)
    tiles = torch.empty(len(index[0]), block_size, block_size, dtype=torch.bool, device=device)
    step = max(1, elements // block_size**2)
    for start in range(0, len(tiles), step):
        b, qb, kb = (i[start : start + step, None, None] for i in index)
        q, kv = qb * block_size + offsets[:, None], kb * block_size + offsets
        inside = (q < t) & (kv < t)
        tiles[start : start + step] = mask_mod(b, h, q.clamp(max=t - 1), kv.clamp(max=t - 1)) & inside
    return index, tiles


def full_dense_mask(mask_mod: MaskMod, rows: RowLayout, block_size: int = 128) -> Tensor:
    """The whole ``[B, 1, L + S, L + S]`` boolean mask of ``rows``: the ``sdpa`` backend's attention mask."""
    (b, qb, kb), tiles = evaluate_tiles(mask_mod, rows, block_size)
    n_blocks, t = ceil_div(rows.length, block_size), rows.length
    shape = (rows.batch_size, n_blocks, block_size, n_blocks, block_size)
    dense = torch.zeros(shape, dtype=torch.bool, device=tiles.device)
    dense[b, qb, :, kb, :] = tiles
    dense = dense.view(rows.batch_size, 1, n_blocks * block_size, n_blocks * block_size)
    return dense[:, :, :t, :t].contiguous() if n_blocks * block_size != t else dense


@dataclasses.dataclass
class SparseCall:
    """One SDPA call of a ``BlockSparseMask``: ``G`` query blocks that each see exactly ``M`` key blocks.

    ``query`` ``[G]`` and ``keys`` ``[G, M]`` index the flattened (batch, block) grids of queries and keys;
    ``mask`` ``[G, 1, query_block, M * key_block]`` is the mask restricted to those tiles.
    """

    query: Tensor
    keys: Tensor
    mask: Tensor


@dataclasses.dataclass
class BlockSparseMask:
    """The mask as a list of SDPA calls over only the tiles that hold a visible pair (the ``sdpa`` backend).

    Query blocks are grouped by how many key blocks they see, so each group is one batched SDPA call over
    its gathered keys, with no padding; ``order`` puts the calls' concatenated outputs back in (batch,
    query block) order. Autograd through the gathers gives the backward, which skips the same tiles.
    """

    query_block: int
    key_block: int
    calls: list[SparseCall]
    order: Tensor


def block_sparse_mask(
    mask_mod: MaskMod, rows: RowLayout, query_block: int = 64, key_block: int = 32
) -> BlockSparseMask:
    """Build a ``BlockSparseMask`` from the evaluated ``key_block`` tiles, never the full dense matrix.

    ``query_block`` is a multiple of ``key_block``: a query block sees a key block when any of its tiles
    holds a visible pair. Query rows past the row's end (block padding) see the first gathered key, so no
    row is empty (their outputs are dropped).
    """
    if query_block % key_block:
        raise ValueError(f"query_block {query_block} must be a multiple of key_block {key_block}")
    (b, qb, kb), tiles = evaluate_tiles(mask_mod, rows, key_block)
    seen = tiles.any(dim=(1, 2))
    b, qb, kb, tiles = b[seen], qb[seen], kb[seen], tiles[seen]
    t, batch, per = rows.length, rows.batch_size, query_block // key_block
    n_keys, n_queries = ceil_div(t, key_block), ceil_div(t, query_block)
    device = tiles.device
    # Tile id of every (batch, query block, key block); the extra last tile is all False.
    tile_id = torch.full((batch, n_queries * per, n_keys), len(tiles), dtype=torch.long, device=device)
    tile_id[b, qb, kb] = torch.arange(len(tiles), device=device)
    tiles = torch.cat([tiles, tiles.new_zeros(1, key_block, key_block)])
    tile_id = tile_id.view(batch * n_queries, per, n_keys)
    visible = (tile_id < len(tiles) - 1).any(dim=1)  # [B * n_queries, n_keys]
    counts = visible.sum(dim=1)
    rows_pad = torch.arange(n_queries, device=device).repeat(batch)[:, None] * query_block
    rows_pad = rows_pad + torch.arange(query_block, device=device) >= t  # [B * n_queries, query_block]
    calls, flat_queries = [], []
    for m in counts.unique().tolist():
        query = torch.nonzero(counts == m).squeeze(1)
        key = torch.nonzero(visible[query])[:, 1].view(len(query), m)
        ids = tile_id[query[:, None, None], torch.arange(per, device=device)[:, None], key[:, None, :]]
        mask = tiles[ids].permute(0, 1, 3, 2, 4).reshape(len(query), 1, query_block, m * key_block)
        mask[:, 0, :, 0] |= rows_pad[query]
        batch_of = torch.div(query, n_queries, rounding_mode="floor")
        calls.append(SparseCall(query, batch_of[:, None] * n_keys + key, mask))
        flat_queries.append(query)
    order = torch.argsort(torch.cat(flat_queries))
    return BlockSparseMask(query_block, key_block, calls, order)


def attention_mask(
    mask_mod: MaskMod, rows: RowLayout, backend: str, block_size: int | None = None
) -> BlockSparseMask | BlockMask | Tensor:
    """The mask of one batch as its backend runs it, built from the evaluated tiles in one call.

    ``sdpa`` gets the ``BlockSparseMask``, ``flex`` the ``BlockMask`` (``block_size``: 128 on CUDA, 32 on CPU,
    where sparser tiles measured faster) and ``dense`` the full boolean matrix (the reference).
    """
    if backend == "sdpa":
        return block_sparse_mask(mask_mod, rows)
    if backend == "flex":
        return block_mask(mask_mod, rows, block_size or (32 if rows.pos.device.type == "cpu" else 128))
    if backend == "dense":
        return full_dense_mask(mask_mod, rows)
    raise ValueError(f"unknown attention mask backend {backend!r}")


def block_mask(mask_mod: MaskMod, rows: RowLayout, block_size: int = 128) -> BlockMask:
    """The ``flex`` backend's per-sample block mask; build it once per batch and share it across layers."""
    (b, qb, kb), tiles = evaluate_tiles(mask_mod, rows, block_size)
    n_blocks = ceil_div(rows.length, block_size)
    partial = torch.zeros(rows.batch_size, 1, n_blocks, n_blocks, dtype=torch.bool, device=tiles.device)
    full = torch.zeros_like(partial)
    any_, all_ = tiles.any(dim=(1, 2)), tiles.all(dim=(1, 2))
    partial[b, 0, qb, kb] = any_ & ~all_
    full[b, 0, qb, kb] = all_

    def to_kv(blocks: Tensor) -> tuple[Tensor, Tensor]:
        return blocks.sum(-1, dtype=torch.int32), blocks.int().argsort(dim=-1, descending=True, stable=True).int()

    t = rows.length
    return BlockMask.from_kv_blocks(*to_kv(partial), *to_kv(full), block_size, mask_mod, seq_lengths=(t, t))
