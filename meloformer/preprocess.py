"""`meloformer preprocess`: a folder of MIDI files -> checksummed HID token shards.

Files are tokenised in worker processes. Every ``shard_files`` files (in sorted order) the kept pieces are
written as one new shard and the index is replaced atomically, so an interrupted run loses at most one
shard's worth of work and a rerun continues where it stopped: files already listed in the index (as a
piece, a duplicate or a skipped file, matched by path and file hash) are not processed again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from meloformer.datamodules.shards import (
    INDEX_NAME,
    empty_index,
    read_index,
    sha256_file,
    split_of,
    verify_shards,
    write_index,
    write_shard,
)
from meloformer.files import folder_lock, write_text
from meloformer.hid import HIDError, HIDTokenizer

MIDI_SUFFIXES = {".mid", ".midi"}
LOCK_NAME = "preprocess.lock"


@dataclass
class Summary:
    files_seen: int = 0
    processed_now: int = 0
    kept: int = 0
    duplicates: int = 0
    skipped: Counter = field(default_factory=Counter)
    pieces_per_split: Counter = field(default_factory=Counter)
    tokens: int = 0
    notes: int = 0
    dropped_controls: int = 0
    dropped_pitch_bends: int = 0
    seconds: float = 0.0
    unreadable: dict[str, str] = field(default_factory=dict)  # files and folders that could not be read
    repaired: list[str] = field(default_factory=list)  # damaged shards rebuilt from their sources

    def lines(self) -> list[str]:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        rate = self.processed_now / self.seconds if self.seconds > 0 else 0.0
        per_note = self.tokens / self.notes if self.notes else 0.0
        splits = ", ".join(f"{s} {self.pieces_per_split.get(s, 0)}" for s in ("train", "val", "test"))
        return [
            f"files seen {self.files_seen}, processed now {self.processed_now}, kept {self.kept}, "
            f"duplicates {self.duplicates}, skipped {skipped} ({reasons}), unreadable {len(self.unreadable)}",
            f"pieces per split: {splits}",
            f"tokens {self.tokens:,}, notes {self.notes:,}, tokens per note {per_note:.2f}, "
            f"dropped controllers {self.dropped_controls:,}, pitch bends {self.dropped_pitch_bends:,}",
            f"{rate:.1f} files/s over {self.seconds:.1f} s",
            *self.repaired,
        ]


def find_midi_files(root: Path, problems: dict[str, str] | None = None) -> list[Path]:
    """Every .mid/.midi file under ``root`` (sorted), following folder links once each.

    Folders that cannot be listed, links that loop back to a folder already walked and dangling links are
    not errors: they go to ``problems`` (path relative to ``root`` -> what is wrong) for the report.
    """
    root = Path(root)
    problems = {} if problems is None else problems
    found: list[Path] = []
    walked: set[str] = set()

    def note(err: OSError) -> None:
        problems[_relative(Path(err.filename), root)] = f"cannot read folder ({err.strerror})"

    for folder, subfolders, names in os.walk(root, onerror=note, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:
            problems[_relative(Path(folder), root)] = "symlink loop (a link back to a folder already read)"
            subfolders.clear()
            continue
        walked.add(real)
        for name in names:
            path = Path(folder) / name
            if path.suffix.lower() not in MIDI_SUFFIXES:
                continue
            if path.is_file():
                found.append(path)
            else:
                problems[_relative(path, root)] = "not a regular file (a dangling link?)"
    return sorted(found)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _skip_reason(err: Exception) -> str:
    """A short category for the summary; the full message goes to the report."""
    text = str(err)
    for key in ("no notes", "max_tracks", "max_bars", "max_tokens", "time signature", "cannot parse"):
        if key in text:
            return {"cannot parse": "unreadable"}.get(key, key)
    return "invalid"


def _tokenise(job: tuple[str, str, str, dict]) -> dict[str, Any]:
    """Worker: one file -> tokens or a reason. Never raises, so one bad file cannot stop the job."""
    path, source, file_sha256, settings = job
    result: dict[str, Any] = {"source": source, "file_sha256": file_sha256}
    try:
        if Path(path).stat().st_size == 0:
            raise HIDError("cannot parse MIDI file: empty file")
        tokens, stats = _worker_tokenizer(settings).encode_with_stats(path)
    except Exception as err:  # report every failure by file; keep going
        result["error"] = f"{type(err).__name__}: {err}"
        result["reason"] = _skip_reason(err)
        return result
    result.update(tokens=tokens, stats=stats)
    return result


_TOKENIZERS: dict[str, HIDTokenizer] = {}


def _worker_tokenizer(settings: dict) -> HIDTokenizer:
    key = json.dumps(settings, sort_keys=True)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = HIDTokenizer(**settings)
    return _TOKENIZERS[key]


def preprocess(
    input_dir: str | Path,
    output_dir: str | Path,
    tokenizer: HIDTokenizer | None = None,
    workers: int = 2,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    shard_files: int = 512,
    progress: bool = True,
) -> Summary:
    """Tokenise every MIDI file under ``input_dir`` into shards in ``output_dir`` (resumable).

    Raises ValueError/OSError with one line for arguments or folders that cannot work, and while another
    run holds ``output_dir``. Damaged shards of an earlier run are rebuilt from their source files first.
    """
    tokenizer = tokenizer or HIDTokenizer()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_arguments(input_dir, output_dir, workers, val_fraction, test_fraction, shard_files)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        # One run per folder: a second one stops instead of interleaving its shards.
        with folder_lock(output_dir, LOCK_NAME, "preprocess"), _clean_on_failure(output_dir):
            index = open_index(output_dir, tokenizer, val_fraction, test_fraction)
            repaired = repair_damaged_shards(input_dir, output_dir, index, tokenizer)
            problems: dict[str, str] = {}
            files = find_midi_files(input_dir, problems)
            if not files and not index["pieces"]:
                raise ValueError(f"{input_dir}: no .mid or .midi files found")
            summary = Summary(files_seen=len(files), repaired=repaired)
            todo = files_to_do(files, input_dir, index, tokenizer, problems)
            started = time.perf_counter()
            writer = ShardWriter(output_dir, index, shard_files)
            for result in tokenise_all(todo, workers, progress):
                summary.processed_now += 1
                writer.add(result)
            writer.flush()
            summary.seconds = time.perf_counter() - started
            summary.unreadable = problems
            count_index(index, summary)
            if not index["pieces"]:
                reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.skipped.items())) or "unreadable"
                raise ValueError(
                    f"{input_dir}: none of its {len(files)} MIDI files is usable ({reasons}; duplicates: "
                    f"{summary.duplicates}, unreadable: {len(problems)}); no dataset written"
                )
            write_report(output_dir, index, summary)
    except ValueError:
        if created:  # a refused run leaves nothing behind
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    return summary


def check_arguments(
    input_dir: Path, output_dir: Path, workers: int, val_fraction: float, test_fraction: float, shard_files: int
) -> None:
    """Refuse, in one line, what cannot work before anything is read or written."""
    if not input_dir.exists():
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    if not input_dir.is_dir():
        raise ValueError(f"{input_dir}: input is a file; give the folder of MIDI files")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"{output_dir}: output is a file; give a folder for the dataset")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must each be in [0, 1), "
            "and their sum below 1"
        )
    if shard_files < 1:
        raise ValueError(f"shard_files must be at least 1, got {shard_files}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")


@contextmanager
def _clean_on_failure(output_dir: Path) -> Iterator[None]:
    """On a write error (disk full) remove the half-written index and say what is left, in one line."""
    try:
        yield
    except OSError as err:
        (output_dir / (INDEX_NAME + ".tmp")).unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                err.errno,
                f"{output_dir}: disk full; the dataset keeps every shard completed before, "
                "free some space and rerun to continue",
            ) from None
        raise


def open_index(output_dir: Path, tokenizer: HIDTokenizer, val_fraction: float, test_fraction: float) -> dict:
    """The index of an earlier run (made with the same tokenizer settings), or a new, empty one."""
    if not (output_dir / INDEX_NAME).exists():
        return empty_index(tokenizer.settings, val_fraction, test_fraction)
    index = read_index(output_dir)
    if index["tokenizer"] != tokenizer.settings:
        raise ValueError(
            f"{output_dir}: existing shards were made with tokenizer settings {index['tokenizer']}, "
            f"not {tokenizer.settings}; use another output folder"
        )
    return index


def repair_damaged_shards(input_dir: Path, output_dir: Path, index: dict, tokenizer: HIDTokenizer) -> list[str]:
    """Rewrite every damaged shard from its pieces' source files, or refuse naming it; returns what was done.

    Tokenisation is deterministic, so the rebuilt shard must match the checksum in the index exactly.
    """
    repaired: list[str] = []
    if not index["shards"]:
        return repaired
    number_of = {shard["file"]: number for number, shard in enumerate(index["shards"])}
    for problem in verify_shards(output_dir):
        name = problem.split(":")[0]
        number = number_of[name]
        pieces = sorted((p for p in index["pieces"] if p["shard"] == number), key=lambda p: p["offset"])
        tokens = []
        for piece in pieces:
            source = input_dir / piece["source"]
            if not source.is_file() or sha256_file(source) != piece["file_sha256"]:
                raise ValueError(
                    f"{output_dir / name} is damaged and its source {source} is gone or changed: "
                    "preprocess into a new folder"
                )
            tokens.append(tokenizer.encode(source))
        entry = write_shard(output_dir, number, tokens)
        if entry["sha256"] != index["shards"][number]["sha256"]:
            raise ValueError(f"{output_dir / name} is damaged and rebuilding it gave other tokens: use a new folder")
        repaired.append(f"rebuilt damaged {name} ({problem.split(': ', 1)[1]}) from {len(pieces)} source files")
    return repaired


def files_to_do(
    files: list[Path], input_dir: Path, index: dict, tokenizer: HIDTokenizer, problems: dict[str, str]
) -> list[tuple[str, str, str, dict]]:
    """Jobs for the files not yet in the index (by path and file hash); unreadable ones go to ``problems``."""
    done = {(p["source"], p["file_sha256"]) for p in index["pieces"] + index["duplicates"] + index["skipped"]}
    todo = []
    for path in files:
        source = path.relative_to(input_dir).as_posix()
        try:
            file_sha256 = sha256_file(path)
        except OSError as err:
            problems[source] = f"cannot read file ({err.strerror})"
            continue
        if (source, file_sha256) not in done:
            todo.append((str(path), source, file_sha256, tokenizer.settings))
    return todo


def worker_count(workers: int, jobs: int) -> int:
    """``workers``, at most one per CPU this process may use and one per job."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(workers, cpus, jobs))


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Hide the caller's main module from ``multiprocessing`` while the workers start.

    A spawned worker re-runs the caller's script (or ``python -m`` module) before its first job. In a script
    or notebook-exported file without an ``if __name__ == "__main__":`` guard that starts the whole job again
    in every worker, or waits forever on a lock the script holds (the demo corpus's first use). The workers
    need nothing from it (``_tokenise`` lives here), and ``spawn`` rather than ``fork`` keeps them free of
    the locks and threads of a parent that has loaded torch, a synthesizer or a web server.
    """
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def tokenise_all(todo: list, workers: int, progress: bool) -> Iterator[dict[str, Any]]:
    """Results of ``_tokenise`` in the order of ``todo``, from up to ``workers`` processes."""
    workers = worker_count(workers, len(todo))
    pool = None
    if workers > 1:
        with _main_module_hidden():
            pool = mp.get_context("spawn").Pool(workers)
    try:
        results = pool.imap(_tokenise, todo, chunksize=4) if pool else map(_tokenise, todo)
        yield from tqdm(results, total=len(todo), desc="preprocess", unit="file", disable=not progress)
    finally:
        if pool:
            pool.terminate()


class ShardWriter:
    """Collects kept pieces and writes a shard (then the index) every ``shard_files`` files."""

    def __init__(self, output_dir: Path, index: dict, shard_files: int) -> None:
        self.output_dir, self.index, self.shard_files = output_dir, index, shard_files
        self.seen_content = {p["content_hash"]: p["source"] for p in index["pieces"]}
        self.tokens: list[np.ndarray] = []
        self.pieces: list[dict] = []
        self.files = self.offset = 0

    def add(self, result: dict[str, Any]) -> None:
        """File one tokenised (or failed) file as a piece, a duplicate or a skipped file."""
        source, file_sha256 = result["source"], result["file_sha256"]
        if "error" in result:
            skipped = {"source": source, "file_sha256": file_sha256, "reason": result["reason"]}
            self.index["skipped"].append(skipped | {"error": result["error"]})
        else:
            self._add_piece(source, file_sha256, result["tokens"], result["stats"])
        self.files += 1
        if self.files % self.shard_files == 0:
            self.flush()

    def _add_piece(self, source: str, file_sha256: str, tokens: np.ndarray, stats) -> None:
        content = hashlib.sha256(tokens.tobytes()).hexdigest()
        if content in self.seen_content:
            duplicate = {"source": source, "file_sha256": file_sha256, "duplicate_of": self.seen_content[content]}
            self.index["duplicates"].append(duplicate)
            return
        self.seen_content[content] = source
        fractions = self.index["split_fractions"]
        self.pieces.append(
            {
                "offset": self.offset,
                "length": int(tokens.size),
                "bars": stats.bars,
                "tracks": stats.tracks,
                "notes": stats.notes,
                "dropped_controls": stats.dropped_controls,
                "dropped_pitch_bends": stats.dropped_pitch_bends,
                "source": source,
                "file_sha256": file_sha256,
                "content_hash": content,
                "split": split_of(source, fractions["val"], fractions["test"]),
            }
        )
        self.tokens.append(tokens)
        self.offset += int(tokens.size)

    def flush(self) -> None:
        """Write the pending pieces as one new shard, then replace the index (atomically)."""
        if self.pieces:
            number = len(self.index["shards"])
            try:
                entry = write_shard(self.output_dir, number, self.tokens)
            except OSError:
                (self.output_dir / f"shard_{number:05d}.u16").unlink(missing_ok=True)  # not in the index
                raise
            self.index["shards"].append(entry)
            self.index["pieces"].extend(piece | {"shard": number} for piece in self.pieces)
        write_index(self.output_dir, self.index)
        self.tokens, self.pieces, self.offset = [], [], 0


def count_index(index: dict, summary: Summary) -> None:
    """Fill the summary's totals from the whole index (this run and earlier ones)."""
    for piece in index["pieces"]:
        summary.kept += 1
        summary.pieces_per_split[piece["split"]] += 1
        summary.tokens += piece["length"]
        summary.notes += piece["notes"]
        summary.dropped_controls += piece["dropped_controls"]
        summary.dropped_pitch_bends += piece["dropped_pitch_bends"]
    summary.duplicates = len(index["duplicates"])
    summary.skipped = Counter(s["reason"] for s in index["skipped"])


def write_report(output_dir: Path, index: dict, summary: Summary) -> None:
    """``report.txt``: the summary, then every skipped file with its reason, then every duplicate."""
    lines = summary.lines() + ["", "unreadable files and folders (retried on the next run):"]
    lines += [f"  {path}: {why}" for path, why in sorted(summary.unreadable.items())] or ["  none"]
    lines += ["", "skipped files:"]
    lines += [f"  {s['source']}: {s['error']}" for s in index["skipped"]] or ["  none"]
    lines += ["", "duplicates:"]
    lines += [f"  {d['source']} = {d['duplicate_of']}" for d in index["duplicates"]] or ["  none"]
    write_text(Path(output_dir) / "report.txt", "\n".join(lines) + "\n")
