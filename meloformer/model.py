"""The MeloFormer transformer: summary-token attention (docs/design.md sections 4 and 5) in plain PyTorch.

Each row is ``L`` regular tokens followed by ``S`` summary slots (one per bar segment, see ``masks``). Every
layer runs one attention over both under the summary mask, so slots summarise their segment and regular
tokens read earlier segments through them. Pre-norm RMSNorm, rotary embedding over logical positions (a
slot sits at its segment's end), SwiGLU, grouped-query attention, output head tied to the token embedding,
a track/program embedding, no biases.

Backends: ``flex`` runs compiled ``flex_attention`` with a per-batch ``BlockMask``; ``sdpa`` runs
``scaled_dot_product_attention`` block-sparsely, over only the tiles of the same mask that hold a visible
pair (CPU training: torch 2.13 has no FlexAttention backward on CPU, and this path trains faster than both
the dense mask and plain causal attention). ``auto`` takes ``sdpa`` on CPU when gradients are enabled and
``flex`` otherwise. A dense boolean mask (``prepare(backend="dense")``) is the reference of the tests.

Decoding (``meloformer.decoder``) runs the same blocks with one ``KVCache`` per layer: attention writes
its new keys and values there and, for a decoding step, attends over the cached ones (litgpt's
``input_pos`` pattern); the step's ``AttentionContext`` says where to write and what to read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from meloformer.arith import ceil_div
from meloformer.files import verify_checksums
from meloformer.hid import TRACK_CONDUCTOR, HIDTokenizer
from meloformer.masks import (
    DEFAULT_FINE_BARS,
    BlockSparseMask,
    MaskPlan,
    MaskRules,
    PlannedMask,
    attention_mask,
    check_mask_settings,
    flex_block_size,
)
from meloformer.row_layout import RowLayout, row_layout

# Compiled once for the process: the eager flex_attention materialises the whole score matrix.
compiled_flex_attention = torch.compile(flex_attention, dynamic=False)

Backend = Literal["auto", "flex", "sdpa"]
AttentionVariant = Literal["summary", "window", "causal", "local"]
SlotInput = Literal["learned", "segment_mean"]
Checkpointing = Literal["none", "ffn", "block"]
DEFAULT_VOCAB_SIZE = HIDTokenizer().vocab_size
NUM_TRACK_EMBEDDINGS = 1 + 2 + 128  # none, conductor, drums, 128 programs
# The card ``save_pretrained``/``push_to_hub`` write where a folder has none (``meloformer export`` writes its own).
MODEL_CARD = """---
{{ card_data }}
---

# MeloFormer model

A symbolic-music transformer (MeloFormer, HID tokens). `config.json` holds the model configuration and,
under `tokenizer`, the tokenizer settings.

```python
from meloformer.model import MeloFormer
model = MeloFormer.from_pretrained("THIS_FOLDER_OR_HUB_ID")
```

```bash
meloformer generate --ckpt_path THIS_FOLDER_OR_HUB_ID --out samples
```
"""


@dataclasses.dataclass
class MeloFormerConfig:
    """The architecture: what the weights mean. Checkpoints and model folders store it, and a resume must match
    it (``RuntimeConfig`` holds how the model runs, which may change at any time)."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    n_layer: int = 6
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 256
    ffn_hidden: int | None = None  # SwiGLU width; default 8/3 n_embd rounded up to a multiple of 64
    max_seq_len: int = 2048
    summary_slots: int = 256  # slots per row; a batch with more segments rounds up to a multiple of 128
    fine_bars: tuple[int, ...] = DEFAULT_FINE_BARS
    cross_window: int = 1
    kind_sparsity: bool = False
    attention: AttentionVariant = "summary"  # summary | window | causal | local (the last two: no slots; ablations)
    token_window: int = 1024  # window: the recent tokens a token sees one by one (a multiple of 128)
    slot_input: SlotInput = "learned"  # a slot's input; segment_mean adds the mean embedding of its segment's tokens
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            self.ffn_hidden = ceil_div(8 * self.n_embd // 3, 64) * 64
        self.fine_bars = tuple(self.fine_bars)
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must divide into n_head heads, and n_head into n_kv_head groups")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("rotary embedding needs an even head size")
        check_mask_settings(self.fine_bars, self.attention, self.token_window, self.kind_sparsity)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_size(cls, name: str, **overrides) -> MeloFormerConfig:
        """One of ``SIZES`` (small, base, large, xlarge), with any field overridden.

        A new ``n_embd`` without an ``ffn_hidden`` gets the default width of its own (8/3 n_embd), not the
        size's."""
        if name not in SIZES:
            raise ValueError(f"unknown size {name!r}; choose from {sorted(SIZES)}")
        if "n_embd" in overrides:
            overrides.setdefault("ffn_hidden", None)  # None: computed from n_embd in __post_init__
        return dataclasses.replace(SIZES[name], **overrides)

    @classmethod
    def from_stored(cls, stored: dict) -> MeloFormerConfig:
        """The configuration a checkpoint or model folder stores. Fields added since it was saved take their
        defaults, which keep the behaviour it was trained with (``slot_input: learned``); one without an
        ``attention`` field was trained with ``summary``, the default of its time. The run-time knobs that older
        ones stored among these fields are dropped."""
        unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS))
        if unknown:
            raise ValueError(f"unknown model fields {', '.join(unknown)} (made by a newer MeloFormer?)")
        return cls(**{"attention": "summary"} | {k: v for k, v in stored.items() if k not in RUNTIME_FIELDS})


