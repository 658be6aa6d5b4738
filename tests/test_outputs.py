"""Nothing lost, nothing stale: every file the product writes lands whole, never over an input or earlier work
(without --overwrite), in a folder checked writable before the work; model folders are verified before use.

Commands run in this process through ``meloformer.cli.main``: an uncaught exception fails the test exactly where
a traceback would reach the user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _music import demo_files, make_score
from meloformer.cli import main
from meloformer.files import atomic_path, folder_lock, temporary_name, writable_folder
from meloformer.model import MeloFormer
from meloformer.pretrained import (
    CHECKSUMS,
    DEFAULT_MODEL,
    SHIPPED_MODELS,
    load_model_folder,
    verify_model_folder,
)

SHIPPED = SHIPPED_MODELS / DEFAULT_MODEL


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"meloformer {command}: error: "), err
    return err


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder this process cannot write to: a mode-555 folder, or for root (whom modes do not stop) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        yield folder
        folder.chmod(0o755)
        return
    try:
        writable_folder("/sys")
    except ValueError:
        yield Path("/sys")
        return
    pytest.skip("running as root without a read-only folder")


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("song") / "song.mid"
    make_score([(0, False, [(0.0, 1.0, 60, 90), (1.0, 1.0, 64, 90)])]).dump_midi(str(path))
    return path


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", "--ckpt_path", str(tiny_checkpoint), "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------- the rule itself


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("earlier work")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "earlier work" and not temporary_name(target).exists()
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_a_folder_lock_refuses_a_second_writer(tmp_path):
    with folder_lock(tmp_path, ".x.lock", "generate"):
        with pytest.raises(ValueError, match="another generate is writing this folder"):
            with folder_lock(tmp_path, ".x.lock", "generate"):
                pass
    with folder_lock(tmp_path, ".x.lock", "generate"):  # released with the first holder
        pass


# ---------------------------------------------------------------- render


@pytest.mark.parametrize(
    "output, problem",
    [
        ("song.mid", "is the input"),  # render x.mid x.mid used to replace the MIDI with WAV data
        ("other.mid", "other.mid: the output must be a .wav file"),  # another MIDI file
        ("old.wav", "old.wav: already exists; give --overwrite"),
    ],
)
def test_render_never_writes_over_its_input_another_midi_or_earlier_audio(song, output, problem, tmp_path, capsys):
    midi = tmp_path / "song.mid"
    shutil.copy(song, midi)
    shutil.copy(song, tmp_path / "other.mid")
    (tmp_path / "old.wav").write_bytes(b"earlier audio")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["render", str(midi), str(tmp_path / output)]) == 2
    assert problem in one_line_error(capsys, "render")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_render_overwrite_replaces_an_earlier_wav(song, tmp_path, capsys):
    (tmp_path / "old.wav").write_bytes(b"earlier audio")
    assert main(["render", str(song), str(tmp_path / "old.wav"), "--overwrite"]) == 0
    assert (tmp_path / "old.wav").read_bytes()[:4] == b"RIFF"


def test_render_refuses_audio_longer_than_the_cap_before_rendering(tmp_path, capsys):
    huge = tmp_path / "huge.mid"  # 40 bytes, one note of 50,000 s: 9.6 GB of audio
    make_score([(0, False, [(0.0, 100_000.0, 60, 90)])]).dump_midi(str(huge))
    assert huge.stat().st_size < 100
    assert main(["render", str(huge), str(tmp_path / "huge.wav")]) == 2
    assert "50,000 s of audio is more than the limit of 1,200 s (raise it with --max_seconds)" in one_line_error(
        capsys, "render"
    )
    assert not list(tmp_path.glob("*.wav")) and not list(tmp_path.glob(".*"))
    four = tmp_path / "four.mid"  # 4 s: refused under a 2 s cap, rendered when the cap is raised
    make_score([(0, False, [(0.0, 8.0, 60, 90)])]).dump_midi(str(four))
    assert main(["render", str(four), str(tmp_path / "four.wav"), "--max_seconds", "2"]) == 2
    assert "more than the limit of 2 s" in one_line_error(capsys, "render")
    assert main(["render", str(four), str(tmp_path / "four.wav"), "--max_seconds", "5"]) == 0


@pytest.mark.parametrize("header_change", ["tpq0", "type2"])
def test_midi_without_time_or_with_sequential_patterns_is_refused(song, header_change, tmp_path, capsys):
    data = bytearray(song.read_bytes())
    if header_change == "tpq0":
        data[12:14] = (0).to_bytes(2, "big")
    else:
        data[8:10] = (2).to_bytes(2, "big")
    bad = tmp_path / f"{header_change}.mid"
    bad.write_bytes(bytes(data))
    assert main(["render", str(bad), str(tmp_path / "out.wav")]) == 2
    reason = "0 ticks per quarter note" if header_change == "tpq0" else "type 2 (sequential patterns)"
    assert reason in one_line_error(capsys, "render")
    assert not (tmp_path / "out.wav").exists()


def test_render_into_a_read_only_folder_says_so(song, read_only, capsys):
    assert main(["render", str(song), str(read_only / "out.wav")]) == 2
    err = one_line_error(capsys, "render")
    assert f"{read_only}: cannot write to this folder" in err and "not found" not in err.lower()


# ---------------------------------------------------------------- generate


def generate(tiny_checkpoint, out: Path, *extra: str) -> int:
    args = ["generate", "--ckpt_path", str(tiny_checkpoint), "--out", str(out), "--bars", "2", "--no_progress"]
    return main([*args, "--instruments", "0", *extra] if "--instruments" not in extra else [*args, *extra])


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if the model samples: the refusals below must come before any sampling."""
    import meloformer.infill  # noqa: F401 (imported first, it keeps the real `generate` it imports by name)
    import meloformer.sampler

    def refuse(*args, **kwargs):
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(meloformer.sampler, "generate", refuse)


