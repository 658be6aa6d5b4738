"""The model uses the kind table of the tokenizer it was built for, never the default one.

Token ids mean different kinds under other settings (resolution 24 has more ``Pos`` ids than the default
vocabulary has tokens; resolution 8 and 16 tempo bins shift every later kind), so a model that read kinds
off a default tokenizer would crash or build the wrong mask.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from _music import REPO, demo_files
from meloformer.edits import crop_bars
from meloformer.hid import HIDTokenizer
from meloformer.layout import layout
from meloformer.masks import full_dense_mask
from meloformer.model import MeloFormer, MeloFormerConfig
from meloformer.row_layout import KIND_CLASS, row_layout

SETTINGS = [{"resolution": 24}, {"resolution": 8}, {"tempo_bins": 16}]
DEFAULT = HIDTokenizer()


def _piece(tok: HIDTokenizer) -> np.ndarray:
    chorale = next(f for f in demo_files() if "bach" in str(f))
    return crop_bars(tok, tok.encode(chorale), 0, 3).astype(np.int64)


def _model(tok: HIDTokenizer, **fields) -> MeloFormer:
    torch.manual_seed(0)
    config = MeloFormerConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, **fields)
    return MeloFormer(config, tok.kinds).eval()


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_model_reads_kinds_from_its_own_tokenizer(settings):
    tok = HIDTokenizer(**settings)
    tokens = _piece(tok)
    model = _model(tok, attention="summary", kind_sparsity=True, summary_slots=32, max_seq_len=512)
    rows = model.row_layout(torch.from_numpy(tokens)[None])
    expected = KIND_CLASS[layout(tokens, tok.kinds).kind]
    assert np.array_equal(rows.kind_class[0, : len(tokens)].numpy(), expected)
    if tokens.max() < DEFAULT.vocab_size:  # the default table gives other kinds (the old, silent bug)
        wrong = row_layout(tokens[None], DEFAULT.kinds, 32)
        right_mask, wrong_mask = (full_dense_mask(model.mask_mod(r), r) for r in (rows, wrong))
        assert not torch.equal(right_mask, wrong_mask)
    else:  # ids past the default vocabulary (the old IndexError)
        with pytest.raises(ValueError, match="token ids must lie in"):
            layout(tokens, DEFAULT.kinds)
    logits = model(torch.from_numpy(tokens)[None])
    assert logits.shape == (1, len(tokens), tok.vocab_size) and torch.isfinite(logits).all()


def test_kind_table_is_checked_and_stays_out_of_the_state_dict():
    tok = HIDTokenizer(resolution=24)
    with pytest.raises(ValueError, match=f"kind table has {DEFAULT.vocab_size} entries but vocab_size is 1006"):
        MeloFormer(MeloFormerConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2), DEFAULT.kinds)
    model = _model(tok)
    assert torch.equal(model.kinds, torch.from_numpy(tok.kinds.astype(np.int64)))
    assert "kinds" not in model.state_dict() and all("kinds" not in k for k in model.state_dict())


def meloformer(*args: str, cwd) -> subprocess.CompletedProcess:
    done = subprocess.run([shutil.which("meloformer"), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"resolution": 24, "tempo_bins": 16}, {"resolution": 8}], ids=["r24-t16", "r8"])
def test_preprocess_fit_resume_generate_with_other_settings(settings, tmp_path):
    midi = tmp_path / "midi"
    midi.mkdir()
    for path in [f for f in demo_files() if "bach" in str(f)][:6]:
        shutil.copy(path, midi / path.name)
    flags = [f"--tokenizer.{k}={v}" for k, v in settings.items()]
    shards = str(tmp_path / "shards")
    meloformer("preprocess", str(midi), shards, "--workers", "1", "--no_progress", *flags, cwd=tmp_path)
    tokenizer = "{" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}"
    fit = [
        "fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.data_dir", shards,
        "--model.tokenizer", tokenizer,
        "--model.config.n_layer", "1", "--model.config.n_embd", "32", "--model.config.ffn_hidden", "128",
        "--model.config.n_head", "2", "--model.config.n_kv_head", "1",
        "--model.config.max_seq_len", "256", "--model.config.summary_slots", "64",
        "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
        "--trainer.callbacks.init_args.phases", "[{start_step: 0, batch_size: 1}]",
    ]  # fmt: skip
    meloformer(*fit, "--trainer.max_steps", "2", cwd=tmp_path)
    (last,) = (tmp_path / "runs" / "demo").rglob("last.ckpt")
    meloformer(*fit, "--trainer.max_steps", "3", "--ckpt_path", str(last), cwd=tmp_path)
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == 3
    out = tmp_path / "samples"
    meloformer("generate", "--ckpt_path", str(last), "--bars", "2", "--out", str(out), "--no_progress", cwd=tmp_path)
    tok = HIDTokenizer(**settings)
    tokens = tok.encode(out / "sample_0.mid")
    assert tok.parse(tokens).n_bars == 2 and len(tok.note_table(tokens)) > 0
