"""Train/val/test splits and dedup: a piece never moves between splits, whatever the process or the folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _music import make_score
from meloformer.datamodules.shards import split_of
from meloformer.hid import HIDTokenizer
from meloformer.preprocess import preprocess

FRACTIONS = {"val_fraction": 0.25, "test_fraction": 0.25}  # large, so every split holds several pieces

# u = first 8 bytes of sha256(path) as a big-endian fraction of 2**64, from `printf PATH | sha256sum`.
PINNED = {
    "a/11.mid": ("01099a032d492a4e", "test"),
    "a/16.mid": ("03b63e6504bfe575", "test"),
    "a/13.mid": ("1e07e32812bc8096", "val"),
    "a/14.mid": ("2e9444df4553b59f", "val"),
    "a/7.mid": ("34500330568f3338", "train"),  # u = 0.204
    "a/0.mid": ("357536fac510db14", "train"),  # u = 0.209
    "a/3.mid": ("8a3bffe2aaeacfd1", "train"),
    "bach/bwv1.mid": ("d8338672d2324f63", "train"),
}


def test_split_of_pinned_paths():
    for path, (_, split) in PINNED.items():
        assert split_of(path, 0.1, 0.1) == split, path
    assert [split_of(p, 0.25, 0.25) for p in ("a/7.mid", "a/12.mid", "a/9.mid", "a/1.mid")] == [
        "test",  # u = 0.204
        "val",  # u = 0.256
        "val",  # u = 0.374
        "train",  # u = 0.653
    ]
    splits = [split_of(f"a/{i}.mid", 0.1, 0.1) for i in range(2000)]
    assert 0.07 < splits.count("val") / 2000 < 0.13 and 0.07 < splits.count("test") / 2000 < 0.13


def _folder(root, names, first: int = 0):
    """Distinct pieces ``first``, ``first + 1``, ... under ``names``."""
    root.mkdir()
    for i, name in enumerate(names, start=first):
        melody = [(q, 1, 60 + (3 * i + q) % 24, 80) for q in range(6 + i % 4)]
        make_score([(0, False, melody)], tempos=[(0, 80.0 + 3 * i)]).dump_midi(str(root / name))
    return root


def _index(src, out) -> dict:
    summary = preprocess(src, out, HIDTokenizer(max_bars=32), workers=1, progress=False, **FRACTIONS)
    index = json.loads((out / "index.json").read_text())
    splits = [p["split"] for p in index["pieces"]]
    n, duplicates = len(index["pieces"]), len(index["duplicates"])
    assert summary.lines()[:2] == [
        f"files seen {n + duplicates}, processed now {n + duplicates}, kept {n}, "
        f"duplicates {duplicates}, skipped 0 (none), unreadable 0",
        f"pieces per split: train {splits.count('train')}, val {splits.count('val')}, test {splits.count('test')}",
    ]
    return index


def _splits(index: dict) -> dict[str, str]:
    return {p["source"]: p["split"] for p in index["pieces"]}


NAMES = [f"piece_{i:02d}.mid" for i in range(14)]


def test_stored_splits_do_not_depend_on_the_process_or_on_other_files(tmp_path):
    src = _folder(tmp_path / "midi", NAMES)
    index = _index(src, tmp_path / "out")
    stored = _splits(index)
    assert stored == {s: split_of(s, 0.25, 0.25) for s in NAMES}, "stored splits are the path rule's"
    assert len(set(stored.values())) == 3

    # Another process with another hash seed writes the same splits.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    cli = [sys.executable, "-m", "meloformer.cli", "preprocess", str(src), str(tmp_path / "other"), "--workers", "1"]
    cli += ["--val_fraction", "0.25", "--test_fraction", "0.25", "--tokenizer.max_bars", "32"]
    subprocess.run(cli, env=env, check=True, capture_output=True)
    assert _splits(json.loads((tmp_path / "other" / "index.json").read_text())) == stored

    # A folder with one more file that sorts first: no earlier piece moves.
    (tmp_path / "more").mkdir()
    for name in NAMES:
        (tmp_path / "more" / name).write_bytes((src / name).read_bytes())
    _folder(tmp_path / "first", ["aaa_first.mid"], first=len(NAMES))
    (tmp_path / "more" / "aaa_first.mid").write_bytes((tmp_path / "first" / "aaa_first.mid").read_bytes())
    grown = _splits(_index(tmp_path / "more", tmp_path / "more_out"))
    assert list(grown) == ["aaa_first.mid", *NAMES]
    assert {s: grown[s] for s in NAMES} == stored


@pytest.mark.parametrize("variant", ["resolution", "tempo map"])
def test_duplicates_are_found_by_tokens_not_bytes(tmp_path, variant):
    """The same music in other bytes (another MIDI resolution, or the tempo written twice) is one piece."""
    notes = [(q, 1, 60 + q, 80) for q in range(8)]
    src = tmp_path / "midi"
    src.mkdir()
    make_score([(0, False, notes)]).dump_midi(str(src / "a.mid"))
    if variant == "resolution":
        make_score([(0, False, notes)], tpq=960).dump_midi(str(src / "b.mid"))
    else:
        make_score([(0, False, notes)], tempos=[(0, 120.0), (0, 120.0)]).dump_midi(str(src / "b.mid"))
    assert (src / "a.mid").read_bytes() != (src / "b.mid").read_bytes()
    index = _index(src, tmp_path / "out")
    assert [p["source"] for p in index["pieces"]] == ["a.mid"]
    assert index["duplicates"] == [
        {"source": "b.mid", "file_sha256": index["duplicates"][0]["file_sha256"], "duplicate_of": "a.mid"}
    ]
