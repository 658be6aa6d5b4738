"""What a DataLoader worker spends per training row: the mask plan alone against the plan with the parallels
term's marks (``--model.parallels_weight``, ``part_writing.parallel_pitches``), on one CPU thread.

Rows are whole pieces of a dataset folder's train split (default: the reference corpus's, else the demo
corpus encoded here) packed into ``--row-tokens`` tokens and padded, as the loader's rows are, for the ``small`` model's
flex plan (what a GPU run's workers build). Each time is the best of ``--repeats`` after a warm-up. The
ratio says how many more workers the term needs to keep the same pace.

    python bench/loader.py [--rows 8] [--out bench/results/loader.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import REPO, add_common_arguments, best_time, demo_pieces, print_header, set_threads, write_report

from meloformer.datamodules.shards import INDEX_NAME, ShardReader
from meloformer.hid import PAD, HIDTokenizer
from meloformer.module import MeloFormerModule, WithParallelPitches

TOK = HIDTokenizer()


def pieces(shards: Path) -> list[np.ndarray]:
    """The train split's pieces of the dataset folder ``shards``, else the demo corpus."""
    if not (shards / INDEX_NAME).is_file():
        return demo_pieces(TOK)
    reader = ShardReader(shards, expected_settings=TOK.vocab_settings())
    table = reader.pieces("train")
    return [np.asarray(reader.tokens(table, i), dtype=np.int64) for i in range(len(table))]


def packed_rows(pieces: list[np.ndarray], n_rows: int, row_tokens: int) -> torch.Tensor:
    """``n_rows`` rows of whole pieces (those that fit) packed in order, then ``PAD``."""
    rows, row, used = [], [], 0
    for piece in (p for p in pieces if len(p) <= row_tokens):
        if used + len(piece) > row_tokens:
            rows.append(np.concatenate(row + [np.full(row_tokens - used, PAD)]))
            row, used = [], 0
            if len(rows) == n_rows:
                break
        row.append(piece)
        used += len(piece)
    return torch.from_numpy(np.stack(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "reference-shards")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--row-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    add_common_arguments(parser, "loader")
    args = parser.parse_args()
    set_threads(args.threads or 1)

    rows = packed_rows(pieces(args.shards), args.rows, args.row_tokens)
    plan = MeloFormerModule().mask_plan("flex")
    marked = WithParallelPitches(plan, TOK)
    times = {
        "plan": best_time(lambda: [plan(row[None]) for row in rows], args.repeats) / len(rows),
        "plan_and_marks": best_time(lambda: [marked(row[None]) for row in rows], args.repeats) / len(rows),
    }
    marks = int(sum(marked(row[None])["parallel_pitches"].any(-1).sum() for row in rows))
    ratio = times["plan_and_marks"] / times["plan"]
    print_header(f"loader work per row, {len(rows)} rows of {args.row_tokens:,} tokens")
    print(f"{'per row':<16} {'ms':>8}")
    for name, seconds in times.items():
        print(f"{name:<16} {1e3 * seconds:>8.1f}")
    print(f"plan + marks / plan: {ratio:.2f}x ({marks:,} tokens carry marks)")
    ms = {name: 1e3 * seconds for name, seconds in times.items()}
    write_report(
        args.out,
        {"rows": len(rows), "row_tokens": args.row_tokens, "marked_tokens": marks, "ms_per_row": ms, "ratio": ratio},
    )


if __name__ == "__main__":
    main()
