"""Measuring instruments: peak RSS, the page cache, on-disk footprint, checks.

Everything here reads /proc or the file system directly (no psutil).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

try:  # a dependency of jaxckpt; only used to fingerprint restored leaves
    import xxhash

    def _digest(buf) -> str:
        return xxhash.xxh3_64_hexdigest(buf)
except ImportError:  # pragma: no cover
    import zlib

    def _digest(buf) -> str:
        return f"{zlib.crc32(buf):08x}"

READ_CHUNK = 64 << 20
EXIT_MISMATCH = 3  # exit status of a measurement process whose restore was not bit-exact


# --------------------------------------------------------------------------
# Memory


def proc_status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, ...), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak RSS above the RSS at entry, in bytes (`extra` after exit).

    Uses the kernel's high-water mark after resetting it through
    /proc/self/clear_refs, which costs nothing while the measured code runs.
    Where the reset is refused it falls back to a thread sampling VmRSS every
    `interval` seconds (which can miss short spikes).
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self.baseline = proc_status_kib("VmRSS")
        self.peak = self.baseline
        if _reset_peak_rss():
            self.method = "VmHWM after clear_refs"
        else:
            self.method = f"VmRSS sampled every {self.interval * 1e3:g} ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, proc_status_kib("VmRSS"))

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.peak = max(self.peak, proc_status_kib("VmHWM"))
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, proc_status_kib("VmRSS"))

    @property
    def extra(self) -> int:
        return (self.peak - self.baseline) * 1024


# --------------------------------------------------------------------------
# Page cache


def drop_caches() -> bool:
    """sync + drop the page cache (needs root); False where refused."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def read_file(path: Path, buf: bytearray | None = None) -> int:
    """Read a file once in 64 MiB chunks (into the page cache, if cached)."""
    buf = buf if buf is not None else bytearray(READ_CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def read_tree(root: Path) -> int:
    """Read every file under root once (pulls it into the page cache)."""
    buf = bytearray(READ_CHUNK)
    return sum(read_file(p, buf) for p in sorted(root.rglob("*")) if p.is_file())


# --------------------------------------------------------------------------
# Footprint on disk


def footprint(root: Path) -> dict:
    """Files, directories and bytes under root (root itself not counted)."""
    files = dirs = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirs += len(dirnames)
        files += len(filenames)
        size += sum(os.lstat(os.path.join(dirpath, n)).st_size for n in filenames)
    return {"files": files, "dirs": dirs, "disk_bytes": size}


def thread_count() -> int:
    return proc_status_kib("Threads")


# --------------------------------------------------------------------------
# Restore checks


class RestoreMismatch(AssertionError):
    """A restored value differs from what was saved."""


def _host(value) -> np.ndarray:
    return np.asarray(value)


def as_bytes(array) -> np.ndarray:
    """The raw bytes of an array (any rank, 0-d included) as a uint8 vector."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def leaf_digest(array: np.ndarray) -> str:
    return _digest(as_bytes(array))


def reference_digests(workload) -> dict[str, str]:
    """xxh3-64 of every leaf's bytes, from regenerated contents."""
    from . import workloads

    return {spec.key: leaf_digest(workloads.make_leaf(workload, i))
            for i, spec in enumerate(workload.leaves)}


def verify_restore(workload, restored: dict, digests: dict[str, str]) -> dict:
    """Check a restored tree bit for bit against what the workload holds.

    Every leaf: same path, shape and dtype, and the same xxh3-64 digest of
    its bytes as `digests` (from `reference_digests`, computed once per run
    in another process).  The first, the largest and the last leaf are also
    regenerated and compared element by element.  Raises RestoreMismatch
    naming the leaf path on any difference.
    """
    from . import workloads

    flat = workloads.flatten(restored)
    expected_keys = [spec.key for spec in workload.leaves]
    if sorted(flat) != sorted(expected_keys):
        missing = sorted(set(expected_keys) - set(flat))[:5]
        extra = sorted(set(flat) - set(expected_keys))[:5]
        raise RestoreMismatch(f"tree structure differs: missing {missing}, unexpected {extra}")
    largest = max(range(len(workload.leaves)), key=lambda i: workload.leaves[i].nbytes)
    compare_fully = {0, largest, len(workload.leaves) - 1}
    for i, spec in enumerate(workload.leaves):
        got = _host(flat[spec.key])
        if got.shape != spec.shape or got.dtype != np.dtype(spec.dtype):
            raise RestoreMismatch(f"at {spec.key}: expected {spec.dtype}{list(spec.shape)}, "
                                  f"found {got.dtype}{list(got.shape)}")
        if i in compare_fully:
            want = workloads.make_leaf(workload, i)
            if not np.array_equal(as_bytes(got), as_bytes(want)):
                bad = int(np.count_nonzero(as_bytes(got) != as_bytes(want)))
                raise RestoreMismatch(f"at {spec.key}: {bad} of {want.nbytes} bytes differ")
        if leaf_digest(got) != digests[spec.key]:
            raise RestoreMismatch(f"at {spec.key}: content digest differs "
                                  f"(found {leaf_digest(got)}, expected {digests[spec.key]})")
    return {"leaves_checked": len(expected_keys), "fully_compared": len(compare_fully)}
