"""`meloformer serve`: the page's controls are checked before any sampling, and in a real browser (headless
Chromium driven by playwright) the page generates a sample and offers its piano roll, audio and MIDI file."""

from __future__ import annotations

import shutil
import socket

import numpy as np
import pytest
import symusic
import torch
from matplotlib.colors import to_rgb
from PIL import Image

from _music import demo_files
from meloformer.cli import main
from meloformer.hid import TRACK_DRUMS, TRACK_PROGRAM0
from meloformer.module import load_checkpoint, open_checkpoint
from meloformer.pianoroll import MARK_COLOUR
from meloformer.pretrained import save_model_folder
from meloformer.serve import Studio, build_app, launch

MARK_RGB = np.round(np.array(to_rgb(MARK_COLOUR)) * 255).astype(np.uint8)
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# The controls of Studio.request in order, with values that generate a short piece.
DEFAULTS = {
    "instruments": [],
    "bars": 2,
    "tempo": 0,
    "time_signature": "model's choice",
    "temperature": 1.0,
    "top_p": 0.95,
    "prompt": None,
    "mode": "continue",
    "new_track": "",
    "prompt_bars": 0,
}


def chromium() -> str | None:
    """Debian's headless Chromium (playwright cannot download its own browsers here)."""
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.fixture(scope="module")
def studio(tiny_checkpoint) -> Studio:
    return Studio(load_checkpoint(tiny_checkpoint))


def test_the_app_loads_a_model_folder(tiny_checkpoint, tmp_path):
    module = load_checkpoint(tiny_checkpoint)
    save_model_folder(module.model, module.tokenizer, tmp_path / "model", "# a test model")
    studio = Studio(open_checkpoint(str(tmp_path / "model"), "cpu"))
    assert studio.tok.settings == module.tokenizer.settings
    assert all(
        torch.equal(a, b) for a, b in zip(studio.model.state_dict().values(), module.model.state_dict().values())
    )


def test_controls_become_the_generation_request(studio):
    named = {"instruments": ["Drums", "Electric Bass (finger)", "(none)", "Violin"], "tempo": 96}
    request, _ = studio.request(**{**DEFAULTS, **named, "time_signature": "3/4", "key": "D minor", "dynamics": "40-70"})
    assert request.bars == 2 and request.instruments == [TRACK_DRUMS, TRACK_PROGRAM0 + 33, TRACK_PROGRAM0 + 40]
    assert request.tempo == 96 and request.time_signature == (3, 4) and request.prompt is None
    assert request.key == "D minor" and request.dynamics == ["40-70"]
    prompt = str(next(f for f in demo_files() if "bach" in str(f)))
    request, _ = studio.request(**{**DEFAULTS, **named, "prompt": prompt, "prompt_bars": 3})
    assert studio.tok.parse(request.prompt).n_bars == 3 and request.bars == 3 + 2  # bars are new bars
    assert request.instruments is None and request.tempo is None  # the prompt's
    add = {"mode": "add a track", "new_track": "Flute"}
    request, _ = studio.request(**{**DEFAULTS, "prompt": prompt, "prompt_bars": 3, **add})
    assert request.add_track == TRACK_PROGRAM0 + 73 and request.bars == 3
    request, _ = studio.request(**{**DEFAULTS, "bars": 4, "chords": "C G Am F"})  # at most a chord per bar
    assert request.chords == ["C", "G", "Am", "F"]
    request, _ = studio.request(**{**DEFAULTS, "bars": 4, "form": " ABAB ", "voice_leading": "on"})
    assert request.form == "ABAB" and request.voice_leading is True
    assert studio.request(**DEFAULTS)[0].voice_leading is None  # auto: the sampler decides by the ensemble
    assert studio.request(**{**DEFAULTS, "voice_leading": "off"})[0].voice_leading is False
    assert (
        studio.request(**DEFAULTS)[0].restatement == 2.0
        and studio.request(**{**DEFAULTS, "restatement": 0})[0].restatement == 0
    )
    infill = {"mode": "regenerate bars (infill)", "regions": "2:2-3 1:1"}
    request, regions = studio.request(**{**DEFAULTS, "prompt": prompt, "prompt_bars": 3, **infill})
    assert request.bars == 3 and [(r.track, r.first, r.last) for r in regions] == [(2, 2, 3), (1, 1, 1)]


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"bars": 0}, "bars 0"),
        ({"bars": None}, "bars None"),
        ({"instruments": ["vilin"]}, "unknown instrument 'vilin'.*close names: violin"),
        ({"dynamics": "70-40"}, "dynamics '70-40'"),
        ({"key": "H major"}, "key 'H major'"),
        ({"tempo": 1000}, "tempo 1000"),
        ({"temperature": 0}, "temperature 0"),
        ({"time_signature": "7/32"}, None),  # not offered by the page: the model chooses
        ({"prompt": "PROMPT", "mode": "add a track"}, "choose its instrument"),
        ({"prompt": "BAD"}, "bad.mid: not a usable MIDI file"),
        ({"chords": "C H7"}, "H7"),
        ({"form": "ABA"}, "form 'ABA': 2 bars do not divide into 3 equal phrases"),
        ({"voice_leading": True}, "voice-leading True: give auto, on, off"),
        ({"restatement": -1}, "restatement -1: give 0 \\(off\\) to 4"),
        ({"prompt": "PROMPT", "form": "AB"}, "--form plans a new piece"),
        ({"prompt": "PROMPT", "mode": "regenerate bars (infill)"}, "give regions"),
        ({"prompt": "PROMPT", "mode": "regenerate bars (infill)", "regions": "9:1-2"}, "track"),
    ],
)
def test_bad_controls_are_named(studio, change, problem, tmp_path):
    (tmp_path / "bad.mid").write_bytes(b"not midi")
    paths = {"PROMPT": str(demo_files()[0]), "BAD": str(tmp_path / "bad.mid")}
    controls = {**DEFAULTS, **{k: paths.get(v, v) if isinstance(v, str) else v for k, v in change.items()}}
    if problem is None:
        assert studio.request(**controls)[0].time_signature is None
        return
    with pytest.raises(ValueError, match=problem):
        studio.request(**controls)


