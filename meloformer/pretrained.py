"""Model folders: a trained MeloFormer as ``model.safetensors`` + ``config.json`` + a model card ``README.md``.

The format is huggingface_hub's (``PyTorchModelHubMixin`` on ``MeloFormer``): ``config.json`` holds every
``MeloFormerConfig`` field and, under ``tokenizer``, the HID tokenizer settings, so a folder is all that
generation and evaluation need. ``load_model_folder`` reads a local folder or a Hugging Face model id (from
the local cache when offline); it is the one loading path of the CLI and the web app. A local folder's
``checksums.json`` holds the size and sha256 of both files (the card is free to edit); ``load_model_folder``
checks them and each ``config.json`` field first (``verify_model_folder``), so a damaged, truncated or
mixed-up folder is refused with one line instead of generating from wrong weights.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

from meloformer.files import (
    CHECKSUMS,
    CHECKSUMS_FORMAT,
    MODEL_FILES,
    atomic_folder,
    read_json_object,
    sha256_file,
    verify_checksums,
    writable_folder,
    write_text,
)
from meloformer.hid import HIDTokenizer
from meloformer.model import MeloFormer, MeloFormerConfig, RuntimeConfig

SHIPPED_MODELS = Path(str(resources.files("meloformer.models")))  # models/ of the repository, as package data
DEFAULT_MODEL = "meloformer-pd-2m"


def model_card_text(card: str) -> str:
    """``card`` with the YAML front matter of a MeloFormer model (license, library_name, tags) on top,
    unless it has front matter of its own."""
    parsed = ModelCard(card, ignore_metadata_errors=True)
    if parsed.data.to_dict():
        return card
    data = MeloFormer._hub_mixin_info.model_card_data
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + card).content


def save_model_folder(
    model: MeloFormer, tokenizer: HIDTokenizer, folder: str | Path, card: str, overwrite: bool = False
) -> Path:
    """Write ``model.safetensors``, ``config.json`` (model configuration and tokenizer settings), ``card`` (with
    front matter) as ``README.md`` and ``checksums.json``; the folder appears whole (see ``atomic_folder``). A
    non-empty ``folder`` is refused unless ``overwrite``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder}: is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"--out {folder}: is not empty; give --overwrite to replace it, or another folder")
    writable_folder(folder.parent, "--out")
    with atomic_folder(folder) as tmp:
        (tmp / "README.md").write_text(model_card_text(card))  # written first: save_pretrained keeps a card
        config = {**dataclasses.asdict(model.config), "tokenizer": tokenizer.settings}
        model.save_pretrained(tmp, config=config)
        write_checksums(tmp)
    return folder


def write_checksums(folder: str | Path) -> dict[str, dict]:
    """Record the size and sha256 of the files the model is made of (``MODEL_FILES``) in ``checksums.json``."""
    folder = Path(folder)
    files = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in MODEL_FILES
    }
    write_text(folder / CHECKSUMS, json.dumps({"format": CHECKSUMS_FORMAT, "files": files}, indent=1) + "\n")
    return files


def is_model_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def verify_model_folder(folder: str | Path) -> dict[str, Any]:
    """The saved configuration (``config.json``, with its ``tokenizer`` settings) of a model folder, after
    checking it field by field and, where ``export`` wrote ``checksums.json``, both files against it;
    ValueError with one line naming the file (and field) otherwise. ``load_model_folder`` calls this first."""
    folder = Path(folder)
    if not is_model_folder(folder):
        raise ValueError(f"{folder}: not a model folder (no config.json)")
    saved = _read_config(folder / "config.json")
    verify_checksums(folder)
    return saved


def _read_config(path: Path) -> dict[str, Any]:
    """``config.json`` checked field by field: every field known, of its type, the tokenizer settings usable."""
    saved = read_json_object(path, "the model configuration")
    fields = {f.name: f for f in (*dataclasses.fields(MeloFormerConfig), *dataclasses.fields(RuntimeConfig))}
    for name, value in saved.items():
        if name == "tokenizer":
            continue
        if name not in fields:
            raise ValueError(f"{path}: unknown field {name!r} (not a MeloFormer model configuration)")
        default = fields[name].default
        kind = float if isinstance(default, float) else type(default)
        if default is not None and kind in (int, float, bool, str) and not _is_a(value, kind):
            raise ValueError(f"{path}: field {name!r} is {value!r}, not of type {kind.__name__}")
    if not isinstance(saved.get("tokenizer"), dict):
        raise ValueError(f"{path}: field 'tokenizer' (the tokenizer settings) is missing or not an object")
    try:
        vocab_size = HIDTokenizer(**saved["tokenizer"]).vocab_size
        MeloFormerConfig.from_stored({k: v for k, v in saved.items() if k != "tokenizer"})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    if saved.get("vocab_size", vocab_size) != vocab_size:
        raise ValueError(f"{path}: field 'vocab_size' is {saved['vocab_size']}, its tokenizer has {vocab_size}")
    return saved


def _is_a(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def is_hub_id(path: str) -> bool:
    """Could ``path`` name a Hugging Face model (``owner/name``) rather than a local file or folder?"""
    parts = path.split("/")
    return not Path(path).exists() and len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


def load_model_folder(folder: str | Path, device: str = "cpu") -> tuple[MeloFormer, HIDTokenizer]:
    """The model (in eval mode) and tokenizer of a model folder or a Hugging Face model id."""
    where, local = str(folder), Path(folder).exists()
    if local and not is_model_folder(where):
        raise ValueError(f"{where}: not a model folder (no config.json)")
    if not local and not is_hub_id(where):
        raise ValueError(f"{where}: no such model folder (nor a Hugging Face model id, owner/name)")
    if local:  # the fields here; from_pretrained checks the files against checksums.json
        _read_config(Path(where) / "config.json")
    try:
        model = MeloFormer.from_pretrained(where, map_location=device)
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, OSError) as err:
        if local:
            raise
        if constants.is_offline_mode():
            raise ValueError(f"{where}: no such model folder, and not in the Hugging Face cache (offline)") from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{where}: no such model folder, nor fetched from the Hugging Face Hub ({reason})") from None
    return model.eval(), HIDTokenizer(**model.tokenizer_settings)


def default_model_folder() -> Path:
    """The model shipped with the repository (``models/<DEFAULT_MODEL>``)."""
    folder = SHIPPED_MODELS / DEFAULT_MODEL
    if not is_model_folder(folder):
        raise ValueError(f"no shipped model at {folder}: give --ckpt_path (a .ckpt or a model folder)")
    return folder