def test_generate_audio_without_the_soundfont_fails_before_sampling(
    tiny_checkpoint, tmp_path, monkeypatch, no_sampling, capsys
):
    import meloformer.audio

    def missing():
        raise OSError("no TimGM6mb.sf2: audio needs the pretty_midi package (pip install pretty_midi)")

    monkeypatch.setattr(meloformer.audio, "soundfont_path", missing)
    assert generate(tiny_checkpoint, tmp_path / "out", "--audio") == 2
    assert "no TimGM6mb.sf2" in one_line_error(capsys, "generate")
    assert not list((tmp_path / "out").glob("sample_*"))


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--chords", "C", "G", "Am"], "3 chords for 2 new bars: give at most one chord per bar"),
        (["--instruments", "drums", "0", "drums"], "'drums' twice"),
    ],
)
def test_generate_refuses_what_it_would_silently_drop(tiny_checkpoint, extra, problem, tmp_path, no_sampling, capsys):
    assert generate(tiny_checkpoint, tmp_path / "out", *extra) == 2
    assert problem in one_line_error(capsys, "generate")


def test_generate_refuses_a_type_2_prompt(tiny_checkpoint, song, tmp_path, no_sampling, capsys):
    data = bytearray(song.read_bytes())
    data[8:10] = (2).to_bytes(2, "big")
    (tmp_path / "type2.mid").write_bytes(bytes(data))
    args = ["generate", "--ckpt_path", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--no_progress"]
    assert main([*args, "--prompt", str(tmp_path / "type2.mid")]) == 2
    assert "type 2 (sequential patterns) is not supported" in one_line_error(capsys, "generate")


def test_generate_keeps_earlier_samples_unless_told_to_overwrite(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(tiny_checkpoint, out, "--seed", "1") == 0
    first = (out / "sample_0.mid").read_bytes()
    capsys.readouterr()
    assert generate(tiny_checkpoint, out, "--seed", "2") == 2
    assert "sample_0.mid (and 1 more): already exists; give --overwrite" in one_line_error(capsys, "generate")
    assert (out / "sample_0.mid").read_bytes() == first
    assert generate(tiny_checkpoint, out, "--seed", "2", "--overwrite") == 0
    assert (out / "sample_0.mid").read_bytes() != first
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["sample_0.mid", "sample_0.png"]


def test_a_second_generate_on_one_folder_is_refused_while_the_first_writes(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, ".generate.lock", "generate"):  # what a running `generate` holds
        assert generate(tiny_checkpoint, out) == 2
        assert "another generate is writing this folder" in one_line_error(capsys, "generate")
    assert generate(tiny_checkpoint, out) == 0


def test_generate_into_a_read_only_folder_fails_before_sampling(tiny_checkpoint, read_only, no_sampling, capsys):
    assert generate(tiny_checkpoint, read_only / "samples") == 2
    assert "cannot write to this folder" in one_line_error(capsys, "generate")


# ---------------------------------------------------------------- export and model folders


def test_export_writes_checksums_and_refuses_a_non_empty_folder(tiny_checkpoint, exported, tmp_path, capsys):
    listed = json.loads((exported / CHECKSUMS).read_text())["files"]
    assert set(listed) == {"config.json", "model.safetensors"}
    assert listed["model.safetensors"]["bytes"] == (exported / "model.safetensors").stat().st_size
    (tmp_path / "notes.txt").write_text("my notes")
    args = ["export", "--ckpt_path", str(tiny_checkpoint), "--out"]
    assert main([*args, str(tmp_path)]) == 2
    assert "is not empty; give --overwrite" in one_line_error(capsys, "export")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    (copy / "model.safetensors").write_bytes(b"stale")
    assert main([*args, str(copy), "--overwrite"]) == 0
    verify_model_folder(copy)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_export_refuses_to_replace_the_shipped_model(tiny_checkpoint, capsys):
    before = (SHIPPED / "model.safetensors").stat()
    assert main(["export", "--ckpt_path", str(tiny_checkpoint), "--out", str(SHIPPED)]) == 2
    assert "is not empty; give --overwrite" in one_line_error(capsys, "export")
    assert (SHIPPED / "model.safetensors").stat().st_mtime_ns == before.st_mtime_ns


def test_the_shipped_model_matches_its_checksums():
    saved = verify_model_folder(SHIPPED)
    assert saved["n_layer"] >= 1 and "tokenizer" in saved


def _flip_bytes(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    for i in range(64):  # in the weights, after the header
        data[-1 - 97 * i] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _other_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] += 1
    (folder / "config.json").write_text(json.dumps(config))


def _broken_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["n_embd"] = "wide"
    (folder / "config.json").write_text(json.dumps(config))


def _invalid_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"n_layer": 1,')


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_flip_bytes, "model.safetensors: not the file this folder was exported with"),
        (_truncate, "model.safetensors: not the file this folder was exported with"),
        (_other_config, "config.json: not the file this folder was exported with"),
        (_broken_config, "config.json: field 'n_embd' is 'wide', not of type int"),
        (_invalid_json, "config.json: not valid JSON"),
    ],
)
def test_a_damaged_model_folder_is_refused_by_every_loader(exported, damage, problem, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    damage(folder)
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        load_model_folder(folder)
    if damage is not _invalid_json:  # (that one the mixin itself refuses first, with json's ValueError)
        with pytest.raises(ValueError, match="not the file this folder was exported with"):
            MeloFormer.from_pretrained(folder)  # the hub mixin's own call checks the files too
    args = ["--ckpt_path", str(folder), "--out", str(tmp_path / "out"), "--bars", "1", "--no_progress"]
    assert main(["generate", *args]) == 2
    assert problem in one_line_error(capsys, "generate")
    from meloformer.serve import serve_main

    assert serve_main(["--ckpt_path", str(folder), "--port", "7999"]) == 2
    assert problem in capsys.readouterr().err


def test_an_edited_card_is_still_a_valid_folder(exported, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    (folder / "README.md").write_text("# my notes on this model\n")
    load_model_folder(folder)


# ---------------------------------------------------------------- evaluate


def test_evaluate_into_a_read_only_folder_fails_before_evaluating(read_only, tmp_path, monkeypatch, capsys):
    import meloformer.evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated before checking --out")

    monkeypatch.setattr(meloformer.evaluate, "evaluate_music", refuse)
    args = ["evaluate", "--generated", str(tmp_path), "--reference", str(tmp_path)]
    assert main([*args, "--out", str(read_only / "result.json")]) == 2
    assert "cannot write to this folder" in one_line_error(capsys, "evaluate")


def test_evaluate_json_is_strict_with_null_for_undefined_numbers(tmp_path, monkeypatch, capsys):
    import meloformer.evaluate

    monkeypatch.setattr(
        meloformer.evaluate,
        "evaluate_music",
        lambda *a: {"similarity_error": float("nan"), "ratio": float("inf"), "curve": [1.0, float("nan")]},
    )
    monkeypatch.setattr(meloformer.evaluate, "music_table", lambda result: "table")
    out = tmp_path / "result.json"
    args = ["evaluate", "--generated", str(tmp_path), "--reference", str(tmp_path), "--out", str(out)]
    assert main(args) == 0
    text = out.read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON")) == {
        "similarity_error": None,
        "ratio": None,
        "curve": [1.0, None],
    }
    assert main(args) == 2
    assert "result.json: already exists; give --overwrite" in one_line_error(capsys, "evaluate")


# ---------------------------------------------------------------- preprocess


def test_preprocess_of_files_none_usable_fails_and_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.mid").write_bytes(b"not midi")
    make_score([]).dump_midi(str(tmp_path / "in" / "silent.mid"))
    out = tmp_path / "out"
    assert main(["preprocess", str(tmp_path / "in"), str(out), "--workers", "1", "--no_progress"]) == 2
    assert "none of its 2 MIDI files is usable" in one_line_error(capsys, "preprocess")
    assert not out.exists()


def test_refused_preprocess_of_an_empty_folder_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["preprocess", str(tmp_path / "in"), str(tmp_path / "out"), "--no_progress"]) == 2
    assert "no .mid or .midi files found" in one_line_error(capsys, "preprocess")
    assert not (tmp_path / "out").exists()


