"""Checkpoint files checked before use: a damaged, truncated or foreign file is one clear error.

``torch.save`` writes a zip archive whose entries carry CRC-32 checksums; reading every entry against its CRC
finds flipped bytes anywhere in the tensors, and a truncated file has no zip directory at all. Without this
check a damaged checkpoint loads silently (only its weights are wrong) or fails deep inside ``torch.load``.
Reading only what a checkpoint says about itself (``read_checkpoint_metadata``) checks all but the tensors,
so it costs kilobytes, not a pass over gigabytes of weights and optimizer state.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as it is: missing, damaged, truncated or not a checkpoint."""


def check_checkpoint_file(path: str | Path, weights: bool = True) -> None:
    """Raise ``CheckpointError`` unless ``path`` is an intact ``torch.save`` archive: its zip directory and the
    CRC of every entry (``weights=False``: of every entry but the tensors', which reads a few kilobytes)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            checked = [entry for entry in entries if weights or not _is_tensor(entry)]
            damaged = next((entry.filename for entry in checked if not _intact(archive, entry)), None)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: not a checkpoint, or a truncated one (no intact zip directory)") from None
    except Exception as err:  # noqa: BLE001 - any failure to read the archive means it is unusable
        raise CheckpointError(f"{path}: damaged checkpoint (unreadable zip entries: {type(err).__name__})") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged checkpoint (entry {damaged} fails its CRC check)")
    if not any(entry.filename.endswith("/data.pkl") for entry in entries):
        raise CheckpointError(f"{path}: a zip file, not a checkpoint")


def _is_tensor(entry: zipfile.ZipInfo) -> bool:
    """A tensor's storage: ``<archive>/data/<key>`` (the pickle, version and byte order are the rest)."""
    return entry.filename.rpartition("/")[0].endswith("/data")


def _intact(archive: zipfile.ZipFile, entry: zipfile.ZipInfo) -> bool:
    """Whether the entry's bytes match its CRC-32 (zipfile checks it on reaching the end)."""
    try:
        with archive.open(entry) as stream:
            while stream.read(1 << 24):
                pass
    except zipfile.BadZipFile:
        return False
    return True


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A ``meloformer fit`` checkpoint with its weights, every byte checked first."""
    check_checkpoint_file(path)
    return _load(path, map_location=map_location)


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint for what it says about itself (``meloformer`` settings, ``global_step``, hyperparameters):
    its zip directory and every entry but the tensors checked, tensors mapped lazily and never read. Cheap
    for a checkpoint of any size; weights that will be used need ``read_checkpoint`` or ``check_checkpoint_file``."""
    check_checkpoint_file(path, weights=False)
    return _load(path, map_location="cpu", mmap=True)


def _load(path: str | Path, **kwargs: Any) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, weights_only=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - an intact archive that torch cannot load is not a checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"meloformer", "state_dict"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a MeloFormer checkpoint (not made by `meloformer fit`)")
    return checkpoint
