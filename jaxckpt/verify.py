"""Verifying a checkpoint: every chunk of every shard re-read and re-hashed
through ``CheckpointReader.read(verify=True)``, in bounded batches, so that
verifying a 500 GiB checkpoint needs a few hundred MiB of memory, not
500 GiB. Used by ``jaxckpt verify``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from jaxckpt import format as fmt
from jaxckpt import progress as progress_mod
from jaxckpt import storage
from jaxckpt.errors import CheckpointError
from jaxckpt.reader import CheckpointReader

# Bytes of leaf data asked of the reader at once. A slab of a shard larger than
# this goes through a temporary buffer rounded out to whole checksum chunks, so
# at most 2 x 112 MiB + 2 chunks of 16 MiB = 256 MiB are in flight.
VERIFY_BATCH_BYTES = 112 << 20


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    path: str
    ok: bool
    leaves: int = 0
    nbytes: int = 0
    error: str | None = None
    gone: bool = False  # deleted while being verified (a running manager rotated it away)


def _pieces(leaf: fmt.LeafRecord, batch_bytes: int) -> list[tuple[Any, int]]:
    """``(box, nbytes)`` requests that read every byte of ``leaf`` once, each of at
    most ``batch_bytes`` where possible. A leaf larger than that is read shard by
    shard (a box equal to a shard is read straight into place, nothing rounded
    out), and a shard larger than that in slabs of rows (one row at least)."""
    if leaf.kind == "value" or leaf.nbytes == 0:
        return []
    if leaf.nbytes <= batch_bytes:
        return [(None, leaf.nbytes)]
    out = []
    for s in leaf.shards:
        if s.length == 0:
            continue
        if s.length <= batch_bytes or not s.box:
            out.append((s.box, s.length))
            continue
        (lo, hi), rest = s.box[0], s.box[1:]
        row_bytes = s.length // (hi - lo)
        rows = max(1, batch_bytes // row_bytes)
        out.extend((((r, min(r + rows, hi)),) + rest, (min(r + rows, hi) - r) * row_bytes) for r in range(lo, hi, rows))
    return out


def _batches(manifest: fmt.Manifest, batch_bytes: int) -> Iterator[tuple[list[tuple[int, Any]], int, int]]:
    """``(requests, nbytes, leaves finished)``: every array byte once, in batches
    of at most ``batch_bytes`` (but one piece per batch at least)."""
    batch: list[tuple[int, Any]] = []
    size = finished = 0
    for i, leaf in enumerate(manifest.leaves):
        for box, n in _pieces(leaf, batch_bytes):
            if batch and size + n > batch_bytes:
                yield batch, size, finished
                batch, size, finished = [], 0, 0
            batch.append((i, box))
            size += n
        finished += 1
    if batch or finished:
        yield batch, size, finished


def verify_checkpoint(path: str, *, progress: bool | None = None, batch_bytes: int = VERIFY_BATCH_BYTES,
                      stream: Any = None, encryption_key: bytes | None = None) -> VerifyResult:
    """Re-read and re-hash every chunk of every shard of the checkpoint at ``path``."""
    try:
        with CheckpointReader(path, encryption_key=encryption_key) as r:
            m = r.manifest
            bar = progress_mod.progress_bar(f"verify {path}", m.total_bytes, len(m.leaves), enabled=progress,
                                            stream=stream, leave=False)
            with bar:
                for requests, nbytes, finished in _batches(m, batch_bytes):
                    counted = 0

                    def step(n: int) -> None:
                        # reads rounded out to whole chunks may exceed the batch: count each byte once
                        nonlocal counted
                        n = min(n, nbytes - counted)
                        counted += n
                        bar.update(n)

                    if requests:  # mapped where possible: the page cache's pages are hashed, not copies of them
                        r.read(requests, verify=True, progress=step, mappable=[True] * len(requests))
                    bar.update(nbytes - counted, leaves=finished)
            return VerifyResult(path, True, len(m.leaves), m.total_bytes)
    except (CheckpointError, OSError) as e:
        return VerifyResult(path, False, error=error_message(e), gone=not _exists(path))


def error_message(e: BaseException) -> str:
    """What to print for an error: a CheckpointError's own words; other errors' type too."""
    if isinstance(e, CheckpointError):
        return str(e)
    return f"{type(e).__name__}: {e}"  # an OSError's text alone ("[Errno 5] ...") hides what it is


def _exists(path: str) -> bool:
    loc = storage.Location.parse(path)
    return storage.backend(loc).exists(loc)
