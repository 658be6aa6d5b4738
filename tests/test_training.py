"""MeloFormerModule training: the loss, the schedule, exact resumption, checkpoints, and DDP on CPU."""

from __future__ import annotations

import dataclasses
import inspect
import math
import subprocess
import sys
import textwrap
import typing

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from meloformer.callbacks import PhaseSwitchCallback
from meloformer.datamodules import HIDDataModule
from meloformer.datamodules.shards import ShardReader
from meloformer.edits import crop_bars
from meloformer.hid import BOS, PAD, HIDTokenizer, TokenKind
from meloformer.layout import layout
from meloformer.model import SIZES, MeloFormerConfig, RuntimeConfig
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
    crops = [crop_bars(TOKENIZER, np.array(reader.tokens(table, i)), 0, 2) for i in (0, 1)]
    row = np.concatenate(crops)[:length]
    return torch.from_numpy(np.pad(row.astype(np.int64), (0, length - len(row))))[None]


def test_loss_covers_regular_tokens_only_and_groups_kinds(demo_shards, tiny_model):
    module = MeloFormerModule(**tiny_model)
    tokens = packed_row(demo_shards)
    loss, valid, group = module.token_losses({"tokens": tokens})
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
    for token_kind, name in ((TokenKind.DUR, "duration"), (TokenKind.VEL, "velocity"), (TokenKind.TRACK, "track")):
        assert (names[kind == token_kind] == name).all(), name
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
    assert lrs[:10] == pytest.approx([1e-3 * (k + 1) / 11 for k in range(10)], rel=1e-9)  # never 0
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-6)  # half-way down the cosine
    module.trainer = pl.Trainer(max_steps=-1, logger=False)
    with pytest.raises(ValueError, match="max_steps"):
        module.configure_optimizers()


def test_weight_decay_only_on_matrices(tiny_model):
    """Embeddings and projections decay; RMSNorm gains and the summary vector (1-D) do not."""
    module = MeloFormerModule(**tiny_model, weight_decay=0.1)
    module.trainer = pl.Trainer(max_steps=10, logger=False)
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "model.blocks.0.attn_norm.weight",
        "model.blocks.0.ffn_norm.weight",
        "model.norm.weight",
        "model.summary_emb",
    ]
    assert sorted(names[id(p)] for p in decay["params"]) == [
        "model.blocks.0.attn.proj.weight",
        "model.blocks.0.attn.qkv.weight",
        "model.blocks.0.ffn.down.weight",
        "model.blocks.0.ffn.gate.weight",
        "model.blocks.0.ffn.up.weight",
        "model.tok_emb.weight",
        "model.track_emb.weight",
    ]


def test_loss_falls(demo_shards, tiny_model, tmp_path):
    module = MeloFormerModule(**tiny_model, lr=3e-3, warmup_steps=5)
    recorder = LossRecorder()
    run = trainer(tmp_path, 40, recorder)
    run.fit(module, data(demo_shards, batch_size=2))
    losses = recorder.losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    names = {"train/loss", "train/ppl", "train/lr", "train/tokens_per_s"} | {f"train/loss_{k}" for k in KIND_GROUPS}
    assert names <= set(run.callback_metrics)


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


def test_validation_loss_is_token_weighted_over_the_whole_split(demo_shards, tiny_model):
    """``validate`` against the per-token losses of every validation batch, summed by hand."""
    torch.manual_seed(0)
    module = MeloFormerModule(**tiny_model)
    datamodule = data(demo_shards, val_batch_size=3)
    (logged,) = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        module, datamodule=datamodule, verbose=False
    )
    sums, counts = torch.zeros(len(KIND_GROUPS) + 1), torch.zeros(len(KIND_GROUPS) + 1)
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            loss, valid, group = module.token_losses({"tokens": batch["tokens"]})
            sums[0], counts[0] = sums[0] + loss[valid].sum(), counts[0] + valid.sum()
            for i in range(len(KIND_GROUPS)):
                chosen = valid & (group == i)
                sums[i + 1], counts[i + 1] = sums[i + 1] + loss[chosen].sum(), counts[i + 1] + chosen.sum()
    expected = {"val/loss": float(sums[0] / counts[0])}
    expected |= {f"val/loss_{name}": float(sums[i + 1] / counts[i + 1]) for i, name in enumerate(KIND_GROUPS)}
    assert counts.min() > 0 and counts[0] > 1000
    assert {k: float(logged[k]) for k in expected} == pytest.approx(expected, rel=1e-5)
    assert float(logged["val/ppl"]) == pytest.approx(math.exp(expected["val/loss"]), rel=1e-5)
    assert float(logged["val/ppl_pitch"]) == pytest.approx(math.exp(expected["val/loss_pitch"]), rel=1e-5)


