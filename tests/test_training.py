"""MeloFormerModule training: the loss, the schedule, exact resumption, checkpoints, and DDP on CPU."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from meloformer.callbacks import PhaseSwitchCallback
from meloformer.datamodules import HIDDataModule
from meloformer.datamodules.shards import ShardReader
from meloformer.hid import BOS, PAD, HIDTokenizer, TokenKind
from meloformer.layout import layout
from meloformer.module import KIND_GROUPS, MeloFormerModule, load_checkpoint

TOKENIZER = HIDTokenizer()


class Recorder(pl.Callback):
    """The rows every optimizer step trained on."""

    def __init__(self) -> None:
        self.rows: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.setdefault(trainer.global_step, []).extend(batch["row"].tolist())


class LossRecorder(pl.Callback):
    """The training loss of every batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def trainer(root, max_steps, *callbacks, **kwargs) -> pl.Trainer:
    kwargs = {
        "max_steps": max_steps,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "default_root_dir": root,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
    } | kwargs
    return pl.Trainer(callbacks=list(callbacks), **kwargs)


def data(shards, **kwargs) -> HIDDataModule:
    return HIDDataModule(str(shards), max_seq_len=256, max_segments=64, **kwargs)


def packed_row(shards, length=256) -> torch.Tensor:
    """Two pieces cropped to a few bars each, then padding: [1, length]."""
    reader = ShardReader(shards)
    table = reader.pieces("train")
    crops = [TOKENIZER.crop_bars(np.array(reader.tokens(table, i)), 0, 2) for i in (0, 1)]
    row = np.concatenate(crops)[:length]
    return torch.from_numpy(np.pad(row.astype(np.int64), (0, length - len(row))))[None]


def test_loss_covers_regular_tokens_only_and_groups_kinds(demo_shards, tiny_model):
    module = MeloFormerModule(**tiny_model)
    tokens = packed_row(demo_shards)
    loss, valid, group = module.token_losses(tokens)
    targets = tokens[0, 1:].numpy()
    assert np.array_equal(valid[0].numpy(), (targets != PAD) & (targets != BOS))
    assert (loss[~valid] == 0).all()
    # The mean equals cross-entropy over the counted targets of a plain forward.
    logits = module(tokens)[0, :-1]
    expected = F.cross_entropy(logits[valid[0]], tokens[0, 1:][valid[0]])
    mean, sums, counts = module.group_means(loss, valid, group)
    assert torch.allclose(mean, expected, atol=1e-6)
    is_eos = tokens[:, 1:] == TOKENIZER.vocab.index("EOS")
    assert counts.sum() == (valid & ~is_eos).sum()  # every counted target but EOS has a kind group
    torch.testing.assert_close(sums.sum() + loss[is_eos].sum(), loss.sum())
    lay = layout(tokens[0].numpy(), TOKENIZER.kinds)
    kind, track = lay.kind[1:], lay.track[1:]
    names = np.array([*KIND_GROUPS, "-"])[group[0].numpy()]
    assert (names[(kind == TokenKind.POS) & (track == 0)] == "conductor").all()
    assert (names[(kind == TokenKind.POS) & (track > 0)] == "position").all()
    assert (names[np.isin(kind, [TokenKind.TIMESIG, TokenKind.CHORD, TokenKind.TEMPO])] == "conductor").all()
    assert (names[kind == TokenKind.PITCH] == "pitch").all() and (names[kind == TokenKind.BAR] == "bar").all()
    assert set(names[valid[0].numpy()]) >= {"bar", "position", "pitch", "duration", "velocity", "track", "conductor"}


def test_learning_rate_warms_up_then_decays_to_the_floor_at_max_steps(tiny_model):
    module = MeloFormerModule(**tiny_model, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    module.trainer = pl.Trainer(max_steps=110, logger=False)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(110):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-6)  # half-way down the cosine
    module.trainer = pl.Trainer(max_steps=-1, logger=False)
    with pytest.raises(ValueError, match="max_steps"):
        module.configure_optimizers()


def test_loss_falls(demo_shards, tiny_model, tmp_path):
    module = MeloFormerModule(**tiny_model, lr=3e-3, warmup_steps=5)
    recorder = LossRecorder()
    trainer(tmp_path, 40, recorder).fit(module, data(demo_shards, batch_size=2))
    losses = recorder.losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses


def _fit_recorded(shards, root, tiny_model, max_steps, ckpt_path=None):
    pl.seed_everything(0)
    module = MeloFormerModule(**tiny_model, lr=2e-3, warmup_steps=2)
    recorder = Recorder()
    phases = [{"start_step": 0, "batch_size": 1}, {"start_step": 2, "batch_size": 2, "num_workers": 1}]
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    run = trainer(root, max_steps, PhaseSwitchCallback(phases), checkpoints, recorder, accumulate_grad_batches=2)
    run.fit(module, data(shards, transpose=3), ckpt_path=ckpt_path)
    return module, recorder.rows


