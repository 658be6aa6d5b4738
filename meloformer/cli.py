"""The `meloformer` console script: LightningCLI for fit/validate/test, plus preprocess and sizes."""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser

from meloformer.hid import HIDTokenizer

LIGHTNING_COMMANDS = ("fit", "validate", "test")
EXTRA_COMMANDS = ("preprocess", "sizes")
USAGE = """usage: meloformer {fit,validate,test,preprocess,sizes} ...

  fit, validate, test   train or evaluate (LightningCLI): meloformer fit --config configs/demo.yaml
                        (--print_config, dotted overrides such as --model.size base, --trainer.strategy ddp
                        --trainer.num_nodes N --trainer.devices M; `meloformer fit --help` lists everything)
  preprocess            tokenise a folder of MIDI files into HID shards
  sizes                 the model sizes and their real parameter counts
"""


def preprocess_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="meloformer preprocess",
        description="Tokenise a folder of MIDI files (recursively) into HID shards, or --verify a dataset.",
    )
    parser.add_argument("input_dir", nargs="?", help="folder of .mid/.midi files")
    parser.add_argument("output_dir", nargs="?", help="dataset folder (created; reruns resume)")
    parser.add_argument("--verify", type=str, default=None, help="re-check every shard's checksum in this folder")
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
        print(f"{args.verify}: {'all shards intact' if not problems else f'{len(problems)} damaged shard(s)'}")
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


def sizes_main(argv: list[str]) -> int:
    """Print every model size with its real parameter count (built on the meta device)."""
    from meloformer.model import SIZES, parameter_counts

    counts = parameter_counts()
    header = ("size", "layers", "width", "heads", "kv", "max_seq_len", "slots", "params")
    print("{:8} {:>6} {:>6} {:>5} {:>3} {:>11} {:>6} {:>12}".format(*header))
    for name, config in SIZES.items():
        print(
            f"{name:8} {config.n_layer:6} {config.n_embd:6} {config.n_head:5} {config.n_kv_head:3} "
            f"{config.max_seq_len:11} {config.summary_slots:6} {counts[name]:12,}"
        )
    return 0


class ConfigError(Exception):
    """A configuration that cannot be built: shown as one line, before any training."""


def lightning_main(argv: list[str] | None) -> int:
    """Run LightningCLI on ``argv`` (None: the command line)."""
    from lightning.pytorch.cli import LightningCLI

    from meloformer.datamodules import HIDDataModule
    from meloformer.module import MeloFormerModule

    class MeloFormerCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The model is the single source of these; the DataModule packs rows to match.
            parser.link_arguments("model.tokenizer", "data.tokenizer")
            for source, target in (("max_seq_len", "max_seq_len"), ("summary_slots", "max_segments")):
                parser.link_arguments(
                    "model", f"data.{target}", compute_fn=_config_field(source), apply_on="instantiate"
                )

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, OSError) as err:  # ShardError is a ValueError
                raise ConfigError(str(err)) from err

    try:
        MeloFormerCLI(
            MeloFormerModule,
            HIDDataModule,
            args=argv,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "meloformer"},
        )
    except ConfigError as err:
        print(f"meloformer: error: {err}", file=sys.stderr)
        return 2
    return 0


def _config_field(name: str):
    def field(module) -> int:
        return getattr(module.config, name)

    return field


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command in LIGHTNING_COMMANDS:
        return lightning_main(None if from_command_line else argv)
    if command == "preprocess":
        return preprocess_main(argv[1:])
    if command == "sizes":
        return sizes_main(argv[1:])
    print(USAGE, file=sys.stdout if command in ("-h", "--help") else sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
