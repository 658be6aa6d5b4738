"""DDP is exact: the validation loss of two gloo ranks on CPU equals one process's, on a split whose rows do
not divide evenly between the ranks (``DistributedSampler`` would repeat a row to even them out)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_MODEL

from meloformer.datamodules import HIDDataModule
from meloformer.module import MeloFormerModule

_VALIDATE = textwrap.dedent(
    """
    import sys

    import lightning.pytorch as pl
    import torch

    from meloformer.datamodules import HIDDataModule
    from meloformer.module import MeloFormerModule

    shards, out, tiny, devices = sys.argv[1], sys.argv[2], eval(sys.argv[3]), int(sys.argv[4])
    module = MeloFormerModule(**tiny)
    module.load_state_dict(torch.load(f"{out}/weights.pt"))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    (result,) = trainer.validate(module, HIDDataModule(shards, max_seq_len=256, max_segments=64, val_batch_size=2))
    if trainer.is_global_zero:
        torch.save(result, f"{out}/devices{devices}.pt")
    """
)


@pytest.mark.slow
def test_validation_loss_is_the_same_on_one_and_two_ranks(demo_shards, tmp_path):
    shards = shutil.copytree(demo_shards, tmp_path / "shards")
    index = json.loads((shards / "index.json").read_text())
    val = [piece for piece in index["pieces"] if piece["split"] == "val"]
    if len(val) % 2 == 0:
        val[0]["split"] = "train"  # an odd number of validation pieces: the ranks get unequal shares
    (shards / "index.json").write_text(json.dumps(index))
    assert len(HIDDataModule(str(shards)).reader.pieces("val")) % 2 == 1

    torch.manual_seed(0)
    torch.save(MeloFormerModule(**TINY_MODEL).state_dict(), tmp_path / "weights.pt")
    script = tmp_path / "validate.py"
    script.write_text(_VALIDATE)
    for devices in (1, 2):
        cmd = [sys.executable, str(script), str(shards), str(tmp_path), repr(TINY_MODEL), str(devices)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"devices{d}.pt") for d in (1, 2))
    assert set(one) == set(two) and "val/loss" in one
    for name in one:
        assert abs(one[name] - two[name]) < 1e-5 * max(1.0, abs(one[name])), name
