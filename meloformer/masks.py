"""Summary-token attention masks (docs/design.md section 4), written as FlexAttention ``mask_mod``s.

A row of the attention holds ``L`` regular tokens and then one contiguous block of ``S`` summary slots
(``meloformer.row_layout``). Keeping the slots together (instead of interleaving them after their segments)
leaves whole tiles empty, which FlexAttention skips.

Every rule is a small ``mask_mod(b, h, q_idx, kv_idx)`` over the rows' packed codes (``row_layout.Code``:
one int64 load per side, then constant bit tests), composed with ``and_masks``/``or_masks``. The one
composed function is evaluated on broadcast index tensors to build every representation of the mask
(``attention_mask``): the ``BlockSparseMask`` of the ``sdpa`` backend, the ``BlockMask`` of the ``flex``
backend (which also evaluates it inside its kernel) and the dense boolean matrix of the tests; and row by
row for KV-cached decoding. So the rules exist exactly once. Which tiles are visible, and which fully,
comes from one evaluation per run of a segment's tokens in a tile (``tile_visibility``), not per element.

During training the tiles are evaluated in the DataLoader workers (``MaskPlan``, on the CPU): a batch
arrives with its side channels and its backend's tile structure (``PlannedMask``), and the step only wraps
them (``PlannedMask.mask``), with no host sync.
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
from meloformer.row_layout import Code, RowLayout, row_layout

DEFAULT_FINE_BARS = (1, 2, 4, 8, 12, 16, 24, 32)
MAX_FINE_BAR = 62  # the fine-bar table is the bits of one int64 constant

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ATTENTION_VARIANTS = ("summary", "window", "causal", "local")
CHUNK = 1 << Code.CHUNK_BITS  # the window variant counts a document's tokens in chunks of 128 from its start
SEGMENT = Code.DOC | Code.TRACK | Code.BAR


def check_mask_settings(
    fine_bars: Sequence[int], attention: str, token_window: int, kind_sparsity: bool = False
) -> None:
    """ValueError naming the first mask setting the rules cannot take (a model configuration checks them too)."""
    if attention not in ATTENTION_VARIANTS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_VARIANTS)}, got {attention!r}")
    if kind_sparsity and attention not in ("summary", "local"):
        raise ValueError(f"kind_sparsity restricts the fine-bar rules of summary and local; {attention} has none")
    if any(o < 1 or o > MAX_FINE_BAR for o in fine_bars):
        raise ValueError(f"fine_bars must lie in 1..{MAX_FINE_BAR}, got {tuple(fine_bars)}")
    if token_window < CHUNK or token_window % CHUNK:
        raise ValueError(f"token_window must be a positive multiple of {CHUNK}, got {token_window}")


def summary_mask_mod(
    rows: RowLayout,
    fine_bars: Sequence[int] = DEFAULT_FINE_BARS,
    cross_window: int = 1,
    kind_sparsity: bool = False,
    attention: str = "summary",
    token_window: int = 1024,
) -> MaskMod:
    """The mask of one attention variant for the rows of ``rows`` (query and key index the same row).

    ``summary`` is the full mask of docs/design.md section 4 (SR, SS, RS and RR). ``window`` keeps the slots
    but lays RR out for 128-token tiles: a regular token sees its document's tokens in its own chunk and the
    chunks before it up to ``token_window`` tokens, and the slots of the segments that ended before that
    window. The two ablations use rows without summary slots: ``causal`` lets a regular token see every
    earlier token of its document (full attention), and ``local`` keeps only the RR rules of ``summary``.
    """
    check_mask_settings(fine_bars, attention, token_window, kind_sparsity)
    n, code, kind_code = rows.num_regular, rows.code, rows.kind_code
    fine = sum(1 << o for o in set(fine_bars))  # bit o set: a token sees its track's bar o bars back
    chunks = token_window // CHUNK

    def bars(b, q, kv):
        """Bar of the query and of the key, plus one (0: outside a segment)."""
        return code[b, q] & Code.BAR, code[b, kv] & Code.BAR

    def itself(b, h, q, kv):
        """Every row sees itself, so padding and unused slots (which see nothing else) give no NaN."""
        return q == kv

    def same_doc(b, h, q, kv):
        """All four rules stay inside one document; padding and unused slots (dead) are never seen."""
        cq = code[b, q]
        return (((cq ^ code[b, kv]) & (Code.DOC | Code.DEAD)) == 0) & ((cq & Code.DEAD) == 0)

    def sr(b, h, q, kv):
        """The summary slot of segment s sees every regular token of s (same document, track and bar)."""
        return (q >= n) & (kv < n) & (((code[b, q] ^ code[b, kv]) & SEGMENT) == 0)

    def earlier_end(b, h, q, kv):
        """The key's position (a slot's: its segment's end) lies before the query's."""
        return (code[b, kv] >> Code.POS_SHIFT) < (code[b, q] >> Code.POS_SHIFT)

    def ss(b, h, q, kv):
        """The summary slot of segment s sees the slot of every segment s' that ended before s ended."""
        return (q >= n) & (kv >= n) & earlier_end(b, h, q, kv)

    def rs(b, h, q, kv):
        """A regular token at position p sees the slot of every segment s' that ended before p."""
        return (q < n) & (kv >= n) & earlier_end(b, h, q, kv)

    def chunks_back(b, q, kv):
        """How many chunks of its document the key (a slot: its segment's end) lies before the query."""
        return (code[b, q] >> Code.CHUNK_SHIFT) - (code[b, kv] >> Code.CHUNK_SHIFT)

    def rs_before_window(b, h, q, kv):
        """A regular token sees the slot of every segment that ended before its window, whose tokens it no
        longer sees one by one."""
        return (q < n) & (kv >= n) & (chunks_back(b, q, kv) >= chunks)

    def rr_window(b, h, q, kv):
        """A regular token sees the regular tokens of its own chunk and of the ``token_window`` / 128 - 1 chunks
        before it."""
        return (kv < n) & (chunks_back(b, q, kv) < chunks)

    def rr_causal(b, h, q, kv):
        """A regular token sees only regular tokens at or before its own position (one of the rules below)."""
        return (q < n) & (kv <= q)

    def rr_global(b, h, q, kv):
        """A regular token sees every earlier global token of its piece: BOS, Track and EOS."""
        return (code[b, kv] & Code.GLOBAL) != 0

    def rr_same_segment(b, h, q, kv):
        """A regular token sees the earlier tokens of its own segment."""
        cq = code[b, q]
        return (((cq ^ code[b, kv]) & SEGMENT) == 0) & ((cq & Code.BAR) != 0)

    def rr_fine_bar(b, h, q, kv):
        """A regular token sees the tokens of its own track whose bar lies ``fine_bars`` bars before its own."""
        bar_q, bar_kv = bars(b, q, kv)
        offset = (bar_q - bar_kv).clamp(0, 63)  # not before: bit 0, never set
        same_track = ((code[b, q] ^ code[b, kv]) & Code.TRACK) == 0
        return same_track & (bar_kv != 0) & (((fine >> offset) & 1) != 0)

    def rr_cross_track(b, h, q, kv):
        """A regular token sees the tokens of other tracks within ``cross_window`` bars of its own bar (causality
        keeps only the tracks before it)."""
        bar_q, bar_kv = bars(b, q, kv)
        other_track = ((code[b, q] ^ code[b, kv]) & Code.TRACK) != 0
        return other_track & (bar_q != 0) & (bar_kv != 0) & ((bar_q - bar_kv).abs() <= cross_window)

    def rr_kind(b, h, q, kv):
        """With ``kind_sparsity``, the three local rules only pair kinds of one class: onsets and pitches see
        onsets and pitches, velocities velocities, durations durations; an onset group always sees itself, and
        other kinds (Bar, conductor events) are not restricted."""
        kq, kk = kind_code[b, q], kind_code[b, kv]
        cq, ck = kq & 3, kk & 3
        same_onset = ((kq >> 2) == (kk >> 2)) & ((kq >> 2) != 0)
        return (cq == 0) | (ck == 0) | (cq == ck) | same_onset

    local = or_masks(rr_same_segment, rr_fine_bar, rr_cross_track)
    if kind_sparsity:
        local = and_masks(local, rr_kind)
    rr = and_masks(rr_causal, or_masks(rr_global, local))
    if attention == "window":
        visible = or_masks(sr, ss, rs_before_window, and_masks(rr_causal, or_masks(rr_same_segment, rr_window)))
    else:
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


