"""The `meloformer` console script: LightningCLI for fit/validate/test, plus preprocess, generate, evaluate
and sizes."""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser

from meloformer.hid import HIDTokenizer

LIGHTNING_COMMANDS = ("fit", "validate", "test")
USAGE = """usage: meloformer {fit,validate,test,preprocess,generate,evaluate,export,sizes} ...

  fit, validate, test   train or evaluate (LightningCLI): meloformer fit --config configs/demo.yaml
                        (--print_config, dotted overrides such as --model.size base, --trainer.strategy ddp
                        --trainer.num_nodes N --trainer.devices M; `meloformer fit --help` lists everything)
  preprocess            tokenise a folder of MIDI files into HID shards
  generate              sample MIDI files (and piano rolls) from a checkpoint, a model folder or the shipped model
  evaluate              loss/perplexity of a checkpoint on a split, or music metrics of generated MIDI
  export                turn a training checkpoint into a model folder (safetensors, config.json, model card)
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


def generate_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="meloformer generate", description="Sample MIDI files from a checkpoint.")
    parser.add_argument(
        "--ckpt_path",
        type=str,
        default=None,
        help="a checkpoint of `meloformer fit` or a model folder (default: the shipped model)",
    )
    parser.add_argument("--out", type=str, required=True, help="folder for sample_K.mid and sample_K.png")
    parser.add_argument("--prompt", type=str, default=None, help="MIDI file to continue (or to add a track to)")
    parser.add_argument("--prompt_bars", type=int, default=None, help="use only the prompt's first bars")
    parser.add_argument("--add_track", type=str, default=None, help="GM program (0-127) or 'drums': new track")
    parser.add_argument("--instruments", nargs="+", default=None, help="tracks in order: programs or 'drums'")
    parser.add_argument("--bars", type=int, default=None, help="bars in all (default 8; prompt + 8 to continue)")
    parser.add_argument("--tempo", type=float, default=None, help="quarter notes per minute")
    parser.add_argument("--time_signature", type=str, default=None, help="e.g. 3/4")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--top_p", type=float, default=0.95, help="1.0: off")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="sample K uses seed + K")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def _track_token(name: str) -> int:
    from meloformer.hid import TRACK_DRUMS, TRACK_PROGRAM0

    if name.strip().lower() == "drums":
        return TRACK_DRUMS
    if not name.strip().isdigit() or not 0 <= int(name) <= 127:
        raise ValueError(f"instrument {name!r}: give a General MIDI program 0-127 or 'drums'")
    return TRACK_PROGRAM0 + int(name)


def _time_signature(text: str) -> tuple[int, int]:
    try:
        numerator, denominator = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"time signature {text!r}: write it as N/D, e.g. 3/4") from None
    return numerator, denominator


def generate_main(argv: list[str]) -> int:
    import torch

    from meloformer.pianoroll import save_pianoroll
    from meloformer.pretrained import load_model
    from meloformer.sampling import GenerationRequest, check_request, generate

    args = generate_parser().parse_args(argv)
    try:
        if args.prompt and (args.tempo is not None or args.time_signature):
            raise ValueError("--tempo and --time_signature come from the prompt; drop them or the prompt")
        model, tok = load_model(args.ckpt_path, device=args.device)
        prompt = None
        bars = args.bars
        if args.prompt:
            prompt = tok.encode(args.prompt)
            if args.prompt_bars:
                prompt = tok.crop_bars(prompt, 0, min(args.prompt_bars, tok.parse(prompt).n_bars))
            prompt_bars = tok.parse(prompt).n_bars
            bars = prompt_bars if args.add_track else (bars or prompt_bars + 8)
        request = GenerationRequest(
            bars=bars or 8,
            instruments=[_track_token(x) for x in args.instruments] if args.instruments else None,
            tempo=args.tempo,
            time_signature=_time_signature(args.time_signature) if args.time_signature else None,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            prompt=prompt,
            add_track=_track_token(args.add_track) if args.add_track else None,
        )
        check_request(tok, request)
    except (ValueError, OSError) as err:
        print(f"meloformer generate: error: {err}", file=sys.stderr)
        return 2
    model = model.to(torch.device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(args.num_samples):
        tokens = generate(model, tok, request, seed=args.seed + k, progress=not args.no_progress)
        tok.decode_to_file(tokens, out / f"sample_{k}.mid")
        save_pianoroll(tok, tokens, out / f"sample_{k}.png", title=f"sample {k} (seed {args.seed + k})")
        piece = tok.parse(tokens)
        notes = len(tok.note_table(piece))
        print(f"{out / f'sample_{k}.mid'}: {piece.n_bars} bars, {len(piece.tracks)} tracks, {notes} notes")
    return 0


def evaluate_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="meloformer evaluate",
        description="Loss/perplexity of --ckpt_path on --data's --split, or metrics of --generated vs --reference.",
    )
    parser.add_argument("--ckpt_path", type=str, default=None)
    parser.add_argument("--data", type=str, default=None, help="a dataset folder of `meloformer preprocess`")
    parser.add_argument("--split", type=str, default="val", help="val or test")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--generated", type=str, default=None, help="folder of generated MIDI files")
    parser.add_argument("--reference", type=str, default=None, help="folder of reference MIDI files")
    parser.add_argument("--out", type=str, default=None, help="write the results here as JSON")
    return parser


def evaluate_main(argv: list[str]) -> int:
    from meloformer.evaluate import evaluate_checkpoint, evaluate_music, loss_table, music_table, write_json

    parser = evaluate_parser()
    args = parser.parse_args(argv)
    try:
        if args.generated or args.reference:
            if not (args.generated and args.reference):
                parser.error("give both --generated and --reference")
            result = evaluate_music(args.generated, args.reference)
            print(music_table(result))
        elif args.ckpt_path and args.data:
            result = evaluate_checkpoint(args.ckpt_path, args.data, args.split, args.batch_size, args.device)
            print(loss_table(result))
        else:
            parser.error("give --ckpt_path and --data, or --generated and --reference")
    except (ValueError, OSError) as err:
        print(f"meloformer evaluate: error: {err}", file=sys.stderr)
        return 2
    write_json(result, args.out)
    return 0


def export_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="meloformer export", description="A training checkpoint -> a model folder.")
    parser.add_argument("--ckpt_path", type=str, required=True, help="a checkpoint of `meloformer fit`")
    parser.add_argument("--out", type=str, required=True, help="the model folder to write")
    parser.add_argument("--card", type=str, default=None, help="a Markdown model card (default: a generated one)")
    return parser


def export_main(argv: list[str]) -> int:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` from a training checkpoint."""
    from meloformer.module import load_checkpoint, model_card
    from meloformer.pretrained import save_model_folder

    args = export_parser().parse_args(argv)
    try:
        module = load_checkpoint(args.ckpt_path)
        card = Path(args.card).read_text() if args.card else model_card(module, args.ckpt_path)
        folder = save_model_folder(module.model, module.tokenizer, args.out, card)
    except (ValueError, OSError) as err:
        print(f"meloformer export: error: {err}", file=sys.stderr)
        return 2
    size = (folder / "model.safetensors").stat().st_size
    print(f"{folder}: model.safetensors ({size / 1e6:.1f} MB), config.json, README.md")
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


def build_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI of ``meloformer fit|validate|test`` (``run=False``: parse and instantiate only)."""
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

    return MeloFormerCLI(
        MeloFormerModule,
        HIDDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "meloformer"},
    )


def _config_field(name: str):
    def field(module) -> int:
        return getattr(module.config, name)

    return field


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command in LIGHTNING_COMMANDS:
        try:
            build_cli(None if from_command_line else argv)
        except ConfigError as err:
            print(f"meloformer: error: {err}", file=sys.stderr)
            return 2
        return 0
    if command == "preprocess":
        return preprocess_main(argv[1:])
    if command == "generate":
        return generate_main(argv[1:])
    if command == "evaluate":
        return evaluate_main(argv[1:])
    if command == "export":
        return export_main(argv[1:])
    if command == "sizes":
        return sizes_main(argv[1:])
    print(USAGE, file=sys.stdout if command in ("-h", "--help") else sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
