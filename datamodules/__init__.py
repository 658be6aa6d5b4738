"""Data side of MeloFormer: token shards, packed rows, the resumable stream and the LightningDataModule.

The Lightning parts are imported lazily, so ``meloformer preprocess`` (which only needs ``shards``) and its
worker processes do not pay for importing torch and Lightning.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "HIDDataModule": "hid_datamodule",
    "LoaderSchedule": "hid_datamodule",
    "LoaderPlan": "stream",
    "StreamLoader": "stream",
    "StreamState": "stream",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
