"""Shared fixtures: the demo corpus as shards, and tiny model settings for fast training tests."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from _music import DEMO_MIDI
from meloformer.hid import HIDTokenizer
from meloformer.model import MeloFormer, MeloFormerConfig

# The web app's tests need gradio, which a bare GPU machine lacks; every other test runs without it.
collect_ignore = [] if importlib.util.find_spec("gradio") else ["test_serve.py"]

# A MeloFormer small enough to train a few steps in well under a second on CPU: MeloFormerModule's arguments,
# as plain data (the module takes the dicts too). ffn_hidden is given: on the command line a field left out
# keeps the small size's value.
TINY_MODEL = {
    "config": {
        "max_seq_len": 256,
        "summary_slots": 64,
        "n_layer": 1,
        "n_embd": 32,
        "ffn_hidden": 128,
        "n_head": 2,
        "n_kv_head": 1,
    },
    "runtime": {"attention_backend": "sdpa"},
}


def model_flags(settings: dict = TINY_MODEL) -> list[str]:
    """``settings`` (``MeloFormerModule`` arguments, nested dicts) as dotted ``--model.`` command-line flags."""
    flags = []
    for name, value in settings.items():
        if isinstance(value, dict):
            flags += [f"--model.{name}.{field}={v}" for field, v in value.items()]
        else:
            flags.append(f"--model.{name}={value}")
    return flags


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The bundled demo corpus preprocessed with the default tokenizer settings (once per session)."""
    from meloformer.preprocess import preprocess

    out = tmp_path_factory.mktemp("demo-shards")
    preprocess(DEMO_MIDI, out, HIDTokenizer(), workers=1, progress=False)
    return out


@pytest.fixture
def tiny_model() -> dict:
    """Keyword arguments of ``MeloFormerModule`` for a tiny model (a fresh deep copy per test)."""
    return copy.deepcopy(TINY_MODEL)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny tensors: they gain nothing from threads, and on a busy
    machine the hand-offs between threads dominate (use with ``pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(demo_shards, tmp_path_factory):
    """A checkpoint of a tiny model trained two steps on the demo corpus (for generate, audio and serve)."""
    import lightning.pytorch as pl

    from meloformer.datamodules import HIDDataModule
    from meloformer.module import MeloFormerModule

    module = MeloFormerModule(**TINY_MODEL, warmup_steps=1)
    trainer = pl.Trainer(
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, HIDDataModule(str(demo_shards), max_seq_len=256, max_segments=64))
    path = tmp_path_factory.mktemp("tiny-checkpoint") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def model() -> MeloFormer:
    """A tiny untrained MeloFormer with a long context, for sampling tests (one per test module)."""
    torch.manual_seed(0)
    config = MeloFormerConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, max_seq_len=2048, summary_slots=64)
    return MeloFormer(config, HIDTokenizer().kinds).eval()
