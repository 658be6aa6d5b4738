"""Shared fixtures: the demo corpus as shards, and tiny model settings for fast training tests."""

from __future__ import annotations

import pytest

from _music import DEMO_MIDI
from meloformer.hid import HIDTokenizer

# A MeloFormer small enough to train a few steps in well under a second on CPU.
TINY_MODEL = {
    "max_seq_len": 256,
    "summary_slots": 64,
    "attention_backend": "sdpa",
    "overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1},
}


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The bundled demo corpus preprocessed with the default tokenizer settings (once per session)."""
    from meloformer.preprocess import preprocess

    out = tmp_path_factory.mktemp("demo-shards")
    preprocess(DEMO_MIDI, out, HIDTokenizer(), workers=1, progress=False)
    return out


@pytest.fixture
def tiny_model() -> dict:
    """Keyword arguments of ``MeloFormerModule`` for a tiny model (a fresh copy per test)."""
    return {**TINY_MODEL, "overrides": dict(TINY_MODEL["overrides"])}
