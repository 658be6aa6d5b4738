"""``meloformer serve``: a local Gradio web app that samples music from a checkpoint or model folder.

Controls mirror ``meloformer generate`` (instruments by General MIDI name, bars, tempo, time signature, key,
dynamics, chords, form, voice-leading, temperature, top-p, seed, a prompt MIDI to continue, to add a track
to, or to regenerate bars of); the page shows the piano roll (regenerated bars marked), plays the audio and
offers the MIDI file.
The handler is also an API endpoint, ``/generate``, with named parameters (``gradio_client``:
``Client(url).predict(track_1="Violin", bars=8, api_name="/generate")``); every parameter has a default.
Gradio runs the handler in a worker thread, not on the request's event loop, one generation at a time, and
forwards the sampler's tqdm bar as the page's progress indicator. A control that cannot be generated raises
``gr.Error``: one line on the page, no traceback anywhere.
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
from meloformer.instruments import instrument_choices, instrument_name, instrument_token
from meloformer.module import MeloFormerModule, open_checkpoint
from meloformer.pianoroll import save_pianoroll
from meloformer.sampler import GenerationRequest, check_request, generate, parse_time_signature
from meloformer.steering import DEFAULT_DYNAMICS, DEFAULT_INSTRUMENTS, RESTATEMENT_BIAS, VOICE_LEADING

TIME_SIGNATURES = ["model's choice", "4/4", "3/4", "2/4", "6/8", "5/4", "7/8", "12/8"]
MODES = ["continue", "add a track", "regenerate bars (infill)"]
NO_TRACK = "(none)"
TRACK_SLOTS = 6  # instrument dropdowns on the page: one per track, so an instrument may come twice (SATB)
DEFAULT_TRACKS = [instrument_name(instrument_token(name)) for name in DEFAULT_INSTRUMENTS]
KEYS = ["model's choice"] + [
    f"{tonic} {mode}" for mode in ("major", "minor") for tonic in "C G D A E B F# C# F Bb Eb Ab".split()
]
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
        instruments: list[str],
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
        key: str = KEYS[0],
        dynamics: str = "",
        form: str = "",
        voice_leading: str = "auto",
        restatement: float = RESTATEMENT_BIAS,
    ) -> tuple[GenerationRequest, list[Region]]:
        """The GenerationRequest of the page's controls and the infill regions (none unless infilling);
        ValueError names the first bad control. ``instruments`` are names or programs, ``NO_TRACK`` skipped.
        With a prompt, its tracks, tempo and meter hold (the page's are ignored), and adding a track or
        regenerating bars keeps its dynamics too."""
        if bars is None or bars != int(bars) or not 1 <= bars <= 256:
            raise ValueError(f"bars {bars}: give a whole number from 1 to 256")
        if tempo and not 24 <= tempo <= 320:
            raise ValueError(f"tempo {tempo}: give 24 to 320 bpm, or 0 to let the model choose")
        if not 0 < temperature <= 5 or not 0 < top_p <= 1:
            raise ValueError(f"temperature {temperature} / top-p {top_p}: give temperature in (0, 5], top-p in (0, 1]")
        if restatement is None or not 0 <= restatement <= 4:
            raise ValueError(f"restatement {restatement}: give 0 (off) to 4")
        if voice_leading not in VOICE_LEADING:
            raise ValueError(f"voice-leading {voice_leading!r}: give {', '.join(VOICE_LEADING)}")
        tracks = [instrument_token(name) for name in instruments if name and name != NO_TRACK]
        request = GenerationRequest(
            bars=int(bars),
            instruments=None if prompt else tracks or None,  # with a prompt: its tracks, tempo and meter
            tempo=None if prompt else tempo or None,
            time_signature=parse_time_signature(time_signature) if time_signature in TIME_SIGNATURES[1:] else None,
            temperature=temperature,
            top_p=top_p,
            chords=chords.split() or None,
            key=key if key and key != KEYS[0] else None,
            dynamics=dynamics.split() or None,
            form=form.strip() or None,
            voice_leading=VOICE_LEADING[voice_leading],
            restatement=restatement,
        )
        if prompt:
            request.time_signature = None
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
                if not new_track or new_track == NO_TRACK:
                    raise ValueError("add a track: choose its instrument")
                request.add_track, request.bars, request.dynamics = instrument_token(new_track), n_bars, None
            elif mode == MODES[2]:
                if request.chords or request.key:
                    raise ValueError("infill keeps the prompt's chords and key: clear them")
                request.bars, request.dynamics = n_bars, None
                infill_regions = [Region.parse(text) for text in regions.split()]
                if not infill_regions:
                    raise ValueError("regenerate bars: give regions such as 2:3-4 (track:first-last bar, from 1)")
                check_infill(self.tok, request, infill_regions)
                return request, infill_regions
            else:
                request.bars = n_bars + int(bars)
        check_request(self.tok, request)
        return request, []

    def run(
        self,
        track_1: str = DEFAULT_TRACKS[0],
        track_2: str = DEFAULT_TRACKS[1],
        track_3: str = DEFAULT_TRACKS[2],
        track_4: str = DEFAULT_TRACKS[3],
        track_5: str = NO_TRACK,
        track_6: str = NO_TRACK,
        bars: float = 8,
        tempo: float = 0,
        time_signature: str = TIME_SIGNATURES[0],
        key: str = KEYS[0],
        dynamics: str = " ".join(DEFAULT_DYNAMICS),
        chords: str = "",
        temperature: float = 1.0,
        top_p: float = 0.95,
        seed: float = 0,
        prompt: str | None = None,
        mode: str = MODES[0],
        new_track: str = NO_TRACK,
        regions: str = "",
        prompt_bars: float = 0,
        form: str = "",
        voice_leading: str = "auto",
        restatement: float = RESTATEMENT_BIAS,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio's progress idiom)
    ) -> tuple[str, str, str, str]:
        """Sample one piece; returns its piano roll (PNG), audio (WAV), MIDI file and a status line.

        Args:
            track_1: instrument of track 1, a General MIDI name ("Choir Aahs", "Violin", "Drums") or "(none)"; all
                tracks "(none)": the model chooses
            track_2: instrument of track 2
            track_3: instrument of track 3
            track_4: instrument of track 4
            track_5: instrument of track 5
            track_6: instrument of track 6
            bars: bars to write (after a prompt: new bars)
            tempo: quarter notes per minute, 24-320; 0: the model chooses
            time_signature: e.g. "4/4", or "model's choice"
            key: e.g. "D minor": the notes stay in its scale; "model's choice": free
            dynamics: velocity ranges spread over the bars, e.g. "40-70" or "55-70 70-85 85-100"; empty: free
            chords: one chord per bar, repeated, e.g. "C G Am F"; empty: free
            temperature: sampling temperature, (0, 5]
            top_p: nucleus sampling, (0, 1]
            seed: random seed, a whole number from 0
            prompt: optional MIDI file to continue, add a track to, or regenerate bars of
            mode: with a prompt: "continue", "add a track" or "regenerate bars (infill)"
            new_track: add a track: its instrument
            regions: infill: track:first-last bars, from 1 (e.g. "2:3-4 1:7")
            prompt_bars: use only the prompt's first bars (0: all)
            form: a letter per phrase of equal length, e.g. "AABA": a repeated letter restates its phrase (no prompt)
            voice_leading: "on": no track crosses the voices before it or moves with one in parallel fifths or
                octaves (a choir's voices also keep their listed order and their parts' ranges); "off"; "auto":
                on when every track is a voice (a choir)
            restatement: a bar begun as a copy of an earlier bar of its track is drawn to end as one: the bias,
                0 (off) to 4
        """
        started = time.perf_counter()
        try:
            request, regions_ = self.request(
                [track_1, track_2, track_3, track_4, track_5, track_6],
                bars,
                tempo,
                time_signature,
                temperature,
                top_p,
                prompt,
                mode,
                new_track,
                prompt_bars,
                chords,
                regions,
                key,
                dynamics,
                form,
                voice_leading,
                restatement,
            )
            if seed is None or seed != int(seed) or seed < 0:
                raise ValueError(f"seed {seed}: give a whole number from 0")
            progress(0, desc="sampling")
            if regions_:
                tokens = infill(self.model, self.tok, request, regions_, seed=int(seed), progress=True)
            else:
                tokens = generate(self.model, self.tok, request, seed=int(seed), progress=True)
            out = Path(self._work.name)  # one generation at a time; Gradio copies each output into its cache
            self.tok.decode_to_file(tokens, out / "sample.mid")
            marked = [region.as_tuple() for region in regions_]
            save_pianoroll(self.tok, tokens, out / "sample.png", f"seed {int(seed)}", marked)
            progress(1, desc="rendering audio")
            render_midi(out / "sample.mid", out / "sample.wav")
        except (ValueError, OSError, RuntimeError) as err:
            raise gr.Error(str(err).splitlines()[0], print_exception=False) from None
        piece = self.tok.parse(tokens)
        notes = len(self.tok.note_table(piece))
        regenerated = f", regenerated {' '.join(map(str, regions_))} (shaded)" if regions_ else ""
        status = (
            f"{piece.n_bars} bars, {len(piece.tracks)} tracks, {notes} notes, seed {int(seed)}{regenerated}, "
            f"{time.perf_counter() - started:.1f} s"
        )
        return str(out / "sample.png"), str(out / "sample.wav"), str(out / "sample.mid"), status


def build_app(studio: Studio) -> gr.Blocks:
    """The page: controls on the left, the sample on the right."""
    choices = [NO_TRACK, *instrument_choices()]
    with gr.Blocks(title="MeloFormer", analytics_enabled=False) as app:
        gr.Markdown("# MeloFormer\nSample multi-track music; every sample is a valid MIDI file.")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Group():
                    tracks = [
                        gr.Dropdown(
                            choices,
                            value=DEFAULT_TRACKS[n] if n < len(DEFAULT_TRACKS) else NO_TRACK,
                            label=f"track {n + 1}"
                            + (" (without a prompt; all (none): the model chooses)" if n == 0 else ""),
                            elem_id=f"track_{n + 1}",
                            filterable=True,
                        )
                        for n in range(TRACK_SLOTS)
                    ]
                bars = gr.Number(value=8, precision=0, label="bars (after a prompt: new bars)", elem_id="bars")
                tempo = gr.Number(
                    value=0, label="tempo in bpm (0: the model chooses; without a prompt)", elem_id="tempo"
                )
                time_signature = gr.Dropdown(
                    TIME_SIGNATURES,
                    value=TIME_SIGNATURES[0],
                    label="time signature (without a prompt)",
                    elem_id="time_signature",
                )
                key = gr.Dropdown(KEYS, value=KEYS[0], label="key", elem_id="key")
                dynamics = gr.Textbox(
                    label="dynamics: velocity ranges over the bars (e.g. 40-70; empty: the model's own)",
                    value=" ".join(DEFAULT_DYNAMICS),
                    elem_id="dynamics",
                )
                chords = gr.Textbox(
                    label="chords, one per bar, repeated (e.g. C G Am F; empty: free)", value="", elem_id="chords"
                )
                form = gr.Textbox(
                    label="form: a letter per phrase (e.g. AABA; empty: free; without a prompt)",
                    value="",
                    elem_id="form",
                )
                voice_leading = gr.Radio(
                    list(VOICE_LEADING),
                    value="auto",
                    label="voice-leading: no crossing, no parallel fifths or octaves (auto: for a choir)",
                    elem_id="voice_leading",
                )
                restatement = gr.Slider(
                    0.0,
                    4.0,
                    value=RESTATEMENT_BIAS,
                    step=0.5,
                    label="restatement: a bar begun as a copy of an earlier one is drawn to end as one (0: off)",
                    elem_id="restatement",
                )
                with gr.Row():
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p")
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                with gr.Accordion("prompt (optional)", open=False):
                    prompt = gr.File(
                        label="prompt MIDI", file_types=[".mid", ".midi"], type="filepath", elem_id="prompt"
                    )
                    mode = gr.Radio(MODES, value=MODES[0], label="with the prompt", elem_id="mode")
                    new_track = gr.Dropdown(choices, value=NO_TRACK, label="new track (add a track)")
                    regions = gr.Textbox(
                        label="regenerate bars: track:first-last, from 1 (e.g. 2:3-4 1:7)", value="", elem_id="regions"
                    )
                    prompt_bars = gr.Number(
                        value=0, precision=0, label="use the prompt's first bars (0: all)", elem_id="prompt_bars"
                    )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown(label="status", elem_id="status")
                roll = gr.Image(label="piano roll", type="filepath", interactive=False, elem_id="pianoroll")
                audio = gr.Audio(label="audio", type="filepath", interactive=False, elem_id="audio")
                midi = gr.File(label="MIDI", interactive=False, elem_id="midi")
        inputs = [*tracks, bars, tempo, time_signature, key, dynamics, chords, temperature, top_p, seed]
        button.click(
            studio.run,
            inputs=[*inputs, prompt, mode, new_track, regions, prompt_bars, form, voice_leading, restatement],
            outputs=[roll, audio, midi, status],
            api_name="generate",
            concurrency_limit=1,
        )
    return app


class _OneLineErrors:
    """Stands in for the ``traceback`` module in Gradio's queue, which prints a whole traceback for every
    request its components refuse (a raw API call with a missing value, a string for a number, a file path
    it did not upload): the log gets one line instead. The client gets the message (``show_error``)."""

    @staticmethod
    def print_exc(*args, **kwargs) -> None:
        err = sys.exc_info()[1]
        message = str(err).strip().splitlines()[0] if err is not None and str(err).strip() else type(err).__name__
        print(f"meloformer serve: request refused: {message}", file=sys.stderr)


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Start the server (``block=False``: in a background thread); returns the page's URL."""
    import gradio.queueing

    gradio.queueing.traceback = _OneLineErrors  # see _OneLineErrors
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        theme=THEME,
        ssr_mode=False,
        prevent_thread_lock=not block,
        quiet=True,
        show_error=True,
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