def test_preprocess_workers_are_capped_at_the_cpu_count(tmp_path, monkeypatch):
    import multiprocessing

    import meloformer.preprocess as pre

    started = []
    spawn = multiprocessing.get_context("spawn")

    class Counting:
        def Pool(self, workers):  # noqa: N802 (multiprocessing's name)
            started.append(workers)
            return spawn.Pool(workers)

    monkeypatch.setattr(pre.mp, "get_context", lambda method: Counting())
    (tmp_path / "in").mkdir()
    for f in [f for f in demo_files() if "bach" in str(f)][:6]:
        shutil.copy(f, tmp_path / "in" / f.name)
    pre.preprocess(tmp_path / "in", tmp_path / "out", workers=500, progress=False)
    cpus = len(os.sched_getaffinity(0))
    assert started == ([min(cpus, 6)] if min(cpus, 6) > 1 else [])


def test_preprocess_from_a_script_without_a_main_guard_does_not_deadlock(tmp_path):
    """The demo corpus's first use takes a lock, then preprocesses; with spawned workers each worker re-ran the
    script and waited forever on that lock."""
    (tmp_path / "in").mkdir()
    for f in [f for f in demo_files() if "bach" in str(f)][:4]:
        shutil.copy(f, tmp_path / "in" / f.name)
    script = tmp_path / "user_script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import fcntl
            from meloformer.preprocess import preprocess

            lock = open({str(tmp_path / "cache.lock")!r}, "w")
            fcntl.flock(lock, fcntl.LOCK_EX)
            summary = preprocess({str(tmp_path / "in")!r}, {str(tmp_path / "out")!r}, workers=2, progress=False)
            print("kept", summary.kept)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kept 4" in done.stdout


