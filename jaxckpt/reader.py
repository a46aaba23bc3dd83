"""Reader: a committed checkpoint -> host arrays, on a thread pool.

``CheckpointReader`` decodes and validates the manifest once, then serves
requests for boxes (sub-arrays) of leaves: ``readplan.Plan`` decides which
bytes fill what memory (mappings of the file where the results may be,
reads straight into final buffers where a saved shard lands contiguously,
runs of small neighbours in one read); this module opens the data files
through the storage backend, runs the plan's reads in parallel, and verifies
each chunk in the thread that read it. Data files must hold at least as many
bytes as the manifest says (on POSIX checked at open, where they must be
regular files: no links, no FIFOs; in a bucket by the reads themselves).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np

from jaxckpt import gcpause
from jaxckpt import config
from jaxckpt import crypto
from jaxckpt import format as fmt
from jaxckpt import memory
from jaxckpt import readplan
from jaxckpt import storage
from jaxckpt.arrayinfo import Box
from jaxckpt.errors import CorruptCheckpointError


MAX_MAPS = 16384  # mappings one reader makes at most (vm.max_map_count is 65530 by default)
UNCACHED_BYTES = 1 << 20  # encrypted chunks this large are read past the page cache (_fill_op)
SERIAL_DECRYPT = 64 << 10  # runs of encrypted chunks smaller than this on average decrypt one at a time


class CheckpointReader:
    """A committed checkpoint opened for reading: its manifest, decoded and
    validated, and its data files, opened when first read (through the
    storage backend of its location)."""

    def __init__(self, path: str | os.PathLike | storage.Location, max_workers: int | None = None,
                 storage_options: dict | None = None, encryption_key: crypto.Key | None = None):
        self.location = storage.Location.parse(path, storage_options)
        self.path = str(self.location)
        self._source = storage.backend(self.location).open(self.location)
        data = self._source.read_manifest(fmt.MAX_MANIFEST_BYTES + crypto.MAX_SEALED)
        where = self._source.describe(fmt.MANIFEST_NAME)
        self.encrypted = crypto.is_sealed(data)
        self._opener: _Opener | None = None
        if self.encrypted:
            data, sealed = crypto.open_manifest(crypto.resolve_key(encryption_key), data, where)
        elif len(data) > fmt.MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: {len(data)} bytes, above the cap of {fmt.MAX_MANIFEST_BYTES}")
        self.manifest = fmt.decode_manifest(data, where)
        if self.encrypted:
            self._opener = _Opener(crypto.resolve_key(encryption_key), self.manifest, sealed, where)
        self.by_path = {leaf.path: i for i, leaf in enumerate(self.manifest.leaves)}
        self.max_workers = max_workers or config.read_workers()
        self._files: dict[int, storage.DataSource] = {}
        self._opening: dict[int, threading.Lock] = {}  # one lock per file being opened (``_file``)
        self._starts: dict[int, list[int]] | None = None  # shard offsets per file, built on first use
        self._maps = 0  # mappings made (MAX_MAPS)
        self._lock = threading.Lock()
        self._decrypting = threading.Lock()  # runs of small encrypted chunks, one thread at a time (_check_parts)

    # ------------------------------------------------------------ files
    def _file(self, file: int) -> storage.DataSource:
        """Data file ``file`` of the manifest, opened once (on POSIX checked at
        open to hold at least the recorded size; an object is checked by the
        reads that need its bytes, so opening one sends nothing)."""
        with self._lock:
            f = self._files.get(file)
            if f is not None:
                return f
            once = self._opening.setdefault(file, threading.Lock())
        with once:
            f = self._files.get(file)
            if f is None:
                rec = self.manifest.files[file]
                f = self._source.open_data(rec.name, rec.size)
                with self._lock:
                    self._files[file] = f
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
        (``storage.DataSource.map``), or None where mapping is unavailable here,
        the checkpoint is encrypted, or this reader has made MAX_MAPS already:
        the caller reads instead."""
        if self._maps >= MAX_MAPS or self.encrypted:
            return None
        view = self._file_for(file, leaf).map(offset, length)
        if view is not None:
            self._maps += 1
        return view

    # ------------------------------------------------------------ executing
    def _verify(self, op: readplan.Op, data) -> None:
        if self._opener is not None:
            self._opener.decrypt(op.file, op.offset, data, op.checksum, self._name, op.leaf)
        if op.checksum is not None:
            self._check(op.file, op.offset, data, op.checksum, op.leaf, op.chunk)

    def _check(self, file: int, offset: int, data, checksum: int, leaf: str, chunk: int) -> None:
        found = fmt.checksum(data)
        if found != checksum:
            raise CorruptCheckpointError(
                f"{self._name(file)}: checksum mismatch in leaf {leaf!r}, chunk {chunk} (bytes at offset {offset}): "
                f"expected xxh3 {checksum:#018x}, found {found:#018x}")

    def _fill_op(self, f: storage.DataSource, op: readplan.Op, where: str) -> None:
        """Bring one op's bytes into its destination: populate a mapping (or,
        where the kernel refuses, read into its private pages), else read into
        the fresh buffer after backing its pages in one call. Encrypted chunks
        of ``UNCACHED_BYTES`` or more bypass the page cache (read once, then
        decrypted in place: a cached copy would only cost the kernel a copy)."""
        if op.mapped:
            if not memory.populate(op.dest, where, op.offset):
                f.read_into(op.dest, op.offset, where)  # copy-on-write: private pages
            return
        memory.prefault(op.dest)
        if self.encrypted and len(op.dest) >= UNCACHED_BYTES:
            f.read_uncached_into(op.dest, op.offset, where)
        else:
            f.read_into(op.dest, op.offset, where)

    def _check_parts(self, file: int, base: int, dest, parts: list) -> None:
        """Decrypt (if encrypted) and check each part of a run of small shards read
        into ``dest``. Encrypted runs of chunks averaging under ``SERIAL_DECRYPT``
        bytes take turns (``_decrypting``): ``cryptography`` releases the GIL
        around each call, and reader threads handing it to each other at every
        small chunk cost more than the calls (a 10,000-leaf read: 0.25 s one run
        at a time vs 0.29-0.37 s all at once, 8 threads on 2 cores)."""
        checksum = fmt.checksum
        serial = self._opener is not None and len(dest) < SERIAL_DECRYPT * len(parts)
        with self._decrypting if serial else contextlib.nullcontext():
            for lo, hi, want, leaf, chunk in parts:
                if self._opener is not None:
                    self._opener.decrypt(file, base + lo, dest[lo:hi], want, self._name, leaf)
                if want is not None and checksum(dest[lo:hi]) != want:
                    self._check(file, base + lo, dest[lo:hi], want, leaf, chunk)  # raises

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
            self._check_parts(first.file, base, dest, parts)
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
        plan = readplan.Plan(self.manifest, self._starts, verify or self.encrypted, self._try_map)
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


