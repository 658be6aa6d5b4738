"""The `meloformer` console script: LightningCLI for fit/validate/test, plus preprocess, generate, evaluate
and sizes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import sys
import textwrap
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from jsonargparse import ArgumentError, ArgumentParser

from meloformer.hid import HIDTokenizer
from meloformer.steering import DEFAULT_DYNAMICS, DEFAULT_INSTRUMENTS, RESTATEMENT_BIAS, VOICE_LEADING


def preprocess_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="meloformer preprocess",
        description="Tokenise a folder of MIDI files (recursively) into HID shards, or --verify a dataset.",
    )
    parser.add_argument("input_dir", nargs="?", help="folder of .mid/.midi files")
    parser.add_argument("output_dir", nargs="?", help="dataset folder (created; reruns resume)")
    parser.add_argument("--verify", type=str, default=None, help="re-check every shard's checksum in this folder")
    parser.add_argument("--workers", type=int, default=2, help="tokenising processes (at most one per CPU)")
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--test_fraction", type=float, default=0.05)
    parser.add_argument("--shard_files", type=int, default=512, help="files per shard (and per resume point)")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_class_arguments(HIDTokenizer, "tokenizer")
    return parser


def parse(parser: ArgumentParser, argv: list[str]):
    """Parse ``argv``; a mistake raises ValueError with jsonargparse's message on one line (no usage dump)."""
    parser.exit_on_error = False
    try:
        return parser.parse_args(argv)
    except ArgumentError as err:
        raise ValueError(f"{' '.join(str(err).split())} (see {parser.prog} --help)") from None


def fail(command: str, err: Exception) -> int:
    """Print a user's mistake as one line on stderr; exit status 2."""
    print(f"meloformer {command}: error: {err}", file=sys.stderr)
    return 2


