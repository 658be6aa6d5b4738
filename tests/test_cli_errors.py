"""Every user mistake on the command line: non-zero exit, one line naming the problem, never a traceback.

The table runs ``meloformer.cli.main`` in this process (an uncaught exception fails the test, exactly where a
traceback would reach the user); one case also runs the installed console script end to end.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from _music import demo_files, make_score
from meloformer.cli import main
from meloformer.module import MeloFormerModule

# Small enough that 200 bars of one track cannot fit its context.
TINY = {"config": {"max_seq_len": 256, "summary_slots": 64, "n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1}}
TINY |= {"runtime": {"attention_backend": "sdpa"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A tiny checkpoint, damaged and foreign files, prompts and folders for the cases below."""
    root = tmp_path_factory.mktemp("cli-errors")
    torch.manual_seed(0)
    module = MeloFormerModule(**TINY)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, root / "tiny.ckpt")
    data = (root / "tiny.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not a checkpoint\n")
    sixteen = [(program, False, [(0, 1, 60, 80)]) for program in range(15)] + [(0, True, [(0, 1, 36, 90)])]
    make_score(sixteen).dump_midi(str(root / "sixteen_tracks.mid"))
    shutil.copy(next(f for f in demo_files() if "bach" in str(f)), root / "chorale.mid")
    (root / "empty").mkdir()
    (root / "midi").mkdir()
    shutil.copy(root / "chorale.mid", root / "midi" / "chorale.mid")
    (root / "broken_index").mkdir()
    (root / "broken_index" / "index.json").write_text("{not json")
    (root / "thin_index").mkdir()
    (root / "thin_index" / "index.json").write_text(json.dumps({"format": "meloformer-shards", "version": 1}))
    assert main(["preprocess", str(root / "midi"), str(root / "shards"), "--workers", "1", "--no_progress"]) == 0
    return {"root": str(root), "ckpt": str(root / "tiny.ckpt")}


CASES = {
    # generate
    "bars-0": (["generate", "--bars", "0"], "--bars must be at least 1"),
    "num-samples-0": (["generate", "--num_samples", "0"], "--num_samples must be at least 1"),
    "temperature-negative": (["generate", "--temperature", "-1"], "temperature must be 0 (greedy) or more"),
    "top-p-above-1": (["generate", "--top_p", "1.5"], "top_p must be in (0, 1]"),
    "top-k-negative": (["generate", "--top_k", "-3"], "top_k must be 0 (off) or more"),
    "tempo-0": (["generate", "--tempo", "0"], "tempo 0 is outside 24..320"),
    "tempo-too-fast": (["generate", "--tempo", "1000"], "tempo 1000 is outside"),
    "prompt-bars-0": (["generate", "--prompt", "{root}/chorale.mid", "--prompt_bars", "0"], "--prompt_bars must be"),
    "bars-past-max": (["generate", "--bars", "2000"], "bars must be in 1..1024"),
    "bars-past-context": (["generate", "--bars", "200", "--instruments", "0"], "the model's context holds 256"),
    "instrument-name": (["generate", "--instruments", "flut"], "unknown instrument 'flut' (a General MIDI name"),
    "time-signature-text": (["generate", "--time_signature", "three"], "write it as N/D"),
    "time-signature-unknown": (["generate", "--time_signature", "7/32"], "unsupported time signature 7/32"),
    "add-track-no-prompt": (["generate", "--add_track", "drums"], "--add_track needs a --prompt"),
    "add-track-17th": (
        ["generate", "--prompt", "{root}/sixteen_tracks.mid", "--add_track", "5"],
        "the prompt already has 16 tracks",
    ),
    "prompt-missing": (["generate", "--prompt", "{root}/nothing.mid"], "nothing.mid"),
    "ckpt-missing": (["generate", "--ckpt_path", "{root}/nothing.ckpt"], "--ckpt_path {root}/nothing.ckpt: no such"),
    "ckpt-foreign": (["generate", "--ckpt_path", "{root}/notes.txt"], "notes.txt: not a checkpoint"),
    "ckpt-truncated": (["generate", "--ckpt_path", "{root}/truncated.ckpt"], "truncated.ckpt: not a checkpoint"),
    "device-unknown": (["generate", "--device", "gpu7"], "--device 'gpu7': not a device"),
    "out-is-a-file": (["generate", "--out", "{root}/notes.txt"], "--out {root}/notes.txt: is a file"),
    "unknown-option": (["generate", "--bars_count", "3"], "unrecognized arguments: --bars_count"),
    "wrong-type": (["generate", "--bars", "many"], 'Parser key "bars"'),
    # evaluate
    "evaluate-foreign-ckpt": (["evaluate", "--data", "{root}/shards", "--ckpt_path", "{root}/notes.txt"], "notes.txt"),
    "evaluate-truncated-ckpt": (
        ["evaluate", "--data", "{root}/shards", "--ckpt_path", "{root}/truncated.ckpt"],
        "truncated.ckpt: not a checkpoint, or a truncated one",
    ),
    "evaluate-split": (["evaluate", "--data", "{root}/shards", "--split", "train"], "--split must be val or test"),
    "evaluate-no-data": (["evaluate", "--data", "{root}/nothing"], "--data {root}/nothing: no such dataset folder"),
    "evaluate-out-folder": (["evaluate", "--data", "{root}/shards", "--out", "{root}/empty"], "is a folder"),
    "evaluate-half-music": (["evaluate", "--generated", "{root}/empty"], "give both --generated and --reference"),
    "evaluate-no-midi": (
        ["evaluate", "--generated", "{root}/empty", "--reference", "{root}/midi"],
        "{root}/empty: no readable MIDI files",
    ),
    # preprocess
    "input-missing": (["preprocess", "{root}/nothing", "{root}/out"], "{root}/nothing: input folder does not exist"),
    "input-is-a-file": (["preprocess", "{root}/notes.txt", "{root}/out"], "input is a file"),
    "output-is-a-file": (["preprocess", "{root}/midi", "{root}/notes.txt"], "{root}/notes.txt: output is a file"),
    "input-empty": (["preprocess", "{root}/empty", "{root}/out"], "{root}/empty: no .mid or .midi files"),
    "fractions": (
        ["preprocess", "{root}/midi", "{root}/out", "--val_fraction", "0.7", "--test_fraction", "0.5"],
        "val_fraction 0.7 and test_fraction 0.5",
    ),  # fmt: skip
    "negative-fraction": (["preprocess", "{root}/midi", "{root}/out", "--val_fraction", "-0.1"], "val_fraction -0.1"),
    "shard-files-0": (["preprocess", "{root}/midi", "{root}/out", "--shard_files", "0"], "shard_files must be"),
    "workers-0": (["preprocess", "{root}/midi", "{root}/out", "--workers", "0"], "workers must be at least 1"),
    "velocity-bins-0": (["preprocess", "{root}/midi", "{root}/out", "--tokenizer.velocity_bins", "0"], "velocity_bins"),
    "tempo-bins-1": (["preprocess", "{root}/midi", "{root}/out", "--tokenizer.tempo_bins", "1"], "tempo_bins"),
    "other-settings": (
        ["preprocess", "{root}/midi", "{root}/shards", "--tokenizer.resolution", "24"],
        "existing shards were made with tokenizer settings",
    ),
    "no-folders": (["preprocess"], "give INPUT_DIR and OUTPUT_DIR"),
    "verify-missing": (["preprocess", "--verify", "{root}/nothing"], "{root}/nothing/index.json: no dataset index"),
    "verify-broken-index": (["preprocess", "--verify", "{root}/broken_index"], "index is not valid JSON"),
    "verify-thin-index": (["preprocess", "--verify", "{root}/thin_index"], "index.json lacks the field 'shards'"),
}
# Options every generate/evaluate case gets unless it sets them itself.
DEFAULTS = {
    "generate": {"--ckpt_path": "{ckpt}", "--out": "{root}/out", "--no_progress": None},
    "evaluate": {"--ckpt_path": "{ckpt}"},
}


