"""Model folders: export a training checkpoint, load it back, generate and evaluate from it; the shipped model."""

from __future__ import annotations

import json

import pytest
import symusic
import torch
from huggingface_hub import ModelCard, constants
from test_generate_cli import checkpoint, meloformer  # noqa: F401 (the fixture)
from test_model import hid_pieces

from _music import REPO
from meloformer.cli import main
from meloformer.hid import HIDTokenizer
from meloformer.model import MeloFormer
from meloformer.module import load_checkpoint
from meloformer.pretrained import DEFAULT_MODEL, SHIPPED_MODELS, is_model_folder, load_model_folder
from meloformer.sampler import GenerationRequest, generate

SHIPPED = SHIPPED_MODELS / DEFAULT_MODEL


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "model"
    done = meloformer("export", "--ckpt_path", str(checkpoint), "--out", str(out), cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_export_then_from_pretrained_gives_equal_logits(checkpoint, exported):  # noqa: F811
    assert {p.name for p in exported.iterdir()} >= {"model.safetensors", "config.json", "README.md"}
    saved = json.loads((exported / "config.json").read_text())
    module = load_checkpoint(checkpoint)
    assert saved["tokenizer"] == module.tokenizer.settings and saved["n_layer"] == module.config.n_layer
    model, tokenizer = load_model_folder(exported)
    assert model.config == module.config and tokenizer.settings == module.tokenizer.settings
    tokens = torch.as_tensor(hid_pieces(1, 256, seed=2)[0])[None]
    with torch.no_grad():
        assert torch.equal(model(tokens), module.model(tokens))
    # The mixin's own entry point reads the same folder.
    direct = MeloFormer.from_pretrained(exported)
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), model.state_dict().values()))
    # The card carries the hub front matter, and every file is readable by all.
    card = ModelCard.load(exported / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "meloformer" and "midi" in card.data.tags
    assert {p.name: p.stat().st_mode & 0o777 for p in exported.iterdir()} == dict.fromkeys(
        ("model.safetensors", "config.json", "README.md", "checksums.json"), 0o644
    )


def test_generate_and_evaluate_accept_a_model_folder(exported, demo_shards, tmp_path):
    args = ["--ckpt_path", str(exported), "--bars", "2", "--instruments", "0", "--no_progress", "--seed", "3"]
    from_folder = meloformer("generate", *args, "--out", str(tmp_path / "f"), cwd=tmp_path)
    assert from_folder.returncode == 0, from_folder.stderr[-3000:]
    assert symusic.Score(str(tmp_path / "f" / "sample_0.mid")).note_num() > 0
    done = meloformer("evaluate", "--ckpt_path", str(exported), "--data", str(demo_shards), "--split", "val",
                      "--out", str(tmp_path / "loss.json"), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert 0 < json.loads((tmp_path / "loss.json").read_text())["loss"] < 10


def test_a_folder_without_config_is_refused(tmp_path):
    assert not is_model_folder(tmp_path)
    with pytest.raises(ValueError, match="not a model folder"):
        load_model_folder(tmp_path)


@pytest.mark.skipif(not is_model_folder(SHIPPED), reason="no shipped model in this checkout")
def test_the_shipped_model_writes_a_valid_two_bar_sample(tmp_path):
    model, tokenizer = load_model_folder(SHIPPED)
    assert model.config.vocab_size == HIDTokenizer(**tokenizer.settings).vocab_size
    assert (SHIPPED / "model.safetensors").stat().st_size <= 25 * 2**20
    tokens = generate(model, tokenizer, GenerationRequest(bars=2), seed=0, progress=False)
    tokenizer.decode_to_file(tokens, tmp_path / "s.mid")
    assert tokenizer.parse(tokens).n_bars == 2
    assert symusic.Score(str(tmp_path / "s.mid")).note_num() > 0
    done = meloformer("generate", "--out", str(tmp_path / "cli"), "--bars", "2", "--no_progress", cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "cli" / "sample_0.mid").exists()


@pytest.mark.skipif(not is_model_folder(SHIPPED), reason="no shipped model in this checkout")
def test_the_shipped_model_chooses_the_meter_for_its_instruments():
    """Format version 2 writes the ensemble before the conductor: with no meter asked for, a choir gets a
    chorale's 4/4 (16 of 17 held-out chorales) and a single line a fiddle tune's meter (6/8, 2/4, 2/2, ...)."""
    from meloformer.hid import TRACK_PROGRAM0

    model, tokenizer = load_model_folder(SHIPPED)
    meters = {}
    for name, programs in (("choir", [52, 52, 53, 53]), ("line", [0])):
        request = GenerationRequest(bars=2, instruments=[TRACK_PROGRAM0 + p for p in programs])
        pieces = [tokenizer.parse(generate(model, tokenizer, request, seed=s)) for s in range(8)]
        meters[name] = [piece.conductor_events(tokenizer)[0][0][1] for piece in pieces]
    assert meters["choir"].count((4, 4)) >= 6 and meters["line"].count((4, 4)) <= 2, meters


@pytest.fixture(scope="module")
def shipped_round_trip(tmp_path_factory):
    """The shipped model through the mixin's own calls: from_pretrained, save_pretrained, from_pretrained."""
    model = MeloFormer.from_pretrained(SHIPPED)
    folder = tmp_path_factory.mktemp("hub") / "saved"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.skipif(not is_model_folder(SHIPPED), reason="no shipped model in this checkout")
def test_the_shipped_model_round_trips_through_the_hub_mixin(shipped_round_trip):
    model, folder = shipped_round_trip
    again = MeloFormer.from_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["tokenizer"] == model.tokenizer_settings
    assert again.config == model.config and torch.equal(again.kinds, torch.as_tensor(HIDTokenizer().kinds))
    tokens = torch.as_tensor(hid_pieces(1, 256, seed=4)[0])[None]
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert ModelCard.load(folder / "README.md").data.library_name == "meloformer"


@pytest.mark.skipif(not is_model_folder(SHIPPED), reason="no shipped model in this checkout")
def test_a_hub_id_loads_from_the_local_cache_offline(shipped_round_trip, tmp_path, monkeypatch):
    """push_to_hub uploads what save_pretrained writes; the Hub's cache keeps it as a snapshot of a revision."""
    model, folder = shipped_round_trip
    repo = tmp_path / "hub" / "models--someone--meloformer-test"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded, tokenizer = load_model_folder("someone/meloformer-test")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert tokenizer.settings == HIDTokenizer().settings
    with pytest.raises(ValueError, match=r"^someone/absent: no such model folder, and not in the Hugging Face cache"):
        load_model_folder("someone/absent")


def test_a_missing_hub_model_is_one_line_in_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["generate", "--ckpt_path", "someone/absent", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        "meloformer generate: error: someone/absent: no such model folder, and not in the Hugging Face cache (offline)"
    )
