"""KV-cached incremental decoding (docs/design.md section 8), the core that sampling and the CLI build on.

Regular tokens are appended one at a time. When a new token closes a segment (it is ``Bar``, ``Track`` or
``EOS``), that segment's summary slot is computed once, layer by layer, from the cached keys and values of
its tokens and of earlier slots; its keys and values join the cache, and then the new token is processed
and can see it. Side channels come from ``meloformer.layout.layout`` on the tokens so far (through
``row_layout``), and each query's mask row is the model's own ``mask_mod`` evaluated for that one query, so
the logits equal those of a full forward on the same tokens. A step costs O(context): one layout pass,
one mask row and one attention row per layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from meloformer.masks import RowLayout, dense_mask
from meloformer.model import MeloFormer, rope_angles


def open_last_segment(rows: RowLayout) -> RowLayout:
    """``rows`` with the segment holding each row's last token still open: its slot unused (doc -1), since
    while decoding a summary exists only once the next token has closed its segment."""
    last = rows.num_regular - 1
    slot_doc = torch.where(rows.pos[:, last + 1 :] == last, -1, rows.doc[:, last + 1 :])
    return dataclasses.replace(rows, doc=torch.cat([rows.doc[:, : last + 1], slot_doc], dim=1))


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

    def _allocate(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        c = self.model.config
        shape = (c.n_layer, batch, c.n_kv_head, self.capacity, c.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        slot_shape = shape[:3] + (c.summary_slots, c.head_dim)
        self.slot_k = torch.zeros(slot_shape, device=device, dtype=dtype)
        self.slot_v = torch.zeros_like(self.slot_k)
        self.slots = torch.zeros(batch, dtype=torch.long, device=device)  # closed summaries per row
        self._tokens = np.zeros((batch, self.capacity), dtype=np.int64)

    def _reserve_slots(self, needed: int) -> None:
        """Double the slot storage until ``needed`` slots fit."""
        have = self.slot_k.shape[3]
        if needed <= have:
            return
        grow = max(needed, 2 * have) - have
        self.slot_k, self.slot_v = (F.pad(t, (0, 0, 0, grow)) for t in (self.slot_k, self.slot_v))

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        """Full forward on ``prompt`` ``[B, n]``, returning its logits; caches its tokens and closed segments."""
        batch, n = prompt.shape
        if n > self.capacity:
            raise ValueError(f"prompt of {n} tokens exceeds the decoder capacity {self.capacity}")
        self._allocate(batch, prompt.device, next(self.model.parameters()).dtype)
        self._tokens[:, :n] = prompt.cpu().numpy()
        ctx = self.model.prepare(prompt, backend=self.backend)
        kv: list[tuple[Tensor, Tensor]] = []
        logits = self.model(prompt, ctx=ctx, kv=kv)
        rows = ctx.rows
        # Slots are ordered by segment end; the one ending at the last token is still open (not cached).
        self.slots = ((rows.doc[:, n:] >= 0) & (rows.pos[:, n:] < n - 1)).sum(1)
        self._reserve_slots(rows.num_slots)
        for layer, (k, v) in enumerate(kv):
            self.k[layer, :, :, :n], self.v[layer, :, :, :n] = k[:, :, :n], v[:, :, :n]
            self.slot_k[layer, :, :, : rows.num_slots] = k[:, :, n:]
            self.slot_v[layer, :, :, : rows.num_slots] = v[:, :, n:]
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
        rows = self.model.row_layout(torch.from_numpy(self._tokens[:, : p + 1]), min_slots=self.slot_k.shape[3])
        rows = open_last_segment(rows).to(self.k.device)
        closing = (rows.doc[:, p + 1 :] >= 0).sum(1) > self.slots
        if bool(closing.any()):
            self._summarise(rows, closing)
        self.length = p + 1
        return self._regular(rows, token.to(self.k.device))

    def _summarise(self, rows: RowLayout, closing: Tensor) -> None:
        """Compute the summary slot of the segment each ``closing`` row just closed, through every layer.

        Rows that did not close a segment compute a throwaway slot at their next (unused) index, which
        sees only itself and is overwritten when that row closes its segment.
        """
        n, slot = rows.num_regular, self.slots
        batch = torch.arange(rows.batch_size, device=slot.device)
        x = self.model.embed_slots(rows.track_token[batch, n + slot])[:, None]

        def write(layer: int, k: Tensor, v: Tensor) -> None:
            self.slot_k[layer, batch, :, slot], self.slot_v[layer, batch, :, slot] = k[:, :, 0], v[:, :, 0]

        # Its segment's tokens are all cached; the new token (at n - 1) is not part of it.
        self._layers(x, rows, (n + slot)[:, None], n - 1, int(slot.max()) + 1, write)
        self.slots = torch.where(closing, slot + 1, slot)

    def _regular(self, rows: RowLayout, token: Tensor) -> Tensor:
        """Run the newest token (at ``length - 1``) through every layer; return its logits."""
        n = rows.num_regular
        p = n - 1
        x = self.model.embed_tokens(token[:, None], rows.track_token[:, p : p + 1])

        def write(layer: int, k: Tensor, v: Tensor) -> None:
            self.k[layer, :, :, p : p + 1], self.v[layer, :, :, p : p + 1] = k, v

        x = self._layers(x, rows, torch.full((1,), p, device=token.device), n, int(self.slots.max()), write)
        return self.model.logits(x)[:, 0]

    def _layers(self, x: Tensor, rows: RowLayout, q_idx: Tensor, n_regular: int, n_slots: int, write) -> Tensor:
        """One query per row (``x`` ``[B, 1, d]``, row index ``q_idx``) through every block.

        It attends to the cached regular tokens ``[0, n_regular)`` and slots ``[0, n_slots)`` under its row of
        the model's mask; ``write`` stores its own keys and values in the cache first.
        """
        model = self.model
        n = rows.num_regular
        kv_idx = torch.cat([torch.arange(n_regular), n + torch.arange(n_slots)]).to(x.device)
        mask = dense_mask(model.mask_mod(rows), rows.batch_size, q_idx, kv_idx)
        pos = rows.pos.gather(1, q_idx.expand(rows.batch_size, 1))
        cos, sin = rope_angles(pos, model.config.head_dim, model.config.rope_base)
        for layer, block in enumerate(model.blocks):
            q, k, v = block.attn.qkv_heads(block.attn_norm(x), cos, sin)
            write(layer, k, v)
            keys = torch.cat([self.k[layer, :, :, :n_regular], self.slot_k[layer, :, :, :n_slots]], dim=2)
            values = torch.cat([self.v[layer, :, :, :n_regular], self.slot_v[layer, :, :, :n_slots]], dim=2)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
            x = block.feed_forward(x + block.attn.output(y))
        return x