def test_serve_rejects_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["serve", "--ckpt_path", str(tmp_path / "none.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("none.ckpt: no such file or model folder") and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def page(studio):
    if chromium() is None:
        pytest.skip("no Chromium: apt-get install chromium-headless-shell (CI does, in .ci/run)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(studio)
    url = launch(app, port=port, block=False)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(120_000)  # a busy 2-core machine
        page.goto(url)
        yield page
        browser.close()
    app.close()


def choose(page, slot: str, name: str) -> None:
    """Pick ``name`` in the dropdown ``slot`` as a user does: type into its filter, click the option."""
    page.locator(f"#{slot} input").click()
    page.locator(f"#{slot} input").fill(name)
    page.get_by_role("option", name=name, exact=True).first.click()


@pytest.mark.slow
def test_page_generates_a_sample_with_piano_roll_audio_and_midi(page, tmp_path):
    choose(page, "track_1", "Acoustic Grand Piano")
    choose(page, "track_2", "Electric Bass (finger)")
    for slot in ("track_3", "track_4"):
        choose(page, slot, "(none)")
    page.locator("#bars input").fill("2")
    page.locator("#generate").click()
    page.locator("#pianoroll img").wait_for(state="visible")
    page.locator("#audio audio[src]").first.wait_for(state="attached")  # the player has loaded the WAV
    assert "2 bars, 2 tracks" in page.locator("#status").inner_text()
    with page.expect_download() as download:
        page.locator("#midi a.download-link").first.click()
    download.value.save_as(tmp_path / "sample.mid")
    score = symusic.Score(str(tmp_path / "sample.mid"))
    assert score.note_num() > 0 and [t.program for t in score.tracks] == [0, 33]


@pytest.mark.slow
def test_page_shows_bad_input_as_a_message(page, capfd):
    page.locator("#dynamics textarea").fill("70-40")
    page.locator("#generate").click()
    message = page.get_by_text("dynamics '70-40': write a velocity range LO-HI within 1-127")
    message.first.wait_for(state="visible")
    assert "Traceback" not in capfd.readouterr().err
    page.locator("#dynamics textarea").fill("")


@pytest.mark.slow
def test_page_marks_the_regenerated_bars_in_the_piano_roll(page, tmp_path):
    chorale = next(f for f in demo_files() if "bach" in str(f))
    page.get_by_text("prompt (optional)").click()
    page.locator("#prompt input[type=file]").set_input_files(str(chorale))
    page.get_by_label("regenerate bars (infill)").check()
    page.locator("#regions textarea").fill("2:2-3")
    page.locator("#prompt_bars input").fill("4")
    page.locator("#generate").click()
    page.get_by_text("regenerated 2:2-3 (shaded)").first.wait_for(state="visible")
    picture = page.locator("#pianoroll img")
    source = picture.get_attribute("src")
    (tmp_path / "roll.png").write_bytes(page.request.get(source).body())
    pixels = np.asarray(Image.open(tmp_path / "roll.png").convert("RGB")).reshape(-1, 3)
    assert (pixels == MARK_RGB).all(axis=1).sum() > 1000  # the shaded bars


def test_the_api_has_named_optional_parameters(studio):
    endpoint = build_app(studio).get_api_info()["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names[:6] == [f"track_{n}" for n in range(1, 7)] and "prompt" in names and "key" in names
    assert all(p["parameter_has_default"] for p in endpoint["parameters"])  # the prompt too: not "(required)"
    assert [r["label"] for r in endpoint["returns"]] == ["piano roll", "audio", "MIDI", "status"]
