"""The real `meloformer` console script in subprocesses: fit, --print_config, overrides, bad configs, sizes."""

from __future__ import annotations

import csv
import dataclasses
import shutil
import subprocess

import pytest
import torch
import yaml

from _music import REPO
from meloformer.cli import build_cli, main
from meloformer.model import SIZES, MeloFormerConfig, RuntimeConfig, parameter_counts
from meloformer.module import load_checkpoint

DEMO = str(REPO / "configs" / "demo.yaml")
GPU_CONFIGS = ["small", "base", "large", "xlarge"]
QUICK = ["--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "2"]


def meloformer(*args: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    script = shutil.which("meloformer")
    assert script, "the meloformer console script is not installed (pip install -e .)"
    return subprocess.run([script, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_fit_demo_config_a_few_steps(tmp_path):
    """The README's main job, shortened: trains, switches phase, validates, logs and leaves checkpoints."""
    phases = "[{start_step: 0, batch_size: 1}, {start_step: 2, batch_size: 2, num_workers: 1}]"
    done = meloformer(
        "fit", "--config", DEMO, "--trainer.max_steps", "4", *QUICK, "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1", "--trainer.callbacks.init_args.phases", phases, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "phase 2/2 from optimizer step 2: batch_size 2, num_workers 1" in done.stderr
    (metrics,) = (tmp_path / "runs" / "demo").rglob("metrics.csv")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    steps = {int(r["step"]): r for r in rows if r.get("train/loss")}
    assert sorted(steps) == [0, 1, 2, 3]
    assert [float(steps[s]["batch_size"]) for s in range(4)] == [1, 1, 2, 2]
    assert [float(steps[s]["num_workers"]) for s in range(4)] == [0, 0, 1, 1]
    for name in ("train/ppl", "train/lr", "train/loss_pitch", "train/loss_conductor"):
        assert steps[3][name], name
    assert any(r.get("val/loss") and r.get("val/ppl_velocity") for r in rows)
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "demo").rglob("*.ckpt"))
    assert "last.ckpt" in checkpoints


def test_print_config_shows_one_resolved_config(tmp_path):
    done = meloformer("fit", "--config", DEMO, "--print_config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    config = yaml.safe_load(done.stdout)
    model = config["model"]
    assert set(model["config"]) == {f.name for f in dataclasses.fields(MeloFormerConfig)}  # every field, resolved
    assert set(model["runtime"]) == {f.name for f in dataclasses.fields(RuntimeConfig)}
    assert (model["config"]["n_embd"], model["config"]["ffn_hidden"]) == (128, 384)
    assert model["runtime"]["attention_backend"] == "sdpa" and model["lr"] == 2e-3
    assert config["trainer"]["precision"] == "32-true"
    assert "max_seq_len" not in config["data"]  # linked from the model: set once, in model
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "meloformer.callbacks.PhaseSwitchCallback" in callbacks


def test_a_field_left_out_keeps_its_value_also_a_derived_one(tmp_path):
    """The fields of ``model.config`` start at the small size's values, ``ffn_hidden`` too (derived from the
    size's ``n_embd``): a new ``n_embd`` alone keeps small's SwiGLU width (the configs give both)."""
    done = meloformer("fit", "--model.config.n_embd", "128", "--print_config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    config = yaml.safe_load(done.stdout)["model"]["config"]
    assert config == {**dataclasses.asdict(SIZES["small"]), "fine_bars": list(SIZES["small"].fine_bars), "n_embd": 128}
    assert config["ffn_hidden"] == SIZES["small"].ffn_hidden == 1408


def test_command_line_sets_model_fields(tmp_path):
    """Dotted flags set single model fields over the config's; the rest come from the config (and small)."""
    done = meloformer(
        "fit", "--config", DEMO, "--model.config.n_layer", "2", "--model.config.n_embd", "64",
        "--model.config.n_head", "2", "--model.config.n_kv_head", "1", "--model.runtime.gradient_checkpointing",
        "ffn", "--trainer.max_steps", "2", *QUICK, "--trainer.limit_val_batches", "0", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (last,) = (tmp_path / "runs" / "demo").rglob("last.ckpt")
    checkpoint = torch.load(last, weights_only=True, map_location="cpu")
    saved = checkpoint["meloformer"]["model_config"]
    expected = MeloFormerConfig.from_size(
        "small", vocab_size=saved["vocab_size"], n_layer=2, n_embd=64, n_head=2, n_kv_head=1, ffn_hidden=384,
        max_seq_len=512, summary_slots=128, attention="summary",
    )  # fmt: skip
    assert saved == dataclasses.asdict(expected)  # ffn_hidden: the config's, kept
    assert checkpoint["hyper_parameters"]["config"] == saved  # plain data, read with weights_only
    assert checkpoint["hyper_parameters"]["runtime"]["gradient_checkpointing"] == "ffn"
    parameters = sum(t.numel() for k, t in checkpoint["state_dict"].items() if k.startswith("model."))
    assert load_checkpoint(last).model.num_parameters() == parameters  # a CLI checkpoint rebuilds alone


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--model.sise", "base"], "sise"),
        (["--trainer.max_steps", "many"], "max_steps"),
        (["--model.config.n_layers", "2"], "unrecognized arguments: --model.config.n_layers 2"),
        (
            [
                "--trainer.callbacks.init_args.phases",
                "[{start_step: 0, batch_size: 2}, {start_step: 0, batch_size: 4}]",
            ],
            "phase 2 starts at step 0, not after phase 1",
        ),
        (["--data.data_dir", "no/such/folder"], "no/such/folder: no dataset here"),
        (
            ["--model.tokenizer", "{resolution: 24}", "--data.data_dir", "{shards}"],
            "resolution: data 12 vs expected 24",
        ),
    ],
    ids=["unknown-key", "wrong-type", "unknown-model-setting", "phases-out-of-order", "missing-data", "tokenizer"],
)
def test_bad_config_stops_before_training(tmp_path, demo_shards, args, problem):
    args = [a.replace("{shards}", str(demo_shards)) for a in args]
    done = meloformer("fit", "--config", DEMO, *args, cwd=tmp_path)
    assert done.returncode != 0
    assert problem in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--model.config.n_layer", "two"],
            """Parser key "model.config.n_layer": Expected a <class 'int'>. Got value: two""",
        ),
        (
            ["--model.config.attention", "full"],
            """Parser key "model.config.attention": Expected a typing.Literal['summary', 'window', 'causal', """
            """'local']. Got value: full""",
        ),
        (
            ["--model.overrides", "{n_layer: 2}"],
            "unrecognized arguments: --model.overrides {n_layer: 2} (the architecture is model.config now, every "
            "field spelled out: see `meloformer sizes`)",
        ),
        (["--model.n_layer", "2"], "unrecognized arguments: --model.n_layer 2 (it is model.config.n_layer now)"),
        (
            ["--model.size", "base"],
            "unrecognized arguments: --model.size base (the architecture is model.config now, every field spelled "
            "out: see `meloformer sizes`)",
        ),
    ],
    ids=["wrong-type", "not-a-choice", "old-overrides", "old-flat-field", "old-size"],
)
def test_a_bad_model_field_is_one_line(args, line, capsys):
    """jsonargparse checks every model field against its type; the CLI shows its verdict as one line."""
    assert main(["fit", "--config", DEMO, *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"meloformer: error: {line}"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--model.config.attention", "window", "--model.config.token_window", "200"],
         "token_window must be a positive multiple of 128, got 200"),
        (["--model.config.fine_bars", "[1, 70]"], "fine_bars must lie in 1..62, got (1, 70)"),
        (["--model.config.attention", "window", "--model.config.kind_sparsity", "true"],
         "kind_sparsity restricts the fine-bar rules of summary and local; window has none"),
    ],
)  # fmt: skip
def test_a_mask_setting_the_rules_cannot_take_is_one_line(args, line, capsys):
    """The configuration checks its mask settings when it is built, before any row or mask is made."""
    assert main(["fit", "--config", DEMO, *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"meloformer: error: {line}" and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("size", GPU_CONFIGS)
def test_gpu_configs_build(size, demo_shards):
    """The GPU configs parse and instantiate (on CPU here, with the demo shards standing in for data/shards)."""
    cli = build_cli(
        ["--config", str(REPO / "configs" / f"{size}.yaml"), "--data.data_dir", str(demo_shards),
         "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"],
        run=False,
    )  # fmt: skip
    rows = {"max_seq_len": 8192, "summary_slots": 1024, "vocab_size": SIZES[size].vocab_size}
    assert cli.model.config == dataclasses.replace(SIZES[size], **rows)  # the size, with rows of its own
    assert (cli.datamodule.max_seq_len, cli.datamodule.max_segments) == (8192, 1024)
    assert cli.model.hparams.compile and cli.trainer.accumulate_grad_batches == 8
    (phases,) = [c.phases for c in cli.trainer.callbacks if hasattr(c, "phases")]
    assert [(p.start_step, p.batch_size, p.num_workers) for p in phases] == [(0, 1, 0), (10, 1, 8), (100, 6, 8)]
    with open(REPO / "configs" / f"{size}.yaml") as f:
        assert yaml.safe_load(f)["trainer"]["precision"] == "bf16-mixed"


def test_sizes_command_prints_real_parameter_counts(tmp_path):
    done = meloformer("sizes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name, count in parameter_counts().items():
        assert f"{count:,}" in next(line for line in done.stdout.splitlines() if line.startswith(name))
    small = next(line for line in done.stdout.splitlines() if line.startswith("small"))
    config = yaml.safe_load((REPO / "configs" / "small.yaml").read_text())["model"]["config"]
    assert f"small.yaml {config['max_seq_len']}/{config['summary_slots']}" in small  # the rows it really trains


def test_help_lists_the_commands(tmp_path):
    done = meloformer("--help", cwd=tmp_path)
    assert done.returncode == 0
    for command in ("fit", "validate", "test", "preprocess", "sizes"):
        assert command in done.stdout
