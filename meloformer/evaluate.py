"""`meloformer evaluate`: loss and perplexity of a checkpoint on a dataset split, or music metrics of a folder
of generated MIDI against a reference folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meloformer.files import write_text
from meloformer.metrics import PIECE_METRICS, MusicMetrics, similarity_error

if TYPE_CHECKING:
    from meloformer.module import MeloFormerModule


def evaluate_checkpoint(
    module: MeloFormerModule, data_dir: str | Path, split: str = "val", batch_size: int = 4, device: str = "cpu"
) -> dict[str, float]:
    """Token-weighted loss and perplexity, overall and per token kind, of a trained module on ``split``."""
    import lightning.pytorch as pl

    if split not in ("val", "test"):
        raise ValueError(f"--split must be val or test, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    if not Path(data_dir).is_dir():
        raise ValueError(f"--data {data_dir}: no such dataset folder")
    data = evaluation_data(module, data_dir, batch_size)
    trainer = pl.Trainer(
        accelerator=device, devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    run = trainer.validate if split == "val" else trainer.test
    (results,) = run(module, datamodule=data, verbose=False)
    return {k.split("/", 1)[1]: float(v) for k, v in sorted(results.items())}


def evaluation_data(module: MeloFormerModule, data_dir: str | Path, batch_size: int = 4):
    """The ``HIDDataModule`` of ``data_dir`` with rows shaped for ``module`` (its length, slots, tokenizer)."""
    from meloformer.datamodules import HIDDataModule

    return HIDDataModule(
        data_dir=str(data_dir),
        max_seq_len=module.config.max_seq_len,
        max_segments=module.config.summary_slots,
        val_batch_size=batch_size,
        tokenizer=module.tokenizer.settings,
    )


def evaluate_music(generated: str | Path, reference: str | Path, max_distance: int = 16) -> dict[str, Any]:
    """Per-folder means of the piece metrics and Museformer's similarity error of generated vs reference."""
    metrics = MusicMetrics(max_distance=max_distance)
    gen, ref = metrics.folder(generated), metrics.folder(reference)
    return {
        "generated": {"folder": str(generated), "files": gen["files"], **gen["metrics"]},
        "reference": {"folder": str(reference), "files": ref["files"], **ref["metrics"]},
        "similarity_error": similarity_error(gen["bar_similarity"], ref["bar_similarity"]),
        "bar_similarity": {"generated": gen["bar_similarity"], "reference": ref["bar_similarity"]},
        "skipped": {**gen["skipped"], **ref["skipped"]},
    }


def music_table(result: dict[str, Any]) -> str:
    rows = [f"{'metric':<22} {'generated':>10} {'reference':>10}"]
    for name in ("files", *PIECE_METRICS):
        g, r = result["generated"][name], result["reference"][name]
        rows.append(f"{name:<22} {g:>10.4g} {r:>10.4g}")
    rows.append(f"{'similarity_error':<22} {result['similarity_error']:>10.4g}")
    for path, why in result["skipped"].items():
        rows.append(f"skipped {path}: {why}")
    return "\n".join(rows)


def loss_table(result: dict[str, float]) -> str:
    rows = [f"{'tokens':<12} {'loss':>8} {'ppl':>10}"]
    for key in sorted(k for k in result if k.startswith("loss")):
        kind = "all" if key == "loss" else key[len("loss_") :]
        ppl = result.get("ppl" + key[len("loss") :], math.exp(result[key]))
        rows.append(f"{kind:<12} {result[key]:>8.4f} {ppl:>10.3f}")
    return "\n".join(rows)


def write_json(result: dict[str, Any], path: str | Path | None) -> None:
    """Write ``result`` as strict JSON (a NaN or infinite number becomes ``null``), whole or not at all."""
    if path:
        write_text(path, json.dumps(finite(result), indent=2, allow_nan=False))


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float inside it (dicts, lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