def _fill(args: list[str], files: dict[str, str]) -> list[str]:
    return [a.replace("{root}", files["root"]).replace("{ckpt}", files["ckpt"]) for a in args]


@pytest.mark.parametrize(("args", "problem"), list(CASES.values()), ids=list(CASES))
def test_mistake_gives_one_line_and_nonzero_exit(args, problem, files, capsys):
    command = args[0]
    for option, value in DEFAULTS.get(command, {}).items():
        if option not in args:
            args = args + [option] + ([value] if value is not None else [])
    code = main(_fill(args, files))
    out, err = capsys.readouterr()
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"meloformer {command}: error: ")
    assert _fill([problem], files)[0] in lines[0]


def test_device_without_cuda_is_one_line(files, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for command in (["generate", "--out", f"{files['root']}/out"], ["evaluate", "--data", f"{files['root']}/shards"]):
        assert main([*command, "--ckpt_path", files["ckpt"], "--device", "cuda"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"meloformer {command[0]}: error: --device cuda: CUDA is not available on this machine"]


def test_console_script_prints_no_traceback(files):
    """The installed script, end to end, on a damaged checkpoint."""
    done = subprocess.run(
        [shutil.which("meloformer"), "generate", "--ckpt_path", f"{files['root']}/truncated.ckpt", "--out", "x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"meloformer generate: error: {files['root']}/truncated.ckpt: not a checkpoint, or a truncated one "
        "(no intact zip directory)"
    ]


def test_a_failing_sample_keeps_the_ones_before_it(files, tmp_path, monkeypatch, capsys):
    import meloformer.sampler

    real, calls = meloformer.sampler.generate, []

    def fail_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(meloformer.sampler, "generate", fail_third)
    out = tmp_path / "samples"
    args = ["generate", "--ckpt_path", files["ckpt"], "--out", str(out), "--bars", "2", "--num_samples", "4"]
    assert main([*args, "--no_progress"]) == 1
    assert sorted(p.name for p in out.glob("*.mid")) == ["sample_0.mid", "sample_1.mid"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"meloformer generate: error: sample 2 failed (out of memory); samples 0..1 are in {out}"]


def test_a_long_prompt_is_cropped_with_a_notice(files, tmp_path, capsys):
    out = tmp_path / "continued"
    chorale = f"{files['root']}/chorale.mid"
    args = ["generate", "--ckpt_path", files["ckpt"], "--prompt", chorale, "--out", str(out), "--no_progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    (notice,) = [line for line in captured.err.splitlines() if "prompt" in line]
    assert notice.startswith("meloformer generate: the prompt's ") and "256-token context" in notice
    kept = int(notice.split("using its last ")[1].split()[0])
    assert f"{kept + 8} bars" in captured.out  # the default: 8 new bars after what was kept
