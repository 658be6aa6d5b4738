"""What this machine can run: a trainer's accelerator, devices and nodes checked before Lightning starts, and
the CPU thread count of a run on CPU."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

GPU_CONFIGS = ("small.yaml", "base.yaml", "large.yaml", "xlarge.yaml")


def check_trainer(trainer: Any, configs: list[str]) -> None:
    """Raise ValueError with one line for an accelerator this machine lacks, ``devices`` 0, or several nodes
    without a multi-node launch (Lightning would wait forever for the other nodes)."""
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str) and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        gpu_config = [name for name in configs if name in GPU_CONFIGS]
        hint = (
            f"{gpu_config[0]} is a GPU config: on this machine use --config cpu.yaml (your data) or demo.yaml"
            if gpu_config
            else "use --trainer.accelerator cpu"
        )
        raise ValueError(f"trainer.accelerator {accelerator}: this machine has no CUDA GPU; {hint}")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ValueError("trainer.accelerator mps: MPS is not available on this machine; use --trainer.accelerator cpu")
    devices = trainer.get("devices")
    if isinstance(devices, int) and devices == 0 or isinstance(devices, str) and devices.strip() == "0":
        raise ValueError("trainer.devices 0: give the number of devices to train on (at least 1), or auto")
    num_nodes = trainer.get("num_nodes") or 1
    if num_nodes > 1 and not multi_node_launch():
        raise ValueError(
            f"trainer.num_nodes {num_nodes}: this process was not started as part of a multi-node launch, so it "
            "would wait forever for the other nodes; run the same command on every node with MASTER_ADDR, "
            "MASTER_PORT and NODE_RANK set (or under srun or torchrun)"
        )


def multi_node_launch() -> bool:
    """Whether a cluster launcher (SLURM, torchrun, LSF) or MASTER_ADDR + NODE_RANK tell this
    process where the other nodes are."""
    from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    if "MASTER_ADDR" in os.environ and "NODE_RANK" in os.environ:
        return True
    return any(env.detect() for env in (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment))


def cpu_threads() -> tuple[int, str]:
    """Intra-op threads for a run on CPU, and why: ``OMP_NUM_THREADS`` when it is set; else the cores this
    process may use, less the cores other processes keep busy now, at least 1.

    On a 2-core machine beside one busy process, two threads lose most of their time waiting for each other
    (about 20x slower than one thread), so busy cores are left alone."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = busy_cores()
    threads = max(1, min(cores, cores - round(busy)))
    return threads, f"{cores} cores, {busy:.1f} busy; set OMP_NUM_THREADS to choose"


def busy_cores(seconds: float = 0.3) -> float:
    """How many cores other processes keep busy: the machine's CPU time not idle over ``seconds`` (this
    process sleeps meanwhile), from ``/proc/stat``; elsewhere the 1-minute load average."""

    def idle_and_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks[:8])  # idle + iowait; user .. steal

    try:
        idle0, total0 = idle_and_total()
        time.sleep(seconds)
        idle1, total1 = idle_and_total()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(1, total1 - total0))