def preprocess_main(argv: list[str]) -> int:
    from meloformer.datamodules.shards import verify_shards
    from meloformer.preprocess import preprocess

    try:
        args = parse(preprocess_parser(), argv)
        if args.verify:
            problems = verify_shards(Path(args.verify))
        elif not args.input_dir or not args.output_dir:
            raise ValueError("give INPUT_DIR and OUTPUT_DIR (or --verify DIR)")
        else:
            summary = preprocess(
                args.input_dir,
                args.output_dir,
                HIDTokenizer(**args.tokenizer.as_dict()),
                workers=args.workers,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                shard_files=args.shard_files,
                progress=not args.no_progress,
            )
    except (ValueError, OSError) as err:
        return fail("preprocess", err)
    except KeyError as err:  # an index.json without one of its fields
        return fail("preprocess", ValueError(f"{args.verify or args.output_dir}: index.json lacks the field {err}"))
    if args.verify:
        for problem in problems:
            print(f"DAMAGED {problem}")
        print(f"{args.verify}: {'all shards intact' if not problems else f'{len(problems)} damaged shard(s)'}")
        return 1 if problems else 0
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
    parser.add_argument("--add_track", type=str, default=None, help="instrument of a new track: violin, drums, 40")
    parser.add_argument(
        "--instruments",
        nargs="+",
        default=None,
        help="tracks in order, by General MIDI name or program: piano violin drums, choir-aahs 52 (default "
        f"without a prompt: {' '.join(DEFAULT_INSTRUMENTS)})",
    )
    parser.add_argument("--bars", type=int, default=None, help="bars in all (default 8; prompt + 8 to continue)")
    parser.add_argument("--tempo", type=float, default=None, help="quarter notes per minute")
    parser.add_argument(
        "--time_signature",
        type=str,
        default=None,
        help="e.g. 3/4 (default without a prompt: the model chooses it for the instruments, and it holds)",
    )
    parser.add_argument("--chords", nargs="+", default=None, help="a chord per bar, repeated: C G Am F")
    parser.add_argument(
        "--meter_changes", action="store_true", help="let the model change the time signature after the first bar"
    )
    parser.add_argument("--key", type=str, default=None, help="keep the new bars in a key: 'D minor', Bb, F#m")
    parser.add_argument(
        "--dynamics",
        nargs="+",
        default=None,
        help=f"velocity ranges spread over the new bars: 40-70 (without a prompt: {' '.join(DEFAULT_DYNAMICS)})",
    )
    parser.add_argument(
        "--voice_leading",
        nargs="?",
        const="on",
        default="auto",
        choices=VOICE_LEADING,
        help="part-writing: no track crosses the voices written before it or moves with one in parallel fifths "
        "or octaves (auto: on when every track is a voice, as in a choir, whose voices also keep their listed "
        "order and their parts' ranges)",
    )
    parser.add_argument(
        "--form", type=str, default=None, help="a letter per equal phrase, e.g. AABA: a repeated letter restates"
    )
    parser.add_argument(
        "--restatement",
        type=float,
        default=RESTATEMENT_BIAS,
        help="a bar begun as a copy of an earlier bar of its track is drawn to end as one: the bias; 0: off",
    )
    parser.add_argument("--infill", nargs="+", default=None, help="with --prompt: regenerate TRACK:FIRST-LAST bars")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--top_p", type=float, default=0.95, help="1.0: off")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="sample K uses seed + K")
    parser.add_argument("--device", type=str, default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--audio", action="store_true", help="also write sample_K.wav (General MIDI SoundFont)")
    parser.add_argument("--overwrite", action="store_true", help="replace samples of an earlier run in --out")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def generate_main(argv: list[str]) -> int:
    with contextlib.ExitStack() as held:  # the lock on --out, from the checks to the last sample
        return _generate(argv, held)


def _generate(argv: list[str], held: contextlib.ExitStack) -> int:

    from meloformer.audio import render_midi, soundfont_path
    from meloformer.edits import crop_bars
    from meloformer.files import folder_lock, refuse_existing, writable_folder
    from meloformer.infill import Region, check_infill, infill, track_list
    from meloformer.instruments import instrument_token
    from meloformer.module import open_checkpoint
    from meloformer.pianoroll import save_pianoroll
    from meloformer.sampler import (
        GenerationRequest,
        check_request,
        context_of,
        fit_to_context,
        generate,
        parse_time_signature,
    )

    try:
        args = parse(generate_parser(), argv)
        if args.num_samples < 1:
            raise ValueError(f"--num_samples must be at least 1, got {args.num_samples}")
        for name in ("bars", "prompt_bars"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
        if args.prompt and (args.tempo is not None or args.time_signature):
            raise ValueError("--tempo and --time_signature come from the prompt; drop them or the prompt")
        if args.meter_changes and (args.prompt or args.time_signature):
            raise ValueError("--meter_changes lets the model choose the meters: drop --time_signature and --prompt")
        if args.add_track and not args.prompt:
            raise ValueError("--add_track needs a --prompt to add the track to")
        steering = args.bars or args.instruments or args.chords or args.key or args.dynamics
        if args.infill and (not args.prompt or args.add_track or steering):
            raise ValueError(
                "--infill needs --prompt and keeps its bars, tracks, chords, key and dynamics (no --bars, "
                "--instruments, --add_track, --chords, --key or --dynamics)"
            )
        regions = [Region.parse(text) for text in args.infill or ()]
        if args.audio:
            soundfont_path()  # before any sampling: a missing SoundFont must not cost the samples
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out}: is a file, not a folder")
        module = open_checkpoint(args.ckpt_path, args.device)
        tok = module.tokenizer
        prompt = None
        bars = args.bars
        if args.prompt:
            prompt = tok.encode(args.prompt)
            if args.prompt_bars:
                prompt = crop_bars(tok, prompt, 0, min(args.prompt_bars, tok.parse(prompt).n_bars))
            prompt_bars = tok.parse(prompt).n_bars
            bars = prompt_bars if args.add_track or regions else (bars or prompt_bars + 8)
        else:
            args.instruments = args.instruments or list(DEFAULT_INSTRUMENTS)
            args.dynamics = args.dynamics or list(DEFAULT_DYNAMICS)
        request = GenerationRequest(
            bars=bars or 8,
            instruments=[instrument_token(x) for x in args.instruments] if args.instruments else None,
            tempo=args.tempo,
            time_signature=parse_time_signature(args.time_signature) if args.time_signature else None,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            prompt=prompt,
            add_track=instrument_token(args.add_track) if args.add_track else None,
            chords=args.chords,
            key=args.key,
            dynamics=args.dynamics,
            meter_changes=args.meter_changes,
            voice_leading=VOICE_LEADING[args.voice_leading],
            form=args.form,
            restatement=args.restatement,
        )
        capacity = context_of(module.model, request)
        notice = None
        if regions:  # the prompt is kept whole: its bars are the regions' coordinates
            check_infill(tok, request, regions)
            print(f"prompt tracks: {track_list(tok, prompt)}")
        else:
            check_request(tok, request)
            request, notice = fit_to_context(tok, request, capacity)
            check_request(tok, request, capacity)
        out = writable_folder(args.out, "--out")  # all checked, no sample made yet: now the folder
        held.enter_context(folder_lock(out, ".generate.lock", "generate"))  # concurrent runs: one is refused
        earlier = sorted(p for p in out.glob("sample_*") if p.suffix in (".mid", ".png", ".wav"))
        refuse_existing(earlier, "--out", args.overwrite)
    except (ValueError, OSError) as err:
        return fail("generate", err)
    if notice:
        print(f"meloformer generate: {notice}", file=sys.stderr)
    model = module.model  # on the device open_checkpoint chose
    for k in range(args.num_samples):
        desc = f"sample {k + 1}/{args.num_samples}"
        progress = not args.no_progress
        try:
            if regions:
                tokens = infill(model, tok, request, regions, seed=args.seed + k, progress=progress)
            else:
                tokens = generate(model, tok, request, seed=args.seed + k, progress=progress, desc=desc)
            tok.decode_to_file(tokens, out / f"sample_{k}.mid")
            marked = [region.as_tuple() for region in regions]
            save_pianoroll(tok, tokens, out / f"sample_{k}.png", f"sample {k} (seed {args.seed + k})", marked)
            if args.audio:
                render_midi(tok.decode(tokens), out / f"sample_{k}.wav")
        except (ValueError, OSError, RuntimeError) as err:  # keep what was written; name the sample that failed
            kept = f"samples 0..{k - 1} are in {out}" if k else "no sample was written"
            print(f"meloformer generate: error: sample {k} failed ({err}); {kept}", file=sys.stderr)
            return 1
        piece = tok.parse(tokens)
        notes = len(tok.note_table(piece))
        print(f"{out / f'sample_{k}.mid'}: {piece.n_bars} bars, {len(piece.tracks)} tracks, {notes} notes")
    return 0


def render_parser() -> ArgumentParser:
    from meloformer.audio import MAX_SECONDS

    parser = ArgumentParser(prog="meloformer render", description="Synthesize a MIDI file to a WAV file.")
    parser.add_argument("midi", help="a .mid/.midi file")
    parser.add_argument("wav", help="the .wav file to write (16-bit stereo, 48 kHz)")
    parser.add_argument("--max_seconds", type=float, default=MAX_SECONDS, help="refuse longer pieces")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing WAV file")
    return parser


def render_main(argv: list[str]) -> int:
    from meloformer.audio import render_midi
    from meloformer.files import refuse_existing, refuse_input, writable_folder

    try:
        args = parse(render_parser(), argv)
        midi, wav = Path(args.midi), Path(args.wav)
        if not midi.is_file():
            raise OSError(f"{args.midi}: no such file")
        refuse_input(wav, [midi])
        if wav.suffix.lower() != ".wav":
            raise ValueError(f"{args.wav}: the output must be a .wav file")
        if not wav.parent.is_dir():
            raise OSError(f"{args.wav}: its folder does not exist")
        writable_folder(wav.parent)
        refuse_existing([wav], overwrite=args.overwrite)
        seconds = render_midi(midi, wav, max_seconds=args.max_seconds)
    except (ValueError, OSError, RuntimeError) as err:
        return fail("render", err)
    print(f"{args.wav}: {seconds:.2f} s")
    return 0


def evaluate_parser() -> ArgumentParser:
    from meloformer.report import REPEATS

    parser = ArgumentParser(
        prog="meloformer evaluate",
        description="Loss/perplexity of --ckpt_path on --data's --split, metrics of --generated vs --reference, "
        "or the two-sample report of --generated against real pieces (--against REAL_DIR --out REPORT_DIR).",
    )
    parser.add_argument("--ckpt_path", type=str, default=None)
    parser.add_argument("--data", type=str, default=None, help="a dataset folder of `meloformer preprocess`")
    parser.add_argument("--split", type=str, default="val", help="val or test")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--generated", type=str, default=None, help="folder of generated MIDI files")
    parser.add_argument("--reference", type=str, default=None, help="folder of reference MIDI files")
    parser.add_argument("--against", type=str, default=None, help="folder of real MIDI files: the two-sample report")
    parser.add_argument("--prompt", type=str, default=None, help="--against: the prompt, whose key pieces should keep")
    parser.add_argument("--region", type=str, default=None, help="--against: infilled TRACK:FIRST-LAST (from 1)")
    parser.add_argument("--bars", type=int, default=None, help="--against: measure the first bars of each piece")
    parser.add_argument("--bootstrap", type=int, default=200, help="--against: resamples for the Fréchet error")
    parser.add_argument("--folds", type=int, default=5, help="--against: cross-validation folds of the classifier")
    parser.add_argument(
        "--repeats", type=int, default=REPEATS, help="--against: random k-fold splits the classifier is averaged over"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default=None, help="the JSON file to write (--against: the report folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def evaluate_main(argv: list[str]) -> int:
    from meloformer.evaluate import evaluate_checkpoint, evaluate_music, loss_table, music_table, write_json
    from meloformer.files import refuse_existing, writable_folder
    from meloformer.module import open_checkpoint

    try:
        args = parse(evaluate_parser(), argv)
        if args.against:
            return against_main(args)
        if args.out:  # checked before the evaluation, so its result cannot be lost to the output
            if Path(args.out).is_dir():
                raise ValueError(f"--out {args.out}: is a folder; give the JSON file to write")
            writable_folder(Path(args.out).parent, "--out")
            refuse_existing([Path(args.out)], "--out", args.overwrite)
        if args.generated or args.reference:
            if not (args.generated and args.reference):
                raise ValueError("give both --generated and --reference")
            result = evaluate_music(args.generated, args.reference)
            print(music_table(result))
        elif args.ckpt_path and args.data:
            if args.split not in ("val", "test"):
                raise ValueError(f"--split must be val or test, got {args.split!r}")
            module = open_checkpoint(args.ckpt_path, args.device)
            result = evaluate_checkpoint(module, args.data, args.split, args.batch_size, args.device)
            print(loss_table(result))
        else:
            raise ValueError("give --ckpt_path and --data, or --generated and --reference (or --against)")
        write_json(result, args.out)
    except (ValueError, OSError) as err:
        return fail("evaluate", err)
    return 0


def against_main(args) -> int:
    """``evaluate --generated GEN --against REAL --out DIR``: the two-sample report, written into DIR."""
    from meloformer.report import NO_SKLEARN, evaluate_against, markdown, write_report

    if not args.generated or args.reference or not args.out:
        raise ValueError("--against REAL_DIR needs --generated GEN_DIR and --out REPORT_DIR (and no --reference)")
    if Path(args.out).is_file():
        raise ValueError(f"--out {args.out}: is a file; give the report folder")
    if args.prompt and not Path(args.prompt).is_file():
        raise ValueError(f"--prompt {args.prompt}: no such file")
    region = None
    if args.region:
        from meloformer.infill import Region  # torch: only where a region is given

        region = Region.parse(args.region)
    report, tokens = evaluate_against(
        args.generated,
        args.against,
        region=(region.track - 1, region.first - 1, region.last - 1) if region else None,
        prompt=args.prompt,
        bars=args.bars,
        bootstrap=args.bootstrap,
        folds=args.folds,
        repeats=args.repeats,
        seed=args.seed,
    )
    if report["classifier_note"] == NO_SKLEARN:
        print(f"meloformer evaluate: {NO_SKLEARN}", file=sys.stderr)
    paths = write_report(report, tokens, args.out)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def export_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="meloformer export", description="A training checkpoint -> a model folder.")
    parser.add_argument("--ckpt_path", type=str, required=True, help="a checkpoint of `meloformer fit`")
    parser.add_argument("--out", type=str, required=True, help="the model folder to write")
    parser.add_argument("--card", type=str, default=None, help="a Markdown model card (default: a generated one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    return parser


def export_main(argv: list[str]) -> int:
    """Write ``model.safetensors``, ``config.json``, ``README.md`` and ``checksums.json`` from a checkpoint."""
    from meloformer.module import load_checkpoint, model_card
    from meloformer.pretrained import save_model_folder

    try:
        args = parse(export_parser(), argv)
        module = load_checkpoint(args.ckpt_path)
        card = Path(args.card).read_text() if args.card else model_card(module, args.ckpt_path)
        folder = save_model_folder(module.model, module.tokenizer, args.out, card, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        return fail("export", err)
    size = (folder / "model.safetensors").stat().st_size
    print(f"{folder}: model.safetensors ({size / 1e6:.1f} MB), config.json, README.md, checksums.json")
    return 0


def sizes_main(argv: list[str]) -> int:
    """Print every model size with its real parameter count (built on the meta device) and the rows (tokens /
    summary slots) the shipped configs of that size train with, which override the size's defaults."""
    import yaml

    from meloformer.model import SIZES, parameter_counts

    counts = parameter_counts()
    rows: dict[str, list[str]] = {name: [] for name in SIZES}
    for name, path in sorted(shipped_configs().items()):
        config = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("config") or {}
        size = size_of(config)
        if size is not None:
            full = dataclasses.asdict(SIZES["small"]) | config
            rows[size].append(f"{name} {full['max_seq_len']}/{full['summary_slots']}")
    header = ("size", "layers", "width", "heads", "kv", "max_seq_len", "slots", "params", "configs: tokens/slots")
    print("{:8} {:>6} {:>6} {:>5} {:>3} {:>11} {:>6} {:>12}  {}".format(*header))
    for name, config in SIZES.items():
        print(
            f"{name:8} {config.n_layer:6} {config.n_embd:6} {config.n_head:5} {config.n_kv_head:3} "
            f"{config.max_seq_len:11} {config.summary_slots:6} {counts[name]:12,}  {', '.join(rows[name]) or '-'}"
        )
    print("max_seq_len and slots are the size's defaults; a config's rows (tokens/slots) override them.")
    return 0


def size_of(config: dict) -> str | None:
    """The size whose architecture a config's ``model.config`` (fields left out: the small size's) has, rows
    (``max_seq_len``, ``summary_slots``) and ``vocab_size`` (the tokenizer's) aside; None: no size's."""
    from meloformer.model import SIZES

    def shape(fields: dict) -> dict:
        aside = ("vocab_size", "max_seq_len", "summary_slots")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items() if k not in aside}

    given = shape(dataclasses.asdict(SIZES["small"]) | config)
    return next((name for name, size in SIZES.items() if shape(dataclasses.asdict(size)) == given), None)


class ConfigError(Exception):
    """A configuration that cannot be built: shown as one line, before any training."""


def build_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI of ``meloformer fit|validate|test`` (``run=False``: parse and instantiate only)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities import rank_zero_info

    from meloformer.callbacks import StopCheckpoint
    from meloformer.checkpoint import CheckpointError, check_checkpoint_file, read_checkpoint_metadata
    from meloformer.datamodules import HIDDataModule
    from meloformer.machine import check_trainer
    from meloformer.module import MeloFormerModule

    class MeloFormerCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The model is the single source of these; the DataModule packs rows to match.
            parser.link_arguments("model.tokenizer", "data.tokenizer")
            for source, target in (("max_seq_len", "max_seq_len"), ("summary_slots", "max_segments")):
                parser.link_arguments(
                    "model", f"data.{target}", compute_fn=_config_field(source), apply_on="instantiate"
                )
            parser.link_arguments("model", "data.mask_plan", compute_fn=_batch_plan, apply_on="instantiate")

        def parse_arguments(self, parser, args) -> None:
            """Parse errors as one short line (``ConfigError``), not after the whole usage."""
            for each in (parser, *getattr(self, "_subcommand_parsers", {}).values()):
                each.exit_on_error = False
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as err:
                raise ConfigError(moved_field_hint(str(err))) from None

        def before_instantiate_classes(self) -> None:
            subcommand = self.config.get("subcommand")
            if subcommand is not None:  # this machine can run the trainer asked for
                configs = [Path(str(p)).name for p in self.config[subcommand].get("config") or []]
                try:
                    check_trainer(self.config[subcommand].trainer, configs)
                except ValueError as err:
                    raise ConfigError(str(err)) from None
            if subcommand == "fit":
                max_steps = self.config.fit.trainer.max_steps
                if max_steps is None or max_steps <= 0:
                    raise ConfigError(
                        f"trainer.max_steps must be a positive number of optimizer steps (the horizon of the "
                        f"learning-rate schedule), got {max_steps}"
                    )

        def _parse_ckpt_path(self) -> None:
            """Check ``--ckpt_path`` before anything uses it, and keep its settings for the comparison below.

            (LightningCLI would instead copy the checkpoint's hyperparameters over the config, so a resume
            with other settings would silently train the checkpoint's model.)"""
            self.saved_settings = None
            subcommand = self.config.get("subcommand")
            self.ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if self.ckpt_path in (None, "last", "best", "hpc") or self.ckpt_path.startswith("registry"):
                return
            try:
                check_checkpoint_file(self.ckpt_path)  # every byte, before Lightning loads the weights
                self.saved_settings = read_checkpoint_metadata(self.ckpt_path)["meloformer"]
            except CheckpointError as err:
                raise ConfigError(f"--ckpt_path {err}") from err

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, OSError, MisconfigurationException) as err:  # ShardError: a ValueError
                raise ConfigError(str(err)) from err
            if self.saved_settings is not None:
                try:
                    self.model.check_resumable(self.saved_settings)
                except ValueError as err:
                    raise ConfigError(f"--ckpt_path {self.ckpt_path}: {err}") from err
            if self.subcommand is not None:  # open the data now: an empty split or too short rows fail here
                try:
                    self.datamodule.prepare_data()
                    self.datamodule.setup(self.subcommand)
                except (ValueError, OSError) as err:
                    raise ConfigError(str(err)) from err

        def instantiate_trainer(self, **kwargs):
            """The run folder (fit), atomic checkpoint files, plain progress lines in a log file, CPU threads."""
            config = self._get(self.config_init, "trainer", default={})
            if self.subcommand == "fit":
                try:
                    kwargs.update(fit_run(config, self.ckpt_path))
                except ValueError as err:
                    raise ConfigError(str(err)) from None
            kwargs.update(run_defaults(config, {**config, **kwargs}.get("callbacks")))
            return super().instantiate_trainer(**kwargs)

        def after_fit(self) -> None:
            checkpoint = self.trainer.checkpoint_callback
            path = checkpoint and (checkpoint.last_model_path or checkpoint.best_model_path)
            if path:
                rank_zero_info(f"checkpoint: {path}")

    return MeloFormerCLI(
        MeloFormerModule,
        HIDDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [StopCheckpoint()]},  # SIGTERM / Ctrl-C: checkpoint, then stop
        parser_kwargs={"prog": "meloformer"},
    )


