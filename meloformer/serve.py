"""``meloformer serve``: a local Gradio web app that samples music from a checkpoint or model folder.

Controls mirror ``meloformer generate`` (instruments, bars, tempo, time signature, chords, temperature,
top-p, seed, a prompt MIDI to continue, to add a track to, or to regenerate bars of); the page shows the
piano roll, plays the audio and offers the MIDI file. Gradio runs the handler in a worker thread, not on
the request's event loop, one generation at a time, and forwards the sampler's tqdm bar as the page's
progress indicator. A control that cannot be generated raises ``gr.Error``: one line on the page, no
traceback anywhere.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import torch
from jsonargparse import ArgumentParser

from meloformer.audio import render_midi
from meloformer.edits import crop_bars
from meloformer.infill import Region, check_infill, infill
from meloformer.module import MeloFormerModule, open_checkpoint
from meloformer.pianoroll import save_pianoroll
from meloformer.sampler import GenerationRequest, check_request, generate, parse_instrument, parse_time_signature

TIME_SIGNATURES = ["model's choice", "4/4", "3/4", "2/4", "6/8", "5/4", "7/8", "12/8"]
MODES = ["continue", "add a track", "regenerate bars (infill)"]
# System fonts: Gradio's default theme would fetch Google Fonts, and nothing may download at run time.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class Studio:
    """One loaded model and the folder its outputs are written to; ``run`` is the page's handler."""

    def __init__(self, module: MeloFormerModule, device: str = "cpu") -> None:
        self.tok = module.tokenizer
        self.model = module.model.to(torch.device(device)).eval()
        self._work = tempfile.TemporaryDirectory(prefix="meloformer-serve-")  # removed with the Studio

    def request(
        self,
        instruments: str,
        bars: float | None,
        tempo: float | None,
        time_signature: str,
        temperature: float,
        top_p: float,
        prompt: str | None,
        mode: str,
        new_track: str,
        prompt_bars: float | None,
        chords: str = "",
        regions: str = "",
    ) -> tuple[GenerationRequest, list[Region]]:
        """The GenerationRequest of the page's controls and the infill regions (none unless infilling);
        ValueError names the first bad control."""
        if bars is None or bars != int(bars) or not 1 <= bars <= 256:
            raise ValueError(f"bars {bars}: give a whole number from 1 to 256")
        if tempo and not 24 <= tempo <= 320:
            raise ValueError(f"tempo {tempo}: give 24 to 320 bpm, or 0 to let the model choose")
        if not 0 < temperature <= 5 or not 0 < top_p <= 1:
            raise ValueError(f"temperature {temperature} / top-p {top_p}: give temperature in (0, 5], top-p in (0, 1]")
        request = GenerationRequest(
            bars=int(bars),
            instruments=[parse_instrument(x) for x in instruments.split()] or None,
            tempo=tempo or None,
            time_signature=parse_time_signature(time_signature) if time_signature in TIME_SIGNATURES[1:] else None,
            temperature=temperature,
            top_p=top_p,
            chords=chords.split() or None,
        )
        if prompt:
            if request.tempo or request.time_signature or request.instruments:
                raise ValueError("instruments, tempo and time signature come from the prompt: clear them")
            try:
                tokens = self.tok.encode(prompt)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"{Path(prompt).name}: not a usable MIDI file ({err})") from None
            n_bars = self.tok.parse(tokens).n_bars
            if prompt_bars:
                tokens = crop_bars(self.tok, tokens, 0, min(int(prompt_bars), n_bars))
                n_bars = self.tok.parse(tokens).n_bars
            request.prompt = tokens
            if mode == "add a track":
                if not new_track.strip():
                    raise ValueError("add a track: give its instrument (a General MIDI program 0-127 or 'drums')")
                request.add_track, request.bars = parse_instrument(new_track), n_bars
            elif mode == MODES[2]:
                if request.chords:
                    raise ValueError("infill keeps the prompt's chords: clear the chords")
                request.bars = n_bars
                infill_regions = [Region.parse(text) for text in regions.split()]
                if not infill_regions:
                    raise ValueError("regenerate bars: give regions such as 2:3-4 (track:first-last bar, from 1)")
                check_infill(self.tok, request, infill_regions)
                return request, infill_regions
            else:
                request.bars = n_bars + int(bars)
        check_request(self.tok, request)
        return request, []

    def run(self, *controls, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio's progress idiom)
        """Page handler: (piano roll PNG, WAV, MIDI, status line) of one sample."""
        *request_controls, seed = controls
        started = time.perf_counter()
        try:
            request, regions = self.request(*request_controls)
            if seed is None or seed != int(seed) or seed < 0:
                raise ValueError(f"seed {seed}: give a whole number from 0")
            progress(0, desc="sampling")
            if regions:
                tokens = infill(self.model, self.tok, request, regions, seed=int(seed), progress=True)
            else:
                tokens = generate(self.model, self.tok, request, seed=int(seed), progress=True)
            out = Path(self._work.name)  # one generation at a time; Gradio copies each output into its cache
            self.tok.decode_to_file(tokens, out / "sample.mid")
            save_pianoroll(self.tok, tokens, out / "sample.png", title=f"seed {int(seed)}")
            progress(1, desc="rendering audio")
            render_midi(out / "sample.mid", out / "sample.wav")
        except (ValueError, OSError, RuntimeError) as err:
            raise gr.Error(str(err).splitlines()[0], print_exception=False) from None
        piece = self.tok.parse(tokens)
        notes = len(self.tok.note_table(piece))
        status = (
            f"{piece.n_bars} bars, {len(piece.tracks)} tracks, {notes} notes, seed {int(seed)}, "
            f"{time.perf_counter() - started:.1f} s"
        )
        return str(out / "sample.png"), str(out / "sample.wav"), str(out / "sample.mid"), status


def build_app(studio: Studio) -> gr.Blocks:
    """The page: controls on the left, the sample on the right."""
    with gr.Blocks(title="MeloFormer", analytics_enabled=False) as app:
        gr.Markdown("# MeloFormer\nSample multi-track music; every sample is a valid MIDI file.")
        with gr.Row():
            with gr.Column(scale=1):
                instruments = gr.Textbox(
                    label="instruments",
                    placeholder="e.g. drums 33 0 73 (General MIDI programs in order; empty: the model chooses)",
                    elem_id="instruments",
                )
                bars = gr.Number(value=4, precision=0, label="bars (after a prompt: new bars)", elem_id="bars")
                tempo = gr.Number(value=0, label="tempo in bpm (0: the model chooses)", elem_id="tempo")
                time_signature = gr.Dropdown(TIME_SIGNATURES, value=TIME_SIGNATURES[0], label="time signature")
                chords = gr.Textbox(
                    label="chords, one per bar, repeated (e.g. C G Am F; empty: free)", value="", elem_id="chords"
                )
                with gr.Row():
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p")
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                with gr.Accordion("prompt (optional)", open=False):
                    prompt = gr.File(label="prompt MIDI", file_types=[".mid", ".midi"], type="filepath")
                    mode = gr.Radio(MODES, value=MODES[0], label="with the prompt")
                    new_track = gr.Textbox(label="new track (add a track): program 0-127 or drums", value="")
                    regions = gr.Textbox(label="regenerate bars: track:first-last, from 1 (e.g. 2:3-4 1:7)", value="")
                    prompt_bars = gr.Number(value=0, precision=0, label="use the prompt's first bars (0: all)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                roll = gr.Image(label="piano roll", type="filepath", interactive=False, elem_id="pianoroll")
                audio = gr.Audio(label="audio", type="filepath", interactive=False, elem_id="audio")
                midi = gr.File(label="MIDI", interactive=False, elem_id="midi")
        controls = [instruments, bars, tempo, time_signature, temperature, top_p, prompt, mode, new_track]
        button.click(
            studio.run,
            inputs=[*controls, prompt_bars, chords, regions, seed],
            outputs=[roll, audio, midi, status],
            concurrency_limit=1,
        )
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Start the server (``block=False``: in a background thread); returns the page's URL."""
    _, url, _ = app.launch(
        server_name=host, server_port=port, theme=THEME, ssr_mode=False, prevent_thread_lock=not block, quiet=True
    )
    return url


def serve_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="meloformer serve", description="A local web app that samples from a model.")
    parser.add_argument(
        "--ckpt_path", type=str, default=None, help="a checkpoint or a model folder (default: the shipped model)"
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", type=str, default="127.0.0.1", help="0.0.0.0 to serve the local network")
    parser.add_argument("--device", type=str, default="cpu")
    return parser


def serve_main(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    try:
        if not 1 <= args.port <= 65535:
            raise ValueError(f"--port {args.port}: give 1 to 65535")
        studio = Studio(open_checkpoint(args.ckpt_path, args.device), args.device)
        model = args.ckpt_path or "the shipped model"
        print(f"meloformer serve: {model} on http://{args.host}:{args.port} (Ctrl-C stops)")
        launch(build_app(studio), args.host, args.port)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"meloformer serve: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
