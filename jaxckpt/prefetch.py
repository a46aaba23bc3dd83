"""Reads run ahead of their consumer, in order, within a byte budget.

A foreign file's tensors are yielded one at a time (``fmt_safetensors``,
``fmt_flax``: ``iter_tensors``); read one after the other from a bucket, each
small tensor would wait a whole request's latency. ``ordered`` runs the reads
of the next tensors on a small pool while the consumer holds the current one,
at most ``window`` bytes of them at once (one read, however large, always
runs), so memory stays bounded and results come back in file order. The
window is the file's (``storage.FileSource.prefetch_bytes``): 64 MiB in a
bucket, 0 on a disk, which answers in microseconds (memory: one tensor).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_THREADS = 16
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _get_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="jaxckpt-prefetch")
        return _pool


def ordered(jobs: Iterable[tuple[int, Callable[[], T]]], window: int) -> Iterator[T]:
    """The result of each ``(nbytes, read)`` job, in order; reads run ahead on
    a pool while their bytes in flight stay within ``window`` (0: each read
    in turn, on the caller's thread). An error is
    raised where its job's result would have been; closing the iterator early
    cancels the reads not started and waits for those running."""
    if window <= 0:
        yield from (read() for _, read in jobs)
        return
    pool, pending = _get_pool(), collections.deque()
    jobs, ahead = iter(jobs), 0
    try:
        while True:
            for nbytes, read in jobs:
                pending.append((nbytes, pool.submit(read)))
                ahead += nbytes
                if ahead >= window:
                    break
            if not pending:
                return
            nbytes, future = pending.popleft()
            ahead -= nbytes
            yield future.result()
    finally:  # the caller closes the file next: no read may still be running then
        for _, future in pending:
            future.cancel()
        concurrent.futures.wait([future for _, future in pending])
