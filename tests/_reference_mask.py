"""The summary mask as first written: every rule over the rows' separate side channels (doc, segment, track,
bar, position, ...), with a table gather for the fine bars. ``meloformer.masks`` packs these into one code per
position; tests check that both give the same mask on real rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.attention.flex_attention import and_masks, or_masks

from meloformer.masks import ATTENTION_VARIANTS, DEFAULT_FINE_BARS, MaskMod
from meloformer.row_layout import RowLayout


def reference_mask_mod(
    rows: RowLayout,
    fine_bars: Sequence[int] = DEFAULT_FINE_BARS,
    cross_window: int = 1,
    kind_sparsity: bool = False,
    attention: str = "summary",
    token_window: int = 1024,
) -> MaskMod:
    """The mask of one attention variant for the rows of ``rows`` (query and key index the same row).

    ``summary`` is the full mask of docs/design.md section 4 (SR, SS, RS and RR); ``window`` replaces its RR and
    RS rules by 128-token chunks of the document. The two ablations use rows without
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
    # The window variant's chunk of every position: its position counted from its document's first token.
    docs = [(b, d) for b in range(doc.shape[0]) for d in doc[b, :n].unique().tolist()]
    first = {(b, d): int(pos[b, :n][doc[b, :n] == d].min()) for b, d in docs}
    start = torch.tensor([[first.get((b, d), 0) for d in row.tolist()] for b, row in enumerate(doc)])
    chunk = (pos - start) // 128
    recent = token_window // 128

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

    def rs_before_window(b, h, q, kv):
        """A regular token sees the slot of every segment that ended before the chunks of its window."""
        return (q < n) & (kv >= n) & (chunk[b, q] - chunk[b, kv] >= recent)

    def rr_window(b, h, q, kv):
        """A regular token sees the regular tokens of the last ``token_window`` / 128 chunks of its document."""
        return (kv < n) & (chunk[b, q] - chunk[b, kv] < recent)

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
    window = or_masks(sr, ss, rs_before_window, and_masks(rr_causal, or_masks(rr_same_segment, rr_window)))
    visible = {"summary": or_masks(sr, ss, rs, rr), "window": window, "causal": rr_causal, "local": rr}[attention]
    return or_masks(itself, and_masks(same_doc, visible))