def fit_run(trainer: dict, ckpt_path: str | None) -> dict:
    """Trainer arguments of a fit's run folder (``meloformer.runs``): its loggers, unless the config names
    others, and its ``checkpoints/`` for every ``ModelCheckpoint`` without a ``dirpath``. A checkpoint file
    of a run is always its newest state (no ``last-v1.ckpt``). ValueError: a fresh fit into a ``dirpath``
    that holds another run's checkpoints."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities import rank_zero_info

    from meloformer.runs import run_folder, run_loggers

    folder = run_folder(trainer.get("default_root_dir") or ".", ckpt_path)
    callbacks = trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if not isinstance(callback, ModelCheckpoint):
            continue
        callback._enable_version_counter = False  # Lightning has no setter; save_last would write last-v1.ckpt
        if callback.dirpath is None:
            callback.dirpath = str((folder / "checkpoints").resolve())
        elif ckpt_path is None and list(Path(callback.dirpath).glob("*.ckpt")):
            raise ValueError(
                f"ModelCheckpoint dirpath {callback.dirpath} holds another run's checkpoints; leave dirpath out "
                "(each run gets a folder of its own under --trainer.default_root_dir) or give an empty folder"
            )
    resumed = ckpt_path is not None and folder.is_dir()
    rank_zero_info(f"run folder: {folder}{' (continued)' if resumed else ''}")
    return {"logger": run_loggers(folder)} if trainer.get("logger") in (None, True) else {}


def run_defaults(trainer: dict, callbacks) -> dict:
    """Trainer arguments of every fit, validate and test: checkpoints written atomically, progress as plain
    lines when stdout is not a terminal, and on CPU a thread count chosen for the machine's load (printed)."""
    import torch
    from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.utilities import rank_zero_info

    from meloformer.callbacks import ProgressLines
    from meloformer.machine import cpu_threads
    from meloformer.runs import AtomicCheckpointIO

    kwargs = {}
    plugins = trainer.get("plugins") or []
    plugins = plugins if isinstance(plugins, list) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
    callbacks = callbacks or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    if trainer.get("enable_progress_bar") is not False and not sys.stdout.isatty():
        if not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, ProgressLines(trainer.get("log_every_n_steps") or 50)]
    accelerator = trainer.get("accelerator")
    if accelerator == "cpu" or accelerator in (None, "auto") and not torch.cuda.is_available():
        threads, why = cpu_threads()
        torch.set_num_threads(threads)
        rank_zero_info(f"CPU threads: {threads} ({why})")
    return kwargs


