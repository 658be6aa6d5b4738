"""The training step's path on the host: the DataLoader workers build the attention context, and the step
only wraps it, with no host sync (issue: the step rebuilt the mask with ~9,400 aten calls and a sync)."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.utils._python_dispatch import TorchDispatchMode

from meloformer.datamodules import HIDDataModule
from meloformer.datamodules.rows import RowBuilder
from meloformer.datamodules.shards import ShardReader
from meloformer.hid import HIDTokenizer
from meloformer.model import SIZES
from meloformer.module import MeloFormerModule

# Ops that make a CUDA host wait for the device (a value or a data-dependent shape comes back).
SYNCING = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "bincount",
           "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "allclose"}  # fmt: skip


class Ops(TorchDispatchMode):
    """Every aten call made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> list[str]:
        return [name for name in self.calls if name in SYNCING]


def test_the_attention_context_of_a_loader_batch_is_a_few_calls_and_no_sync(demo_shards):
    """4 demo rows of 8,192 tokens with 1,024 slots, flex: the step builds nothing but rotary angles."""
    torch.set_num_threads(1)
    tok = HIDTokenizer()
    builder = RowBuilder(ShardReader(demo_shards), "train", tok, 8192, 1024, transpose=5)
    tokens = torch.from_numpy(np.stack([builder.row(i) for i in range(4)]))
    module = MeloFormerModule(dataclasses.replace(SIZES["small"], max_seq_len=8192, summary_slots=1024))
    batch = {"tokens": tokens} | module.mask_plan("flex")(tokens)
    with Ops() as ops:
        ctx = module.attention_context(batch)
    assert isinstance(ctx.mask, BlockMask) and ctx.mask.BLOCK_SIZE == (128, 128)
    assert len(ops.calls) <= 50 and not ops.syncs, ops.calls
    assert ctx.mask.kv_num_blocks.sum() > 0 and ctx.rows.num_slots == 1024


def test_the_window_attention_computes_mostly_full_tiles(demo_shards):
    """The same 4 rows under ``window`` (rows aligned as its loader packs them): at least 60% of the 128-token
    tiles flex computes are full, where ``summary`` computes about 10% full tiles."""
    tok = HIDTokenizer()
    share = {}
    for attention in ("summary", "window"):
        config = dataclasses.replace(SIZES["small"], max_seq_len=8192, summary_slots=1024, attention=attention)
        plan = MeloFormerModule(config).mask_plan("flex")
        builder = RowBuilder(ShardReader(demo_shards), "train", tok, 8192, 1024, transpose=5, doc_align=plan.doc_align)
        tokens = torch.from_numpy(np.stack([builder.row(i) for i in range(4)]))
        counts = plan(tokens)["mask"].structure.tile_counts()
        share[attention] = counts["full"] / counts["computed"]
    assert share["window"] >= 0.6 and share["summary"] < 0.2, share


@pytest.mark.parametrize(("accumulate", "parallels_weight"), [(1, 0.0), (2, 0.0), (1, 1.0)])
def test_training_step_makes_no_host_sync(demo_shards, tiny_model, accumulate: int, parallels_weight: float):
    """Loss, per-kind losses, perplexity, throughput, learning rate and the parallels term are logged as device
    values."""

    class Counted(MeloFormerModule):
        ops: list[str] = []

        def training_step(self, batch, batch_idx):
            with Ops() as ops:
                loss = super().training_step(batch, batch_idx)
            Counted.ops.append(ops.syncs)
            return loss

    module = Counted(**tiny_model, warmup_steps=1, parallels_weight=parallels_weight)
    data = HIDDataModule(str(demo_shards), max_seq_len=256, max_segments=64, mask_plan=module.batch_plan())
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=accumulate, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data)
    assert len(Counted.ops) == 2 * accumulate and all(syncs == [] for syncs in Counted.ops), Counted.ops
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"]) and "train/loss_pitch" in logged and "train/tokens_per_s" in logged
    assert ("train/parallels" in logged) == (parallels_weight > 0)
