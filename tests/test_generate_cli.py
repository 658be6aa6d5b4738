"""The console script end to end: fit the demo config a few steps, generate from its checkpoint, evaluate."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import miditoolkit
import pytest
import symusic

from _music import REPO, demo_files
from meloformer.edits import crop_bars
from meloformer.hid import HIDTokenizer

TOK = HIDTokenizer()


def meloformer(*args: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("meloformer"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("fit")
    done = meloformer(
        "fit", "--config", str(REPO / "configs" / "demo.yaml"), "--trainer.max_steps", "3",
        "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
        "--model.config.n_layer", "1", "--model.config.n_embd", "32", "--model.config.ffn_hidden", "128",
        "--model.config.n_head", "2", "--model.config.n_kv_head", "1", cwd=work,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (last,) = (work / "runs" / "demo").rglob("last.ckpt")
    return last


def test_generate_writes_valid_midi_and_piano_rolls_reproducibly(checkpoint, tmp_path):
    args = ["--ckpt_path", str(checkpoint), "--bars", "2", "--instruments", "drums", "0", "--tempo", "90"]
    args += ["--time_signature", "3/4", "--num_samples", "2", "--seed", "5", "--no_progress"]
    first = meloformer("generate", *args, "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for k in range(2):
        midi = tmp_path / "a" / f"sample_{k}.mid"
        assert (tmp_path / "a" / f"sample_{k}.png").stat().st_size > 1000
        score = symusic.Score(str(midi))
        assert score.note_num() > 0 and len(miditoolkit.MidiFile(str(midi)).instruments) == 2
        assert [(t.is_drum, t.program) for t in score.tracks] == [(True, 0), (False, 0)]
        assert [(ts.numerator, ts.denominator) for ts in score.time_signatures] == [(3, 4)]
    again = meloformer("generate", *args, "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert again.returncode == 0
    assert (tmp_path / "a" / "sample_1.mid").read_bytes() == (tmp_path / "b" / "sample_1.mid").read_bytes()
    assert (tmp_path / "a" / "sample_0.mid").read_bytes() != (tmp_path / "a" / "sample_1.mid").read_bytes()


def test_generate_continues_a_prompt_and_adds_a_track(checkpoint, tmp_path):
    prompt = next(f for f in demo_files() if "bach" in str(f))
    base = ["--ckpt_path", str(checkpoint), "--prompt", str(prompt), "--prompt_bars", "2", "--no_progress"]
    done = meloformer("generate", *base, "--bars", "3", "--out", str(tmp_path / "cont"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    prompt_notes = TOK.note_table(crop_bars(TOK, TOK.encode(prompt), 0, 2))
    continued = TOK.note_table(TOK.encode(tmp_path / "cont" / "sample_0.mid"))
    head = continued[continued[:, 1] < 2]
    assert sorted(map(tuple, head.tolist())) == sorted(map(tuple, prompt_notes.tolist()))

    done = meloformer("generate", *base, "--add_track", "73", "--out", str(tmp_path / "add"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    score = symusic.Score(str(tmp_path / "add" / "sample_0.mid"))
    original = TOK.decode(crop_bars(TOK, TOK.encode(prompt), 0, 2))
    assert [t.program for t in score.tracks] == [t.program for t in original.tracks] + [73]
    for new, old in zip(score.tracks, original.tracks):
        assert [(n.time, n.duration, n.pitch, n.velocity) for n in new.notes] == [
            (n.time, n.duration, n.pitch, n.velocity) for n in old.notes
        ]


def test_generate_rejects_bad_controls(checkpoint, tmp_path):
    for args, problem in [
        (["--instruments", "flut"], "close names: flute"),
        (["--time_signature", "three"], "N/D"),
        (["--time_signature", "7/32"], "unsupported time signature"),
    ]:
        done = meloformer("generate", "--ckpt_path", str(checkpoint), "--out", str(tmp_path), *args, cwd=tmp_path)
        assert done.returncode == 2 and problem in done.stderr, (args, done.stderr[-2000:])


def test_evaluate_generated_against_reference_and_checkpoint_on_a_split(checkpoint, tmp_path, demo_shards):
    gen = tmp_path / "gen"
    done = meloformer(
        "generate", "--ckpt_path", str(checkpoint), "--bars", "2", "--instruments", "0", "--num_samples", "2",
        "--out", str(gen), "--no_progress", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reference = REPO / "demo" / "midi" / "bach_chorales"
    done = meloformer(
        "evaluate",
        "--generated",
        str(gen),
        "--reference",
        str(reference),
        "--out",
        str(tmp_path / "m.json"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["generated"]["files"] == 2 and result["reference"]["files"] == 40
    # The reference folder's means, pinned: four-voice chorales sound four pitches at a time and fill every bar.
    reference_means = {
        "pitch_class_entropy": 2.9731971,
        "groove_consistency": 0.9384501,
        "polyphony": 4.1318422,
        "empty_bar_rate": 0.00125,
        "notes_per_bar": 17.7100133,
    }
    assert {k: result["reference"][k] for k in reference_means} == pytest.approx(reference_means, abs=1e-6)
    generated = result["generated"]
    assert 0 <= generated["pitch_class_entropy"] <= math.log2(12)
    assert 0 <= generated["groove_consistency"] <= 1 and 0 <= generated["empty_bar_rate"] <= 1
    assert generated["polyphony"] >= 1 and generated["notes_per_bar"] > 0
    for name in reference_means:
        assert f"{name:<22} {generated[name]:>10.4g} {result['reference'][name]:>10.4g}" in done.stdout
    assert 0 < result["similarity_error"] <= 1

    done = meloformer(
        "evaluate", "--ckpt_path", str(checkpoint), "--data", str(demo_shards), "--split", "val",
        "--out", str(tmp_path / "loss.json"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads((tmp_path / "loss.json").read_text())
    assert {"loss", "ppl", "loss_pitch", "ppl_pitch", "loss_conductor"} <= set(losses)
    assert 0 < losses["loss"] < 10 and "pitch" in done.stdout


def test_generate_device_defaults_to_auto(tiny_checkpoint, monkeypatch):
    """``--device auto`` (the default): CUDA when the machine has it, else the CPU."""
    import torch

    from meloformer.cli import generate_parser
    from meloformer.module import open_checkpoint, resolve_device

    assert generate_parser().parse_args(["--out", "x"]).device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert next(open_checkpoint(str(tiny_checkpoint), "auto").parameters()).device.type == "cpu"
