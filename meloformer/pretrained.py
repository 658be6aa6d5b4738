"""Model folders: a trained MeloFormer as ``model.safetensors`` + ``config.json`` + a model card ``README.md``.

The format is huggingface_hub's (``PyTorchModelHubMixin`` on ``MeloFormer``): ``config.json`` holds every
``MeloFormerConfig`` field and, under ``tokenizer``, the HID tokenizer settings, so a folder is all that
generation and evaluation need. ``load_model_folder`` reads a local folder or a Hugging Face model id (from
the local cache when offline); it is the one loading path of the CLI and the web app.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

from meloformer.hid import HIDTokenizer
from meloformer.model import MeloFormer

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


def save_model_folder(model: MeloFormer, tokenizer: HIDTokenizer, folder: str | Path, card: str) -> Path:
    """Write ``model.safetensors``, ``config.json`` (model configuration and tokenizer settings) and ``card``
    (with front matter)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(model_card_text(card))  # written first: save_pretrained keeps a card
    config = {**dataclasses.asdict(model.config), "tokenizer": tokenizer.settings}
    model.save_pretrained(folder, config=config)
    return folder


def is_model_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


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
