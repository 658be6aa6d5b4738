"""Summary-token attention: compiled FlexAttention vs SDPA with the dense mask vs plain causal SDPA.

At 2,048 / 8,192 / 16,384 regular tokens (plus their summary slots), with the attention shape of the
``small`` model (8 query heads, 2 key/value heads, head size 64): forward on CPU, forward+backward on CUDA.
Also the tiles flex computes at 128 (partial ones run the ``mask_mod`` on every element, full ones do not)
against a causal mask over the same regular tokens, their fill, and the time to build the flex tile
structure on one CPU thread (what a DataLoader worker spends per row).

Both masks: ``summary`` and ``window`` (``--attention``). Rows are built like training rows (``packed``:
bar-window crops of demo-corpus pieces, at most ``--piece-tokens`` each, packed into one row with document
ids; for ``window`` each starts on a 128-token boundary, as its training rows do), and, as the worst case,
one long piece (``single``: every token in one document). Each time is the best of ``--repeats`` runs after a warm-up
(compilation excluded), so a busy machine disturbs the ratios less.

    python bench/attention.py [--quick] [--out bench/results/attention.json]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import numpy as np
import symusic
import torch
import torch.nn.functional as F
from common import add_common_arguments, best_time, demo_pieces, print_header, set_threads, write_report

from meloformer.arith import ceil_div
from meloformer.edits import crop_bars
from meloformer.hid import BOS, PAD, HIDTokenizer
from meloformer.masks import MaskRules, flex_blocks, full_dense_mask
from meloformer.model import SIZES, compiled_flex_attention
from meloformer.row_layout import row_layout, slots_for

TOK = HIDTokenizer()
HEADS, KV_HEADS, HEAD_DIM = SIZES["small"].n_head, SIZES["small"].n_kv_head, SIZES["small"].head_dim


def synthetic_piece(rng: np.random.Generator, n_bars: int) -> np.ndarray:
    """Four tracks of random notes, for when the demo corpus is absent."""
    score = symusic.Score(480)
    for program, is_drum in ((0, True), (33, False), (0, False), (73, False)):
        track = symusic.Track(program=program, is_drum=is_drum)
        for b in range(n_bars):
            for _ in range(int(rng.integers(2, 8))):
                onset = b * 1920 + int(rng.integers(0, 16)) * 120
                track.notes.append(symusic.Note(onset, 240, int(rng.integers(36, 84)), 90))
        score.tracks.append(track)
    return TOK.encode(score).astype(np.int64)


def corpus(seed: int = 0) -> list[np.ndarray]:
    """HID pieces of the demo corpus, or synthetic ones."""
    pieces = demo_pieces(TOK)
    if not pieces:
        rng = np.random.default_rng(seed)
        pieces = [synthetic_piece(rng, int(rng.integers(8, 200))) for _ in range(40)]
    return pieces


def crop(piece: np.ndarray, max_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """A random bar window of ``piece`` with at most ``max_tokens`` tokens (the widest that fits)."""
    if len(piece) <= max_tokens:
        return piece
    n_bars = TOK.parse(piece).n_bars
    b0 = int(rng.integers(0, n_bars))
    best = crop_bars(TOK, piece, b0, b0 + 1)
    width = 2
    while b0 + width <= n_bars:
        window = crop_bars(TOK, piece, b0, b0 + width)
        if len(window) > max_tokens:
            break
        best, width = window, width * 2
    return best[:max_tokens].astype(np.int64)


def packed_row(pieces: list[np.ndarray], length: int, piece_tokens: int, seed: int = 0, align: int = 1) -> np.ndarray:
    """A training-like row: crops of random pieces, packed back to back (each starting at a multiple of
    ``align``, padding between, as ``RowBuilder`` packs for the window attention) and cut to ``length``."""
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < length:
        c = crop(pieces[int(rng.integers(len(pieces)))], piece_tokens, rng)
        gap = -len(c) % align
        out += [c, np.full(gap, PAD, dtype=np.int64)]
        total += len(c) + gap
    return np.concatenate(out)[:length]


def single_row(pieces: list[np.ndarray], length: int) -> np.ndarray:
    """One long piece (repeated if no piece is long enough): every token in one document."""
    longest = max(pieces, key=len)
    while len(longest) < length:
        longest = np.concatenate([longest, longest[1:]])  # drop the second BOS: still one document
    return longest[:length]


def bench_row(tokens: np.ndarray, device: torch.device, repeats: int, block_size: int, rules: MaskRules) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    train = device.type == "cuda"
    dtype = torch.bfloat16 if train else torch.float32
    n = len(tokens)
    segments = int(row_layout(tokens[None], TOK.kinds).num_slots)
    rows = row_layout(tokens[None], TOK.kinds, slots_for(segments, n // 8)).to(device)
    mask_mod = rules.mask_mod(rows)
    t = rows.length

    cpu_rows = rows.to("cpu")
    cpu_mod = rules.mask_mod(cpu_rows)
    tiles128 = flex_blocks(cpu_mod, cpu_rows, 128, runs=rules.runs)
    tiles_build = best_time(lambda: flex_blocks(cpu_mod, cpu_rows, 128, runs=rules.runs), repeats, lambda: None)
    blocks = flex_blocks(mask_mod, rows, block_size, runs=rules.runs).block_mask(mask_mod)
    dense = full_dense_mask(mask_mod, rows)
    causal_tiles = ceil_div(n, 128) * (ceil_div(n, 128) + 1) // 2
    counts = tiles128.tile_counts()
    visible = int(dense.sum())

    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, HEADS, t, HEAD_DIM, device=device, dtype=dtype, generator=gen, requires_grad=train)
    k, v = (
        torch.randn(1, KV_HEADS, t, HEAD_DIM, device=device, dtype=dtype, generator=gen, requires_grad=train)
        for _ in range(2)
    )

    def run(attention: Callable[[], torch.Tensor]) -> Callable[[], object]:
        if not train:
            return lambda: attention()

        def forward_backward() -> None:
            attention().sum().backward()

        return forward_backward

    kernels = {
        "flex": lambda: compiled_flex_attention(q, k, v, block_mask=blocks, enable_gqa=True),
        "sdpa_dense_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    with torch.set_grad_enabled(train):
        flex_out = kernels["flex"]()
        reference = kernels["sdpa_dense_mask"]()
        max_diff = (flex_out.float() - reference.float()).abs().max().item()
        times = {name: best_time(run(fn), repeats, sync) for name, fn in kernels.items()}
    return {
        "attention": rules.attention,
        "tokens": n,
        "summary_slots": rows.num_slots,
        "segments": segments,
        "documents": int((tokens == BOS).sum()),
        "mask_density": dense.float().mean().item(),
        "block_size": block_size,
        "tile_sparsity": blocks.sparsity() / 100,
        "tiles_128": counts,
        "full_share_128": counts["full"] / counts["computed"],
        "fill_128": visible / (counts["computed"] * 128**2),
        "causal_tiles_128": causal_tiles,
        "computed_vs_causal_128": counts["computed"] / causal_tiles,
        "tiles_build_cpu_s": tiles_build,
        "seconds": times,
        "flex_speedup_vs_dense_sdpa": times["sdpa_dense_mask"] / times["flex"],
        "flex_vs_dense_max_abs_diff": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,048 and 8,192 tokens, packed rows, 2 repeats")
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--piece-tokens", type=int, default=2048, help="longest crop packed into a row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--block-size", type=int, default=None, help="flex tile size (default: model's choice)")
    parser.add_argument("--attention", nargs="+", default=["summary", "window"], choices=("summary", "window"))
    add_common_arguments(parser, "attention")
    args = parser.parse_args()
    set_threads(args.threads)
    lengths, repeats, workloads = args.lengths, args.repeats, ("packed", "single")
    if args.quick:
        lengths, repeats, workloads = [x for x in lengths if x <= 8192], 2, ("packed",)
    device = torch.device(args.device)
    block_size = args.block_size or (128 if device.type == "cuda" else 32)

    pieces = corpus()
    results = []
    header = (
        f"{'mask':>7} {'row':>7} {'tokens':>6} {'slots':>5} {'docs':>4} {'tiles/causal':>12} {'full':>5} {'fill':>5} "
        f"{'build s':>7} {'flex s':>8} {'sdpa+mask s':>11} {'causal s':>8} {'flex/causal':>11}"
    )
    mode = "forward+backward, bf16" if device.type == "cuda" else "forward, fp32"
    print_header(f"attention {mode}, flex tile {block_size}, best of {repeats}", device.type)
    print(header)
    for attention, workload, length in itertools.product(args.attention, workloads, lengths):
        rules = MaskRules(attention=attention)
        if workload == "packed":
            tokens = packed_row(pieces, length, args.piece_tokens, align=rules.doc_align)
        else:
            tokens = single_row(pieces, length)
        r = bench_row(tokens, device, repeats, block_size, rules) | {"workload": workload}
        results.append(r)
        s = r["seconds"]
        print(
            f"{attention:>7} {workload:>7} {length:>6} {r['summary_slots']:>5} {r['documents']:>4} "
            f"{r['computed_vs_causal_128']:>11.2f}x {r['full_share_128']:>5.0%} {r['fill_128']:>5.0%} "
            f"{r['tiles_build_cpu_s']:>7.2f} {s['flex']:>8.4f} {s['sdpa_dense_mask']:>11.4f} "
            f"{s['sdpa_causal']:>8.4f} {s['sdpa_causal'] / s['flex']:>10.2f}x",
            flush=True,
        )
    report = {"mode": mode, "heads": [HEADS, KV_HEADS, HEAD_DIM], "piece_tokens": args.piece_tokens, "results": results}
    write_report(args.out, report, device.type)


if __name__ == "__main__":
    main()
