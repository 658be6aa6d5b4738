"""The rule for every file the product writes: it lands whole, never over an input, never over earlier work.

A file is written under a temporary name in its own folder (``.NAME.PID.tmp``), flushed to disk and renamed
into place with ``os.replace``, so a crash or a kill at any moment leaves either the old file, the new one
whole, or (before the first rename) nothing under NAME; at worst a hidden ``.tmp`` file. Commands check their
output folder is writable before any long work, and refuse to replace existing work unless ``--overwrite``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """The name ``atomic_path`` writes ``path`` under first: hidden, in the same folder, unique per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to; on leaving the block it is synced to disk and renamed
    to ``path`` (replacing it whole). If the block raises, the temporary file is removed and ``path`` is left
    as it was."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole (see ``atomic_path``)."""
    write_bytes(path, text.encode())


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; on leaving the block its files are synced and it is renamed
    to ``path``. An existing ``path`` is first renamed aside and removed after, so a kill leaves the old folder,
    the new one whole, or (between the two renames) no folder and the old one under a hidden name."""
    path = Path(path)
    tmp, old = temporary_name(path), path.with_name(f".{path.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb+") as written:
                os.fsync(written.fileno())
        _sync_folder(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _sync_folder(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():  # failed between the renames: put the old folder back
            os.replace(old, path)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _named(flag: str, path: Path) -> str:
    return f"{flag} {path}" if flag else str(path)


def writable_folder(folder: str | Path, flag: str = "") -> Path:
    """``folder``, created if missing, after proving a file can be written there; ValueError with one line
    naming ``flag`` and the folder otherwise (called before long work, so a result is never lost to it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{_named(flag, folder)}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".meloformer-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{_named(flag, folder)}: cannot write to this folder ({err.strerror or err})") from None
    return folder


def refuse_existing(paths: list[Path], flag: str = "", overwrite: bool = False) -> None:
    """Refuse, in one line, to replace any of ``paths`` that exists, unless ``overwrite``."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ValueError(f"{_named(flag, existing[0])}{more}: already exists; give --overwrite to replace it")


def refuse_input(output: Path, inputs: list[Path], flag: str = "") -> None:
    """Refuse to write ``output`` over one of the command's ``inputs`` (whatever ``--overwrite`` says)."""
    for source in inputs:
        if output.exists() and source.exists() and os.path.samefile(output, source):
            raise ValueError(f"{_named(flag, output)}: is the input {source}; give another output file")


@contextmanager
def folder_lock(folder: Path, name: str, what: str) -> Iterator[None]:
    """Hold ``folder/name`` (an advisory ``flock``, released by the kernel however the process ends) for the
    block; a second writer of the folder is refused with one line instead of mixing its files in."""
    with open(folder / name, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{folder}: another {what} is writing this folder ({name})") from None
        yield


CHECKSUMS = "checksums.json"  # size and sha256 of MODEL_FILES, written by export, checked by every loader
MODEL_FILES = ("config.json", "model.safetensors")  # the card, README.md, is documentation: free to edit
CHECKSUMS_FORMAT = "meloformer-model-folder-checksums-v1"


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from ``path`` (which holds ``what``); ValueError with one line naming the file otherwise."""
    if not path.is_file():
        raise ValueError(f"{path}: missing; it holds {what}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def verify_checksums(folder: str | Path) -> None:
    """Check a model folder's files against the ``checksums.json`` that ``export`` wrote (a folder without one,
    from ``save_pretrained`` or a hub download, passes); ValueError with one line naming the file otherwise."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        return
    listed = read_json_object(folder / CHECKSUMS, "the checksums of the folder's files")
    files = listed.get("files") if listed.get("format") == CHECKSUMS_FORMAT else None
    if not isinstance(files, dict) or not set(MODEL_FILES) <= files.keys():
        raise ValueError(f"{folder / CHECKSUMS}: not a MeloFormer checksum list of {' and '.join(MODEL_FILES)}")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {CHECKSUMS})")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            problem = f"{size:,} bytes, {expected.get('bytes'):,} exported"
        elif sha256_file(path) != expected.get("sha256"):
            problem = f"its sha256 differs from {CHECKSUMS}"
        else:
            continue
        raise ValueError(
            f"{path}: not the file this folder was exported with: damaged, truncated or another model's ({problem})"
        )