def quiet_lightning() -> None:
    """No Lightning adverts ("Tip: ... litlogger") and no torch deprecation warning raised inside Lightning's
    ``_pytree``: neither is anything a user can act on."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_no_advert)


def _no_advert(record: logging.LogRecord) -> bool:
    return "Tip:" not in str(record.msg)


def _one_line(message: str, limit: int = 300) -> str:
    """One line of a message: jsonargparse lists what every type of a union said, and the first type
    (ours: ``int`` of ``int | None``) is the one that matters; the rest is cut, but for a short value given
    (a model field's, not a whole callback's)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Errors:" in lines:
        key = [line for line in lines[:1] if line.startswith("Parser key")]
        first = "".join(lines[lines.index("Errors:") + 1 :][:1]).removeprefix("- ")
        given = [line.removeprefix("Given value: ") for line in lines if line.startswith("Given value: ")]
        lines = [*key, first + "".join(f"; given: {value}" for value in given if len(value) <= 60)]
    line = " ".join(lines)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def shipped_configs() -> dict[str, Path]:
    """The YAML configs shipped inside the package (``configs/`` of the repository), by file name."""
    folder = resources.files("meloformer.configs")
    return {p.name: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_config(value: str) -> str:
    """A ``--config`` value: a file as given, else a bare name (``small`` or ``small.yaml``) of a shipped config."""
    if Path(value).is_file() or Path(value).name != value:
        return value  # a path: jsonargparse reports a missing file with its name
    shipped = shipped_configs()
    for name in (value, f"{value}.yaml"):
        if name in shipped:
            return str(shipped[name])
    raise ConfigError(
        f"--config {value}: no such file and no shipped config of that name; shipped: {', '.join(sorted(shipped))}"
    )


def resolve_config_arguments(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config``/``-c`` value passed through ``resolve_config``."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.removeprefix("--config="))
    return out


def moved_field_hint(message: str) -> str:
    """``message``, with where a model field now lives when it names one at its place in older configs
    (``--model.n_layer``, ``model: {size: small}``)."""
    from meloformer.model import MeloFormerConfig, RuntimeConfig

    found = re.search(r"--model\.(\w+)|Group 'model' does not accept option '(\w+)", message)
    name = found and (found.group(1) or found.group(2))
    for group, fields in (("config", MeloFormerConfig), ("runtime", RuntimeConfig)):
        if name in {f.name for f in dataclasses.fields(fields)}:
            return f"{message} (it is model.{group}.{name} now)"
    if name in ("size", "overrides"):
        return f"{message} (the architecture is model.config now, every field spelled out: see `meloformer sizes`)"
    return message


def _config_field(name: str):
    def field(module) -> int:
        return getattr(module.config, name)

    return field


def _batch_plan(module):
    """The model's batch plan: the DataLoader workers build each batch's side channels, mask and loss targets."""
    return module.batch_plan()


def lightning_main(command: str, argv: list[str]) -> int:
    """``meloformer fit|validate|test``: LightningCLI, with its errors as one line."""
    from meloformer.callbacks import TrainingStopped
    from meloformer.runs import CheckpointWriteError

    try:
        resolved = [command, *resolve_config_arguments(argv)]
        if sys.argv[1:] == [command, *argv]:  # the process's command line: LightningCLI reads it (args= is for
            sys.argv[1:] = resolved  # Python callers), and DDP relaunches it for the other ranks
            build_cli(None)
        else:
            build_cli(resolved)
    except ConfigError as err:
        print(f"meloformer: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:  # its message is already printed
        return 128 + stopped.signum
    except CheckpointWriteError as err:  # a full disk: the previous checkpoint stays whole
        print(f"meloformer: error: {err}", file=sys.stderr)
        return 1
    return 0


def serve_main(argv: list[str]) -> int:
    from meloformer.serve import serve_main as serve  # Gradio loads only for this command

    return serve(argv)


@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[[list[str]], int]  # gets the arguments after the command's name
    help: str


COMMANDS: dict[str, Command] = {
    "fit": Command(
        functools.partial(lightning_main, "fit"),
        "train (LightningCLI): meloformer fit --config demo.yaml (--print_config, dotted overrides such as "
        "--model.config.n_layer 8, --trainer.strategy ddp --trainer.num_nodes N --trainer.devices M; "
        "`meloformer fit --help` lists everything)",
    ),
    "validate": Command(functools.partial(lightning_main, "validate"), "a checkpoint's validation loss (LightningCLI)"),
    "test": Command(functools.partial(lightning_main, "test"), "a checkpoint's test loss (LightningCLI)"),
    "preprocess": Command(preprocess_main, "tokenise a folder of MIDI files into HID shards"),
    "generate": Command(
        generate_main,
        "sample MIDI files (and piano rolls, --audio WAV files) from a checkpoint, a model folder or the shipped model",
    ),
    "render": Command(render_main, "synthesize a MIDI file to WAV: meloformer render in.mid out.wav"),
    "serve": Command(serve_main, "the web app (Gradio): meloformer serve [--ckpt_path CKPT_OR_FOLDER] [--port 7860]"),
    "evaluate": Command(evaluate_main, "a checkpoint's loss/perplexity on a split, or music metrics of generated MIDI"),
    "export": Command(export_main, "a training checkpoint -> a model folder (safetensors, config.json, model card)"),
    "sizes": Command(sizes_main, "the model sizes and their real parameter counts"),
}


def usage() -> str:
    """The top-level help, written from ``COMMANDS``."""
    lines = [f"usage: meloformer {{{','.join(COMMANDS)}}} ...", ""]
    for name, command in COMMANDS.items():
        first, *rest = textwrap.wrap(command.help, 92)
        lines += [f"  {name:12}{first}", *(f"  {'':12}{line}" for line in rest)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = COMMANDS.get(argv[0]) if argv else None
    quiet_lightning()
    if command is not None:
        return command.run(argv[1:])
    asked = bool(argv) and argv[0] in ("-h", "--help")
    print(usage(), file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2


if __name__ == "__main__":
    sys.exit(main())
