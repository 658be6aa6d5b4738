"""Training throughput on CPU: MeloFormer-small (summary attention, sdpa) vs a plain causal transformer, and
the DataLoader's rows/s against what the model consumes.

MeloFormer runs the ``sdpa`` backend's block-sparse attention with each ``--sparse`` grouping
(``QUERYxKEY`` block sizes; the model's default is 64x32) and, with ``--dense``, SDPA over the whole
dense mask. The layout comes from the DataLoader (``batch["layout"]``, as in training); ``--main-layout``
adds the first grouping with the layout computed in the step, as before it moved to the loader. Rows hold
``--summary-slots`` slots, by default one per 8 tokens as the configs use (256 at 2,048 tokens, 1,024 at
8,192). The table's "mask share" is the share of each MeloFormer step spent building its layout (when
computed in the step) and its mask.

The plain transformer has MeloFormer-small's width, depth, heads, SwiGLU width, RMSNorm, rotary embedding
and vocabulary, and attends with ``scaled_dot_product_attention(is_causal=True)`` over the same rows: the
price of summary attention is the difference.

A training step is forward + loss + backward + AdamW, on rows of the bundled demo corpus (``HIDDataModule``).
The models' steps alternate, so a busy machine slows them alike; the median step counts. Loader rows/s is
measured in the main process (no workers).

    python bench/train.py --threads 1 [--seq-len 2048] [--summary-slots 256] [--sparse 64x32 128x32] [--dense]

Goals: MeloFormer >= 0.9x the plain causal tokens/s at 2,048 tokens and >= 1.0x at 8,192; loader >= 10x the
rows/s the model consumes.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F
from common import add_common_arguments, print_header, set_threads, write_report
from torch import Tensor, nn

from meloformer.datamodules import HIDDataModule
from meloformer.hid import BOS, PAD
from meloformer.masks import RowLayout, block_sparse_mask, full_dense_mask
from meloformer.model import AttentionContext, MeloFormerConfig, apply_rope, rope_angles
from meloformer.module import MeloFormerModule


class PlainBlock(nn.Module):
    def __init__(self, c: MeloFormerConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.norm1, self.norm2 = nn.RMSNorm(c.n_embd, eps=c.norm_eps), nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.qkv = nn.Linear(c.n_embd, (c.n_head + 2 * c.n_kv_head) * c.head_dim, bias=False)
        self.proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        self.gate = nn.Linear(c.n_embd, c.ffn_hidden, bias=False)
        self.up = nn.Linear(c.n_embd, c.ffn_hidden, bias=False)
        self.down = nn.Linear(c.ffn_hidden, c.n_embd, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q, k, v = (y.view(b, t, -1, self.head_dim).transpose(1, 2) for y in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class PlainCausal(nn.Module):
    """A standard decoder-only transformer of the same shape as MeloFormer (no summary slots, no masks)."""

    def __init__(self, c: MeloFormerConfig) -> None:
        super().__init__()
        self.config = c
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(PlainBlock(c) for _ in range(c.n_layer))
        self.norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)

    def forward(self, tokens: Tensor) -> Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        cos, sin = rope_angles(pos, self.config.head_dim, self.config.rope_base)
        x = self.tok_emb(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return F.linear(self.norm(x), self.tok_emb.weight)


def plain_loss(model: PlainCausal, batch: dict[str, Tensor]) -> Tensor:
    tokens = batch["tokens"]
    targets = tokens[:, 1:]
    valid = (targets != PAD) & (targets != BOS)
    logits = model(tokens)[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~valid, -100))


def meloformer_loss(
    module: MeloFormerModule, batch: dict[str, Tensor], sparse: tuple[int, int] | None, loader_layout: bool
) -> tuple[Tensor, float]:
    """The module's training loss with the given attention mask, and the seconds spent building the layout
    (unless the loader built it) and the mask."""
    started = time.perf_counter()
    tokens, model, config = batch["tokens"], module.model, module.model.config
    rows = RowLayout.from_tensors(batch["layout"], tokens.shape[1]) if loader_layout else model.row_layout(tokens)
    mask_mod = model.mask_mod(rows)
    mask = full_dense_mask(mask_mod, rows) if sparse is None else block_sparse_mask(mask_mod, rows, *sparse)
    ctx = AttentionContext(rows, mask, *rope_angles(rows.pos, config.head_dim, config.rope_base))
    prepare = time.perf_counter() - started
    targets = tokens[:, 1:]
    valid = (targets != PAD) & (targets != BOS)
    logits = model(tokens, ctx=ctx)[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~valid, -100)), prepare


def timed_step(
    loss_fn, model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor]
) -> tuple[float, float]:
    """Seconds of one training step, and of its layout + mask building (0 for the plain model)."""
    started = time.perf_counter()
    loss = loss_fn(model, batch)
    loss, prepare = loss if isinstance(loss, tuple) else (loss, 0.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, prepare


def loader_rows_per_s(data: HIDDataModule, rows: int) -> float:
    """Rows/s of the training DataLoader (passes over the data repeat until ``rows`` rows were loaded)."""
    loaded, started = 0, time.perf_counter()
    while loaded < rows:
        for batch in data.train_dataloader():
            loaded += len(batch["tokens"])
            if loaded >= rows:
                break
    return loaded / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--summary-slots", type=int, default=None, help="default: seq-len / 8, as the configs")
    parser.add_argument("--sparse", nargs="*", default=["64x32"], help="block-sparse groupings QUERYxKEY")
    parser.add_argument("--dense", action="store_true", help="also time SDPA over the whole dense mask")
    parser.add_argument("--main-layout", action="store_true", help="also the first grouping without the layout "
                        "from the loader (computed in the step, as before)")  # fmt: skip
    parser.add_argument("--loader-rows", type=int, default=200)
    add_common_arguments(parser, "train")
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    L, B = args.seq_len, args.batch_size
    slots = args.summary_slots or L // 8

    module = MeloFormerModule(size="small", max_seq_len=L, summary_slots=slots, attention_backend="sdpa")
    config = module.config
    data = HIDDataModule(max_seq_len=L, max_segments=config.summary_slots, batch_size=B)
    data.prepare_data()
    data.setup("fit")
    batches = [batch for _, batch in zip(range(args.steps + 2), data.train_dataloader())]
    plain = PlainCausal(config)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    variants = {f"sparse {v}": (tuple(int(x) for x in v.split("x")), True) for v in args.sparse}
    if args.main_layout:
        variants[f"sparse {args.sparse[0]}, layout in step"] = (variants[f"sparse {args.sparse[0]}"][0], False)
    variants |= {"dense mask": (None, True)} if args.dense else {}
    runs = {
        f"meloformer {name}": (functools.partial(meloformer_loss, sparse=blocks, loader_layout=on), module, optimizer)
        for name, (blocks, on) in variants.items()
    }
    runs["plain_causal"] = (plain_loss, plain, torch.optim.AdamW(plain.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in runs}
    prepare_times: dict[str, list[float]] = {name: [] for name in runs}
    for i, batch in enumerate(batches):
        for name, (loss_fn, model, optimizer) in runs.items():
            seconds, prepare = timed_step(loss_fn, model, optimizer, batch)
            if i >= 2:
                times[name].append(seconds)
                prepare_times[name].append(prepare)

    step = {name: statistics.median(t) for name, t in times.items()}
    prepare_share = {name: statistics.median(p) / step[name] for name, p in prepare_times.items()}
    tokens_per_s = {name: B * L / s for name, s in step.items()}
    first = next(iter(runs))
    model_rows_per_s = B / step[first]
    loader = loader_rows_per_s(data, args.loader_rows)
    fill = float(torch.cat([batch["tokens"] for batch in batches]).ne(PAD).float().mean())
    result = {
        "seq_len": L,
        "batch_size": B,
        "summary_slots": config.summary_slots,
        "parameters": {
            **{name: sum(p.numel() for p in module.model.parameters()) for name in runs if name != "plain_causal"},
            "plain_causal": sum(p.numel() for p in plain.parameters()),
        },
        "row_fill": fill,
        "step_seconds": step,
        "step_seconds_all": times,
        "prepare_share": prepare_share,
        "tokens_per_s": tokens_per_s,
        "vs_plain": {name: tokens_per_s[name] / tokens_per_s["plain_causal"] for name in runs},
        "loader_rows_per_s": loader,
        "model_rows_per_s": model_rows_per_s,
        "loader_vs_model": loader / model_rows_per_s,
        "goals": {"vs_plain": 1.0 if L >= 8192 else 0.9, "loader_vs_model": 10.0},
    }
    print_header(f"training, rows of {L} tokens (+{config.summary_slots} summary slots), batch {B}, "
                 f"median of {args.steps} steps")  # fmt: skip
    print(f"{'model':40} {'params':>10} {'step s':>8} {'mask share':>10} {'tokens/s':>10} {'vs plain':>9}")
    for name in runs:
        params, ratio = result["parameters"][name], result["vs_plain"][name]
        print(f"{name:40} {params:>10,} {step[name]:>8.3f} {prepare_share[name]:>10.1%} "
              f"{tokens_per_s[name]:>10,.0f} {ratio:>8.2f}x")  # fmt: skip
    print(f"goal: {first} >= {result['goals']['vs_plain']}x plain causal; load average {os.getloadavg()[0]:.1f}")
    print(f"loader {loader:,.1f} rows/s vs model {model_rows_per_s:.2f} rows/s: "
          f"{result['loader_vs_model']:.0f}x (goal >= 10x); rows {fill:.0%} filled")  # fmt: skip
    write_report(args.out, result)


if __name__ == "__main__":
    main()
