"""Token shards: flat ``uint16`` files plus one JSON index (docs/design.md section 6).

A dataset folder holds ``index.json`` and ``shard_NNNNN.u16`` files. The index lists every shard (token
count, sha256) and every piece (shard, offset, length, bars, tracks, notes, source path, hashes, split), and
the tokenizer settings the tokens were made with. Shards are only ever appended, and the index is
replaced atomically after a shard is complete, so an interrupted writer leaves a consistent dataset.

Readers open shards through ``numpy.memmap`` with a bounded LRU, so host memory does not grow with the
dataset and DataLoader workers share the page cache. Before that, every shard's sha256 is checked against the
index; a shard that passed is remembered in ``verified.json`` by its size and modification time, so later
runs hash only shards that changed (or are new).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meloformer.files import sha256_file, write_bytes

INDEX_NAME = "index.json"
VERIFIED_NAME = "verified.json"
INDEX_FORMAT = "meloformer-shards"
INDEX_VERSION = 1
SPLITS = ("train", "val", "test")


class ShardError(ValueError):
    """A dataset folder that cannot be read as it is: missing, damaged, or made with other settings."""


def split_of(source: str, val_fraction: float, test_fraction: float) -> str:
    """Stable split from a hash of the source path: adding files never moves earlier ones."""
    u = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def empty_index(tokenizer_settings: dict[str, Any], val_fraction: float, test_fraction: float) -> dict:
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "tokenizer": tokenizer_settings,
        "split_fractions": {"val": val_fraction, "test": test_fraction},
        "shards": [],
        "pieces": [],
        "duplicates": [],
        "skipped": [],
    }


def read_index(root: Path) -> dict:
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"{path}: no dataset index here (run `meloformer preprocess` first)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: index is not valid JSON ({err})") from err
    if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
        raise ShardError(f"{path}: not a MeloFormer shard index of version {INDEX_VERSION}")
    return index


def write_index(root: Path, index: dict) -> None:
    """Replace the index atomically (write, fsync, rename)."""
    path = Path(root) / INDEX_NAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(root: Path, number: int, pieces: list[np.ndarray]) -> dict:
    """Write one shard of concatenated pieces; returns its index entry (file, tokens, sha256)."""
    name = f"shard_{number:05d}.u16"
    path = Path(root) / name
    data = np.concatenate(pieces).astype(np.uint16) if pieces else np.zeros(0, np.uint16)
    write_bytes(path, data.tobytes())  # whole or absent: a kill mid-shard leaves no partial shard file
    return {"file": name, "tokens": int(data.size), "sha256": hashlib.sha256(data.tobytes()).hexdigest()}


def verify_shards(root: Path, shards: list[dict] | None = None, use_cache: bool = False) -> list[str]:
    """Names of shards whose size or sha256 does not match the index, each with the problem.

    ``use_cache``: skip hashing a shard whose size and mtime are those it had when it last passed (recorded
    in ``verified.json``; a read-only folder just means hashing every time).
    """
    root = Path(root)
    shards = read_index(root)["shards"] if shards is None else shards
    cache = _read_verified(root) if use_cache else {}
    passed = {}
    problems = []
    for shard in shards:
        name, path = shard["file"], root / shard["file"]
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        stat = path.stat()
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": shard["sha256"]}
        if stat.st_size != 2 * shard["tokens"]:
            problems.append(f"{name}: {stat.st_size} bytes, expected {2 * shard['tokens']} (truncated?)")
        elif cache.get(name) == stamp or sha256_file(path) == shard["sha256"]:
            passed[name] = stamp
        else:
            problems.append(f"{name}: sha256 mismatch (damaged)")
    if use_cache and passed != cache:
        _write_verified(root, passed)
    return problems


def _read_verified(root: Path) -> dict[str, dict]:
    try:
        cache = json.loads((root / VERIFIED_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_verified(root: Path, passed: dict[str, dict]) -> None:
    """Record the shards that passed (atomically; concurrent readers each write a complete file)."""
    tmp = root / f".{VERIFIED_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(passed, indent=1))
        os.replace(tmp, root / VERIFIED_NAME)
    except OSError:  # a read-only dataset: nothing remembered, every open hashes again
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class PieceTable:
    """Pieces of one split as flat arrays (cheap to hold and to send to DataLoader workers)."""

    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    bars: np.ndarray
    tracks: np.ndarray

    def __len__(self) -> int:
        return len(self.shard)


class ShardReader:
    """Read pieces from a dataset folder through memory maps, keeping at most ``max_open_shards`` open.

    ``expected_settings`` (tokenizer ``vocab_settings()``) must match what the data was made with.
    With ``verify_checksums`` every shard's sha256 is checked here (a shard unchanged since it last passed
    is not hashed again, see ``verify_shards``); sizes are always checked. A damaged shard is a
    ``ShardError`` naming it and the command that rebuilds it.
    """

    def __init__(
        self,
        root: str | Path,
        max_open_shards: int = 8,
        expected_settings: dict[str, Any] | None = None,
        verify_checksums: bool = True,
    ) -> None:
        self.root = Path(root)
        index = read_index(self.root)
        self.tokenizer_settings: dict[str, Any] = index["tokenizer"]
        if expected_settings is not None:
            differing = {
                k: (self.tokenizer_settings.get(k), v)
                for k, v in expected_settings.items()
                if self.tokenizer_settings.get(k) != v
            }
            if "format_version" in differing:
                made, reads = differing["format_version"]
                raise ShardError(
                    f"{self.root}: shards were made with HID format version {made}, this MeloFormer reads version "
                    f"{reads}: preprocess the MIDI folder again into a new folder (`meloformer preprocess MIDI_FOLDER "
                    "NEW_FOLDER`)"
                )
            if differing:
                detail = ", ".join(f"{k}: data {a!r} vs expected {b!r}" for k, (a, b) in differing.items())
                raise ShardError(f"{self.root}: shards were made with other tokenizer settings ({detail})")
        self.shards = index["shards"]
        problems = verify_shards(self.root, self.shards, use_cache=True) if verify_checksums else self._size_problems()
        if problems:
            raise ShardError(
                f"{self.root}: damaged dataset ({'; '.join(problems)}); rebuild it by rerunning "
                f"`meloformer preprocess MIDI_FOLDER {self.root}` on the folder it was made from"
            )
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, np.memmap] = OrderedDict()
        pieces = index["pieces"]
        self.sources = [p["source"] for p in pieces]
        split = np.array([SPLITS.index(p["split"]) for p in pieces], dtype=np.int8)
        columns = {k: np.array([p[k] for p in pieces], dtype=np.int64) for k in PieceTable.__annotations__}
        self._tables = {
            name: PieceTable(**{k: v[split == code] for k, v in columns.items()}) for code, name in enumerate(SPLITS)
        }
        self._sources = {
            name: [src for src, c in zip(self.sources, split) if c == code] for code, name in enumerate(SPLITS)
        }

    def _size_problems(self) -> list[str]:
        problems = []
        for shard in self.shards:
            path = self.root / shard["file"]
            size = path.stat().st_size if path.is_file() else -1
            if size != 2 * shard["tokens"]:
                problems.append(f"{shard['file']}: {size} bytes, expected {2 * shard['tokens']}")
        return problems

    def pieces(self, split: str) -> PieceTable:
        if split not in self._tables:
            raise ShardError(f"unknown split {split!r}; choose from {SPLITS}")
        return self._tables[split]

    def split_sources(self, split: str) -> list[str]:
        """The source paths of ``split``'s pieces, in the order of ``pieces(split)``."""
        self.pieces(split)  # an unknown split is refused by name
        return self._sources[split]

    def _shard(self, number: int) -> np.memmap:
        mm = self._open.get(number)
        if mm is None:
            mm = np.memmap(self.root / self.shards[number]["file"], dtype=np.uint16, mode="r")
            self._open[number] = mm
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(number)
        return mm

    def tokens(self, table: PieceTable, i: int) -> np.ndarray:
        """The tokens of piece ``i`` of ``table`` (a read-only view into the shard's memory map)."""
        start = table.offset[i]
        return self._shard(int(table.shard[i]))[start : start + table.length[i]]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # memory maps are reopened in each worker process
        return state
