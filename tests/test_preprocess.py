"""`meloformer preprocess`: bad input reported by name, dedup, stable splits, resume, checksums."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import meloformer.preprocess as preprocess_module
from _music import demo_files, make_score
from meloformer.datamodules.shards import ShardError, ShardReader, verify_shards
from meloformer.hid import HIDTokenizer
from meloformer.preprocess import preprocess


def _good_scores(n: int):
    for i in range(n):
        melody = [(q, 1, 60 + (i + q) % 12, 80) for q in range(0, 8 + i % 5)]
        bass = [(q, 2, 36 + i % 7, 90) for q in range(0, 8, 2)]
        yield f"piece_{i:02d}.mid", make_score([(0, False, melody), (33, False, bass)], tempos=[(0, 90.0 + i)])


@pytest.fixture
def mixed_folder(tmp_path):
    """Good files (some in a subfolder, mixed suffix case) and one of each kind of bad file."""
    src = tmp_path / "midi"
    (src / "sub").mkdir(parents=True)
    good = []
    for i, (name, score) in enumerate(_good_scores(12)):
        path = src / ("sub" if i % 3 == 0 else "") / (name.upper() if i % 4 == 0 else name)
        score.dump_midi(str(path))
        good.append(path.relative_to(src).as_posix())
    real = demo_files()[:3]
    for path in real:
        shutil.copy(path, src / path.name)
        good.append(path.name)
    whole = (src / good[1]).read_bytes()
    (src / "truncated.mid").write_bytes(whole[: len(whole) // 2])
    (src / "random.midi").write_bytes(np.random.default_rng(0).bytes(2000))
    (src / "empty.mid").write_bytes(b"")
    make_score([(0, False, [])]).dump_midi(str(src / "no_notes.mid"))
    make_score([(0, False, [(q * 4, 1, 60, 90) for q in range(40)])]).dump_midi(str(src / "too_long.mid"))
    shutil.copy(src / good[2], src / "sub" / "copy_of_piece.mid")  # duplicate content
    (src / "notes.txt").write_text("not midi")
    bad = {"truncated.mid", "random.midi", "empty.mid", "no_notes.mid", "too_long.mid"}
    return src, good, bad


def _run(src, out, **kwargs):
    kwargs.setdefault("tokenizer", HIDTokenizer(max_bars=32))
    return preprocess(src, out, workers=kwargs.pop("workers", 1), progress=False, **kwargs)


def test_good_files_kept_bad_files_reported_by_name(mixed_folder, tmp_path):
    src, good, bad = mixed_folder
    summary = _run(src, tmp_path / "out", workers=2)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert sorted(p["source"] for p in index["pieces"]) == sorted(good)
    assert {s["source"] for s in index["skipped"]} == bad
    reasons = {s["source"]: s["reason"] for s in index["skipped"]}
    assert reasons["no_notes.mid"] == "no notes" and reasons["too_long.mid"] == "max_bars"
    assert reasons["empty.mid"] == reasons["random.midi"] == reasons["truncated.mid"] == "unreadable"
    assert [d["source"] for d in index["duplicates"]] == ["sub/copy_of_piece.mid"]
    assert summary.files_seen == len(good) + len(bad) + 1 and summary.kept == len(good)
    report = (tmp_path / "out" / "report.txt").read_text()
    for name in bad:
        assert name in report

    reader = ShardReader(tmp_path / "out", expected_settings=HIDTokenizer(max_bars=32).vocab_settings())
    tok = HIDTokenizer(max_bars=32)
    total = sum(len(reader.pieces(s)) for s in ("train", "val", "test"))
    assert total == len(good)
    table = reader.pieces("train")
    for i in range(len(table)):
        tokens = reader.tokens(table, i)
        tok.decode(tokens)  # every stored piece is a complete, valid HID sequence
        assert tokens[0] == 1 and tokens[-1] == 2


def test_rerun_is_idempotent_and_more_files_keep_earlier_splits(mixed_folder, tmp_path):
    src, good, _ = mixed_folder
    out = tmp_path / "out"
    _run(src, out)
    first = json.loads((out / "index.json").read_text())
    reasons = {s["source"]: s["reason"] for s in first["skipped"]}  # here tokenised in this process
    assert reasons == {
        "truncated.mid": "unreadable",
        "random.midi": "unreadable",
        "empty.mid": "unreadable",
        "no_notes.mid": "no notes",
        "too_long.mid": "max_bars",
    }
    assert {s["error"].split(":")[0] for s in first["skipped"] if s["reason"] != "unreadable"} == {"HIDError"}
    _run(src, out)
    assert json.loads((out / "index.json").read_text()) == first
    for name, score in list(_good_scores(20))[12:]:
        score.dump_midi(str(src / name))
    _run(src, out)
    grown = json.loads((out / "index.json").read_text())
    before = {p["source"]: p["split"] for p in first["pieces"]}
    after = {p["source"]: p["split"] for p in grown["pieces"]}
    assert len(after) == len(before) + 8
    assert all(after[s] == split for s, split in before.items())
    assert len({p["content_hash"] for p in grown["pieces"]}) == len(grown["pieces"])


def test_interrupted_run_completes_without_duplicates(mixed_folder, tmp_path, monkeypatch):
    src, good, _ = mixed_folder
    _run(src, tmp_path / "whole", shard_files=4)
    real_write_shard = preprocess_module.write_shard
    calls = []

    def write_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second shard never makes it to the index
        return real_write_shard(*args, **kwargs)

    monkeypatch.setattr(preprocess_module, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(src, tmp_path / "cut", shard_files=4)
    monkeypatch.setattr(preprocess_module, "write_shard", real_write_shard)
    partial = json.loads((tmp_path / "cut" / "index.json").read_text())
    assert 0 < len(partial["pieces"]) < len(good)
    _run(src, tmp_path / "cut", shard_files=4)
    whole = json.loads((tmp_path / "whole" / "index.json").read_text())
    cut = json.loads((tmp_path / "cut" / "index.json").read_text())
    key = lambda p: (p["source"], p["content_hash"], p["split"], p["length"])  # noqa: E731
    assert sorted(map(key, cut["pieces"])) == sorted(map(key, whole["pieces"]))
    assert verify_shards(tmp_path / "cut") == []


def test_damaged_shards_are_detected(mixed_folder, tmp_path):
    src, _, _ = mixed_folder
    out = tmp_path / "out"
    _run(src, out)
    shard = out / "shard_00000.u16"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert [p.split(":")[0] for p in verify_shards(out)] == ["shard_00000.u16"]
    with pytest.raises(ShardError, match="sha256"):
        ShardReader(out, verify_checksums=True)
    shard.write_bytes(bytes(data[:-6]))
    with pytest.raises(ShardError, match="shard_00000.u16"):
        ShardReader(out)
    cli = subprocess.run(
        [sys.executable, "-m", "meloformer.cli", "preprocess", "--verify", str(out)], capture_output=True, text=True
    )
    assert cli.returncode == 1 and "DAMAGED shard_00000.u16" in cli.stdout


def test_other_tokenizer_settings_are_refused(mixed_folder, tmp_path):
    src, _, _ = mixed_folder
    _run(src, tmp_path / "out")
    with pytest.raises(ShardError, match="resolution"):
        ShardReader(tmp_path / "out", expected_settings=HIDTokenizer(resolution=8).vocab_settings())
    with pytest.raises(ValueError, match="other tokenizer settings|were made with"):
        _run(src, tmp_path / "out", tokenizer=HIDTokenizer(resolution=8))


def test_unreadable_files_folders_and_links_are_reported_and_the_rest_goes_on(mixed_folder, tmp_path, monkeypatch):
    src, good, _ = mixed_folder
    (src / "locked").mkdir()
    make_score([(0, False, [(0, 1, 60, 80)])]).dump_midi(str(src / "locked" / "hidden.mid"))
    (src / "sub" / "loop").symlink_to(src, target_is_directory=True)
    (src / "gone.mid").symlink_to(tmp_path / "nowhere.mid")
    real_scandir, real_sha = os.scandir, preprocess_module.sha256_file
    unreadable = src / good[0]

    def scandir(path="."):  # root may read anything: refuse the way a folder without permission does
        if str(path) == str(src / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def sha256_file(path, *args):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_sha(path, *args)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(preprocess_module, "sha256_file", sha256_file)
    summary = _run(src, tmp_path / "out")
    assert summary.unreadable == {
        good[0]: "cannot read file (Permission denied)",
        "locked": "cannot read folder (Permission denied)",
        "sub/loop": "symlink loop (a link back to a folder already read)",
        "gone.mid": "not a regular file (a dangling link?)",
    }
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert sorted(p["source"] for p in index["pieces"]) == sorted(good[1:])
    report = (tmp_path / "out" / "report.txt").read_text()
    for path, why in summary.unreadable.items():
        assert f"  {path}: {why}" in report
    monkeypatch.setattr(preprocess_module, "sha256_file", real_sha)
    assert _run(src, tmp_path / "out").processed_now == 1  # readable again: picked up by the rerun


def test_empty_input_folder_is_an_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no midi here")
    with pytest.raises(ValueError, match="empty: no .mid or .midi files found"):
        _run(tmp_path / "empty", tmp_path / "out")


def test_a_second_run_on_the_same_folder_is_refused(mixed_folder, tmp_path):
    src, _, _ = mixed_folder
    out = tmp_path / "out"
    out.mkdir()
    with open(out / preprocess_module.LOCK_NAME, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another preprocess is writing this folder"):
            _run(src, out)
        assert not (out / "index.json").exists()
    _run(src, out)  # released: runs
    assert verify_shards(out) == []


def test_disk_full_leaves_no_stray_index_and_a_rerun_finishes(mixed_folder, tmp_path, monkeypatch):
    src, good, _ = mixed_folder
    out = tmp_path / "out"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 4:  # shard 0, index, shard 1, then the index naming shard 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="disk full; the dataset keeps every shard completed before"):
        _run(src, out, shard_files=4)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not (out / "index.json.tmp").exists()
    assert len(json.loads((out / "index.json").read_text())["shards"]) == 1
    _run(src, out, shard_files=4)
    index = json.loads((out / "index.json").read_text())
    assert sorted(p["source"] for p in index["pieces"]) == sorted(good) and verify_shards(out) == []


def test_rerun_rebuilds_a_damaged_shard_or_names_it(mixed_folder, tmp_path):
    src, good, _ = mixed_folder
    out = tmp_path / "out"
    _run(src, out, shard_files=4)
    before = (out / "index.json").read_text()
    shard = out / "shard_00001.u16"
    intact = shard.read_bytes()
    damaged = bytearray(intact)
    damaged[100:164] = bytes(64)
    shard.write_bytes(bytes(damaged))
    summary = _run(src, out, shard_files=4)
    pieces = sum(p["shard"] == 1 for p in json.loads(before)["pieces"])
    assert pieces >= 2
    expected = f"rebuilt damaged shard_00001.u16 (sha256 mismatch (damaged)) from {pieces} source files"
    assert summary.repaired == [expected]
    assert shard.read_bytes() == intact and (out / "index.json").read_text() == before
    assert "rebuilt damaged shard_00001.u16" in (out / "report.txt").read_text()

    shard.write_bytes(intact[:-10])
    index = json.loads(before)
    source = next(p["source"] for p in index["pieces"] if p["shard"] == 1)
    make_score([(0, False, [(0, 1, 61, 80)])]).dump_midi(str(src / source))  # the source changed since
    with pytest.raises(ValueError, match=f"shard_00001.u16 is damaged and its source .*{source} is gone or changed"):
        _run(src, out, shard_files=4)
