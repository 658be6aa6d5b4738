"""Model folders: a trained MeloFormer as ``model.safetensors`` + ``config.json`` + a model card ``README.md``.

The format is huggingface_hub's (``PyTorchModelHubMixin`` on ``MeloFormer``): ``config.json`` holds every
``MeloFormerConfig`` field and, under ``tokenizer``, the HID tokenizer settings, so a folder is all that
generation and evaluation need. Folders are read locally; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from importlib import resources
from pathlib import Path

from meloformer.hid import HIDTokenizer
from meloformer.model import MeloFormer, MeloFormerConfig

SHIPPED_MODELS = Path(str(resources.files("meloformer.models")))  # models/ of the repository, as package data
DEFAULT_MODEL = "meloformer-pd-2m"


def save_model_folder(model: MeloFormer, tokenizer: HIDTokenizer, folder: str | Path, card: str) -> Path:
    """Write ``model.safetensors``, ``config.json`` (model configuration and tokenizer settings) and ``card``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(card)  # written first: save_pretrained keeps an existing card
    config = {**dataclasses.asdict(model.config), "tokenizer": tokenizer.settings}
    model.save_pretrained(folder, config=config)
    return folder


def is_model_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_model_folder(folder: str | Path, device: str = "cpu") -> tuple[MeloFormer, HIDTokenizer]:
    """The model (in eval mode) and tokenizer of a model folder."""
    folder = Path(folder)
    if not is_model_folder(folder):
        raise ValueError(f"{folder}: not a model folder (no config.json)")
    saved = json.loads((folder / "config.json").read_text())
    tokenizer = HIDTokenizer(**saved.pop("tokenizer", {}))
    config = MeloFormerConfig.from_stored(saved)  # explicit: the mixin cannot resolve postponed annotations
    with contextlib.redirect_stdout(io.StringIO()):  # the mixin prints "Loading weights from local directory"
        model = MeloFormer.from_pretrained(
            folder, config=config, kinds=tokenizer.kinds, map_location=device, local_files_only=True
        )
    return model.eval(), tokenizer


def default_model_folder() -> Path:
    """The model shipped with the repository (``models/<DEFAULT_MODEL>``)."""
    folder = SHIPPED_MODELS / DEFAULT_MODEL
    if not is_model_folder(folder):
        raise ValueError(f"no shipped model at {folder}: give --ckpt_path (a .ckpt or a model folder)")
    return folder