def test_checkpoint_rebuilds_the_model_alone(demo_shards, tiny_model, tmp_path):
    module = MeloFormerModule(**tiny_model, tokenizer={"resolution": 12})
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, 2, checkpoints).fit(module, data(demo_shards))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["meloformer"]["tokenizer"] == TOKENIZER.settings
    assert saved["meloformer"]["model_config"]["n_embd"] == 32
    assert saved["hyper_parameters"]["tokenizer"] == TOKENIZER.settings
    with pytest.raises(ValueError, match=r"^not a MeloFormer checkpoint \(no .meloformer. entry\)$"):
        module.on_load_checkpoint({k: v for k, v in saved.items() if k != "meloformer"})
    rebuilt = load_checkpoint(tmp_path / "last.ckpt")
    tokens = packed_row(demo_shards)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens), module(tokens))


TINY = MeloFormerConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, ffn_hidden=1408, max_seq_len=256)
# The hyperparameters of older checkpoints: the model fields one by one, and before them ``overrides``.
FLAT = {"size": "small", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "ffn_hidden": 1408}
FLAT |= {"max_seq_len": 256, "summary_slots": None, "attention_backend": "sdpa", "gradient_checkpointing": "none"}
OVERRIDES = {"size": "small", "max_seq_len": 256, "summary_slots": None, "attention_backend": None}
OVERRIDES |= {"overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1}}


@pytest.mark.parametrize("old", [FLAT, OVERRIDES], ids=["flat-fields", "overrides"])
def test_a_checkpoint_with_old_hyperparameters_still_loads(tmp_path, old):
    """Older checkpoints hold the model fields (or ``overrides``) among their hyperparameters; the model comes
    from the exact configuration every checkpoint stores, so they load alike, with their training settings."""
    module = MeloFormerModule(TINY)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": old | {"lr": 1e-3}}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = load_checkpoint(tmp_path / "old.ckpt")
    assert loaded.config == module.config and loaded.hparams.lr == 1e-3
    assert set(loaded.hparams) == set(inspect.signature(MeloFormerModule).parameters)  # no size, no overrides


def test_a_checkpoint_from_before_a_new_model_field_loads_with_its_default(tmp_path):
    """A checkpoint saved before ``slot_input`` existed stores no such field: it loads (and resumes) with the
    default, ``learned``, the behaviour it was trained with; asking for another value is refused."""
    module = MeloFormerModule(TINY)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    del checkpoint["meloformer"]["model_config"]["slot_input"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = load_checkpoint(tmp_path / "old.ckpt")
    assert loaded.config.slot_input == "learned" and loaded.config == module.config
    other = MeloFormerModule(dataclasses.replace(TINY, slot_input="segment_mean"))
    with pytest.raises(ValueError, match="slot_input: checkpoint 'learned' vs now 'segment_mean'"):
        other.on_load_checkpoint(checkpoint)


def test_resuming_with_another_model_or_tokenizer_is_an_error(demo_shards, tiny_model, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, 1, checkpoints).fit(MeloFormerModule(**tiny_model), data(demo_shards))
    wider = {**tiny_model, "config": {**tiny_model["config"], "n_embd": 64}}
    with pytest.raises(ValueError, match="other model configuration.*n_embd: checkpoint 32 vs now 64"):
        trainer(tmp_path, 2).fit(MeloFormerModule(**wider), data(demo_shards), ckpt_path=tmp_path / "last.ckpt")
    finer = MeloFormerModule(**tiny_model, tokenizer={"velocity_bins": 16})
    with pytest.raises(ValueError, match="other tokenizer settings.*velocity_bins"):
        trainer(tmp_path, 2).fit(finer, data(demo_shards), ckpt_path=tmp_path / "last.ckpt")


def test_no_module_argument_mirrors_a_config_field():
    """The architecture is one argument, ``config`` (a ``MeloFormerConfig``, default: the small size), and the
    run-time knobs another, ``runtime``: no field of either is an argument of its own."""
    arguments = inspect.signature(MeloFormerModule).parameters
    model, runtime = ({f.name for f in dataclasses.fields(c)} for c in (MeloFormerConfig, RuntimeConfig))
    assert not set(arguments) & (model | runtime) and not model & runtime
    hints = typing.get_type_hints(MeloFormerModule.__init__)
    assert (hints["config"], hints["runtime"]) == (MeloFormerConfig, RuntimeConfig)
    assert (arguments["config"].default, arguments["runtime"].default) == (SIZES["small"], RuntimeConfig())


def test_the_module_builds_its_config_with_the_tokenizers_vocabulary():
    """``vocab_size`` is the tokenizer's; the dicts checkpoints store build the same module; hparams hold them as
    plain data."""
    given = MeloFormerConfig.from_size("base", n_layer=2, n_embd=128, n_head=4, n_kv_head=2, attention="causal")
    module = MeloFormerModule(dataclasses.replace(given, vocab_size=7), RuntimeConfig(gradient_checkpointing="ffn"))
    assert module.config == dataclasses.replace(given, vocab_size=TOKENIZER.vocab_size)
    assert module.model.runtime == RuntimeConfig(gradient_checkpointing="ffn")
    assert module.hparams.config == dataclasses.asdict(module.config)
    assert module.hparams.runtime == dataclasses.asdict(RuntimeConfig(gradient_checkpointing="ffn"))
    again = MeloFormerModule(module.hparams.config, module.hparams.runtime)
    assert again.config == module.config and again.model.runtime == module.model.runtime


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"config": {"n_layers": 2}}, "unknown model fields n_layers"),
        ({"config": {"n_embd": 100, "n_head": 8}}, "n_embd must divide into n_head heads"),
        ({"tokenizer": {"resolutoin": 8}}, "bad tokenizer settings"),
    ],
)
def test_bad_model_settings_are_refused(kwargs, problem):
    """(Unknown names and values of the wrong type are jsonargparse's to catch: tests/test_cli_fit.py.)"""
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


