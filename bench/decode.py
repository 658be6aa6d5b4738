"""KV-cached decoding vs recomputing the whole sequence for every new token, in one run.

The ``small`` model (random weights; speed does not depend on them) decodes a real piece token by token
(teacher-forced, so segments and tracks close where the music puts them) at about 512 and 2,048 tokens of
context. Cached: ``IncrementalDecoder.step``. Recompute: a full forward on all tokens so far, with the
``sdpa`` backend (dense mask) and with compiled ``flex`` (rows padded to the context length, so it compiles
once). Both paths' logits are compared, so the speed-up is for the same numbers.

A decoding step is many small operations; on a machine shared with busy processes, OpenMP hand-offs
between threads can cost milliseconds each, so compare with ``--threads 1`` there.

    python bench/decode.py [--quick] [--out bench/results/decode.json]
"""

from __future__ import annotations

import argparse
import time

import torch
from attention import corpus, single_row
from common import add_common_arguments, print_header, set_threads, write_report

from meloformer.decoder import IncrementalDecoder
from meloformer.hid import PAD, HIDTokenizer
from meloformer.model import MeloFormer, MeloFormerConfig


def recompute(model: MeloFormer, tokens: torch.Tensor, backend: str, pad_to: int) -> torch.Tensor:
    """Logits after the last token of ``tokens`` ``[1, n]`` from a full forward (padded for flex)."""
    n = tokens.shape[1]
    if backend == "flex":
        tokens = torch.cat([tokens, torch.full((1, pad_to - n), PAD, dtype=tokens.dtype)], dim=1)
    return model(tokens, ctx=model.prepare(tokens, backend=backend))[0, n - 1]


def bench_context(model: MeloFormer, piece: torch.Tensor, context: int, cached_steps: int, full_steps: int) -> dict:
    start_at = context - cached_steps
    decoder = IncrementalDecoder(model, capacity=context, backend="sdpa")
    decoder.prefill(piece[:, :start_at])
    cached_logits = []
    start = time.perf_counter()
    for p in range(start_at, context):
        cached_logits.append(decoder.step(piece[:, p])[0])
    cached_s = (time.perf_counter() - start) / cached_steps

    result = {"context": context, "cached_steps": cached_steps, "cached_tokens_per_s": 1 / cached_s}
    for backend in ("sdpa", "flex"):
        recompute(model, piece[:, : context - full_steps], backend, context)  # warm-up (flex compiles)
        times, diff = [], 0.0
        for p in range(context - full_steps, context):
            begin = time.perf_counter()
            logits = recompute(model, piece[:, : p + 1], backend, context)
            times.append(time.perf_counter() - begin)
            diff = max(diff, (logits - cached_logits[p - start_at]).abs().max().item())
        result[f"recompute_{backend}_tokens_per_s"] = 1 / min(times)
        result[f"recompute_{backend}_max_abs_diff"] = diff
    fastest = max(result["recompute_sdpa_tokens_per_s"], result["recompute_flex_tokens_per_s"])
    result["speedup_vs_fastest_recompute"] = result["cached_tokens_per_s"] / fastest
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--contexts", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--size", default="small")
    add_common_arguments(parser, "decode")
    args = parser.parse_args()
    set_threads(args.threads)
    cached_steps, full_steps = (32, 2) if args.quick else (128, 4)

    torch.manual_seed(0)
    config = MeloFormerConfig.from_size(args.size, max_seq_len=max(args.contexts))
    model = MeloFormer(config, HIDTokenizer().kinds).eval()
    piece = torch.as_tensor(single_row(corpus(), max(args.contexts)))[None]
    print_header(f"decoding, {args.size} model ({model.num_parameters() / 1e6:.1f}M parameters)")
    print(
        f"{'context':>7} {'cached tok/s':>12} {'recompute sdpa':>14} {'recompute flex':>14} "
        f"{'speedup':>8} {'max diff':>9}"
    )
    results = []
    with torch.no_grad():
        for context in args.contexts:
            r = bench_context(model, piece, context, cached_steps, full_steps)
            results.append(r)
            diff = max(r["recompute_sdpa_max_abs_diff"], r["recompute_flex_max_abs_diff"])
            print(
                f"{context:>7} {r['cached_tokens_per_s']:>12.1f} {r['recompute_sdpa_tokens_per_s']:>14.2f} "
                f"{r['recompute_flex_tokens_per_s']:>14.2f} {r['speedup_vs_fastest_recompute']:>7.1f}x {diff:>9.1e}",
                flush=True,
            )
    write_report(args.out, {"size": args.size, "parameters": model.num_parameters(), "results": results})


if __name__ == "__main__":
    main()
