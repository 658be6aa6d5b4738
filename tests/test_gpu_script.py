"""bench/gpu.sh without a GPU stops where it needs CUDA and says so; its table reads what the steps leave."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from _music import REPO


def test_gpu_table_reads_every_step(tmp_path):
    (tmp_path / "cuda-tests.json").write_text('{"rc": 0, "seconds": 21}')
    (tmp_path / "cuda-tests.log").write_text("...\n1 passed, 230 deselected in 19.5s\n")
    row = {"workload": "packed", "tiles_128": {"computed": 3190}, "computed_vs_causal_128": 0.3,
           "full_share_128": 0.1, "fill_128": 0.25, "tiles_build_cpu_s": 0.21}  # fmt: skip
    seconds = {"flex": 0.002, "sdpa_dense_mask": 0.025, "sdpa_causal": 0.010}
    results = [row | {"tokens": n, "seconds": {k: v * n / 8192 for k, v in seconds.items()}} for n in (8192, 16384)]
    results.append(results[0] | {"attention": "window", "full_share_128": 0.62})
    (tmp_path / "attention.json").write_text(json.dumps({"results": results}))
    name = "meloformer, mask loader"
    train = {"size": "small", "seq_len": 8192, "batch_size": 4, "tokens_per_s": {name: 2e5, "plain_causal": 1e5},
             "vs_plain": {name: 2.0}, "step_split_seconds": {name: {"mask": 0.0001, "forward": 0.05,
             "backward": 0.1, "optimizer": 0.01}}}  # fmt: skip
    (tmp_path / "train-small-8192.json").write_text(json.dumps(train))
    (tmp_path / "fit.json").write_text('{"rc": 0, "peak_gib": 7.25}')
    (tmp_path / "fit.log").write_text(
        "phase 1/3 from optimizer step 0: batch_size 1, num_workers 0\n[__recompiles] Recompiling function forward\n"
        "phase 2/3 from optimizer step 10: batch_size 1, num_workers 8\n"
        "phase 3/3 from optimizer step 100: batch_size 6, num_workers 8\n[__recompiles] Recompiling function forward\n"
        "fit wall seconds: 203\n"
    )
    metrics = tmp_path / "runs" / "small" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    header = "step,phase,train/tokens_per_s,train/loss"
    metrics.write_text("\n".join([header, "9,1.0,1000,5", "19,2.0,3000,4", "29,2.0,5000,", "109,3.0,9000,3"]) + "\n")

    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_table.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    table = dict(tuple(part.strip() for part in line.split("|")) for line in done.stdout.splitlines()[2:])
    assert table["CUDA tests"] == "1 passed, 230 deselected in 19.5s (exit 0, 21 s)"
    assert table["attention summary packed 16,384 tokens, fwd+bwd bf16"] == (
        "flex 4.0 ms, causal SDPA 20.0 ms (5.00x), SDPA+mask 50.0 ms"
    )
    assert table["tiles summary packed 8,192 tokens, at 128"] == (
        "3,190 computed (0.30x causal), 10% full, 25% fill; built in 0.21 s on one CPU thread"
    )
    assert table["tiles window packed 8,192 tokens, at 128"].startswith("3,190 computed (0.30x causal), 62% full")
    assert table["train small summary 8,192 x 4: MeloFormer vs plain causal tokens/s"] == (
        "200,000 vs 100,000 (2.00x); step ms: mask 0, forward 50, backward 100, optimizer 10"
    )
    assert table["fit: exit status, wall"] == "0, 203 s"
    assert table["fit: recompiles"] == "2"
    speeds = [t for t in table if t.startswith("fit: tokens/s")]
    assert speeds == [f"fit: tokens/s in phase {p} (median)" for p in "123"]
    assert table["fit: tokens/s in phase 2 (median)"] == "4,000"
    assert table["fit: peak GPU memory"] == "7.25 GiB"
    phases = [line for line in done.stdout.splitlines() if line.startswith("fit: phase switch")]
    assert len(phases) == 3 and phases[2].endswith("phase 3/3 from optimizer step 100: batch_size 6, num_workers 8")
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"][0][0] == "CUDA tests"


@pytest.mark.slow
def test_gpu_script_on_cpu_stops_before_cuda_and_says_so(tmp_path):
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 3, done.stderr[-3000:]
    assert "bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False)" in done.stderr
    assert "the CUDA tests, the attention rows and the 150-step fit need a GPU" in done.stderr
    assert (tmp_path / "shards" / "index.json").is_file()  # the CPU steps ran
    config = yaml.safe_load((tmp_path / "resolved-config.yaml").read_text())
    assert config["model"]["config"]["n_embd"] == 512 and config["data"]["data_dir"] == str(tmp_path / "shards")
    assert not (tmp_path / "cuda-tests.log").exists() and not (tmp_path / "fit.log").exists()
