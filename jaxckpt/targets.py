"""Restoring into a target: each target leaf (a ``jax.Array``, a
``jax.ShapeDtypeStruct`` with or without a sharding, a numpy array, a Python
scalar) is checked against its record, read as the host boxes it needs (the
whole leaf, or each device's slice of a sharded target), cast to the target's
dtype and placed with its sharding.

Used by ``api.restore`` and ``api.load_into``; leaves are matched by key
path before they get here.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from jaxckpt import arrayinfo
from jaxckpt import config
from jaxckpt import format as fmt
from jaxckpt import gcpause
from jaxckpt import placement
from jaxckpt import reader as reader_mod
from jaxckpt.errors import CorruptCheckpointError, StructureMismatchError


def _target_info(t: Any) -> tuple[tuple[int, ...] | None, Any, Any, bool]:
    """(shape, dtype, sharding or None, is_key) of a target leaf; shape None for Python scalars."""
    if isinstance(t, (jax.Array, jax.ShapeDtypeStruct)):
        return tuple(t.shape), t.dtype, getattr(t, "sharding", None), arrayinfo.is_key_dtype(t.dtype)
    if isinstance(t, (np.ndarray, np.generic)):
        return tuple(np.shape(t)), t.dtype, None, False
    return None, None, None, False


@functools.lru_cache(maxsize=64)
def _key_layout(impl: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Trailing shape and dtype of one key's data for a PRNG implementation; None if unknown."""
    try:
        data = jax.random.key_data(jax.random.key(0, impl=impl))
    except (ValueError, TypeError, KeyError):
        return None
    return tuple(data.shape), np.dtype(data.dtype)


def check_key_record(r: reader_mod.CheckpointReader, rec: fmt.LeafRecord) -> None:
    """A key leaf's implementation is known and its data fits it (else jax raises TypeError/ValueError)."""
    where = os.path.join(r.path, fmt.MANIFEST_NAME)
    layout = _key_layout(rec.impl)
    if layout is None:
        raise CorruptCheckpointError(f"{where}: leaf {rec.path!r}: unknown PRNG implementation {rec.impl!r}")
    trailing, dtype = layout
    n = len(trailing)
    if arrayinfo.DTYPES[rec.dtype] != dtype or len(rec.shape) < n or tuple(rec.shape[len(rec.shape) - n:]) != trailing:
        raise CorruptCheckpointError(
            f"{where}: leaf {rec.path!r}: {rec.impl} key data must be {dtype}[..., {', '.join(map(str, trailing))}], "
            f"found {rec.dtype}{list(rec.shape)}")


def _key_shape(rec: fmt.LeafRecord) -> tuple[int, ...]:
    # key data has trailing implementation dimensions; the key array's shape drops them
    return rec.shape[:len(rec.shape) - len(_key_layout(rec.impl)[0])]


def _check_leaf(where: str, path: str, rec: fmt.LeafRecord, t: Any, info: tuple) -> None:
    shape, _, _, is_key = info
    if shape is None:  # a Python scalar or str target
        if rec.kind == "value":
            v = rec.value
            # str <-> number and complex -> real cannot be cast (int('abc'), float(1j) raise)
            if (v is not None and isinstance(t, str) == isinstance(v, str)
                    and (isinstance(t, complex) or not isinstance(v, complex))):
                return
            found = f"a Python {type(v).__name__}"
        else:
            if (rec.kind != "key" and rec.shape == () and not isinstance(t, str)
                    and (isinstance(t, complex) or not rec.dtype.startswith("complex"))):
                return
            found = f"an array of shape {rec.shape}" if rec.shape != () else f"a {rec.dtype} array of shape ()"
        raise StructureMismatchError(f"{where}: leaf {path!r}: the target expects a Python {type(t).__name__}, "
                                     f"the checkpoint has {found}")
    if rec.kind == "value":
        raise StructureMismatchError(f"{where}: leaf {path!r}: the target expects an array of shape {shape}, "
                                     f"the checkpoint has a Python {type(rec.value).__name__}")
    if is_key != (rec.kind == "key"):
        raise StructureMismatchError(f"{where}: leaf {path!r}: the target expects "
                                     f"{'a PRNG key array' if is_key else 'a numeric array'}, the checkpoint has "
                                     f"{'a PRNG key array' if rec.kind == 'key' else 'a numeric array'}")
    found = _key_shape(rec) if is_key else rec.shape
    if tuple(found) != tuple(shape):
        raise StructureMismatchError(f"{where}: leaf {path!r}: shape mismatch: the target expects {tuple(shape)}, "
                                     f"the checkpoint has {tuple(found)}")
    if not is_key and rec.dtype != getattr(info[1], "name", info[1]):
        _refuse_lossy(where, path, arrayinfo.DTYPES[rec.dtype], info[1], "checkpoint")


