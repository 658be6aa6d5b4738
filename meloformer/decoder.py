"""KV-cached incremental decoding (docs/design.md section 8), the core that sampling and the CLI build on.

Regular tokens are appended one at a time. When a new token closes a segment (it is ``Bar``, ``Track`` or
``EOS``), that segment's summary slot is computed once, through the model's own blocks, from the cached
keys and values of its tokens and of earlier slots; its keys and values join the cache, and then the new
token goes through the blocks and can see it. Each layer's ``KVCache`` holds the regular tokens at entries
``[0, capacity)`` and the summary slots after them. The side channels grow with the tokens
(``GrowingRowLayout``, equal to ``row_layout`` of the tokens so far), and each query's mask row is the
model's own ``mask_mod`` evaluated for that one query, so the logits equal those of a full forward on the
same tokens. A step costs O(context): copying the side channels out, one mask row and one attention row per
layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from meloformer.masks import dense_mask
from meloformer.model import AttentionContext, KVCache, MeloFormer, rope_angles
from meloformer.row_layout import GrowingRowLayout, RowLayout


def open_last_segment(rows: RowLayout) -> RowLayout:
    """``rows`` with the segment holding each row's last token still open: its slot unused (doc -1), since
    while decoding a summary exists only once the next token has closed its segment."""
    last = rows.num_regular - 1
    return rows.with_dead_slots(rows.pos[:, last + 1 :] == last)


class IncrementalDecoder:
    """Decode a batch of equally long rows, each one piece, with a KV cache.

    ``prefill(prompt)`` runs a full forward on ``[B, n]`` prompt tokens and fills the cache; ``step(token)``
    appends one token ``[B]`` per row and returns the logits ``[B, vocab]`` for the next one. ``capacity``
    bounds the row length (default: the model's ``max_seq_len``); summary-slot storage grows as needed.
    """

    def __init__(self, model: MeloFormer, capacity: int | None = None, backend: str = "sdpa") -> None:
        self.model = model
        self.capacity = capacity or model.config.max_seq_len
        # The prefill's full forward: sdpa by default, since every new prompt length would compile flex anew.
        self.backend = backend
        self.length = 0

    @property
    def tokens(self) -> np.ndarray:
        """The tokens so far, ``[B, length]``."""
        return self._tokens[:, : self.length]

    @property
    def _slot_capacity(self) -> int:
        return self.caches[0].size - self.capacity

    def _allocate(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        c = self.model.config
        size = self.capacity + c.summary_slots
        self.caches = [KVCache.empty(c, batch, size, device, dtype) for _ in range(c.n_layer)]
        self.slots = torch.zeros(batch, dtype=torch.long, device=device)  # closed summaries per row
        self._tokens = np.zeros((batch, self.capacity), dtype=np.int64)

    def _reserve_slots(self, needed: int) -> None:
        """Double the slot storage until ``needed`` slots fit."""
        have = self._slot_capacity
        if needed > have:
            for cache in self.caches:
                cache.grow(self.capacity + max(needed, 2 * have))

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        """Full forward on ``prompt`` ``[B, n]``, returning its logits; caches its tokens and closed segments."""
        batch, n = prompt.shape
        if n > self.capacity:
            raise ValueError(f"prompt of {n} tokens exceeds the decoder capacity {self.capacity}")
        self._allocate(batch, prompt.device, next(self.model.parameters()).dtype)
        self._tokens[:, :n] = prompt.cpu().numpy()
        self.layout = GrowingRowLayout(
            self.model.kinds.cpu().numpy(), batch, self.capacity, self.model.mask_rules.with_slots
        )
        self.layout.extend(self._tokens[:, :n])
        ctx = self.model.prepare(prompt, backend=self.backend, rows=self.layout.rows())
        rows = ctx.rows
        self._reserve_slots(rows.num_slots)
        write = torch.cat([torch.arange(n), self.capacity + torch.arange(rows.num_slots)]).to(prompt.device)
        logits = self.model(prompt, ctx=dataclasses.replace(ctx, write=write.expand(batch, -1)), caches=self.caches)
        # Slots are ordered by segment end; the one ending at the last token is still open (rewritten on closing).
        self.slots = ((rows.doc[:, n:] >= 0) & (rows.pos[:, n:] < n - 1)).sum(1)
        self.length = n
        return logits

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Append ``token`` ``[B]`` and return the logits ``[B, vocab]`` that follow it."""
        p = self.length
        if p >= self.capacity:
            raise ValueError(f"decoder capacity {self.capacity} reached")
        self._tokens[:, p] = token.cpu().numpy()
        self._reserve_slots(int(self.slots.max()) + 2)
        self.layout.append(self._tokens[:, p])
        rows = open_last_segment(self.layout.rows(min_slots=self._slot_capacity)).to(self.slots.device)
        closing = (rows.doc[:, p + 1 :] >= 0).sum(1) > self.slots
        if bool(closing.any()):
            self._summarise(rows, closing)
        self.length = p + 1
        return self._regular(rows, token.to(self.slots.device))

    def _summarise(self, rows: RowLayout, closing: Tensor) -> None:
        """Compute the summary slot of the segment each ``closing`` row just closed, through every block.

        Rows that did not close a segment compute a throwaway slot at their next (unused) index, which
        sees only itself and is overwritten when that row closes its segment.
        """
        n, slot = rows.num_regular, self.slots
        batch = torch.arange(rows.batch_size, device=slot.device)
        tokens = torch.from_numpy(self._tokens[:, :n]).to(slot.device)
        x = self.model.embed_slots(tokens, rows)[batch, slot][:, None]
        # Its segment's tokens are all cached; the new token (at n - 1) is not part of it.
        ctx = self._context(rows, (n + slot)[:, None], (self.capacity + slot)[:, None], n - 1, int(slot.max()) + 1)
        self.model.forward_embeddings(x, ctx, self.caches)
        self.slots = torch.where(closing, slot + 1, slot)

    def _regular(self, rows: RowLayout, token: Tensor) -> Tensor:
        """Run the newest token (at ``length - 1``) through every block; return its logits."""
        p = rows.num_regular - 1
        x = self.model.embed_tokens(token[:, None], rows.track_token[:, p : p + 1])
        at = torch.full((rows.batch_size, 1), p, device=token.device)
        ctx = self._context(rows, at, at, p + 1, int(self.slots.max()))
        return self.model.logits(self.model.forward_embeddings(x, ctx, self.caches))[:, 0]

    def _context(self, rows: RowLayout, query: Tensor, write: Tensor, n_regular: int, n_slots: int) -> AttentionContext:
        """One query per row (row index ``query`` ``[B, 1]``, stored at cache entry ``write``) that attends to the
        cached regular tokens ``[0, n_regular)`` and slots ``[0, n_slots)`` under its row of the model's mask."""
        c, n = self.model.config, rows.num_regular
        regular, slots = torch.arange(n_regular, device=query.device), torch.arange(n_slots, device=query.device)
        mask = dense_mask(self.model.mask_mod(rows), rows.batch_size, query, torch.cat([regular, n + slots]))
        cos, sin = rope_angles(rows.pos.gather(1, query), c.head_dim, c.rope_base)
        read = ((0, n_regular), (self.capacity, self.capacity + n_slots))
        return AttentionContext(rows, mask, cos, sin, write=write, read=read)