class _Opener:
    """The decryption of an encrypted checkpoint's chunks: each data file's
    cipher, and each chunk's index in its file (chunks in offset order, as the
    writer numbered them) to find its nonce and tag."""

    def __init__(self, key: bytes, manifest: fmt.Manifest, sealed: list[tuple[bytes, bytes]], where: str):
        if len(sealed) != len(manifest.files):
            raise CorruptCheckpointError(f"{where}: {len(sealed)} sealed file records for {len(manifest.files)} files")
        chunks: list[list[int]] = [[] for _ in manifest.files]
        for leaf in manifest.leaves:
            for s in leaf.shards:
                chunks[s.file].extend(s.offset + a for a in range(0, s.length, manifest.chunk_bytes))
        self._index = [{off: i for i, off in enumerate(sorted(c))} for c in chunks]
        self._ciphers = [crypto.FileCipher(key, f.name, salt) for f, (salt, _) in zip(manifest.files, sealed)]
        self._tags = [tags for _, tags in sealed]
        for f, c, tags in zip(manifest.files, chunks, self._tags):
            if len(tags) != crypto.TAG * len(c):
                raise CorruptCheckpointError(f"{where}: {f.name}: {len(tags) // crypto.TAG} tags for {len(c)} chunks")

    def decrypt(self, file: int, offset: int, buf, checksum: int | None, name: Callable[[int], str],
                leaf: str) -> None:
        """Decrypt the whole chunk at ``offset`` of ``file`` in place (``buf``), checking
        its tag; errors name the file (``name(file)``) and ``leaf``."""
        i = self._index[file].get(offset)
        if i is None or checksum is None:  # the plan reads whole chunks of an encrypted checkpoint
            raise CorruptCheckpointError(f"{name(file)}: leaf {leaf!r}: no encrypted chunk starts at offset {offset}")
        tag = self._tags[file][i * crypto.TAG:(i + 1) * crypto.TAG]
        view = buf if isinstance(buf, memoryview) and buf.format == "B" else memoryview(buf).cast("B")
        try:
            self._ciphers[file].decrypt(i, offset, view, tag)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{name(file)}: leaf {leaf!r}: {e}") from None
