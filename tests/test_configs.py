"""Configs by bare name: `meloformer fit --config small.yaml` from any folder, and from an installed wheel."""

from __future__ import annotations

import dataclasses
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

from _music import REPO
from meloformer.cli import ConfigError, resolve_config, resolve_config_arguments, shipped_configs, size_of
from meloformer.model import SIZES, MeloFormerConfig

SHIPPED = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def meloformer(*args: str, cwd) -> subprocess.CompletedProcess:
    script = shutil.which("meloformer")
    assert script, "the meloformer console script is not installed (pip install -e .)"
    return subprocess.run([script, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_every_repository_config_is_shipped():
    shipped = shipped_configs()
    assert sorted(shipped) == SHIPPED and "small.yaml" in shipped and "demo.yaml" in shipped
    for name, path in shipped.items():
        assert path.read_bytes() == (REPO / "configs" / name).read_bytes()


@pytest.mark.parametrize("name", SHIPPED)
def test_each_config_spells_out_its_architecture(name):
    """small, base, large and xlarge train their size (rows of their own aside); demo, cpu and ablation a compact
    model of no size. Every one gives ffn_hidden with its n_embd (a field left out keeps small's)."""
    model = yaml.safe_load((REPO / "configs" / name).read_text())["model"]
    assert "size" not in model and {"n_layer", "n_embd", "ffn_hidden", "max_seq_len"} <= set(model["config"])
    config = MeloFormerConfig(**model["config"])
    size = name.removesuffix(".yaml")
    if size in SIZES:
        assert size_of(model["config"]) == size
        assert config == dataclasses.replace(SIZES[size], max_seq_len=8192, summary_slots=1024)
    else:
        assert size_of(model["config"]) is None and config.n_embd == 128


def test_bare_names_resolve_and_paths_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("small.yaml") == str(shipped_configs()["small.yaml"])
    assert resolve_config("base") == str(shipped_configs()["base.yaml"])
    (tmp_path / "small.yaml").write_text("seed_everything: 1\n")
    assert resolve_config("small.yaml") == "small.yaml"  # a file in the working folder wins
    assert resolve_config("elsewhere/demo.yaml") == "elsewhere/demo.yaml"  # paths are left to jsonargparse
    argv = ["fit", "-c", "demo", "--config=large.yaml", "--model.config.n_layer", "2"]
    resolved = resolve_config_arguments(argv)
    assert resolved[2] == str(shipped_configs()["demo.yaml"])
    assert resolved[3] == "--config=" + str(shipped_configs()["large.yaml"])
    assert resolved[4:] == argv[4:]
    with pytest.raises(ConfigError, match="shipped: " + ", ".join(SHIPPED)):
        resolve_config("smal.yaml")


def test_console_script_finds_a_shipped_config_from_any_folder(tmp_path):
    done = meloformer("fit", "--config", "small.yaml", "--print_config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    config = yaml.safe_load(done.stdout)
    assert config["model"]["config"]["n_embd"] == 512 and config["trainer"]["precision"] == "bf16-mixed"


def test_unknown_config_name_lists_the_shipped_ones(tmp_path):
    done = meloformer("fit", "--config", "smal.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"meloformer: error: --config smal.yaml: no such file and no shipped config of that name; "
        f"shipped: {', '.join(SHIPPED)}"
    ]


@pytest.mark.slow
def test_demo_config_trains_from_an_installed_wheel(tmp_path):
    """A wheel built from the repository, installed into a fresh environment, trains with `--config demo.yaml`
    from an empty folder and generates with no checkpoint: configs, the demo corpus and the shipped model
    travel as package data."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns(".*", "build", "dist", "data", "runs", "*.egg-info", "__pycache__", "results")
    shutil.copytree(REPO, source, ignore=ignore)
    wheels = tmp_path / "wheels"
    built = subprocess.run(  # as `pip install -e .` builds: in an isolated build environment
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel", "--no-deps", "-w", str(wheels),
         str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("meloformer-*.whl")
    # A fresh environment that sees this one's packages (torch & co., pip) through a .pth file: from inside a
    # virtual environment, system_site_packages=True would mean the base interpreter's, which lack them.
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "host-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps", "--force-reinstall",
         str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]

    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import meloformer; print(meloformer.__file__)"], cwd=work, capture_output=True, text=True
    )
    assert where.stdout.startswith(str(env_dir)), where.stdout + where.stderr  # the wheel, not the checkout
    done = subprocess.run(
        [str(env_dir / "bin" / "meloformer"), "fit", "--config", "demo.yaml", "--trainer.max_steps", "2",
         "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"],
        cwd=work, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "data" / "demo-shards" / "index.json").is_file()  # the shipped corpus, preprocessed here
    assert list((work / "runs" / "demo").rglob("last.ckpt"))
    sampled = subprocess.run(
        [str(env_dir / "bin" / "meloformer"), "generate", "--out", "samples", "--bars", "2", "--num_samples", "1",
         "--no_progress"],
        cwd=work, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]  # the shipped model travels as package data too
    assert (work / "samples" / "sample_0.mid").is_file()
