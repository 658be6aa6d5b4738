"""HID encoding vs MidiTok's REMI (symusic backend) on the same real MIDI files, in one run.

Both tokenizers start from the file path (parsing included), in this process, file by file; each file is
encoded ``--repeats`` times by both and the best time kept, so the ratio is robust to a noisy machine.

    python bench/tokenizer.py [--midi demo/midi] [--out bench/results/tokenizer.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import symusic
from common import REPO, add_common_arguments, best_time, print_header, write_report
from miditok import REMI, TokenizerConfig

from meloformer.hid import HIDError, HIDTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--midi", type=Path, default=REPO / "demo" / "midi")
    parser.add_argument("--limit", type=int, default=0, help="use at most this many files (0 = all)")
    parser.add_argument("--repeats", type=int, default=3)
    add_common_arguments(parser, "tokenizer")
    args = parser.parse_args()

    files = sorted(p for p in args.midi.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
    if args.limit:
        files = files[: args.limit]
    hid = HIDTokenizer()
    remi = REMI(
        TokenizerConfig(
            use_programs=True, use_tempos=True, use_time_signatures=True, one_token_stream_for_programs=True
        )
    )
    totals = {"hid": [0.0, 0], "remi": [0.0, 0]}
    notes = 0
    used = 0
    for path in files:
        try:
            hid_tokens = hid.encode(path)
        except HIDError:
            continue  # both sides measure the same files
        used += 1
        notes += symusic.Score(str(path)).note_num()
        totals["hid"][0] += best_time(lambda p=path: hid.encode(p), args.repeats)
        totals["hid"][1] += len(hid_tokens)
        totals["remi"][0] += best_time(lambda p=path: remi.encode(symusic.Score(str(p))), args.repeats)
        totals["remi"][1] += len(remi.encode(symusic.Score(str(path))).ids)

    rows = {
        name: {"files_per_s": used / seconds, "tokens_per_note": tokens / notes, "tokens": tokens, "seconds": seconds}
        for name, (seconds, tokens) in totals.items()
    }
    ratio = {
        "files_per_s_hid_over_remi": rows["hid"]["files_per_s"] / rows["remi"]["files_per_s"],
        "tokens_per_note_hid_over_remi": rows["hid"]["tokens_per_note"] / rows["remi"]["tokens_per_note"],
    }
    print_header(f"tokenizers, {used} files, {notes:,} notes from {args.midi}")
    print(f"{'tokenizer':<10} {'files/s':>10} {'tokens/note':>12} {'tokens':>12}")
    for name, row in rows.items():
        print(f"{name:<10} {row['files_per_s']:>10.1f} {row['tokens_per_note']:>12.2f} {row['tokens']:>12,}")
    print(
        f"HID/REMI: {ratio['files_per_s_hid_over_remi']:.2f}x files/s, "
        f"{100 * (1 - ratio['tokens_per_note_hid_over_remi']):.0f}% fewer tokens per note"
    )
    write_report(args.out, {"files": used, "notes": notes, "rows": rows, "ratio": ratio})


if __name__ == "__main__":
    main()
