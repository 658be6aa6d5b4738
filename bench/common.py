"""What every script under ``bench/`` shares: its command-line basics, the host line that heads its table,
best-of-n timing, and the JSON report (with the host it ran on) under ``bench/results/``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meloformer.hid import HIDError, HIDTokenizer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--threads`` and ``--out`` (default ``bench/results/NAME.json``)."""
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def host(device: str = "cpu") -> dict[str, Any]:
    """The machine a result was measured on; the load average tells whether others were busy."""
    cuda = device.startswith("cuda")
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
    }


def print_header(title: str, device: str = "cpu") -> None:
    """The first line of every table: what is measured, and where."""
    h = host(device)
    print(f"{title} | {h['device_name']} ({h['device']}), {h['threads']} threads, torch {h['torch']}", flush=True)


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call: a busy machine disturbs the minimum least."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def demo_pieces(tok: HIDTokenizer) -> list[np.ndarray]:
    """The demo corpus's MIDI files as HID tokens (int64), those that encode."""
    pieces = []
    for path in sorted((REPO / "demo" / "midi").rglob("*.mid")):
        try:
            pieces.append(tok.encode(path).astype(np.int64))
        except HIDError:
            continue
    return pieces


def write_report(out: Path, report: dict[str, Any], device: str = "cpu") -> None:
    """Write ``report`` plus the host (load average taken now, at the end) as JSON to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report | {"host": host(device)}, indent=2) + "\n")
    print(f"wrote {out}")
