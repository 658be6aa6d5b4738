"""The `meloformer` console script: LightningCLI for fit/validate/test, plus preprocess, generate, evaluate
and sizes."""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings
from importlib import resources
from pathlib import Path

from jsonargparse import ArgumentError, ArgumentParser

from meloformer.hid import HIDTokenizer

LIGHTNING_COMMANDS = ("fit", "validate", "test")
USAGE = """usage: meloformer {fit,validate,test,preprocess,generate,render,serve,evaluate,export,sizes} ...

  fit, validate, test   train or evaluate (LightningCLI): meloformer fit --config demo.yaml
                        (--print_config, dotted overrides such as --model.size base, --trainer.strategy ddp
                        --trainer.num_nodes N --trainer.devices M; `meloformer fit --help` lists everything)
  preprocess            tokenise a folder of MIDI files into HID shards
  generate              sample MIDI files (and piano rolls, --audio WAV files) from a checkpoint, a model folder or
                        the shipped model
  render                synthesize a MIDI file to WAV: meloformer render in.mid out.wav
  serve                 the web app (Gradio): meloformer serve [--ckpt_path CKPT_OR_FOLDER] [--port 7860]
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
    parser.add_argument("--add_track", type=str, default=None, help="GM program (0-127) or 'drums': new track")
    parser.add_argument("--instruments", nargs="+", default=None, help="tracks in order: programs or 'drums'")
    parser.add_argument("--bars", type=int, default=None, help="bars in all (default 8; prompt + 8 to continue)")
    parser.add_argument("--tempo", type=float, default=None, help="quarter notes per minute")
    parser.add_argument("--time_signature", type=str, default=None, help="e.g. 3/4")
    parser.add_argument("--chords", nargs="+", default=None, help="a chord per bar, repeated: C G Am F")
    parser.add_argument("--infill", nargs="+", default=None, help="with --prompt: regenerate TRACK:FIRST-LAST bars")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--top_p", type=float, default=0.95, help="1.0: off")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="sample K uses seed + K")
    parser.add_argument("--device", type=str, default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--audio", action="store_true", help="also write sample_K.wav (General MIDI SoundFont)")
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


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` when this machine has it, else ``cpu``; any other name as given."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def open_checkpoint(path: str | None, device: str):
    """The trained module of a checkpoint or model folder (``None``: the shipped model) on ``device``; ValueError
    with one line for a missing, foreign or damaged file or a device this machine lacks."""
    import torch

    from meloformer.module import load_checkpoint, module_from_folder
    from meloformer.pretrained import default_model_folder, is_model_folder

    device = resolve_device(device)
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if where.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine")
    path = str(default_model_folder()) if path is None else path
    if is_model_folder(path):
        return module_from_folder(path).to(where)
    if not Path(path).is_file():
        raise ValueError(f"--ckpt_path {path}: no such file or model folder")
    try:
        return load_checkpoint(path, map_location=where)
    except ValueError:
        raise
    except Exception as err:  # a foreign or damaged file fails anywhere in torch.load/pickle: name it, no traceback
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--ckpt_path {path}: not a readable MeloFormer checkpoint ({reason})") from None


def _output_folder(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {path}: is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def generate_main(argv: list[str]) -> int:
    from meloformer.audio import render_midi
    from meloformer.edits import crop_bars
    from meloformer.infill import Region, check_infill, infill, track_list
    from meloformer.pianoroll import save_pianoroll
    from meloformer.sampling import GenerationRequest, check_request, context_of, fit_to_context, generate

    try:
        args = parse(generate_parser(), argv)
        if args.num_samples < 1:
            raise ValueError(f"--num_samples must be at least 1, got {args.num_samples}")
        for name in ("bars", "prompt_bars"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
        if args.prompt and (args.tempo is not None or args.time_signature):
            raise ValueError("--tempo and --time_signature come from the prompt; drop them or the prompt")
        if args.add_track and not args.prompt:
            raise ValueError("--add_track needs a --prompt to add the track to")
        if args.infill and (not args.prompt or args.add_track or args.bars or args.instruments or args.chords):
            raise ValueError(
                "--infill needs --prompt and keeps its bars, tracks and chords (no --bars, "
                "--instruments, --add_track or --chords)"
            )
        regions = [Region.parse(text) for text in args.infill or ()]
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
            chords=args.chords,
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
        out = _output_folder(args.out)
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
            save_pianoroll(tok, tokens, out / f"sample_{k}.png", title=f"sample {k} (seed {args.seed + k})")
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
    parser = ArgumentParser(prog="meloformer render", description="Synthesize a MIDI file to a WAV file.")
    parser.add_argument("midi", help="a .mid/.midi file")
    parser.add_argument("wav", help="the WAV file to write (16-bit stereo, 48 kHz)")
    return parser


def render_main(argv: list[str]) -> int:
    from meloformer.audio import render_midi

    args = render_parser().parse_args(argv)
    try:
        if not Path(args.midi).is_file():
            raise OSError(f"{args.midi}: no such file")
        seconds = render_midi(args.midi, args.wav)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"meloformer render: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.wav}: {seconds:.2f} s")
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

    try:
        args = parse(evaluate_parser(), argv)
        if args.out and Path(args.out).is_dir():
            raise ValueError(f"--out {args.out}: is a folder; give the JSON file to write")
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
            raise ValueError("give --ckpt_path and --data, or --generated and --reference")
    except (ValueError, OSError) as err:
        return fail("evaluate", err)
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
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities import rank_zero_info

    from meloformer.callbacks import StopCheckpoint
    from meloformer.checkpoint import CheckpointError, read_checkpoint
    from meloformer.datamodules import HIDDataModule
    from meloformer.machine import check_trainer
    from meloformer.module import MeloFormerModule, check_same

    class MeloFormerCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The model is the single source of these; the DataModule packs rows to match.
            parser.link_arguments("model.tokenizer", "data.tokenizer")
            for source, target in (("max_seq_len", "max_seq_len"), ("summary_slots", "max_segments")):
                parser.link_arguments(
                    "model", f"data.{target}", compute_fn=_config_field(source), apply_on="instantiate"
                )

        def parse_arguments(self, parser, args) -> None:
            """Parse errors as one short line (``ConfigError``), not after the whole usage."""
            for each in (parser, *getattr(self, "_subcommand_parsers", {}).values()):
                each.exit_on_error = False
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as err:
                raise ConfigError(str(err)) from None

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
                self.saved_settings = read_checkpoint(self.ckpt_path, mmap=True)["meloformer"]
            except CheckpointError as err:
                raise ConfigError(f"--ckpt_path {err}") from err

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, OSError, MisconfigurationException) as err:  # ShardError: a ValueError
                raise ConfigError(str(err)) from err
            if self.saved_settings is not None:
                try:
                    check_same("tokenizer settings", self.saved_settings["tokenizer"], self.model.tokenizer.settings)
                    model_config = dataclasses.asdict(self.model.config)
                    check_same("model configuration", self.saved_settings["model_config"], model_config)
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


def _config_field(name: str):
    def field(module) -> int:
        return getattr(module.config, name)

    return field


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    quiet_lightning()
    if command in LIGHTNING_COMMANDS:
        from meloformer.callbacks import TrainingStopped
        from meloformer.runs import CheckpointWriteError

        try:
            argv = resolve_config_arguments(argv)
            if from_command_line:
                sys.argv[1:] = argv  # LightningCLI reads the command line itself (args= is for Python callers)
            build_cli(None if from_command_line else argv)
        except ConfigError as err:
            print(f"meloformer: error: {_one_line(str(err))}", file=sys.stderr)
            return 2
        except TrainingStopped as stopped:  # its message is already printed
            return 128 + stopped.signum
        except CheckpointWriteError as err:  # a full disk: the previous checkpoint stays whole
            print(f"meloformer: error: {err}", file=sys.stderr)
            return 1
        return 0
    if command == "preprocess":
        return preprocess_main(argv[1:])
    if command == "generate":
        return generate_main(argv[1:])
    if command == "render":
        return render_main(argv[1:])
    if command == "serve":
        from meloformer.serve import serve_main

        return serve_main(argv[1:])
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
