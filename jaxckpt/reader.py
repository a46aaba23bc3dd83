"""Reader: a committed checkpoint -> host arrays, on a thread pool.

``CheckpointReader`` decodes and validates the manifest once, then serves
requests for boxes (sub-arrays) of leaves: ``readplan.Plan`` decides which
bytes fill what memory (mappings of the file where the results may be,
reads straight into final buffers where a saved shard lands contiguously,
runs of small neighbours in one read); this module opens the data files
through the storage backend, runs the plan's reads in parallel, and verifies
each chunk in the thread that read it. Data files are checked at open to hold
at least as many bytes as the manifest says; on POSIX they must be regular
files (no links, no FIFOs).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np

from jaxckpt import gcpause
from jaxckpt import config
from jaxckpt import format as fmt
from jaxckpt import memory
from jaxckpt import readplan
from jaxckpt import storage
from jaxckpt.arrayinfo import Box
from jaxckpt.errors import CorruptCheckpointError


MAX_MAPS = 16384  # mappings one reader makes at most (vm.max_map_count is 65530 by default)


class CheckpointReader:
    """A committed checkpoint opened for reading: its manifest, decoded and
    validated, and its data files, opened when first read (through the
    storage backend of its location)."""

    def __init__(self, path: str | os.PathLike | storage.Location, max_workers: int | None = None,
                 storage_options: dict | None = None):
        self.location = storage.Location.parse(path, storage_options)
        self.path = str(self.location)
        self._source = storage.backend(self.location).open(self.location)
        data = self._source.read_manifest(fmt.MAX_MANIFEST_BYTES)
        self.manifest = fmt.decode_manifest(data, self._source.describe(fmt.MANIFEST_NAME))
        self.by_path = {leaf.path: i for i, leaf in enumerate(self.manifest.leaves)}
        self.max_workers = max_workers or config.read_workers()
        self._files: dict[int, storage.DataSource] = {}
        self._starts: dict[int, list[int]] | None = None  # shard offsets per file, built on first use
        self._maps = 0  # mappings made (MAX_MAPS)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ files
    def _file(self, file: int) -> storage.DataSource:
        """Data file ``file`` of the manifest, opened once (checked to hold at least the recorded size)."""
        with self._lock:
            f = self._files.get(file)
            if f is None:
                rec = self.manifest.files[file]
                f = self._files[file] = self._source.open_data(rec.name, rec.size)
            return f

    def _file_for(self, file: int, leaf: str) -> storage.DataSource:
        """``_file`` for reading ``leaf``: a missing or short file error names the leaf too."""
        try:
            return self._file(file)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{e} (while reading leaf {leaf!r})") from None

    def _name(self, file: int) -> str:
        return self._source.describe(self.manifest.files[file].name)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
            self._source.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ planning
    def _try_map(self, file: int, leaf: str, offset: int, length: int) -> memoryview | None:
        """A copy-on-write mapping of file bytes [offset, offset + length)
        (``storage.DataSource.map``), or None where mapping is unavailable here or
        this reader has made MAX_MAPS already: the caller reads instead."""
        if self._maps >= MAX_MAPS:
            return None
        view = self._file_for(file, leaf).map(offset, length)
        if view is not None:
            self._maps += 1
        return view

    # ------------------------------------------------------------ executing
    def _verify(self, op: readplan.Op, data) -> None:
        if op.checksum is not None:
            self._check(op.file, op.offset, data, op.checksum, op.leaf, op.chunk)

    def _check(self, file: int, offset: int, data, checksum: int, leaf: str, chunk: int) -> None:
        found = fmt.checksum(data)
        if found != checksum:
            raise CorruptCheckpointError(
                f"{self._name(file)}: checksum mismatch in leaf {leaf!r}, chunk {chunk} (bytes at offset {offset}): "
                f"expected xxh3 {checksum:#018x}, found {found:#018x}")

    @staticmethod
    def _fill_op(f: storage.DataSource, op: readplan.Op, where: str) -> None:
        """Bring one op's bytes into its destination: populate a mapping (or,
        where the kernel refuses, read into its private pages), else read into
        the fresh buffer after backing its pages in one call."""
        if op.mapped:
            if not memory.populate(op.dest, where, op.offset):
                f.read_into(op.dest, op.offset, where)  # copy-on-write: private pages
        else:
            memory.prefault(op.dest)
            f.read_into(op.dest, op.offset, where)

    def _run(self, group: list[readplan.Op]) -> int:
        """Read one group of ops; returns the bytes read. A group of several
        ops (small neighbours in one file) is read with one scatter read
        straight into the destinations; padding between them goes to scratch."""
        first, last = group[0], group[-1]
        f = self._file_for(first.file, first.leaf)
        name = self._name(first.file)
        if first.parts is not None:  # a run of small shards, read (or populated) at once, checked part by part
            parts, dest, base = first.parts, first.dest, first.offset
            which = (f"leaf {parts[0][3]!r}" if parts[0][3] == parts[-1][3]
                     else f"leaves {parts[0][3]!r} .. {parts[-1][3]!r}")
            self._fill_op(f, first, f"{name} ({which})")
            checksum = fmt.checksum
            for lo, hi, want, leaf, chunk in parts:
                if want is not None and checksum(dest[lo:hi]) != want:
                    self._check(first.file, base + lo, dest[lo:hi], want, leaf, chunk)  # raises
            return sum(hi - lo for lo, hi, *_ in parts)
        if len(group) == 1:
            self._fill_op(f, first, f"{name} (leaf {first.leaf!r})")
            self._verify(first, first.dest)
            return len(first.dest)
        scratch = memoryview(bytearray(readplan.GAP))
        bufs: list[memoryview] = []
        pos = first.offset
        for op in group:
            if op.offset > pos:
                bufs.append(scratch[:op.offset - pos])
            bufs.append(op.dest)
            pos = op.offset + len(op.dest)
        f.readv_into(bufs, first.offset, f"{name} (leaves {first.leaf!r} .. {last.leaf!r})")
        for op in group:
            self._verify(op, op.dest)
        return sum(len(op.dest) for op in group)

    def read(self, requests: Iterable[tuple[int, Box | None]], verify: bool = True,
             progress: Callable[[int], None] | None = None,
             mappable: Iterable[bool] | None = None) -> list[np.ndarray]:
        """Read boxes of leaves (``None`` = the whole leaf) in parallel; returns
        host arrays in the saved dtype, in request order.

        ``mappable`` (one flag per request; default none): the result of that
        request may be a copy-on-write view of the file's pages (see the module
        docstring), which suits results kept in host memory or on a CPU device;
        leave it False where the host copy is only staged for an accelerator."""
        with gcpause.paused():  # one array and a few records per leaf, no cycles: see jaxckpt/gcpause.py
            return self._read(requests, verify, progress, mappable)

    def _read(self, requests: Iterable[tuple[int, Box | None]], verify: bool,
              progress: Callable[[int], None] | None, mappable: Iterable[bool] | None) -> list[np.ndarray]:
        requests = list(requests)
        flags = [False] * len(requests) if mappable is None else list(mappable)
        if len(flags) != len(requests):
            raise ValueError(f"read: {len(requests)} requests but {len(flags)} mappable flags")
        if self._starts is None:
            self._starts = readplan.shard_starts(self.manifest)
        plan = readplan.Plan(self.manifest, self._starts, verify, self._try_map)
        plan.add(requests, flags, self._files, self._file_for)
        groups = plan.groups()
        if len(groups) <= 2 or self.max_workers <= 1:
            for g in groups:
                n = self._run(g)
                if progress:
                    progress(n)
        else:
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="jaxckpt-read") as pool:
                futures = [pool.submit(self._run, g) for g in groups]
                try:
                    for fut in futures:
                        n = fut.result()
                        if progress:
                            progress(n)
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
        for post in plan.posts:
            post()
        return plan.outs
