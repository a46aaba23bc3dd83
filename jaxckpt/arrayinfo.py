"""What an array leaf is, below every layer: the dtypes the format stores,
boxes (the region of a global array a shard holds), PRNG keys, and where an
array lives (host memory or an accelerator).

Every other module asks these questions here, so each has one answer.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_dtypes
import numpy as np

# A box: per dimension, [start, stop) in the global array.
Box = tuple[tuple[int, int], ...]


# --------------------------------------------------------------------- dtypes
def _dtype_table() -> dict[str, np.dtype]:
    names = [
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    ]
    table = {n: np.dtype(n) for n in names}
    ml_names = [
        "bfloat16", "int4", "uint4", "int2", "uint2",
        "float8_e3m4", "float8_e4m3", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz",
        "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn",
        "float4_e2m1fn",
    ]
    for n in ml_names:
        t = getattr(ml_dtypes, n, None)
        if t is not None:
            table[n] = np.dtype(t)
    return table


# The format's dtype names (docs/FORMAT.md, dtype table) and the numpy dtypes they denote.
DTYPES: dict[str, np.dtype] = _dtype_table()
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in DTYPES.items()}


def dtype_name(dtype: Any) -> str | None:
    """The format's name for a (native or little-endian) dtype, or None if unsupported."""
    return DTYPE_NAMES.get(np.dtype(dtype).newbyteorder("="))


# --------------------------------------------------------------------- boxes
_KINDS = ("bool", "unsigned integer", "signed integer", "floating point", "complex")


def cast_kind(dtype: Any) -> int | None:
    """The kind of ``dtype`` as a rank: bool < unsigned < signed < floating
    point < complex (ml_dtypes' types by what they hold: numpy calls them all
    'V', and ``np.can_cast`` answers oddly for them); None if none of these."""
    dt = np.dtype(dtype)
    if dt.kind in "buifc":
        return "buifc".index(dt.kind)
    for info, kind in ((ml_dtypes.finfo, 3), (ml_dtypes.iinfo, None)):
        try:
            found = info(dt)
        except (ValueError, TypeError):
            continue
        return kind if kind is not None else (2 if found.min < 0 else 1)
    return None


def lossy_cast(src: Any, dst: Any) -> str | None:
    """Why casting ``src`` values to ``dst`` changes them by kind (numpy's
    'same_kind' rule: float -> int, complex -> real, signed -> unsigned, any ->
    bool), in words; None if it keeps the kind or widens it."""
    a, b = cast_kind(src), cast_kind(dst)
    if a is None or b is None or a <= b:
        return None
    return f"a cast from {_KINDS[a]} to {_KINDS[b]} changes values"


def full_box(shape: tuple[int, ...]) -> Box:
    """The box of a whole array."""
    return tuple([(0, d) for d in shape])


def index_box(index: tuple, shape: tuple[int, ...]) -> Box:
    """The box of a tuple of slices into an array of ``shape`` (a shard's ``index``)."""
    return tuple((s.indices(d)[0], s.indices(d)[1]) for s, d in zip(index, shape))


# --------------------------------------------------------------------- PRNG keys
@functools.lru_cache(maxsize=256)
def is_key_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` is a typed PRNG key dtype (``jax.random.key``'s)."""
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def is_key_array(x: Any) -> bool:
    """Whether ``x`` is a ``jax.Array`` of typed PRNG keys."""
    return isinstance(x, jax.Array) and is_key_dtype(x.dtype)


# --------------------------------------------------------------------- where arrays live
def on_accelerator(device: Any) -> bool:
    """Whether arrays on ``device`` need a transfer to or from host memory (tests patch this)."""
    return device.platform != "cpu"


def single_device(sharding: Any) -> Any:
    """The one device of a sharding that places the whole array on one device, else None."""
    devices = sharding.device_set
    if len(devices) != 1:
        return None
    (dev,) = devices
    return dev