def _refuse_lossy(where: str, path: str, found: Any, expected: Any, side: str) -> None:
    """A target of another dtype gets the values cast to it (float32 -> bfloat16, int32 -> float32: as asked),
    unless the cast changes their kind (float -> int, complex -> real, ...), which would change the values."""
    why = arrayinfo.lossy_cast(found, expected)
    if why:
        raise StructureMismatchError(f"{where}: leaf {path!r}: dtype mismatch: the target expects {np.dtype(expected)}, "
                                     f"the {side} has {np.dtype(found)}, and {why} (restore without a target and "
                                     "cast it yourself)")


def _device_boxes(info: tuple, rec: fmt.LeafRecord, cache: dict[int, tuple[Any, bool]]
                  ) -> list[tuple[Any, arrayinfo.Box]] | None:
    """For a leaf sharded over several devices: (device, box) of each addressable
    slice; None for a leaf read whole (one device, no sharding, a key, a value).
    ``cache``: whether a sharding is single-device, by identity (a target's
    leaves usually share a handful of sharding objects)."""
    shape, _, sharding, is_key = info
    if sharding is None or is_key or rec.kind == "value" or shape is None:
        return None
    hit = cache.get(id(sharding))
    if hit is None:
        hit = cache[id(sharding)] = (sharding, arrayinfo.single_device(sharding) is not None)
    if hit[1]:
        return None
    return [(device, arrayinfo.index_box(index, shape))
            for device, index in sharding.addressable_devices_indices_map(shape).items()]


_WHOLE: tuple[None] = (None,)  # the boxes of a leaf read whole


def _boxes(device_boxes: list[tuple[Any, arrayinfo.Box]] | None) -> tuple[arrayinfo.Box | None, ...]:
    """The host boxes a target leaf needs: the whole leaf (None) or one per distinct addressable slice."""
    return _WHOLE if device_boxes is None else tuple(dict.fromkeys(box for _, box in device_boxes))


def _full(box: arrayinfo.Box | None, rec: fmt.LeafRecord) -> arrayinfo.Box:
    return box if box is not None else arrayinfo.full_box(rec.shape)


def fill(r: reader_mod.CheckpointReader, paths: list[str], tleaves: list[Any], verify: bool,
         progress: Any = None, mmap: bool = True) -> list[Any]:
    """The target leaves ``tleaves`` (at key paths ``paths``) filled from the
    checkpoint ``r``: checked, read, and placed with the target's shardings."""
    with gcpause.paused():  # a few acyclic objects per leaf: see jaxckpt/gcpause.py
        planned, requests, mappable = _plan(r, paths, tleaves, mmap)
        arrays = iter(r.read(requests, verify=verify, progress=progress, mappable=mappable))
        return _place(planned, arrays)