@dataclasses.dataclass
class RuntimeConfig:
    """How the model runs, not what it computes: free to change at any time, also between a checkpoint and its
    resume (a smaller GPU with checkpointing on, CPU ``sdpa`` to GPU ``flex``). Never stored with the weights."""

    attention_backend: Backend = "auto"
    flex_block_size: int | None = None  # None: 128 on CUDA, 32 on CPU (sparser tiles, measured faster)
    gradient_checkpointing: Checkpointing = "none"


RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(RuntimeConfig))
# What attention sees, not what the weights are: a model may be fine-tuned under other rules than it was trained.
MASK_FIELDS = ("fine_bars", "cross_window", "kind_sparsity", "attention", "token_window")


# The original's sizes (17M, 85M, 200M, 450M parameters): head size 64, 4 query heads per key/value head.
SIZES: dict[str, MeloFormerConfig] = {
    "small": MeloFormerConfig(n_layer=6, n_head=8, n_kv_head=2, n_embd=512, max_seq_len=2048, summary_slots=256),
    "base": MeloFormerConfig(n_layer=14, n_head=12, n_kv_head=3, n_embd=768, max_seq_len=4096, summary_slots=512),
    "large": MeloFormerConfig(n_layer=18, n_head=16, n_kv_head=4, n_embd=1024, max_seq_len=8192, summary_slots=1024),
    "xlarge": MeloFormerConfig(n_layer=18, n_head=24, n_kv_head=6, n_embd=1536, max_seq_len=16384, summary_slots=2048),
}


