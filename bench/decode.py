"""KV-cached decoding vs recomputing the whole sequence for every new token, in one run.

The ``small`` model (random weights; speed does not depend on them) decodes a real piece token by token
(teacher-forced, so segments and tracks close where the music puts them) at about 512 and 2,048 tokens of
context. Cached: ``IncrementalDecoder.step``. Recompute: a full forward on all tokens so far, with the
``sdpa`` backend (dense mask) and with compiled ``flex`` (rows padded to the context length, so it compiles
once). Both paths' logits are compared, so the speed-up is for the same numbers. The ``layout`` column is
the cached step against the same step with its side channels laid out anew for the whole prefix, as before
``GrowingRowLayout`` (same logits, compared too).

A decoding step is many small operations; on a machine shared with busy processes, OpenMP hand-offs
between threads can cost milliseconds each, so compare with ``--threads 1`` there.

    python bench/decode.py [--quick] [--out bench/results/decode.json]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
import torch
from attention import corpus, single_row
from common import add_common_arguments, print_header, set_threads, write_report

from meloformer.decoder import IncrementalDecoder
from meloformer.hid import PAD, HIDTokenizer
from meloformer.model import MeloFormer, MeloFormerConfig
from meloformer.row_layout import RowLayout, row_layout


def recompute(model: MeloFormer, tokens: torch.Tensor, backend: str, pad_to: int) -> torch.Tensor:
    """Logits after the last token of ``tokens`` ``[1, n]`` from a full forward (padded for flex)."""
    n = tokens.shape[1]
    if backend == "flex":
        tokens = torch.cat([tokens, torch.full((1, pad_to - n), PAD, dtype=tokens.dtype)], dim=1)
    return model(tokens, ctx=model.prepare(tokens, backend=backend))[0, n - 1]


class RelayoutEachStep:
    """The decoder's side channels as they were built before ``GrowingRowLayout``: ``row_layout`` of the
    whole prefix at every step (the baseline of the ``layout`` column)."""

    def __init__(self, kinds, batch: int, capacity: int, with_slots: bool = True) -> None:
        self.kinds, self.with_slots, self.tokens = kinds, with_slots, np.zeros((batch, 0), dtype=np.int64)

    def extend(self, tokens: np.ndarray) -> None:
        self.tokens = np.concatenate([self.tokens, tokens], axis=1)

    def append(self, token: np.ndarray) -> None:
        self.extend(token[:, None])

    def rows(self, min_slots: int | None = None) -> RowLayout:
        return row_layout(self.tokens, self.kinds, min_slots, self.with_slots)


def cached_decoding(model: MeloFormer, piece: torch.Tensor, start_at: int, context: int) -> tuple[float, list]:
    """Seconds per cached step from ``start_at`` to ``context``, and the logits of each step."""
    decoder = IncrementalDecoder(model, capacity=context, backend="sdpa")
    decoder.prefill(piece[:, :start_at])
    logits = []
    start = time.perf_counter()
    for p in range(start_at, context):
        logits.append(decoder.step(piece[:, p])[0])
    return (time.perf_counter() - start) / (context - start_at), logits


def bench_context(model: MeloFormer, piece: torch.Tensor, context: int, cached_steps: int, full_steps: int) -> dict:
    start_at = context - cached_steps
    cached_s, cached_logits = cached_decoding(model, piece, start_at, context)
    with mock.patch("meloformer.decoder.GrowingRowLayout", RelayoutEachStep):
        relayout_s, relayout_logits = cached_decoding(model, piece, start_at, context)
    relayout_diff = max((a - b).abs().max().item() for a, b in zip(cached_logits, relayout_logits))

    result = {"context": context, "cached_steps": cached_steps, "cached_tokens_per_s": 1 / cached_s}
    result |= {"relayout_tokens_per_s": 1 / relayout_s, "speedup_vs_relayout": relayout_s / cached_s}
    result["relayout_max_abs_diff"] = relayout_diff
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
        f"{'context':>7} {'cached tok/s':>12} {'re-laid out':>11} {'layout':>7} {'recompute sdpa':>14} "
        f"{'recompute flex':>14} {'speedup':>8} {'max diff':>9}"
    )
    results = []
    with torch.no_grad():
        for context in args.contexts:
            r = bench_context(model, piece, context, cached_steps, full_steps)
            results.append(r)
            diff = max(r["recompute_sdpa_max_abs_diff"], r["recompute_flex_max_abs_diff"], r["relayout_max_abs_diff"])
            print(
                f"{context:>7} {r['cached_tokens_per_s']:>12.1f} {r['relayout_tokens_per_s']:>11.1f} "
                f"{r['speedup_vs_relayout']:>6.2f}x {r['recompute_sdpa_tokens_per_s']:>14.2f} "
                f"{r['recompute_flex_tokens_per_s']:>14.2f} {r['speedup_vs_fastest_recompute']:>7.1f}x {diff:>9.1e}",
                flush=True,
            )
    write_report(args.out, {"size": args.size, "parameters": model.num_parameters(), "results": results})


if __name__ == "__main__":
    main()
