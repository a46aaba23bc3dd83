"""A bucket prefix copied into a temporary local directory, for a reader that
can only read local directories: orbax's layout code and orbax itself (whose
own ``gs://`` support needs TensorFlow or gcsfs and its own credentials, and
which has no ``s3://`` or ``az://`` at all).

``copied(location)`` lists the files under the prefix, checks every name (no
empty, ``.`` or ``..`` component: nothing may land outside the copy), checks
that the temporary directory's disk has room for them, downloads them in
parallel with the same ranged GETs as every read, and removes the copy when
the ``with`` block ends. A reader's error inside the block names the bucket
location, not the temporary directory. The bytes are not verified here: the reader checks
what it reads (orbax: its own checksums where it keeps them).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from jaxckpt import storage
from jaxckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

MAX_FILES = 1_000_000  # files under one prefix at most (zarr stores one per chunk)
CHUNK_BYTES = 64 << 20  # one read (ranged GETs of 16 MiB in parallel), one write
THREADS = 4  # objects at once: memory holds THREADS x CHUNK_BYTES


def check_name(loc: storage.Location, name: str) -> list[str]:
    """The components of an object's name relative to ``loc``; ``CorruptCheckpointError``
    for one that would not stay inside the copy."""
    parts = name.split("/")
    if any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise CorruptCheckpointError(f"{loc.join(name)}: an object name that cannot be a local path "
                                     f"(components {parts!r})")
    return parts


def _download(src: storage.FileSource, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        buf = memoryview(bytearray(min(CHUNK_BYTES, src.size)))
        for offset in range(0, src.size, CHUNK_BYTES):
            piece = buf[:min(CHUNK_BYTES, src.size - offset)]
            src.read_into(piece, offset, src.where)
            os.pwrite(fd, piece, offset)
    finally:
        os.close(fd)


@contextlib.contextmanager
def copied(loc: storage.Location) -> Iterator[str]:
    """The local path of a temporary copy of everything under ``loc`` (named
    like ``loc``'s last component), removed afterwards."""
    be = storage.backend(loc)
    files = be.list_files(loc)
    if not files:
        raise CheckpointNotFoundError(f"{loc}: nothing here (no object under this prefix)")
    if len(files) > MAX_FILES:
        raise CorruptCheckpointError(f"{loc}: more than {MAX_FILES} objects under this prefix (the cap)")
    named = [(check_name(loc, name), name, size) for name, size in files
             if not (name.endswith("/") and size == 0)]  # a "folder" placeholder some tools create
    with tempfile.TemporaryDirectory(prefix="jaxckpt-copy-") as tmp:
        need, free = sum(size for _, _, size in named), shutil.disk_usage(tmp).free
        if need > free:
            raise CheckpointError(f"{loc}: a local copy needs {need} bytes in {tmp}, {free} are free "
                                  "(set TMPDIR to a disk with room for it)")
        root = os.path.join(tmp, loc.name or "copy")

        def one(parts: list[str], name: str) -> None:
            try:
                with be.open_file(loc.join(name)) as src:
                    _download(src, os.path.join(root, *parts))
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                raise CorruptCheckpointError(f"{loc.join(name)}: another object's name makes it a folder "
                                             "too (a file and a folder of the same name)") from None
        try:
            for parts, _, _ in named:
                os.makedirs(os.path.join(root, *parts[:-1]), exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise CorruptCheckpointError(f"{loc}: two objects make one name both a file and a folder") from None
        with concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="jaxckpt-copy") as pool:
            for f in [pool.submit(one, parts, name) for parts, name, _ in named]:
                f.result()
        try:
            yield root
        except CheckpointError as e:  # a reader's message names the copy: name the bucket instead
            if root not in str(e):
                raise
            raise type(e)(str(e).replace(root, str(loc))) from e
