"""The C library calls Python does not wrap: ``madvise`` and ``renameat2``.

One loader for the whole package (``libc()``), tried once. Every wrapper
degrades to "unsupported" where the call does not exist (not Linux, an old
kernel or C library); its callers then take the portable path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Any

MADV_WILLNEED = 3
MADV_POPULATE_READ = 22  # Linux >= 5.14
MADV_POPULATE_WRITE = 23  # Linux >= 5.14

_lib: Any = None  # the loaded library, or False where none could be loaded
_madvise: Any = None  # the madvise function with its argument types, or False


def libc() -> Any:
    """The C library (``ctypes.CDLL`` with errno), or None where it cannot be loaded."""
    global _lib
    if _lib is None:
        try:
            _lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _lib = False
    return _lib or None


def madvise_fn() -> Any:
    """``madvise(addr, length, advice) -> int`` (errno via ``ctypes.get_errno``), or
    None where the C library has none. (Tests replace this to inject errors.)"""
    global _madvise
    if _madvise is None:
        lib = libc()
        fn = getattr(lib, "madvise", None) if lib is not None else None
        if fn is not None:
            fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise = fn if fn is not None else False
    return _madvise or None


def renameat2_exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or the file system does not support it."""
    lib = libc()
    fn = getattr(lib, "renameat2", None) if lib is not None else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", a, None, b)