# ---------------------------------------------------------------- the web app's raw API


def test_bad_raw_api_requests_get_a_message_and_leave_no_traceback(tiny_checkpoint, capfd):
    import socket

    import httpx

    from meloformer.module import load_checkpoint
    from meloformer.serve import Studio, build_app, launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(Studio(load_checkpoint(tiny_checkpoint)))
    url = launch(app, port=port, block=False)
    import gradio as gr

    (handler,) = [fn for fn in app.fns.values() if fn.api_name == "generate"]
    good = [component.value for component in handler.inputs]

    def first(kind) -> int:
        return next(i for i, component in enumerate(handler.inputs) if type(component) is kind)

    def changed(kind, value) -> list:
        return [value if i == first(kind) else v for i, v in enumerate(good)]

    bad = {
        "too few values": good[:2],
        "a word for a number": changed(gr.Number, "two"),
        "no values at all": [None] * len(good),
        "a file the server did not receive": changed(
            gr.File, {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
        ),
        "a choice that does not exist": changed(gr.Radio, "sideways"),
    }
    try:
        capfd.readouterr()
        for case, data in bad.items():
            event = httpx.post(f"{url}gradio_api/call/generate", json={"data": data}, timeout=60).json()["event_id"]
            answer = httpx.get(f"{url}gradio_api/call/generate/{event}", timeout=120).text
            assert "event: error" in answer, (case, answer)
            assert json.loads(answer.split("data: ", 1)[1].splitlines()[0])["error"], (case, answer)
    finally:
        app.close()
    log = capfd.readouterr().err
    assert "Traceback" not in log and log.count("meloformer serve: request refused:") == len(bad), log