def test_resume_equals_uninterrupted(demo_shards, tiny_model, tmp_path):
    """k steps, stop, resume to n == n steps at once: same batches, same parameters (float tolerance)."""
    whole, whole_rows = _fit_recorded(demo_shards, tmp_path / "whole", tiny_model, max_steps=6)
    for k in (3, 4):  # at a phase's first step, and inside a phase
        (ckpt,) = (tmp_path / "whole" / "checkpoints").glob(f"*-step={k}.ckpt")
        resumed, resumed_rows = _fit_recorded(demo_shards, tmp_path / f"from{k}", tiny_model, 6, ckpt)
        assert resumed_rows == {s: r for s, r in whole_rows.items() if s >= k}
        for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_rebuilds_the_model_alone(demo_shards, tiny_model, tmp_path):
    module = MeloFormerModule(**tiny_model, tokenizer={"resolution": 12})
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, 2, checkpoints).fit(module, data(demo_shards))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["meloformer"]["tokenizer"] == TOKENIZER.settings
    assert saved["meloformer"]["model_config"]["n_embd"] == 32
    assert saved["hyper_parameters"]["tokenizer"] == TOKENIZER.settings
    rebuilt = load_checkpoint(tmp_path / "last.ckpt")
    tokens = packed_row(demo_shards)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens), module(tokens))


def test_resuming_with_another_model_or_tokenizer_is_an_error(demo_shards, tiny_model, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, 1, checkpoints).fit(MeloFormerModule(**tiny_model), data(demo_shards))
    wider = {**tiny_model, "overrides": {**tiny_model["overrides"], "n_embd": 64}}
    with pytest.raises(ValueError, match="other model configuration.*n_embd: checkpoint 32 vs now 64"):
        trainer(tmp_path, 2).fit(MeloFormerModule(**wider), data(demo_shards), ckpt_path=tmp_path / "last.ckpt")
    finer = MeloFormerModule(**tiny_model, tokenizer={"velocity_bins": 16})
    with pytest.raises(ValueError, match="other tokenizer settings.*velocity_bins"):
        trainer(tmp_path, 2).fit(finer, data(demo_shards), ckpt_path=tmp_path / "last.ckpt")


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"overrides": {"n_layers": 2}}, "unknown model setting 'n_layers'"),
        ({"overrides": {"n_layer": "two"}}, "n_layer='two' should be"),
        ({"attention_backend": "fast"}, "attention_backend='fast'"),
        ({"size": "huge"}, "unknown size 'huge'"),
        ({"tokenizer": {"resolutoin": 8}}, "bad tokenizer settings"),
    ],
)
def test_bad_model_settings_are_refused(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        MeloFormerModule(**kwargs)


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as pl
    import torch
    from meloformer.callbacks import PhaseSwitchCallback
    from meloformer.datamodules import HIDDataModule
    from meloformer.module import MeloFormerModule

    shards, out, tiny = sys.argv[1], sys.argv[2], eval(sys.argv[3])

    class Record(pl.Callback):
        rows = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rows.append(batch["row"].tolist())

        def on_train_end(self, trainer, pl_module):
            params = [p.detach().clone() for p in pl_module.parameters()]
            torch.save({"rows": self.rows, "params": params, "world": trainer.world_size},
                       f"{out}/rank{trainer.global_rank}.pt")

    pl.seed_everything(0)
    module = MeloFormerModule(**tiny, lr=3e-3, warmup_steps=1)
    torch.save([p.detach().clone() for p in module.parameters()], f"{out}/init.pt")
    phases = [{"start_step": 0, "batch_size": 1}, {"start_step": 2, "batch_size": 2, "num_workers": 1}]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                         callbacks=[PhaseSwitchCallback(phases), Record()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, HIDDataModule(shards, max_seq_len=256, max_segments=64))
    """
)


def test_ddp_on_cpu_two_processes(demo_shards, tiny_model, tmp_path):
    """Two gloo processes: parameters agree after training, and each rank trained on different rows."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(_DDP_SCRIPT)
    cmd = [sys.executable, str(script), str(demo_shards), str(tmp_path), repr(tiny_model)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        torch.testing.assert_close(a, b)
    initial = torch.load(tmp_path / "init.pt")
    assert any(not torch.equal(a, b) for a, b in zip(initial, ranks[0]["params"]))
    rows = [[row for batch in rank["rows"] for row in batch] for rank in ranks]
    assert [len(batch) for batch in ranks[0]["rows"]] == [1, 1, 2, 2]
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == list(range(12))  # together: the stream, in global batches
    assert math.isfinite(float(ranks[0]["params"][0].sum()))


@pytest.mark.slow
def test_compiled_training_matches_eager(demo_shards, tiny_model, tmp_path):
    """``compile: true`` trains through torch.compile (CPU, sdpa) with the eager model's losses."""
    losses = {}
    for compiled in (False, True):
        pl.seed_everything(0)
        module = MeloFormerModule(**tiny_model, compile=compiled, recompile_limit=16)
        recorder = LossRecorder()
        trainer(tmp_path, 3, recorder).fit(module, data(demo_shards))
        losses[compiled] = recorder.losses
        assert (module.model._compiled_call_impl is not None) == compiled
    assert torch._dynamo.config.recompile_limit == 16
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
