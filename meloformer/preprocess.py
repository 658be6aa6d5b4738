"""`meloformer preprocess`: a folder of MIDI files -> checksummed HID token shards.

Files are tokenised in worker processes. Every ``shard_files`` files (in sorted order) the kept pieces are
written as one new shard and the index is replaced atomically, so an interrupted run loses at most one
shard's worth of work and a rerun continues where it stopped: files already listed in the index (as a
piece, a duplicate or a skipped file, matched by path and file hash) are not processed again.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from meloformer.datamodules.shards import (
    empty_index,
    read_index,
    sha256_file,
    split_of,
    write_index,
    write_shard,
)
from meloformer.hid import HIDError, HIDTokenizer

MIDI_SUFFIXES = {".mid", ".midi"}


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

    def lines(self) -> list[str]:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        rate = self.processed_now / self.seconds if self.seconds > 0 else 0.0
        per_note = self.tokens / self.notes if self.notes else 0.0
        splits = ", ".join(f"{s} {self.pieces_per_split.get(s, 0)}" for s in ("train", "val", "test"))
        return [
            f"files seen {self.files_seen}, processed now {self.processed_now}, kept {self.kept}, "
            f"duplicates {self.duplicates}, skipped {skipped} ({reasons})",
            f"pieces per split: {splits}",
            f"tokens {self.tokens:,}, notes {self.notes:,}, tokens per note {per_note:.2f}, "
            f"dropped controllers {self.dropped_controls:,}, pitch bends {self.dropped_pitch_bends:,}",
            f"{rate:.1f} files/s over {self.seconds:.1f} s",
        ]


def find_midi_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in MIDI_SUFFIXES)


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
    """Tokenise every MIDI file under ``input_dir`` into shards in ``output_dir`` (resumable)."""
    tokenizer = tokenizer or HIDTokenizer()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    if not 0 <= val_fraction + test_fraction < 1:
        raise ValueError("val_fraction + test_fraction must be in [0, 1)")
    output_dir.mkdir(parents=True, exist_ok=True)
    if (output_dir / "index.json").exists():
        index = read_index(output_dir)
        if index["tokenizer"] != tokenizer.settings:
            raise ValueError(
                f"{output_dir}: existing shards were made with tokenizer settings {index['tokenizer']}, "
                f"not {tokenizer.settings}; use another output folder"
            )
    else:
        index = empty_index(tokenizer.settings, val_fraction, test_fraction)
    fractions = index["split_fractions"]

    done = {(p["source"], p["file_sha256"]) for p in index["pieces"] + index["duplicates"] + index["skipped"]}
    seen_content = {p["content_hash"]: p["source"] for p in index["pieces"]}
    files = find_midi_files(input_dir)
    todo = []
    for path in files:
        source, file_sha256 = path.relative_to(input_dir).as_posix(), sha256_file(path)
        if (source, file_sha256) not in done:
            todo.append((str(path), source, file_sha256, tokenizer.settings))

    summary = Summary(files_seen=len(files))
    started = time.perf_counter()
    pending: list[np.ndarray] = []
    pending_pieces: list[dict] = []
    offset = 0

    def flush() -> None:
        nonlocal pending, pending_pieces, offset
        if pending_pieces:
            number = len(index["shards"])
            index["shards"].append(write_shard(output_dir, number, pending))
            for piece in pending_pieces:
                piece["shard"] = number
            index["pieces"].extend(pending_pieces)
        write_index(output_dir, index)
        pending, pending_pieces, offset = [], [], 0

    ctx = mp.get_context("spawn") if workers > 1 else None
    pool = ctx.Pool(workers) if ctx else None
    try:
        results = pool.imap(_tokenise, todo, chunksize=4) if pool else map(_tokenise, todo)
        bar = tqdm(results, total=len(todo), desc="preprocess", unit="file", disable=not progress)
        for count, result in enumerate(bar, start=1):
            summary.processed_now += 1
            source = result["source"]
            if "error" in result:
                index["skipped"].append(
                    {
                        "source": source,
                        "file_sha256": result["file_sha256"],
                        "reason": result["reason"],
                        "error": result["error"],
                    }
                )
            else:
                tokens, stats = result["tokens"], result["stats"]
                content = hashlib.sha256(tokens.tobytes()).hexdigest()
                if content in seen_content:
                    index["duplicates"].append(
                        {
                            "source": source,
                            "file_sha256": result["file_sha256"],
                            "duplicate_of": seen_content[content],
                        }
                    )
                else:
                    seen_content[content] = source
                    pending.append(tokens)
                    pending_pieces.append(
                        {
                            "offset": offset,
                            "length": int(tokens.size),
                            "bars": stats.bars,
                            "tracks": stats.tracks,
                            "notes": stats.notes,
                            "dropped_controls": stats.dropped_controls,
                            "dropped_pitch_bends": stats.dropped_pitch_bends,
                            "source": source,
                            "file_sha256": result["file_sha256"],
                            "content_hash": content,
                            "split": split_of(source, fractions["val"], fractions["test"]),
                        }
                    )
                    offset += int(tokens.size)
            if count % shard_files == 0:
                flush()
        flush()
    finally:
        if pool:
            pool.terminate()
    summary.seconds = time.perf_counter() - started

    for piece in index["pieces"]:
        summary.kept += 1
        summary.pieces_per_split[piece["split"]] += 1
        summary.tokens += piece["length"]
        summary.notes += piece["notes"]
        summary.dropped_controls += piece["dropped_controls"]
        summary.dropped_pitch_bends += piece["dropped_pitch_bends"]
    summary.duplicates = len(index["duplicates"])
    summary.skipped = Counter(s["reason"] for s in index["skipped"])
    write_report(output_dir, index, summary)
    return summary


def write_report(output_dir: Path, index: dict, summary: Summary) -> None:
    """``report.txt``: the summary, then every skipped file with its reason, then every duplicate."""
    lines = summary.lines() + ["", "skipped files:"]
    lines += [f"  {s['source']}: {s['error']}" for s in index["skipped"]] or ["  none"]
    lines += ["", "duplicates:"]
    lines += [f"  {d['source']} = {d['duplicate_of']}" for d in index["duplicates"]] or ["  none"]
    (Path(output_dir) / "report.txt").write_text("\n".join(lines) + "\n")