def parameter_counts(vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict[str, int]:
    """Real parameter count of every size (built on the meta device, so nothing is allocated)."""
    counts = {}
    kinds = np.zeros(vocab_size, dtype=np.int64)  # the kind table holds no parameters
    for name in SIZES:
        with torch.device("meta"):
            model = MeloFormer(MeloFormerConfig.from_size(name, vocab_size=vocab_size), kinds)
        counts[name] = model.num_parameters()
    return counts


def track_embedding_index(track_token: Tensor) -> Tensor:
    """``Track`` token id -> row of the track embedding (0 where a token has no track)."""
    return torch.where(track_token > 0, track_token - TRACK_CONDUCTOR + 1, 0)


def segment_mean(x: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """Mean of ``x`` ``[B, L, d]`` over the tokens of each segment (``segment`` ``[B, L]``, -1 outside one):
    ``[B, num_segments, d]``, zero for a segment without tokens."""
    index = torch.where(segment >= 0, segment, num_segments).long()  # tokens outside a segment: a spare row
    sums = x.new_zeros(x.shape[0], num_segments + 1, x.shape[2]).scatter_add(1, index[..., None].expand_as(x), x)
    counts = x.new_zeros(x.shape[0], num_segments + 1).scatter_add(1, index, torch.ones_like(x[..., 0]))
    return (sums / counts.clamp(min=1)[..., None])[:, :num_segments]


def rope_angles(pos: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin ``[B, 1, T, head_dim / 2]`` for logical positions ``pos`` ``[B, T]``."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64) / head_dim)
    angles = pos.to(torch.float64)[:, None, :, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_i, x_{i + d/2}) of ``x`` ``[B, H, T, d]`` by its angle: q.k depends on p_q - p_k."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@torch.compiler.disable  # its calls' shapes change with every batch: a compiled model runs it eagerly
def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: BlockSparseMask) -> Tensor:
    """SDPA over only the tiles of ``mask`` that hold a visible pair: gather, one call per group, scatter."""
    batch, heads, t, d = q.shape
    kv_heads, bq, bk = k.shape[1], mask.query_block, mask.key_block
    n_queries, n_keys = ceil_div(t, bq), ceil_div(t, bk)
    q = F.pad(q, (0, 0, 0, n_queries * bq - t)).view(batch, heads, n_queries, bq, d).transpose(1, 2)
    q = q.reshape(batch * n_queries, heads, bq, d)
    k, v = (
        F.pad(x, (0, 0, 0, n_keys * bk - t)).view(batch, kv_heads, n_keys, bk, d).transpose(1, 2).flatten(0, 1)
        for x in (k, v)
    )
    # One gather per tensor for all calls, so the backward scatters into one gradient, not one per call.
    queries = q[torch.cat([call.query for call in mask.calls])].split([len(call.query) for call in mask.calls])
    index, sizes = torch.cat([call.keys.flatten() for call in mask.calls]), [call.keys.numel() for call in mask.calls]
    keys, values = k[index].split(sizes), v[index].split(sizes)
    out = []
    for call, q_, k_, v_ in zip(mask.calls, queries, keys, values):
        g, m = call.keys.shape
        k_, v_ = (x.view(g, m, kv_heads, bk, d).transpose(1, 2).flatten(2, 3) for x in (k_, v_))
        out.append(F.scaled_dot_product_attention(q_, k_, v_, attn_mask=call.mask, enable_gqa=heads != kv_heads))
    y = torch.cat(out)[mask.order].view(batch, n_queries, heads, bq, d).transpose(1, 2)
    return y.reshape(batch, heads, n_queries * bq, d)[:, :, :t]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask | BlockSparseMask | Tensor) -> Tensor:
    """Masked attention ``[B, H, Tq, d]``: a ``BlockMask`` runs compiled flex, the others SDPA."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        return compiled_flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return block_sparse_attention(q, k, v, mask)


@dataclasses.dataclass
class AttentionContext:
    """Everything the layers share for one call: side channels, the mask (built once) and rotary angles.

    With KV caches (decoding), each query's keys and values go to cache entry ``write`` ``[B, T]``; a
    decoding step then attends over the cache spans ``read``, ``(start, stop)`` pairs in order (its mask
    covers their entries), while a prefill (``read`` None) attends over its own keys as usual.
    """

    rows: RowLayout
    mask: BlockMask | BlockSparseMask | Tensor
    cos: Tensor
    sin: Tensor
    write: Tensor | None = None
    read: tuple[tuple[int, int], ...] | None = None


@dataclasses.dataclass
class KVCache:
    """One layer's keys and values while decoding, ``[B, H_kv, size, d]``; the decoder decides which token or
    summary slot each entry holds (``meloformer.decoder``)."""

    k: Tensor
    v: Tensor

    @classmethod
    def empty(
        cls, config: MeloFormerConfig, batch: int, size: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        k = torch.zeros(batch, config.n_kv_head, size, config.head_dim, device=device, dtype=dtype)
        return cls(k, torch.zeros_like(k))

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def grow(self, size: int) -> None:
        """Add empty entries at the end until it holds ``size``."""
        self.k, self.v = (F.pad(t, (0, 0, 0, size - self.size)) for t in (self.k, self.v))

    def update(self, k: Tensor, v: Tensor, ctx: AttentionContext) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` ``[B, H_kv, T, d]`` at ``ctx.write``; return the keys and values to attend over."""
        index = ctx.write[:, None, :, None].expand_as(k)
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        if ctx.read is None:
            return k, v
        # Slices and one cat: several times faster than an index_select of the same entries on CPU.
        return tuple(torch.cat([t[:, :, start:stop] for start, stop in ctx.read], dim=2) for t in (self.k, self.v))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: MeloFormerConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor, ctx: AttentionContext, cache: KVCache | None = None) -> Tensor:
        """Attention of ``x`` ``[B, T, n_embd]`` under ``ctx``; with a ``cache``, through it (see ``KVCache``)."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = apply_rope(q.view(b, t, self.n_head, self.head_dim).transpose(1, 2), ctx.cos, ctx.sin)
        k = apply_rope(k.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2), ctx.cos, ctx.sin)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, ctx)
        y = attend(q, k, v, ctx.mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: MeloFormerConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: MeloFormerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn = FeedForward(config)

    def feed_forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(self.ffn_norm(x))

    def forward(
        self, x: Tensor, ctx: AttentionContext, cache: KVCache | None = None, checkpoint_ffn: bool = False
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), ctx, cache)
        if checkpoint_ffn:
            return checkpoint(self.feed_forward, x, use_reentrant=False)
        return self.feed_forward(x)


class MeloFormer(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="meloformer",
    license="mit",
    tags=["symbolic-music", "midi", "music-generation", "meloformer"],
    model_card_template=MODEL_CARD,
):
    """The network of ``config`` for the tokenizer whose kind table is ``kinds`` (``HIDTokenizer.kinds``).

    ``runtime`` (default: ``RuntimeConfig()``) may be replaced or changed at any time.

    The side channels (tracks, bars, segments) are read off the token ids through ``kinds``, so the model
    keeps it as a non-persistent buffer: it follows the model across devices but stays out of state dicts.
    huggingface_hub's ``from_pretrained(folder_or_hub_id)``, ``save_pretrained`` and ``push_to_hub`` read and
    write model folders: ``config.json`` holds every config field and, under ``tokenizer``, the tokenizer
    settings that the kind table is rebuilt from (``meloformer.pretrained``).
    """

    def __init__(
        self, config: MeloFormerConfig, kinds: np.ndarray | Tensor, runtime: RuntimeConfig | None = None
    ) -> None:
        super().__init__()
        if len(kinds) != config.vocab_size:
            raise ValueError(f"the kind table has {len(kinds)} entries but vocab_size is {config.vocab_size}")
        self.config = config
        self.runtime = runtime or RuntimeConfig()
        self.register_buffer("kinds", torch.as_tensor(np.asarray(kinds), dtype=torch.long), persistent=False)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.track_emb = nn.Embedding(NUM_TRACK_EMBEDDINGS, config.n_embd)
        self.summary_emb = nn.Parameter(torch.empty(config.n_embd))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.reset_parameters()

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        config: MeloFormerConfig | dict[str, Any],
        kinds: np.ndarray | Tensor | None = None,
        map_location: str = "cpu",
        strict: bool = True,
        **hub: Any,
    ) -> MeloFormer:
        """``from_pretrained``'s loader. ``config`` is ``config.json`` as read (the mixin cannot decode it: the
        annotations are postponed); the kind table comes from its tokenizer settings. Weights load strictly,
        and the stored config (tokenizer settings included) is what ``save_pretrained`` writes back."""
        if Path(model_id).is_dir():  # a folder that export wrote: its files must be the ones it wrote
            verify_checksums(model_id)
        settings: dict[str, Any] = {}
        if isinstance(config, dict):
            settings = config.get("tokenizer", {})
            config = MeloFormerConfig.from_stored({k: v for k, v in config.items() if k != "tokenizer"})
        if kinds is None:
            kinds = HIDTokenizer(**settings).kinds
        with contextlib.redirect_stdout(io.StringIO()):  # the mixin prints "Loading weights from local directory"
            model = super()._from_pretrained(
                model_id=model_id, config=config, kinds=kinds, map_location=map_location, strict=strict, **hub
            )
        model._hub_mixin_config = {**dataclasses.asdict(config), "tokenizer": settings}
        return model

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        (save_directory / "model.safetensors").chmod(0o644)  # safetensors writes it owner-only (0600)

    @property
    def tokenizer_settings(self) -> dict[str, Any]:
        """The HID tokenizer settings stored with the model (``from_pretrained``); {} for the defaults."""
        stored = self._hub_mixin_config
        return dict(stored.get("tokenizer", {})) if isinstance(stored, dict) else {}

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual outputs scaled down by sqrt(2 n_layer) as in GPT-2."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.ndim == 1 and name != "summary_emb":
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ per-batch preparation
    def backend(self, device: torch.device) -> str:
        """The attention backend this call uses; ``auto`` avoids flex where it has no backward (CPU)."""
        backend = self.runtime.attention_backend
        if backend == "auto":
            return "sdpa" if device.type == "cpu" and torch.is_grad_enabled() else "flex"
        if backend not in ("flex", "sdpa"):
            raise ValueError(f"attention_backend must be auto, flex or sdpa, got {backend!r}")
        return backend

    @property
    def mask_rules(self) -> MaskRules:
        c = self.config
        return MaskRules(c.fine_bars, c.cross_window, c.kind_sparsity, c.attention, c.token_window)

    def mask_mod(self, rows: RowLayout):
        return self.mask_rules.mask_mod(rows)

    def row_layout(self, tokens: Tensor, min_slots: int | None = None) -> RowLayout:
        """Side channels of a batch with ``summary_slots`` slots (more, rounded up to 128, if needed)."""
        min_slots = self.config.summary_slots if min_slots is None else min_slots
        return row_layout(tokens, self.kinds, min_slots, self.mask_rules.with_slots).to(tokens.device)

    def mask_plan(self, backend: str) -> MaskPlan:
        """What the DataLoader workers compute for each batch so the step builds nothing (``masks.MaskPlan``)."""
        block_size = self.runtime.flex_block_size or flex_block_size("cuda" if backend == "flex" else "cpu")
        kinds = self.kinds.cpu().numpy()
        return MaskPlan(kinds, self.mask_rules, self.config.summary_slots, backend, block_size)

    def prepare(
        self,
        tokens: Tensor,
        backend: str | None = None,
        rows: RowLayout | None = None,
        planned: PlannedMask | None = None,
    ) -> AttentionContext:
        """Side channels, mask and rotary angles for a batch: built once, shared by every layer.

        ``rows`` are side channels computed beforehand, and ``planned`` the mask the DataLoader workers built
        for them (``mask_plan``); used when it is for this call's backend, so the step then builds no mask.
        By default everything is computed here from ``tokens``.
        """
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{tokens.shape[1]} tokens exceed max_seq_len={self.config.max_seq_len}")
        if rows is None:
            rows = self.row_layout(tokens)
        elif rows.num_slots and not self.mask_rules.with_slots:  # rows made for summary attention
            rows, planned = rows.without_slots().to(tokens.device), None
        else:
            rows = rows.to(tokens.device)
        backend = backend or (planned.backend if planned is not None else self.backend(tokens.device))
        mask_mod = self.mask_mod(rows)
        if planned is not None and planned.backend == backend:
            mask = planned.mask(mask_mod)
        else:
            mask = attention_mask(mask_mod, rows, backend, self.runtime.flex_block_size, self.mask_rules.runs)
        cos, sin = rope_angles(rows.pos, self.config.head_dim, self.config.rope_base)
        return AttentionContext(rows, mask, cos, sin)

    # ------------------------------------------------------------------ forward
    def embed_tokens(self, tokens: Tensor, track_token: Tensor) -> Tensor:
        return self.tok_emb(tokens) + self.track_emb(track_embedding_index(track_token))

    def embed_slots(self, tokens: Tensor, rows: RowLayout) -> Tensor:
        """The slots' inputs ``[B, S, n_embd]``: the learned summary vector plus the segment's track/program
        embedding, and with ``slot_input: segment_mean`` the mean embedding of the segment's tokens.

        With ``learned`` a slot holds no content in the first layer (it gathers its segment there), so the
        tokens that read it get its bar one layer late. The segment mean is causal: only queries after the
        segment's end see a slot.
        """
        n = rows.num_regular
        x = self.summary_emb + self.track_emb(track_embedding_index(rows.track_token[:, n:]))
        if self.config.slot_input == "segment_mean":
            x = x + segment_mean(self.tok_emb(tokens), rows.segment[:, :n], rows.num_slots)
        return x

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(self.norm(x), self.tok_emb.weight)

    def forward(
        self,
        tokens: Tensor,
        ctx: AttentionContext | None = None,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        """Logits ``[B, L, vocab]`` of the regular tokens ``[B, L]``.

        ``ctx`` reuses a prepared batch; ``caches`` (one per layer, with ``ctx.write`` set) receive every
        layer's keys and values of the whole row, which is how a decoder's prefill fills them.
        """
        if ctx is None:
            ctx = self.prepare(tokens)
        n = tokens.shape[1]
        track_token = ctx.rows.track_token
        x = torch.cat([self.embed_tokens(tokens, track_token[:, :n]), self.embed_slots(tokens, ctx.rows)], dim=1)
        return self.logits(self.forward_embeddings(x, ctx, caches)[:, :n])

    def forward_embeddings(self, x: Tensor, ctx: AttentionContext, caches: list[KVCache] | None = None) -> Tensor:
        """Every block on embeddings ``x`` ``[B, T, n_embd]``: the hidden states before the final norm.

        A checkpointed block that recomputes in backward writes the same keys and values to the same cache
        entries again, so checkpointing and caches combine.
        """
        mode = self.runtime.gradient_checkpointing if torch.is_grad_enabled() else "none"
        for layer, block in enumerate(self.blocks):
            cache = None if caches is None else caches[layer]
            if mode == "block":
                x = checkpoint(block, x, ctx, cache, use_reentrant=False)
            else:
                x = block(x, ctx, cache, checkpoint_ffn=mode == "ffn")
        return x