def host_bound(t: Any, sharding: Any, cache: dict[int | None, bool]) -> bool:
    """Whether a target leaf's value ends in host memory or on CPU devices
    (where a mapped host array can be the result itself, not a staging copy).
    ``cache``: by sharding identity; None for the default device. With
    ``config.Tuning.map_for_accelerators`` (off until measured on a GPU: ``python
    -m benchmarks.gpu_probe restore W3`` compares both) host arrays bound for an
    accelerator may be mappings too: the source of the host -> device copy,
    dropped once it is done."""
    if config.current().map_for_accelerators:
        return True
    if sharding is None and isinstance(t, (np.ndarray, np.generic)):
        return True
    key = None if sharding is None else id(sharding)
    hit = cache.get(key)
    if hit is None:
        devices = [jax.devices()[0]] if sharding is None else sharding.device_set
        hit = cache[key] = not any(arrayinfo.on_accelerator(d) for d in devices)
    return hit


class _Planned(NamedTuple):
    """One target leaf, checked against its record, with the host boxes it needs."""
    rec: fmt.LeafRecord
    target: Any
    info: tuple  # _target_info(target)
    boxes: tuple  # the host boxes to read: (None,) for the whole leaf, or one per distinct slice
    slices: list | None  # (device, box) per addressable slice of a sharded leaf; None: read whole


def _plan(r: reader_mod.CheckpointReader, paths: list[str], tleaves: list[Any], mmap: bool
          ) -> tuple[list[_Planned], list[tuple[int, arrayinfo.Box | None]], list[bool]]:
    """One pass checks every leaf against its target (before anything is read)
    and plans its reads: one request for a leaf read whole, one per distinct
    addressable slice of a sharded one; and whether each result may be a mapping."""
    leaves, by_path = r.manifest.leaves, r.by_path
    planned: list[_Planned] = []
    cache: dict[int, tuple[Any, bool]] = {}
    requests: list[tuple[int, arrayinfo.Box | None]] = []
    mappable: list[bool] = []
    on_cpu: dict[int | None, bool] = {}
    for p, t in zip(paths, tleaves):
        li = by_path[p]
        rec = leaves[li]
        info = _target_info(t)
        if rec.kind == "key":
            check_key_record(r, rec)
        _check_leaf(r.path, p, rec, t, info)
        db = _device_boxes(info, rec, cache)
        bs = _boxes(db)
        planned.append(_Planned(rec, t, info, bs, db))
        if rec.kind != "value":
            may_map = mmap and host_bound(t, info[2], on_cpu)
            for b in bs:
                requests.append((li, b))
                mappable.append(may_map)
    return planned, requests, mappable


