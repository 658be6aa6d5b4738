"""``SampleLogger``: every N validation runs, sample a short piece and log its piano roll, audio and metrics."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from meloformer.audio import SAMPLE_RATE, render_score, write_wav
from meloformer.features import piece_features
from meloformer.files import atomic_path
from meloformer.metrics import MusicMetrics
from meloformer.pianoroll import render_pianoroll
from meloformer.report import markdown, read_folder, report_scalars, two_sample
from meloformer.sampler import GenerationRequest, generate


class SampleLogger(pl.Callback):
    """Generate ``bars`` bars after every ``every_n_validations``-th validation.

    The model decodes eagerly (``torch.compiler.set_stance("force_eager")``): a compiled training model would
    otherwise compile a new graph for every prompt length, each counting against Dynamo's recompile limit.
    Every rank samples the same piece (same seed, so about the same time) and all meet at a barrier after it,
    so no rank sits in the next training collective while rank 0 samples; rank 0 writes and logs it.

    The MIDI file goes to ``<log_dir>/samples/step_<N>.mid``; the piano roll and the audio (General MIDI
    SoundFont) are logged to a TensorBoard logger (``samples/pianoroll``, ``samples/audio``) and saved beside
    the MIDI file (``step_<N>.png``, ``step_<N>.wav``); the music metrics of the sample
    (pitch-class entropy, groove consistency, polyphony, empty-bar rate, notes per bar) are logged as
    ``sample/<name>`` to every logger.

    With ``against`` (a folder of real MIDI files), it samples ``report_samples`` pieces in all and logs
    their two-sample report against that folder (``meloformer.report``): its scalars as ``report/<name>``
    to every logger, its Markdown table as TensorBoard text ``report``.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        bars: int = 4,
        instruments: list[int] | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.95,
        seed: int = 0,
        against: str | None = None,
        report_samples: int = 8,
    ) -> None:
        if every_n_validations < 1 or bars < 1:
            raise ValueError("SampleLogger: every_n_validations and bars must be at least 1")
        if against is not None and (not Path(against).is_dir() or report_samples < 2):
            raise ValueError(f"SampleLogger: against={against} must be a folder and report_samples at least 2")
        self.against, self.report_samples, self.real = against, report_samples, None
        self.every = every_n_validations
        self.request = GenerationRequest(
            bars=bars, instruments=instruments, temperature=temperature, top_k=top_k, top_p=top_p
        )
        self.seed = seed
        self.validations = 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every:
            return
        step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                tokens = generate(pl_module.model, pl_module.tokenizer, self.request, seed=self.seed + step)
        finally:
            pl_module.train(was_training)
        if trainer.is_global_zero:
            self._log(trainer, pl_module, tokens, step)
        trainer.strategy.barrier("SampleLogger")

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tokens, step: int) -> None:
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        pl_module.tokenizer.decode_to_file(tokens, out_dir / f"step_{step}.mid")
        figure = render_pianoroll(pl_module.tokenizer, tokens, title=f"sample at step {step}")
        with atomic_path(out_dir / f"step_{step}.png") as tmp:
            figure.savefig(tmp, format="png")
        try:
            audio = render_score(pl_module.tokenizer.decode(tokens))
            write_wav(out_dir / f"step_{step}.wav", audio)
        except (RuntimeError, OSError) as err:  # no synthesizer (e.g. symusic 0.6.0): never stop training for it
            rank_zero_warn(f"SampleLogger: no audio: {err}")
            audio = None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("samples/pianoroll", figure, global_step=step)
                if audio is not None:
                    mono = torch.from_numpy(audio.mean(axis=0))[None]  # add_audio takes [1, samples]
                    logger.experiment.add_audio("samples/audio", mono, global_step=step, sample_rate=SAMPLE_RATE)
        metrics, _ = MusicMetrics(pl_module.tokenizer).piece(tokens)
        for logger in trainer.loggers:
            logger.log_metrics({f"sample/{k}": v for k, v in metrics.items()}, step=step)
        if self.against:
            self.log_report(trainer, pl_module, tokens, step)

    def log_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, first, step: int) -> None:
        """Sample ``report_samples - 1`` more pieces and log the report of all against ``against``."""
        tok, was_training = pl_module.tokenizer, pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                more = [
                    generate(pl_module.model, tok, self.request, seed=self.seed + step + k)
                    for k in range(1, self.report_samples)
                ]
        finally:
            pl_module.train(was_training)
        samples = [first, *more]
        if self.real is None:  # the real pieces' features, once
            self.real = read_folder(self.against, tok)[0]
        report = two_sample([piece_features(tok, t) for t in samples], self.real, bootstrap=50)
        for logger in trainer.loggers:
            logger.log_metrics(report_scalars(report), step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("report", markdown(report), global_step=step)
