"""What the integrity checks cost: shard verification when a dataset is opened, and the CRC check of a
checkpoint before it is loaded, each against a baseline in the same run.

Shards: opening the demo dataset (and a synthetic one of ``--synthetic_mb``) with sizes checked only (the
old default), with every shard hashed (the first open), and with the hashes cached in ``verified.json``
(every later open). Checkpoints: ``check_checkpoint_file`` (every zip entry against its CRC-32) against the
``torch.load`` it guards, on a checkpoint of the demo model and of ``small`` (weights and two AdamW moments).

    python bench/integrity.py [--synthetic_mb 256] [--out bench/results/integrity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from meloformer.checkpoint import check_checkpoint_file
from meloformer.datamodules.shards import VERIFIED_NAME, ShardReader, empty_index, write_index, write_shard
from meloformer.hid import HIDTokenizer
from meloformer.model import MeloFormer, MeloFormerConfig
from meloformer.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_open(root: Path) -> dict:
    size = sum(p.stat().st_size for p in root.glob("*.u16"))

    def cold() -> None:
        (root / VERIFIED_NAME).unlink(missing_ok=True)
        ShardReader(root)

    sizes_s = best_of(lambda: ShardReader(root, verify_checksums=False))
    cold_s = best_of(cold)
    cached_s = best_of(lambda: ShardReader(root))
    return {
        "dataset": str(root.name),
        "mb": size / 2**20,
        "sizes_only_s": sizes_s,
        "first_s": cold_s,
        "cached_s": cached_s,
    }


def synthetic_dataset(root: Path, megabytes: int, shard_mb: int = 16) -> Path:
    """Shards of random tokens with a consistent index (opening reads only the index and the shards)."""
    root.mkdir(parents=True)
    index = empty_index(HIDTokenizer().settings, 0.0, 0.0)
    rng = np.random.default_rng(0)
    for number in range(max(1, megabytes // shard_mb)):
        tokens = rng.integers(0, 700, shard_mb * 2**19, dtype=np.uint16)
        index["shards"].append(write_shard(root, number, [tokens]))
        index["pieces"].append(
            {"shard": number, "offset": 0, "length": len(tokens), "bars": 1, "tracks": 1, "source": f"{number}",
             "split": "train"}
        )  # fmt: skip
    write_index(root, index)
    return root


def bench_checkpoint(path: Path, config: MeloFormerConfig) -> dict:
    weights = MeloFormer(config, HIDTokenizer().kinds).state_dict()
    moments = [{k: torch.zeros_like(v) for k, v in weights.items()} for _ in range(2)]
    torch.save({"state_dict": weights, "optimizer_states": moments, "meloformer": {}}, path)
    check_s = best_of(lambda: check_checkpoint_file(path))
    load_s = best_of(lambda: torch.load(path, map_location="cpu", weights_only=True))
    return {"mb": path.stat().st_size / 2**20, "crc_check_s": check_s, "torch_load_s": load_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic_mb", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "integrity.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="meloformer-integrity-"))
    try:
        demo = work / "demo-shards"
        preprocess(REPO / "demo" / "midi", demo, HIDTokenizer(), workers=1, progress=False)
        opens = [bench_open(demo), bench_open(synthetic_dataset(work / "synthetic", args.synthetic_mb))]
        vocab = HIDTokenizer().vocab_size
        demo_config = MeloFormerConfig.from_size(
            "small", vocab_size=vocab, max_seq_len=512, summary_slots=128,
            n_layer=4, n_embd=128, n_head=4, n_kv_head=2,
        )  # fmt: skip
        checkpoints = {
            "demo": bench_checkpoint(work / "demo.ckpt", demo_config),
            "small": bench_checkpoint(work / "small.ckpt", MeloFormerConfig.from_size("small", vocab_size=vocab)),
        }
    finally:
        shutil.rmtree(work)

    header = ("dataset", "MB", "sizes only (s)", "first open (s)", "cached (s)", "cached/sizes")
    print("{:<14} {:>7} {:>15} {:>15} {:>11} {:>13}".format(*header))
    for r in opens:
        print(
            f"{r['dataset']:<14} {r['mb']:7.1f} {r['sizes_only_s']:15.4f} {r['first_s']:15.4f} {r['cached_s']:11.4f} "
            f"{r['cached_s'] / r['sizes_only_s']:12.2f}x"
        )
    header = ("checkpoint", "MB", "CRC check (s)", "torch.load (s)", "check/load")
    print("\n{:<14} {:>7} {:>14} {:>15} {:>11}".format(*header))
    for name, r in checkpoints.items():
        ratio = r["crc_check_s"] / r["torch_load_s"]
        print(f"{name:<14} {r['mb']:7.1f} {r['crc_check_s']:14.4f} {r['torch_load_s']:15.4f} {ratio:10.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"shards": opens, "checkpoints": checkpoints, "platform": platform.platform(), "load": os.getloadavg()},
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