class _Pieces:
    """Every single-device piece (a leaf bound for one device, or one device's
    slice of a sharded leaf), placed in one call at the end (``placement.put``:
    ~15 us per piece instead of ``jax.device_put``'s ~50 us, and windowed on
    an accelerator); sharded leaves are then assembled from their pieces."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.shardings: list[Any] = []
        self.single: list[tuple[int, int]] = []  # (index in out, index in arrays)
        self.sharded: list[tuple[int, tuple[int, ...], Any, list[int]]] = []  # (index in out, shape, sharding, pieces)
        self._on_device: dict[Any, Any] = {}  # device -> its SingleDeviceSharding

    def add_single(self, out_index: int, arr: np.ndarray, sharding: Any) -> None:
        self.single.append((out_index, len(self.arrays)))
        self.arrays.append(arr)
        self.shardings.append(sharding)

    def add_sharded(self, out_index: int, shape: tuple[int, ...], sharding: Any, slices: list,
                    got: dict[arrayinfo.Box, np.ndarray]) -> None:
        ks = []
        for device, box in slices:
            target = self._on_device.get(device)
            if target is None:
                target = self._on_device[device] = jax.sharding.SingleDeviceSharding(device)
            ks.append(len(self.arrays))
            self.arrays.append(got[box])
            self.shardings.append(target)
        self.sharded.append((out_index, shape, sharding, ks))

    def place(self, out: list[Any]) -> None:
        if not self.arrays:
            return
        placed = placement.put(self.arrays, self.shardings)
        for i, k in self.single:
            out[i] = placed[k]
        for i, shape, sharding, ks in self.sharded:
            out[i] = jax.make_array_from_single_device_arrays(shape, sharding, [placed[k] for k in ks])


def _as(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return a if a.dtype == dtype else a.astype(dtype)


def _place(planned: list[_Planned], arrays: Iterator[np.ndarray]) -> list[Any]:
    """The restored leaves, from the host arrays read for ``planned`` (in order)."""
    out: list[Any] = []
    pieces = _Pieces()
    for rec, t, info, bs, db in planned:
        if rec.kind == "value":
            out.append(convert(rec.value, t))
            continue
        shape, dtype, sharding, is_key = info
        if sharding is None or is_key or shape is None:
            out.append(_assemble(rec, {_full(b, rec): next(arrays) for b in bs}, t))
            continue
        np_dtype = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
        if db is None:  # bound for one device
            pieces.add_single(len(out), _as(next(arrays), np_dtype), sharding)
        else:
            pieces.add_sharded(len(out), shape, sharding, db, {_full(b, rec): _as(next(arrays), np_dtype) for b in bs})
        out.append(None)
    pieces.place(out)
    return out


def _assemble(rec: fmt.LeafRecord, regions: dict[arrayinfo.Box, np.ndarray], t: Any) -> Any:
    """A leaf that is not placed by pieces: a PRNG key array, or a target without a sharding."""
    _, _, sharding, is_key = _target_info(t)
    (data,) = regions.values()
    if is_key:
        key = jax.random.wrap_key_data(data, impl=rec.impl)
        return jax.device_put(key, sharding) if sharding is not None else key
    return convert(data[()] if rec.kind == "scalar" else data, t)


def convert(value: Any, t: Any) -> Any:
    """Cast a host value (numpy array/scalar or Python scalar) to the kind of target leaf ``t``."""
    if isinstance(t, jax.ShapeDtypeStruct):
        arr = np.asarray(value, dtype=t.dtype)
        return jax.device_put(arr, t.sharding) if getattr(t, "sharding", None) is not None else jax.device_put(arr)
    if isinstance(t, jax.Array):
        arr = np.asarray(value, dtype=t.dtype)
        return jax.device_put(arr, t.sharding)
    if isinstance(t, np.ndarray):
        return np.asarray(value).astype(t.dtype, copy=False)
    if isinstance(t, np.generic):
        return np.asarray(value).astype(t.dtype)[()]
    if isinstance(t, (bool, int, float, complex)):
        v = value.item() if isinstance(value, (np.ndarray, np.generic)) else value
        return type(t)(v)
    if isinstance(t, str):
        if not isinstance(value, str):
            raise StructureMismatchError(f"the target expects a str, the checkpoint has {type(value).__name__}")
        return value
    return value


def convert_checked(where: str, path: str, value: Any, t: Any) -> Any:
    shape, _, _, is_key = _target_info(t)
    if is_key:
        if not arrayinfo.is_key_array(value):
            raise StructureMismatchError(f"{where}: leaf {path!r}: the target expects a PRNG key array, "
                                         f"found {type(value).__name__}")
        return jax.device_put(value, t.sharding) if getattr(t, "sharding", None) is not None else value
    found = np.shape(value)
    if shape is not None and tuple(found) != tuple(shape):
        raise StructureMismatchError(f"{where}: leaf {path!r}: shape mismatch: the target expects {tuple(shape)}, "
                                     f"the source has {tuple(found)}")
    if shape is not None and hasattr(value, "dtype") and not arrayinfo.is_key_array(value):
        _refuse_lossy(where, path, value.dtype, _target_info(t)[1], "source")
    if isinstance(value, str) != isinstance(t, str) or (
            shape is None and not isinstance(t, complex) and (isinstance(value, complex) or np.iscomplexobj(value))):
        raise StructureMismatchError(f"{where}: leaf {path!r}: the target expects {type(t).__name__}, "
                                     f"the source has {type(value).__name__}")
    return convert(np.asarray(value) if isinstance(value, jax.Array) else value, t)
