"""The `meloformer` console script: LightningCLI for fit/validate/test, plus preprocess/generate/evaluate."""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser

from meloformer.hid import HIDTokenizer

EXTRA_COMMANDS = ("preprocess",)


def preprocess_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="meloformer preprocess",
        description="Tokenise a folder of MIDI files (recursively) into HID shards, or --verify a dataset.",
    )
    parser.add_argument("input_dir", nargs="?", help="folder of .mid/.midi files")
    parser.add_argument("output_dir", nargs="?", help="dataset folder (created; reruns resume)")
    parser.add_argument(
        "--verify", type=str, default=None, help="re-check every shard's checksum in this folder"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--test_fraction", type=float, default=0.05)
    parser.add_argument("--shard_files", type=int, default=512, help="files per shard (and per resume point)")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_class_arguments(HIDTokenizer, "tokenizer")
    return parser


def preprocess_main(argv: list[str]) -> int:
    from meloformer.datamodules.shards import verify_shards
    from meloformer.preprocess import preprocess

    parser = preprocess_parser()
    args = parser.parse_args(argv)
    if args.verify:
        problems = verify_shards(Path(args.verify))
        for problem in problems:
            print(f"DAMAGED {problem}")
        print(
            f"{args.verify}: {'all shards intact' if not problems else f'{len(problems)} damaged shard(s)'}"
        )
        return 1 if problems else 0
    if not args.input_dir or not args.output_dir:
        parser.error("give INPUT_DIR and OUTPUT_DIR (or --verify DIR)")
    tokenizer = HIDTokenizer(**args.tokenizer.as_dict())
    summary = preprocess(
        args.input_dir,
        args.output_dir,
        tokenizer,
        workers=args.workers,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        shard_files=args.shard_files,
        progress=not args.no_progress,
    )
    for line in summary.lines():
        print(line)
    print(f"report: {Path(args.output_dir) / 'report.txt'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "preprocess":
        return preprocess_main(argv[1:])
    print("usage: meloformer {preprocess} ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
