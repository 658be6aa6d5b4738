"""The one table of ``bench/gpu.sh``, from the logs and JSON its steps left in WORK_DIR (also written to
WORK_DIR/gpu.json).

    python bench/gpu_table.py WORK_DIR
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def rows(work: Path) -> list[tuple[str, str]]:
    """(check, result) for the CUDA tests, each attention and training row, and the fit."""
    out = []
    tests = _json(work / "cuda-tests.json")
    last = (_text(work / "cuda-tests.log").strip().splitlines() or ["no output"])[-1]
    out.append(("CUDA tests", f"{last} (exit {tests.get('rc', '?')}, {tests.get('seconds', '?')} s)"))
    for r in _json(work / "attention.json").get("results", []):
        s, mask = r["seconds"], r.get("attention", "summary")
        out.append(
            (
                f"attention {mask} {r['workload']} {r['tokens']:,} tokens, fwd+bwd bf16",
                f"flex {s['flex'] * 1e3:.1f} ms, causal SDPA {s['sdpa_causal'] * 1e3:.1f} ms "
                f"({s['sdpa_causal'] / s['flex']:.2f}x), SDPA+mask {s['sdpa_dense_mask'] * 1e3:.1f} ms",
            )
        )
        out.append(
            (
                f"tiles {mask} {r['workload']} {r['tokens']:,} tokens, at 128",
                f"{r['tiles_128']['computed']:,} computed ({r['computed_vs_causal_128']:.2f}x causal), "
                f"{r['full_share_128']:.0%} full, {r['fill_128']:.0%} fill; built in {r['tiles_build_cpu_s']:.2f} s "
                "on one CPU thread",
            )
        )
    for path in sorted(work.glob("train-*.json")):
        r = _json(path)
        name = next(n for n in r["tokens_per_s"] if n != "plain_causal")
        split = r["step_split_seconds"][name]
        parts = ", ".join(f"{k} {split[k] * 1e3:.0f}" for k in ("mask", "forward", "backward", "optimizer"))
        out.append(
            (
                f"train {r['size']} {r.get('attention', 'summary')} {r['seq_len']:,} x {r['batch_size']}: "
                "MeloFormer vs plain causal tokens/s",
                f"{r['tokens_per_s'][name]:,.0f} vs {r['tokens_per_s']['plain_causal']:,.0f} "
                f"({r['vs_plain'][name]:.2f}x); step ms: {parts}",
            )
        )
    fit, log = _json(work / "fit.json"), _text(work / "fit.log")
    wall = (re.findall(r"fit wall seconds: (\d+)", log) or ["?"])[-1]
    out.append(("fit: exit status, wall", f"{fit.get('rc', 'none (timed out or crashed)')}, {wall} s"))
    out += [("fit: phase switch", line) for line in re.findall(r"phase \d+/\d+ from optimizer step \d+: .*", log)]
    out.append(("fit: recompiles", str(log.count("Recompiling function"))))
    metrics = sorted(work.glob("runs/small/version_*/metrics.csv"))  # the run folder of meloformer fit
    if metrics:
        with open(metrics[-1]) as f:
            logged = [r for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
        for phase in sorted({float(r["phase"]) for r in logged}):
            speeds = [float(r["train/tokens_per_s"]) for r in logged if float(r["phase"]) == phase]
            out.append((f"fit: tokens/s in phase {phase:.0f} (median)", f"{statistics.median(speeds):,.0f}"))
    if "peak_gib" in fit:
        out.append(("fit: peak GPU memory", f"{fit['peak_gib']:.2f} GiB"))
    return out


def main() -> None:
    work = Path(sys.argv[1])
    table = rows(work)
    width = max(len(name) for name, _ in table)
    print(f"{'check':<{width}} | result")
    print(f"{'-' * width}-|-{'-' * 60}")
    for name, value in table:
        print(f"{name:<{width}} | {value}")
    (work / "gpu.json").write_text(json.dumps({"rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
