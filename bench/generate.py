"""Generation speed of MeloFormer-small on CPU: KV-cached decoding vs recomputing the sequence per token.

One run samples a piece under the grammar with the cached decoder (``meloformer.sampler.generate``), then
replays the same tokens without a cache (a full forward over the whole prefix for every token, the way the
original prototype decoded). Speed does not depend on the weights, so the model is untrained.

    python bench/generate.py [--bars 4] [--instruments 0 33 73] [--out bench/results/generate.json]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_common_arguments, print_header, set_threads, write_report

from meloformer.hid import TRACK_PROGRAM0, HIDTokenizer
from meloformer.model import MeloFormer, MeloFormerConfig
from meloformer.sampler import GenerationRequest, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--bars", type=int, default=4)
    parser.add_argument("--instruments", type=int, nargs="+", default=[0, 33, 73], help="GM programs")
    add_common_arguments(parser, "generate")
    args = parser.parse_args()
    set_threads(args.threads)

    tok = HIDTokenizer()
    torch.manual_seed(0)
    config = MeloFormerConfig.from_size(args.size, vocab_size=tok.vocab_size, max_seq_len=8192)
    model = MeloFormer(config, tok.kinds).eval()
    request = GenerationRequest(bars=args.bars, instruments=[TRACK_PROGRAM0 + p for p in args.instruments])
    generate(model, tok, GenerationRequest(bars=1, instruments=request.instruments[:1]), seed=0)  # warm-up

    start = time.perf_counter()
    tokens = generate(model, tok, request, seed=1)
    cached = time.perf_counter() - start
    bars = args.bars * (1 + len(args.instruments))  # every track's bars, the conductor's included

    ids = torch.from_numpy(tokens.astype("int64"))[None]
    start = time.perf_counter()
    with torch.no_grad():
        for n in range(1, ids.shape[1]):
            model(ids[:, :n], ctx=model.prepare(ids[:, :n], backend="sdpa"))
    uncached = time.perf_counter() - start

    rows = {
        "cached": {"seconds": cached, "tokens_per_s": len(tokens) / cached, "seconds_per_bar": cached / bars},
        "uncached": {"seconds": uncached, "tokens_per_s": len(tokens) / uncached, "seconds_per_bar": uncached / bars},
    }
    params = sum(p.numel() for p in model.parameters())
    print_header(f"generation, MeloFormer-{args.size} ({params / 1e6:.1f}M), {len(tokens)} tokens, {bars} bars")
    print(f"{'decoding':<10} {'tokens/s':>10} {'s/bar':>8} {'total s':>9}")
    for name, row in rows.items():
        print(f"{name:<10} {row['tokens_per_s']:>10.1f} {row['seconds_per_bar']:>8.3f} {row['seconds']:>9.2f}")
    speedup = rows["cached"]["tokens_per_s"] / rows["uncached"]["tokens_per_s"]
    print(f"cached / uncached: {speedup:.1f}x")
    report = {"size": args.size, "parameters": params, "tokens": len(tokens), "bars": bars, "rows": rows}
    write_report(args.out, report | {"speedup": speedup})


if __name__ == "__main__":
    main()