def tile_elements(
    mask_mod: MaskMod, rows: RowLayout, block_size: int, index: tuple[Tensor, ...], elements: int = 1 << 20
) -> Tensor:
    """``mask_mod`` on every element of the tiles ``index`` (batch, query block, key block): ``[C, bs, bs]``.

    Tiles go in chunks of about ``elements`` entries, so memory stays small at any context length.
    """
    t, device = rows.length, rows.pos.device
    offsets = torch.arange(block_size, device=device)
    h = torch.zeros(1, 1, 1, dtype=torch.long, device=device)
    tiles = torch.empty(len(index[0]), block_size, block_size, dtype=torch.bool, device=device)
    step = max(1, elements // block_size**2)
    for start in range(0, len(tiles), step):
        b, qb, kb = (i[start : start + step, None, None] for i in index)
        q, kv = qb * block_size + offsets[:, None], kb * block_size + offsets
        inside = (q < t) & (kv < t)
        tiles[start : start + step] = mask_mod(b, h, q.clamp(max=t - 1), kv.clamp(max=t - 1)) & inside
    return tiles


def evaluate_tiles(mask_mod: MaskMod, rows: RowLayout, block_size: int) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """``mask_mod`` on every element of every candidate tile: their indices and ``[C, bs, bs]`` (the reference
    that ``tile_visibility`` must agree with, and the dense matrix's source)."""
    index = torch.nonzero(candidate_tiles(rows, block_size), as_tuple=True)
    return index, tile_elements(mask_mod, rows, block_size, index)


def _block_runs(rows: RowLayout, block_size: int, runs: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per block of positions, the first position of each run the mask treats alike: ``[B, n, K]`` positions,
    which of them are real, the count per block and whether the block holds a dead (or past-the-end) position.

    With ``runs`` the regular tokens of one segment and one chunk (``CHUNK``) inside a block form one run
    (every rule but the causal order among them treats them alike); every other live position is a run of its
    own, and dead positions (padding, unused slots: they see only themselves and nobody sees them) belong to
    none.
    """
    n_blocks = ceil_div(rows.length, block_size)
    fill = n_blocks * block_size - rows.length
    live = F.pad(rows.doc >= 0, (0, fill), value=False)
    p = torch.arange(n_blocks * block_size, device=live.device)
    seg = F.pad(rows.segment, (0, fill), value=-1)
    start = live & ((p % block_size == 0) | (p >= rows.num_regular) | (seg < 0))
    if runs:
        chunk_start = F.pad((rows.code >> Code.POS_SHIFT) % CHUNK == 0, (0, fill), value=False)
        start |= live & ((seg != F.pad(seg, (1, 0), value=-1)[:, :-1]) | chunk_start)
    else:
        start = live
    start = start.view(rows.batch_size, n_blocks, block_size)
    count = start.sum(-1)
    k = max(int(count.max()), 1)
    order = start.int().argsort(dim=-1, descending=True, stable=True)[..., :k]
    first = order + torch.arange(n_blocks, device=live.device)[:, None] * block_size
    real = torch.arange(k, device=live.device) < count[..., None]
    dead = ~live.view(rows.batch_size, n_blocks, block_size).all(-1)
    return first.clamp(max=rows.length - 1), real, count, dead


def tile_visibility(
    mask_mod: MaskMod, rows: RowLayout, block_size: int, runs: bool = False, elements: int = 1 << 22
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, Tensor]:
    """Which candidate tiles hold a visible pair and which are all visible: (batch, query block, key block)
    indices, ``any`` and ``all`` per tile, exactly, without evaluating every element of a tile.

    ``mask_mod`` runs on the first position of each run (``_block_runs``) of the query and key blocks; a
    segment split between two blocks has a first position in each, so the causal order decides between
    them as it does for every pair. A diagonal tile always holds a visible pair (itself) and never only
    visible ones; a tile with a dead position is never full.
    """
    device = rows.pos.device
    index = torch.nonzero(candidate_tiles(rows, block_size), as_tuple=True)
    first, real, count, dead = _block_runs(rows, block_size, runs)
    b, qb, kb = index
    visible_any = torch.empty(len(b), dtype=torch.bool, device=device)
    visible_all = torch.empty_like(visible_any)
    h = torch.zeros(1, 1, 1, dtype=torch.long, device=device)
    # Tiles grouped by their blocks' run counts, so each group pads only to its own widest block.
    width = torch.bucketize(count, torch.tensor([16, 32, 64], device=device)) if runs else torch.zeros_like(count)
    group = width[b, qb] * 4 + width[b, kb]
    for g in group.unique().tolist():
        members = torch.nonzero(group == g).squeeze(1)
        kq, kk = int(count[b[members], qb[members]].max()), int(count[b[members], kb[members]].max())
        step = max(1, elements // max(kq * kk, 1))
        for start in range(0, len(members), step):
            m = members[start : start + step]
            bm, qm, km = b[m], qb[m], kb[m]
            q, kv = first[bm, qm, :kq, None], first[bm, km, None, :kk]
            pairs = real[bm, qm, :kq, None] & real[bm, km, None, :kk]
            seen = mask_mod(bm[:, None, None], h, q, kv)
            visible_any[m] = (seen & pairs).flatten(1).any(1) | (qm == km)
            visible_all[m] = (seen | ~pairs).flatten(1).all(1) & (qm != km) & ~dead[bm, qm] & ~dead[bm, km]
    return index, visible_any, visible_all


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
    mask_mod: MaskMod, rows: RowLayout, query_block: int = 64, key_block: int = 32, runs: bool = False
) -> BlockSparseMask:
    """Build a ``BlockSparseMask`` from the visible ``key_block`` tiles, never the full dense matrix.

    ``query_block`` is a multiple of ``key_block``: a query block sees a key block when any of its tiles
    holds a visible pair. Query rows past the row's end (block padding) see the first gathered key, so no
    row is empty (their outputs are dropped). Only partially visible tiles are evaluated element by element
    (``runs``: see ``flex_blocks``).
    """
    if query_block % key_block:
        raise ValueError(f"query_block {query_block} must be a multiple of key_block {key_block}")
    (b, qb, kb), seen, full = tile_visibility(mask_mod, rows, key_block, runs)
    b, qb, kb, full = b[seen], qb[seen], kb[seen], full[seen]
    tiles = torch.ones(len(b), key_block, key_block, dtype=torch.bool, device=b.device)
    partial = ~full
    tiles[partial] = tile_elements(mask_mod, rows, key_block, (b[partial], qb[partial], kb[partial]))
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
    mask_mod: MaskMod, rows: RowLayout, backend: str, block_size: int | None = None, runs: bool = False
) -> BlockSparseMask | BlockMask | Tensor:
    """The mask of one batch as its backend runs it, built from the evaluated tiles in one call.

    ``sdpa`` gets the ``BlockSparseMask``, ``flex`` the ``BlockMask`` (``block_size``: 128 on CUDA, 32 on CPU,
    where sparser tiles measured faster) and ``dense`` the full boolean matrix (the reference). ``runs``: the
    mask treats a segment's tokens alike but for their causal order (``MaskRules.runs``).
    """
    if backend == "sdpa":
        return block_sparse_mask(mask_mod, rows, runs=runs)
    if backend == "flex":
        return block_mask(mask_mod, rows, block_size or flex_block_size(rows.pos.device), runs)
    if backend == "dense":
        return full_dense_mask(mask_mod, rows)
    raise ValueError(f"unknown attention mask backend {backend!r}")


def flex_block_size(device: torch.device | str) -> int:
    """The flex tile: 128 on CUDA (the kernel's), 32 on CPU, where sparser tiles measured faster."""
    return 32 if torch.device(device).type == "cpu" else 128


@dataclasses.dataclass
class FlexBlocks:
    """The tile structure of a flex ``BlockMask`` as plain tensors (kv and q sides, partial and full tiles):
    computed where the tiles are evaluated, wrapped around a ``mask_mod`` on the step's device."""

    seq_length: int
    block_size: int
    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    q_num_blocks: Tensor
    q_indices: Tensor
    full_q_num_blocks: Tensor
    full_q_indices: Tensor

    def block_mask(self, mask_mod: MaskMod) -> BlockMask:
        """The ``BlockMask`` of these tiles that evaluates ``mask_mod`` inside its partial tiles: no tensor op."""
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[2:]}
        t, size = self.seq_length, self.block_size
        return BlockMask(seq_lengths=(t, t), **tensors, BLOCK_SIZE=(size, size), mask_mod=mask_mod)

    def tile_counts(self) -> dict[str, int]:
        """Tiles flex computes: partial ones (``mask_mod`` on every element) and full ones (none)."""
        partial, full = int(self.kv_num_blocks.sum()), int(self.full_kv_num_blocks.sum())
        return {"partial": partial, "full": full, "computed": partial + full}


def flex_blocks(mask_mod: MaskMod, rows: RowLayout, block_size: int = 128, runs: bool = False) -> FlexBlocks:
    """The ``flex`` backend's per-sample tile structure of ``mask_mod`` on ``rows``; built once per batch.

    ``runs``: the mask treats a segment's tokens alike but for their causal order (``MaskRules.runs``), so
    ``tile_visibility`` evaluates it once per run instead of once per element."""
    (b, qb, kb), any_, all_ = tile_visibility(mask_mod, rows, block_size, runs)
    n_blocks = ceil_div(rows.length, block_size)
    partial = torch.zeros(rows.batch_size, 1, n_blocks, n_blocks, dtype=torch.bool, device=any_.device)
    full = torch.zeros_like(partial)
    partial[b, 0, qb, kb] = any_ & ~all_
    full[b, 0, qb, kb] = all_

    def ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
        """Per row of tiles: how many are set, and their indices first (the layout flex reads)."""
        return blocks.sum(-1, dtype=torch.int32), blocks.int().argsort(dim=-1, descending=True, stable=True).int()

    kv, full_kv = ordered(partial), ordered(full)
    q, full_q = ordered(partial.transpose(-1, -2)), ordered(full.transpose(-1, -2))
    return FlexBlocks(rows.length, block_size, *kv, *full_kv, *q, *full_q)


def block_mask(mask_mod: MaskMod, rows: RowLayout, block_size: int = 128, runs: bool = False) -> BlockMask:
    """The ``flex`` backend's per-sample block mask; build it once per batch and share it across layers."""
    return flex_blocks(mask_mod, rows, block_size, runs).block_mask(mask_mod)


@dataclasses.dataclass
class MaskRules:
    """Which mask a model attends with: the variant and the settings of its rules (``summary_mask_mod``)."""

    fine_bars: tuple[int, ...] = DEFAULT_FINE_BARS
    cross_window: int = 1
    kind_sparsity: bool = False
    attention: str = "summary"
    token_window: int = 1024

    @property
    def with_slots(self) -> bool:
        return self.attention in ("summary", "window")

    @property
    def doc_align(self) -> int:
        """Where packed rows should start their documents: on the window variant's chunk (tile) boundaries."""
        return CHUNK if self.attention == "window" else 1

    @property
    def runs(self) -> bool:
        """Every rule treats the tokens of one segment alike, but for their causal order (not so for the
        kind classes of ``kind_sparsity``): tiles can be evaluated once per segment run."""
        return not self.kind_sparsity

    def mask_mod(self, rows: RowLayout) -> MaskMod:
        return summary_mask_mod(
            rows, self.fine_bars, self.cross_window, self.kind_sparsity, self.attention, self.token_window
        )


@dataclasses.dataclass
class PlannedMask:
    """A batch's mask as the DataLoader workers built it for ``backend``: ``FlexBlocks`` or a
    ``BlockSparseMask``. Lightning moves its tensors to the step's device with the batch."""

    backend: str
    structure: FlexBlocks | BlockSparseMask

    def mask(self, mask_mod: MaskMod) -> BlockMask | BlockSparseMask:
        if isinstance(self.structure, FlexBlocks):
            return self.structure.block_mask(mask_mod)
        return self.structure


@dataclasses.dataclass
class MaskPlan:
    """What the DataLoader workers add to a batch of tokens ``[B, L]``: its side channels (``batch["layout"]``,
    ``min_slots`` summary slots or more) and its mask for ``backend`` (``batch["mask"]``, a ``PlannedMask``).

    A plain picklable object (the model's kind table, rules and sizes), so the data side needs no model.
    """

    kinds: np.ndarray
    rules: MaskRules
    min_slots: int
    backend: str  # flex or sdpa
    flex_block_size: int = 128

    @property
    def doc_align(self) -> int:
        return self.rules.doc_align

    def __call__(self, tokens: Tensor) -> dict[str, object]:
        rows = row_layout(tokens, self.kinds, self.min_slots, self.rules.with_slots)
        mask_mod = self.rules.mask_mod(rows)
        if self.backend == "flex":
            structure = flex_blocks(mask_mod, rows, self.flex_block_size, self.rules.runs)
        elif self.backend == "sdpa":
            structure = block_sparse_mask(mask_mod, rows, runs=self.rules.runs)
        else:
            raise ValueError(f"a mask plan is for the flex or sdpa backend, got {self.backend!r}")
        return {"layout": rows.tensors(), "mask": PlannedMask(self.backend, structure)}
