"""Reads past the page cache (O_DIRECT) of encrypted chunks: every alignment
of buffer, offset and length reads the right bytes, a truncated file is named,
a filesystem that refuses O_DIRECT falls back, and an encrypted restore leaves
the data file out of the page cache while a plain one maps it in."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest

import jaxckpt
from jaxckpt import posix, posixfs
from jaxckpt.errors import CorruptCheckpointError

KEY = bytes(range(32))
PAGE = 4096


def direct_ok(directory) -> bool:
    """Whether this filesystem opens files with O_DIRECT (tmpfs does not)."""
    path = os.path.join(directory, "probe")
    with open(path, "wb") as f:
        f.write(bytes(PAGE))
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(path)


def aligned(n: int, shift: int = 0) -> memoryview:
    """A writable buffer of ``n`` bytes starting ``shift`` bytes past a page boundary."""
    m = mmap.mmap(-1, n + shift + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return memoryview(m)[shift:shift + n]


@pytest.fixture
def datafile(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 5 * PAGE * 64 + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return str(path), data


@pytest.mark.parametrize("offset,length,shift", [
    (0, PAGE * 64, 0),             # whole blocks, all aligned
    (PAGE * 3, PAGE * 10 + 77, 0),  # an aligned head and a buffered tail
    (PAGE * 2 + 5, PAGE * 8, 0),    # unaligned offset: all buffered
    (PAGE, PAGE * 8, 64),           # unaligned buffer: all buffered
    (PAGE * 300, 5 * PAGE * 64 + 123 - PAGE * 300, 0),  # up to the end of the file
    (PAGE, 100, 0),                 # less than one block
    (PAGE, 0, 0),                   # nothing
])
def test_uncached_reads_return_the_files_bytes(datafile, offset, length, shift):
    path, data = datafile
    src = posix.PosixData(path, len(data))
    try:
        buf = aligned(length, shift)
        src.read_uncached_into(buf, offset, path)
        assert bytes(buf) == data[offset:offset + length]
    finally:
        src.close()


def test_an_uncached_read_past_the_end_names_the_truncated_file(datafile):
    path, data = datafile
    src = posix.PosixData(path, len(data))
    try:
        buf = aligned(PAGE * 8)
        with pytest.raises(CorruptCheckpointError) as e:
            src.read_uncached_into(buf, len(data) - PAGE * 2, path)
        assert str(e.value) == (f"{path}: truncated: expected {PAGE * 8} bytes at offset "
                                f"{len(data) - PAGE * 2}, found {PAGE * 2}")
    finally:
        src.close()


def test_without_o_direct_uncached_reads_are_buffered(datafile, monkeypatch):
    monkeypatch.setattr(posixfs, "O_DIRECT", 0)
    path, data = datafile
    src = posix.PosixData(path, len(data))
    try:
        buf = aligned(PAGE * 16)
        src.read_uncached_into(buf, PAGE, path)
        assert bytes(buf) == data[PAGE:PAGE * 17]
    finally:
        src.close()


def resident_fraction(path: str) -> float:
    """The fraction of ``path``'s pages in the page cache (mincore of a read-only mapping)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        addr = np.frombuffer(m, np.uint8).ctypes.data
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            pytest.fail(f"mincore failed: {os.strerror(ctypes.get_errno())}")
        return sum(v & 1 for v in vec) / pages
    finally:
        m.close()


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_an_encrypted_restore_reads_past_the_page_cache_and_a_plain_one_maps(tmp_path):
    if not direct_ok(tmp_path):
        pytest.skip(f"{tmp_path}: this filesystem has no O_DIRECT (the buffered fallback is tested above)")
    state = {"w": np.random.default_rng(1).standard_normal((1024, 1024 + 3), dtype=np.float32),
             "b": np.arange(3_000_001, dtype=np.int16)}
    for encrypted in (True, False):
        path = str(tmp_path / f"ck-{encrypted}")
        jaxckpt.save(path, state, encryption_key=KEY if encrypted else None)
        data = [os.path.join(path, f) for f in os.listdir(path) if f.startswith("data")]
        for f in data:
            evict(f)
        assert max(resident_fraction(f) for f in data) < 0.05
        out = jaxckpt.restore(path, encryption_key=KEY if encrypted else None)
        for k in state:
            assert np.asarray(out[k]).tobytes() == state[k].tobytes()
        found = max(resident_fraction(f) for f in data)
        if encrypted:
            assert found < 0.05, f"an encrypted restore left {found:.0%} of its data file in the page cache"
        else:
            assert found > 0.9, f"a plain restore mapped only {found:.0%} of its data file"
