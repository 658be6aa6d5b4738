"""Checkpoint files checked before use: a damaged, truncated or foreign file is one clear error.

``torch.save`` writes a zip archive whose entries carry CRC-32 checksums; reading every entry against its CRC
finds flipped bytes anywhere in the tensors, and a truncated file has no zip directory at all. Without this
check a damaged checkpoint loads silently (only its weights are wrong) or fails deep inside ``torch.load``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as it is: missing, damaged, truncated or not a checkpoint."""


def check_checkpoint_file(path: str | Path) -> None:
    """Raise ``CheckpointError`` unless ``path`` is an intact ``torch.save`` archive (every entry's CRC holds)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: not a checkpoint, or a truncated one (no intact zip directory)") from None
    except Exception as err:  # noqa: BLE001 - any failure to read the archive means it is unusable
        raise CheckpointError(f"{path}: damaged checkpoint (unreadable zip entries: {type(err).__name__})") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged checkpoint (entry {damaged} fails its CRC check)")
    if not any(name.endswith("/data.pkl") for name in names):
        raise CheckpointError(f"{path}: a zip file, not a checkpoint")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A ``meloformer fit`` checkpoint, checked first (``mmap``: tensors are read lazily, for metadata)."""
    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - an intact archive that torch cannot load is not a checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"meloformer", "state_dict"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a MeloFormer checkpoint (not made by `meloformer fit`)")
    return checkpoint
