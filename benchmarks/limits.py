"""Physical limits of this machine for a given byte count.

Measured in the same run as the methods so that ratios compare like with
like on a noisy, shared machine:

* first touch: fill freshly allocated memory (page faults on new pages);
  what a restore pays for its output buffers.  Reported, not used in ratios.
* memcpy: numpy copy into a preallocated, already-touched buffer, 1 and 2
  threads (numpy releases the GIL while copying).  Best of a few repeats.
* buffered write: one file, 64 MiB os.write()s, then fsync.
* O_DIRECT write: the same through O_DIRECT from a page-aligned 64 MiB
  buffer in huge pages where the kernel gives them, then fsync; falls back to the buffered figure (and says so) where
  the file system refuses O_DIRECT.
* cold read: sync, drop the page cache (root only), read the buffered file.
* warm read: read the same file again, now from the page cache.

All bandwidths are bytes / seconds (GB/s in reports, 1 GB = 1e9 bytes).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np

from . import measure

CHUNK = 64 << 20
ALIGN = 4096
MEMCPY_MIN = 64 << 20
MEMCPY_MAX = 1 << 30
FIRST_TOUCH_MAX = 4 << 30
REPEATS = 3


def _random_chunk() -> mmap.mmap:
    """A page-aligned 64 MiB buffer of random bytes (usable with O_DIRECT).

    Private and advised to use huge pages: the disk's limit, not the memory's.
    On this project's VM O_DIRECT ran at 4.4-5.8 GB/s from huge pages and at
    1.9-2.8 GB/s from 4 KiB pages (``mmap.mmap(-1, n)``'s default is shared
    memory, which never gets huge pages): earlier runs measured the latter.
    """
    buf = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    view = np.frombuffer(buf, dtype=np.uint8)
    view[:] = np.random.default_rng(1).integers(0, 256, size=CHUNK, dtype=np.uint8)
    del view
    return buf


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _best_bandwidth(nbytes: int, fn) -> dict:
    times = [_timed(fn) for _ in range(REPEATS)]
    return {"bytes": nbytes, "seconds": times, "gbps": nbytes / min(times) / 1e9}


def memcpy(nbytes: int, threads: int) -> dict:
    size = max(MEMCPY_MIN, min(nbytes, MEMCPY_MAX))
    src = np.ones(size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)  # np.zeros is lazy: touch it
    dst.fill(1)
    bounds = np.linspace(0, size, threads + 1).astype(np.int64)

    def part(i: int) -> None:
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])

    def run() -> None:
        workers = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return {"threads": threads, **_best_bandwidth(size, run)}


def first_touch(nbytes: int) -> dict:
    """Allocate and fill fresh memory once (no reuse: every page faults in)."""
    size = max(MEMCPY_MIN, min(nbytes, FIRST_TOUCH_MAX))

    def run() -> None:
        np.empty(size, dtype=np.uint8).fill(1)

    seconds = _timed(run)
    return {"bytes": size, "seconds": seconds, "gbps": size / seconds / 1e9}


def _write_file(path: Path, nbytes: int, chunk: mmap.mmap, flags: int) -> float:
    """Write nbytes from `chunk` repeatedly, fsync; returns seconds."""
    view = memoryview(chunk)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
    try:
        left = nbytes
        while left > 0:
            n = os.write(fd, view[:min(left, CHUNK)])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def buffered_write(path: Path, nbytes: int, chunk: mmap.mmap) -> dict:
    seconds = _write_file(path, nbytes, chunk, 0)
    return {"bytes": nbytes, "seconds": seconds, "gbps": nbytes / seconds / 1e9}


def direct_write(path: Path, nbytes: int, chunk: mmap.mmap) -> dict:
    aligned = -(-nbytes // ALIGN) * ALIGN
    if not hasattr(os, "O_DIRECT"):
        return {"available": False, "note": "os.O_DIRECT missing on this platform"}
    try:
        seconds = _write_file(path, aligned, chunk, os.O_DIRECT)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return {"available": False, "note": f"O_DIRECT refused: {e.strerror}"}
    finally:
        path.unlink(missing_ok=True)
    return {"available": True, "bytes": aligned, "seconds": seconds,
            "gbps": aligned / seconds / 1e9}


def read(path: Path, nbytes: int, cold: bool) -> dict:
    buf = bytearray(CHUNK)  # allocated (and zeroed) before the clock starts
    if cold and not measure.drop_caches():
        return {"available": False, "note": "cannot drop the page cache (not root)"}
    seconds = _timed(lambda: measure.read_file(path, buf))
    return {"available": True, "bytes": nbytes, "seconds": seconds,
            "gbps": nbytes / seconds / 1e9}


def measure_all(scratch: Path, nbytes: int) -> dict:
    """Every limit for `nbytes`, using files under `scratch`."""
    scratch.mkdir(parents=True, exist_ok=True)
    result = {"first_touch": first_touch(nbytes), "memcpy_1t": memcpy(nbytes, 1),
              "memcpy_2t": memcpy(nbytes, 2)}
    chunk = _random_chunk()
    data = scratch / "limits.bin"
    try:
        result["direct_write"] = direct_write(scratch / "limits.direct", nbytes, chunk)
        result["buffered_write"] = buffered_write(data, nbytes, chunk)
        result["cold_read"] = read(data, nbytes, cold=True)
        result["warm_read"] = read(data, nbytes, cold=False)
    finally:
        data.unlink(missing_ok=True)
        chunk.close()
    result["write_limit"] = _write_limit(result)
    return result


def _write_limit(result: dict) -> dict:
    """The write bandwidth that save times are compared with."""
    direct = result["direct_write"]
    if direct.get("available"):
        return {"source": "O_DIRECT write + fsync", "gbps": direct["gbps"]}
    return {"source": f"buffered write + fsync ({direct['note']})",
            "gbps": result["buffered_write"]["gbps"]}
