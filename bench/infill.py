"""Infilling cost: a region costs its own bars, not the piece around it.

Regenerates two bars at the start and at the end of one track of a chorale, and, as the baseline in the
same run, the whole track. Bars before the region are one prefill; after the region is closed the copied
bars need no model at all. Speed does not depend on the weights, so the model is untrained.

    python bench/infill.py [--bars 16] [--track 1] [--threads 1] [--out bench/results/infill.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from meloformer.edits import crop_bars
from meloformer.hid import HIDTokenizer
from meloformer.infill import Region, infill
from meloformer.model import MeloFormer, MeloFormerConfig
from meloformer.sampler import GenerationRequest

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--midi", type=Path, default=REPO / "demo" / "midi" / "bach_chorales" / "bwv111_6.mid")
    parser.add_argument("--bars", type=int, default=16)
    parser.add_argument("--track", type=int, default=1, help="counted from 1")
    parser.add_argument("--repeats", type=int, default=3, help="best of")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "infill.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = HIDTokenizer()
    torch.manual_seed(0)
    model = MeloFormer(
        MeloFormerConfig.from_size(args.size, vocab_size=tok.vocab_size, max_seq_len=8192), tok.kinds
    ).eval()
    prompt = crop_bars(tok, tok.encode(args.midi), 0, args.bars)
    request = GenerationRequest(prompt=prompt)
    n, t = args.bars, args.track
    regions = {"bars 1-2": f"{t}:1-2", f"bars {n - 1}-{n}": f"{t}:{n - 1}-{n}", f"bars 1-{n} (baseline)": f"{t}:1-{n}"}
    infill(model, tok, request, [Region.parse(f"{t}:1")], seed=0)  # warm-up

    rows = {}
    for name, text in regions.items():
        best = float("inf")
        for seed in range(args.repeats):
            start = time.perf_counter()
            infill(model, tok, request, [Region.parse(text)], seed=seed)
            best = min(best, time.perf_counter() - start)
        rows[name] = {"region": text, "seconds": best}
    baseline = rows[f"bars 1-{n} (baseline)"]["seconds"]
    for row in rows.values():
        row["vs_whole_track"] = row["seconds"] / baseline

    params = sum(p.numel() for p in model.parameters())
    print(f"MeloFormer-{args.size} ({params / 1e6:.1f}M parameters), {args.midi.name}: {n} bars, {len(prompt)} tokens")
    print(f"{'region of track ' + str(t):<22} {'s':>7} {'vs whole track':>15}")
    for name, row in rows.items():
        print(f"{name:<22} {row['seconds']:>7.2f} {row['vs_whole_track']:>14.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"size": args.size, "parameters": params, "tokens": len(prompt), "bars": n, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
