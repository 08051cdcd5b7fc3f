"""Host inventory (Layer 0): what this node can give to tasks, after a reserve for itself.

The scheduler admits a task only when its requests fit the free capacity reported from here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from agentnode.errors import ConfigError

__all__ = ["Gpu", "Inventory", "gpus", "inventory"]

_NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class Gpu:
    """One GPU; `memory_bytes` is 0 when the driver does not say."""

    index: int
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class Inventory:
    """Total host resources and what is allocatable to tasks after the node reserve."""

    cpu_millis: int
    memory_bytes: int
    allocatable_cpu_millis: int
    allocatable_memory_bytes: int
    gpus: tuple[Gpu, ...]


def gpus(*, proc: Path = _NVIDIA_PROC) -> tuple[Gpu, ...]:
    """NVIDIA GPUs from nvidia-smi when installed, else from /proc/driver/nvidia; () when none."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            return tuple(
                Gpu(int(i), name.strip(), int(float(mib)) << 20)
                for i, name, mib in (line.split(",") for line in out.splitlines() if line.strip())
            )
        except (OSError, subprocess.SubprocessError, ValueError):
            pass  # A broken nvidia-smi is common on hosts without a loaded driver; try /proc.
    if not proc.is_dir():
        return ()
    found = []
    for i, d in enumerate(sorted(proc.iterdir())):
        name = "unknown"
        info = d / "information"
        if info.exists():
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    name = line.split(":", 1)[1].strip()
        found.append(Gpu(i, name, 0))
    return tuple(found)


def inventory(
    *, reserve_cpu_millis: int = 500, reserve_memory_bytes: int = 1 << 30, proc: Path = _NVIDIA_PROC
) -> Inventory:
    """The host's CPUs (those this process may run on), memory and GPUs, minus the reserve."""
    if reserve_cpu_millis < 0 or reserve_memory_bytes < 0:
        raise ConfigError("the node reserve cannot be negative (set reserve_* to 0 or more)")
    cpu = len(os.sched_getaffinity(0)) * 1000
    mem = psutil.virtual_memory().total
    if reserve_cpu_millis >= cpu or reserve_memory_bytes >= mem:
        raise ConfigError(
            f"the node reserve ({reserve_cpu_millis} millicores, {reserve_memory_bytes} bytes) "
            f"leaves nothing of {cpu} millicores, {mem} bytes (lower the reserve)"
        )
    return Inventory(
        cpu_millis=cpu,
        memory_bytes=mem,
        allocatable_cpu_millis=cpu - reserve_cpu_millis,
        allocatable_memory_bytes=mem - reserve_memory_bytes,
        gpus=gpus(proc=proc),
    )
