"""SampleLogger: after validation it writes a sample, logs its piano roll to TensorBoard and its metrics."""

from __future__ import annotations

import wave

import lightning.pytorch as pl
import pytest
import symusic
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from meloformer.audio import SAMPLE_RATE
from meloformer.callbacks import SampleLogger
from meloformer.datamodules import HIDDataModule
from meloformer.module import MeloFormerModule


def test_sample_logger_logs_piano_roll_and_metrics_every_n_validations(demo_shards, tiny_model, tmp_path):
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(
        max_steps=4,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=[tensorboard, csv],
        callbacks=[SampleLogger(every_n_validations=2, bars=2, instruments=[6])],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    module = MeloFormerModule(**tiny_model, warmup_steps=1)
    trainer.fit(module, HIDDataModule(str(demo_shards), max_seq_len=256, max_segments=64))
    samples = sorted(p.name for p in (tmp_path / "tb").rglob("step_*.mid"))
    assert samples == ["step_2.mid", "step_4.mid"]  # validations 2 and 4 of 4
    for name in samples:
        assert symusic.Score(str(next((tmp_path / "tb").rglob(name)))).note_num() > 0
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent)).Reload()
    assert [e.step for e in events.Images("samples/pianoroll")] == [2, 4]
    clips = events.Audio("samples/audio")
    assert [e.step for e in clips] == [2, 4]
    assert all(e.sample_rate == SAMPLE_RATE and e.length_frames > 0 for e in clips)
    for name in samples:  # the WAV beside each MIDI file is as long as the piece
        wav = next((tmp_path / "tb").rglob(name.replace(".mid", ".wav")))
        seconds = symusic.Score(str(wav.with_suffix(".mid"))).to("second").end()
        with wave.open(str(wav)) as audio:
            assert abs(audio.getnframes() / audio.getframerate() - seconds) < 0.05
    assert "sample/pitch_class_entropy" in events.Tags()["scalars"]
    metrics = (next((tmp_path / "csv").rglob("metrics.csv"))).read_text()
    assert "sample/groove_consistency" in metrics


def test_sample_logger_without_a_synthesizer_warns_and_keeps_training(demo_shards, tiny_model, tmp_path, monkeypatch):
    def broken(score):
        raise RuntimeError("symusic 0.6.0 cannot render audio")

    monkeypatch.setattr("meloformer.callbacks.sample_logger.render_score", broken)
    trainer = pl.Trainer(
        max_steps=1,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[SampleLogger(bars=1, instruments=[6])],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="SampleLogger: no audio: symusic 0.6.0"):
        data = HIDDataModule(str(demo_shards), max_seq_len=256, max_segments=64)
        trainer.fit(MeloFormerModule(**tiny_model, warmup_steps=1), data)
    assert trainer.global_step == 1
    assert sorted(p.name for p in (tmp_path / "tb").rglob("step_*.*")) == ["step_1.mid", "step_1.png"]  # no .wav


@pytest.mark.parametrize("rank", [0, 1])
def test_sample_logger_decodes_eagerly_on_every_rank_then_meets_at_a_barrier(tiny_model, tmp_path, rank):
    """A compiled model is not recompiled for the sample (Dynamo sees no new frame); every rank samples and
    waits at a barrier after it, and only rank 0 writes."""
    from types import SimpleNamespace

    import torch
    from torch._dynamo.utils import counters

    module = MeloFormerModule(**tiny_model)
    module.model.compile(backend="eager")
    barriers = []
    trainer = SimpleNamespace(
        sanity_checking=False, global_step=3, is_global_zero=rank == 0, log_dir=str(tmp_path), loggers=[],
        default_root_dir=str(tmp_path), strategy=SimpleNamespace(barrier=barriers.append),
    )  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    SampleLogger(bars=1, instruments=[6]).on_validation_end(trainer, module)
    assert counters["frames"]["total"] == 0
    assert barriers == ["SampleLogger"]
    assert sorted(p.name for p in tmp_path.rglob("step_3.*")) == (
        ["step_3.mid", "step_3.png", "step_3.wav"] if rank == 0 else []
    )
