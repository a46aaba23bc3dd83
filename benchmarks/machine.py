"""A description of the machine a run happened on (read from /proc and /sys)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "orbax-checkpoint", "flax", "msgpack", "numpy", "tensorstore",
            "jaxckpt")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def mount_of(path: Path) -> dict:
    """The /proc/mounts entry holding `path` (the longest mount point prefix)."""
    path = path.resolve()
    best = {"device": "?", "mount_point": "/", "fs_type": "?", "options": ""}
    best_len = -1
    for line in Path("/proc/mounts").read_text().splitlines():
        device, point, fs_type, options = line.split()[:4]
        point = point.replace("\\040", " ")
        inside = path == Path(point) or Path(point) in path.parents
        if inside and len(point) > best_len:
            best = {"device": device, "mount_point": point, "fs_type": fs_type,
                    "options": options}
            best_len = len(point)
    return best | _block_device(best["device"])


def _block_device(device: str) -> dict:
    """Rotational flag and model of the disk behind /dev/NAME, if visible."""
    name = Path(device).name
    sys_block = Path("/sys/class/block") / name
    if not sys_block.exists():
        return {}
    info = {}
    disk = sys_block.resolve()
    if (disk / "partition").exists():
        disk = disk.parent
    for key, rel in (("rotational", "queue/rotational"), ("model", "device/model"),
                     ("scheduler", "queue/scheduler")):
        try:
            info[key] = (disk / rel).read_text().strip()
        except OSError:
            pass
    return info


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(scratch: Path) -> dict:
    """Cores, memory, file system, kernel and library versions."""
    return {
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": _mem_total_bytes(),
        "filesystem": mount_of(scratch),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "root": os.geteuid() == 0,
        "versions": {p: _version(p) for p in PACKAGES},
    }
