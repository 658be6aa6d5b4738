"""Training throughput on CPU: MeloFormer-small (summary attention, sdpa) vs a plain causal transformer, and
the DataLoader's rows/s against what the model consumes. ``--attention window`` times the tile-friendly
variant instead (its rows start each piece on a 128-token boundary).

MeloFormer runs the ``sdpa`` backend's block-sparse attention (64x32 blocks) with its side channels and mask
built by the DataLoader (``batch["layout"]`` and ``batch["mask"]`` from the model's ``mask_plan``, as in
training; the step then builds nothing), and, with ``--in-step``, with both built in the step, as before
they moved to the loader; with ``--dense``, SDPA over the whole dense mask. Rows hold ``--summary-slots``
slots, by default one per 8 tokens as the configs use (256 at 2,048 tokens, 1,024 at 8,192). The table's
"mask share" is the share of each MeloFormer step spent building its layout and mask in the step.

The plain transformer has MeloFormer-small's width, depth, heads, SwiGLU width, RMSNorm, rotary embedding
and vocabulary, and attends with ``scaled_dot_product_attention(is_causal=True)`` over the same rows: the
price of summary attention is the difference.

A training step is forward + loss + backward + AdamW, on rows of the bundled demo corpus (``HIDDataModule``).
The models' steps alternate, so a busy machine slows them alike; the median step counts. Loader rows/s is
measured in the main process (no workers).

    python bench/train.py --threads 1 [--seq-len 2048] [--summary-slots 256] [--in-step] [--dense]

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
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from meloformer.datamodules import HIDDataModule
from meloformer.hid import PAD
from meloformer.model import MeloFormerConfig, RuntimeConfig, apply_rope, rope_angles
from meloformer.module import MeloFormerModule, next_token_losses


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
    loss, valid = next_token_losses(model(batch["tokens"]), batch["tokens"])
    return loss.sum() / valid.sum()


def meloformer_loss(module: MeloFormerModule, batch: dict[str, Tensor], mask: str, clock) -> Tensor:
    """The module's training loss with ``mask`` (``loader``: the batch's own, ``in step``: built here from the
    tokens, ``dense``: the whole matrix); ``clock`` marks the end of building layout and mask."""
    tokens, model = batch["tokens"], module.model
    if mask == "loader":
        ctx = module.attention_context(batch)
    else:
        ctx = model.prepare(tokens, backend="dense" if mask == "dense" else "sdpa")
    clock("mask")
    loss, valid = next_token_losses(model(tokens, ctx=ctx), tokens)
    return loss.sum() / valid.sum()


def timed_step(loss_fn, model: nn.Module, optimizer, batch: dict[str, Tensor], device: torch.device) -> dict:
    """Seconds of one training step and of its parts: mask (layout and mask built in the step; 0 for the
    plain model), forward (with the loss), backward, optimizer. On CUDA each part ends with a sync."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    marks = {"start": time.perf_counter()}

    def clock(name: str) -> None:
        sync()
        marks[name] = time.perf_counter()

    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        loss = loss_fn(model, batch, clock=clock) if loss_fn is not plain_loss else loss_fn(model, batch)
    marks.setdefault("mask", marks["start"])
    clock("forward")
    loss.backward()
    clock("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock("optimizer")
    names = list(marks)
    parts = {b: marks[b] - marks[a] for a, b in zip(names, names[1:])}
    return parts | {"step": marks["optimizer"] - marks["start"]}


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
    parser.add_argument("--size", default="small", help="model size (small, base, large, xlarge)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--summary-slots", type=int, default=None, help="default: seq-len / 8, as the configs")
    parser.add_argument("--in-step", action="store_true", help="also with layout and mask built in the step")
    parser.add_argument("--dense", action="store_true", help="also time SDPA over the whole dense mask")
    parser.add_argument("--loader-rows", type=int, default=200)
    parser.add_argument("--device", default="cpu", help="cpu (sdpa backend, fp32) or cuda (flex, bf16 autocast)")
    parser.add_argument("--attention", default="summary", choices=("summary", "window"), help="MeloFormer's mask")
    add_common_arguments(parser, "train")
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    L, B, device = args.seq_len, args.batch_size, torch.device(args.device)
    slots = args.summary_slots or L // 8
    backend = "sdpa" if device.type == "cpu" else "flex"

    sized = MeloFormerConfig.from_size(args.size, max_seq_len=L, summary_slots=slots, attention=args.attention)
    module = MeloFormerModule(sized, RuntimeConfig(attention_backend=backend))
    config = module.config
    data = HIDDataModule(max_seq_len=L, max_segments=slots, batch_size=B, mask_plan=module.mask_plan(backend))
    data.prepare_data()
    data.setup("fit")
    batches = [move_data_to_device(b, device) for _, b in zip(range(args.steps + 2), data.train_dataloader())]
    plain = PlainCausal(config).to(device)
    module.to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    masks = ["loader"] + ["in step"] * args.in_step + ["dense"] * args.dense
    runs = {
        f"meloformer, mask {mask}": (functools.partial(meloformer_loss, mask=mask), module, optimizer) for mask in masks
    }
    runs["plain_causal"] = (plain_loss, plain, torch.optim.AdamW(plain.parameters(), lr=1e-4))
    parts: dict[str, list[dict]] = {name: [] for name in runs}
    for i, batch in enumerate(batches):
        for name, (loss_fn, model, optimizer) in runs.items():
            seconds = timed_step(loss_fn, model, optimizer, batch, device)
            if i >= 2:
                parts[name].append(seconds)

    split = {name: {k: statistics.median(p[k] for p in ps) for k in ps[0]} for name, ps in parts.items()}
    step = {name: s["step"] for name, s in split.items()}
    tokens_per_s = {name: B * L / s for name, s in step.items()}
    first = next(iter(runs))
    model_rows_per_s = B / step[first]
    loader = loader_rows_per_s(data, args.loader_rows)
    fill = float(torch.cat([batch["tokens"].cpu() for batch in batches]).ne(PAD).float().mean())
    result = {
        "size": args.size,
        "attention": args.attention,
        "device": device.type,
        "seq_len": L,
        "batch_size": B,
        "summary_slots": config.summary_slots,
        "parameters": {
            **{name: sum(p.numel() for p in module.model.parameters()) for name in runs if name != "plain_causal"},
            "plain_causal": sum(p.numel() for p in plain.parameters()),
        },
        "row_fill": fill,
        "step_seconds": step,
        "step_split_seconds": split,
        "tokens_per_s": tokens_per_s,
        "vs_plain": {name: tokens_per_s[name] / tokens_per_s["plain_causal"] for name in runs},
        "loader_rows_per_s": loader,
        "model_rows_per_s": model_rows_per_s,
        "loader_vs_model": loader / model_rows_per_s,
        "goals": {"vs_plain": 1.0 if L >= 8192 else 0.9, "loader_vs_model": 10.0},
    }
    print_header(f"training {args.size} ({args.attention}) on {device.type}, rows of {L} tokens (+{slots} summary "
                 f"slots), batch {B}, median of {args.steps} steps")  # fmt: skip
    print(f"{'model':28} {'params':>12} {'step s':>8} {'mask':>6} {'fwd':>6} {'bwd':>6} {'opt':>6} "
          f"{'tokens/s':>10} {'vs plain':>9}")  # fmt: skip
    for name in runs:
        params, ratio, s = result["parameters"][name], result["vs_plain"][name], split[name]
        shares = " ".join(f"{s[k] / s['step']:>6.0%}" for k in ("mask", "forward", "backward", "optimizer"))
        print(f"{name:28} {params:>12,} {step[name]:>8.3f} {shares} {tokens_per_s[name]:>10,.0f} {ratio:>8.2f}x")
    print(f"goal: {first} >= {result['goals']['vs_plain']}x plain causal; load average {os.getloadavg()[0]:.1f}")
    print(f"loader {loader:,.1f} rows/s vs model {model_rows_per_s:.2f} rows/s: "
          f"{result['loader_vs_model']:.0f}x (goal >= 10x); rows {fill:.0%} filled")  # fmt: skip
    write_report(args.out, result, device.type)


if __name__ == "__main__":
    main()