def test_init_from_starts_from_a_model_folders_weights_and_refuses_another_shape(tmp_path):
    """Fine-tuning: the model starts from the folder's weights (the shipped model with its own architecture, under
    its own or another mask); another architecture is one line naming the field; a checkpoint never needs the
    folder again."""
    import shutil

    from meloformer.pretrained import default_model_folder, load_model_folder

    folder = tmp_path / "model"
    shutil.copytree(default_model_folder(), folder)
    shipped, tok = load_model_folder(folder)
    module = MeloFormerModule(shipped.config, tokenizer=tok.settings, init_from=str(folder))
    for (name, ours), theirs in zip(module.model.state_dict().items(), shipped.state_dict().values()):
        assert torch.equal(ours, theirs), name
    fresh = MeloFormerModule(shipped.config, tokenizer=tok.settings)
    assert not torch.equal(fresh.model.tok_emb.weight, module.model.tok_emb.weight)
    other = dataclasses.replace(shipped.config, n_layer=2)
    message = r"^model.init_from .*: the model folder was made with other model configuration \(n_layer: model "
    with pytest.raises(ValueError, match=message + r"folder 4 vs now 2\)$"):
        MeloFormerModule(other, tokenizer=tok.settings, init_from=str(folder))
    retrained = MeloFormerModule(dataclasses.replace(shipped.config, attention="window"), init_from=str(folder))
    assert torch.equal(retrained.model.tok_emb.weight, module.model.tok_emb.weight)  # another mask, same weights
    with pytest.raises(ValueError, match=r"^model.init_from: .*nowhere: no such model folder"):
        MeloFormerModule(shipped.config, tokenizer=tok.settings, init_from=str(tmp_path / "nowhere"))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "tuned.ckpt")
    shutil.rmtree(folder)
    loaded = load_checkpoint(tmp_path / "tuned.ckpt")  # the folder is gone: the checkpoint holds the weights
    assert torch.equal(loaded.model.tok_emb.weight, module.model.tok_emb.weight)
