"""The functional API: save, restore, load_checkpoint, load_into, inspect.

Restore matches leaves by their flat key path (``params/Dense_0/kernel``), so a
target may use other container types than the saved tree (a FrozenDict for a
dict, a TrainState for the dict a notebook saved) as long as the paths agree.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import os
import pprint
from typing import Any, Mapping

import jax
import numpy as np

from jaxckpt import arrayinfo
from jaxckpt import gcpause
from jaxckpt import checkpointer
from jaxckpt import config
from jaxckpt import display
from jaxckpt import format as fmt
from jaxckpt import placement
from jaxckpt import progress as progress_mod
from jaxckpt import reader as reader_mod
from jaxckpt import tree as tree_mod
from jaxckpt.errors import CorruptCheckpointError, StructureMismatchError


# ------------------------------------------------------------------ save
def save(path: str | os.PathLike, tree: Any, *, metadata: Any = None, overwrite: bool = False) -> None:
    """Write ``tree`` to the checkpoint directory ``path``, atomically and durably.

    ``metadata``: msgpack-able plain values stored with the checkpoint.
    Raises ``CheckpointExistsError`` if ``path`` exists and ``overwrite`` is False.
    """
    checkpointer.save_sync(path, tree, metadata=metadata, overwrite=overwrite)


# ------------------------------------------------------------------ records
@dataclasses.dataclass(frozen=True)
class LeafInfo:
    path: str
    kind: str
    shape: tuple[int, ...]
    dtype: str | None
    nbytes: int
    value: Any = None


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What ``inspect`` reads from a manifest (no array data)."""
    path: str
    format_version: int
    library: str
    created: float
    metadata: Any
    total_bytes: int
    leaves: tuple[LeafInfo, ...]

    def __repr__(self) -> str:
        lines = [f"CheckpointInfo({self.path!r}, format v{self.format_version}, {len(self.leaves)} leaves, "
                 f"{display.format_bytes(self.total_bytes)}, written by {self.library})"]
        for leaf in self.leaves[:50]:
            desc = repr(leaf.value) if leaf.kind == "value" else f"{leaf.dtype}{list(leaf.shape)}  {display.format_bytes(leaf.nbytes)}"
            lines.append(f"  {leaf.path}: {desc}")
        if len(self.leaves) > 50:
            lines.append(f"  ... {len(self.leaves) - 50} more")
        if self.metadata is not None:
            lines.append(f"  metadata: {self.metadata!r}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The notebook view: a header line, the metadata, and a table of leaves
        (key path, shape, dtype, size; at most ``HTML_MAX_ROWS`` rows)."""
        head = (f"<b>CheckpointInfo</b> <code>{html.escape(self.path)}</code><br>"
                f"format v{self.format_version} &middot; {len(self.leaves)} leaves &middot; "
                f"{display.format_bytes(self.total_bytes)} &middot; written by {html.escape(self.library)} &middot; "
                f"created {html.escape(display.local_time(self.created))}")
        if self.metadata is not None:
            head += ("<br>metadata: <pre style=\"margin: 0; white-space: pre-wrap\">"
                     f"{html.escape(display.shorten(pprint.pformat(self.metadata, width=100), 4000))}</pre>")
        rows = []
        for leaf in self.leaves[:HTML_MAX_ROWS]:
            if leaf.kind == "value":
                shape, dtype, size = "", f"Python {type(leaf.value).__name__}", f"= {display.shorten(repr(leaf.value), 80)}"
            else:
                shape, size = str(tuple(leaf.shape)), display.format_bytes(leaf.nbytes)
                dtype = f"{leaf.dtype} (PRNG key data)" if leaf.kind == "key" else str(leaf.dtype)
            rows.append((leaf.path, shape, dtype, size))
        more = len(self.leaves) - HTML_MAX_ROWS
        return head + display.html_table(("key path", "shape", "dtype", "size"), rows,
                                  f"... {more} more leaves" if more > 0 else None)


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What ``load_into`` did: target keys absent from the source, and source keys not used."""
    missing: list[str]
    unexpected: list[str]


HTML_MAX_ROWS = 200  # a notebook table of a million leaves would stall the browser


def inspect(path: str | os.PathLike) -> CheckpointInfo:
    """Read only the manifest: version, metadata, and per leaf path/shape/dtype/size."""
    with reader_mod.CheckpointReader(path) as r:
        m = r.manifest
        leaves = tuple(LeafInfo(x.path, x.kind, x.shape, x.dtype, x.nbytes, x.value) for x in m.leaves)
        return CheckpointInfo(r.path, m.version, m.library, m.created, m.metadata, m.total_bytes, leaves)


# ------------------------------------------------------------------ restore
def _host_value(rec: fmt.LeafRecord, arr: np.ndarray | None) -> Any:
    """A leaf as restored with no target."""
    if rec.kind == "value":
        return rec.value
    if rec.kind == "scalar":
        return arr[()]
    if rec.kind == "key":
        return jax.random.wrap_key_data(arr, impl=rec.impl)
    return arr


def _read_all(r: reader_mod.CheckpointReader, indices: list[int], verify: bool,
              progress: Any = None, mmap: bool = True) -> dict[int, Any]:
    arrays = [i for i in indices if r.manifest.leaves[i].kind != "value"]
    for i in arrays:
        if r.manifest.leaves[i].kind == "key":
            _check_key_record(r, r.manifest.leaves[i])
    got = r.read([(i, None) for i in arrays], verify=verify, progress=progress, mappable=[mmap] * len(arrays))
    host = dict(zip(arrays, got))
    return {i: _host_value(r.manifest.leaves[i], host.get(i)) for i in indices}


def restore(path: str | os.PathLike, target: Any = None, *, partial: bool = False, verify: bool = True,
            progress: bool | None = None, mmap: bool = True) -> Any:
    """Read a checkpoint.

    ``target=None``: plain dict/list/tuple containers with numpy leaves.
    ``target`` a pytree of ``jax.Array`` / ``numpy.ndarray`` /
    ``jax.ShapeDtypeStruct`` (optionally with ``.sharding``) / Python scalars:
    the result has the target's structure, dtypes and shardings; each device
    receives only its slice. ``partial=True`` allows the target to be a subset.
    ``verify``: check every chunk's checksum (default True).
    ``progress``: show a progress bar (None: only when interactive and the
    checkpoint holds at least 256 MiB; see ``jaxckpt.progress``).
    ``mmap`` (default True): an array of at least 1 MiB that stays in host
    memory or goes to a CPU device, and is stored as one shard, is a
    copy-on-write mapping of the checkpoint file's bytes, read and verified
    before ``restore`` returns, instead of a copy in fresh memory (many times
    faster from the page cache; writes to it never reach the file). It stays
    valid when the checkpoint is deleted (the disk space is freed when the
    last such array is), and its clean pages are page cache that the kernel
    may drop and read again under memory pressure. Do not overwrite a
    committed checkpoint's files in place while such arrays live (jaxckpt
    never does). ``mmap=False``: every array in fresh memory.
    """
    # One pause of the cyclic collector for the whole restore (see jaxckpt/gcpause.py):
    # pausing stage by stage let each stage's survivors (a 10,000-leaf
    # manifest, then the host arrays) be traversed by a collection in the next.
    with gcpause.paused():
        return _restore(path, target, partial, verify, progress, mmap)


def _restore(path: str | os.PathLike, target: Any, partial: bool, verify: bool, progress: bool | None,
             mmap: bool) -> Any:
    with reader_mod.CheckpointReader(path) as r, \
            progress_mod.for_restore(r.path, r.manifest.total_bytes, len(r.manifest.leaves), progress) as bar:
        m = r.manifest
        if target is None:
            values = _read_all(r, list(range(len(m.leaves))), verify, bar.callback, mmap)
            return tree_mod.build(m.tree, [values[i] for i in range(len(m.leaves))])
        paths, tleaves, treedef = tree_mod.leaf_paths(target)
        missing = [p for p in paths if p not in r.by_path]
        extra = [] if partial else sorted(set(r.by_path) - set(paths))
        if missing or extra:
            raise StructureMismatchError(_mismatch_message(r.path, missing, extra, partial))
        out = _fill(r, paths, tleaves, verify, bar.callback, mmap)
        return treedef.unflatten(out)


def _mismatch_message(where: str, missing: list[str], extra: list[str], partial: bool) -> str:
    parts = [f"{where}: the checkpoint does not match the target structure"]
    if missing:
        parts.append(f"target leaves missing from the checkpoint: {_list(missing)}")
    if extra:
        parts.append(f"checkpoint leaves not in the target: {_list(extra)}"
                     + ("" if partial else " (pass partial=True to restore a subset)"))
    return "; ".join(parts)


def _list(xs: list[str], n: int = 10) -> str:
    shown = ", ".join(repr(x) for x in xs[:n])
    return shown + (f" and {len(xs) - n} more" if len(xs) > n else "")


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


def _check_key_record(r: reader_mod.CheckpointReader, rec: fmt.LeafRecord) -> None:
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


def _fill(r: reader_mod.CheckpointReader, paths: list[str], tleaves: list[Any], verify: bool,
          progress: Any = None, mmap: bool = True) -> list[Any]:
    with gcpause.paused():  # a few acyclic objects per leaf: see jaxckpt/gcpause.py
        return _fill_leaves(r, paths, tleaves, verify, progress, mmap)


def _host_bound(t: Any, sharding: Any, cache: dict[int | None, bool]) -> bool:
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


def _fill_leaves(r: reader_mod.CheckpointReader, paths: list[str], tleaves: list[Any], verify: bool,
                 progress: Any, mmap: bool) -> list[Any]:
    # One pass checks every leaf against its target (before anything is read)
    # and plans its reads: one request for a leaf read whole, one per distinct
    # addressable slice of a sharded one.
    leaves, by_path = r.manifest.leaves, r.by_path
    recs, infos, slices, boxes = [], [], [], []
    cache: dict[int, tuple[Any, bool]] = {}
    requests: list[tuple[int, arrayinfo.Box | None]] = []
    mappable: list[bool] = []
    on_cpu: dict[int | None, bool] = {}
    for p, t in zip(paths, tleaves):
        li = by_path[p]
        rec = leaves[li]
        info = _target_info(t)
        if rec.kind == "key":
            _check_key_record(r, rec)
        _check_leaf(r.path, p, rec, t, info)
        db = _device_boxes(info, rec, cache)
        bs = _boxes(db)
        recs.append(rec)
        infos.append(info)
        slices.append(db)
        boxes.append(bs)
        if rec.kind != "value":
            may_map = mmap and _host_bound(t, info[2], on_cpu)
            for b in bs:
                requests.append((li, b))
                mappable.append(may_map)
    arrays = iter(r.read(requests, verify=verify, progress=progress, mappable=mappable))
    out: list[Any] = []
    # Every single-device piece (a leaf bound for one device, or one device's
    # slice of a sharded leaf) is placed in one call at the end (placement.put:
    # ~15 us per piece instead of jax.device_put's ~50 us, and windowed on an
    # accelerator); sharded leaves are then assembled from their pieces.
    pieces: list[np.ndarray] = []
    piece_shardings: list[Any] = []
    single: list[tuple[int, int]] = []  # (index in out, index in pieces)
    sharded: list[tuple[int, tuple[int, ...], Any, list[int]]] = []  # (index in out, shape, sharding, pieces)
    on_device: dict[Any, Any] = {}  # device -> its SingleDeviceSharding
    for rec, t, info, bs, db in zip(recs, tleaves, infos, boxes, slices):
        if rec.kind == "value":
            out.append(convert(rec.value, t))
            continue
        shape, dtype, sharding, is_key = info
        if sharding is None or is_key or shape is None:
            out.append(_assemble(rec, {_full(b, rec): next(arrays) for b in bs}, t))
            continue
        np_dtype = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
        if db is None:  # bound for one device
            arr = next(arrays)
            single.append((len(out), len(pieces)))
            pieces.append(arr if arr.dtype == np_dtype else arr.astype(np_dtype))
            piece_shardings.append(sharding)
        else:
            got = {_full(b, rec): (a if (a := next(arrays)).dtype == np_dtype else a.astype(np_dtype)) for b in bs}
            ks = []
            for device, box in db:
                target = on_device.get(device)
                if target is None:
                    target = on_device[device] = jax.sharding.SingleDeviceSharding(device)
                ks.append(len(pieces))
                pieces.append(got[box])
                piece_shardings.append(target)
            sharded.append((len(out), shape, sharding, ks))
        out.append(None)
    if pieces:
        placed = placement.put(pieces, piece_shardings)
        for i, k in single:
            out[i] = placed[k]
        for i, shape, sharding, ks in sharded:
            out[i] = jax.make_array_from_single_device_arrays(shape, sharding, [placed[k] for k in ks])
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


# ------------------------------------------------------------------ flat views
def load_checkpoint(path: str | os.PathLike, *, verify: bool = True, progress: bool | None = None,
                    mmap: bool = True) -> dict[str, Any]:
    """The flat view: ``{"params/Dense_0/kernel": ndarray, "step": 3, ...}`` (MindSpore's ``load_checkpoint``).
    ``progress`` and ``mmap`` as in ``restore``."""
    with reader_mod.CheckpointReader(path) as r, \
            progress_mod.for_restore(r.path, r.manifest.total_bytes, len(r.manifest.leaves), progress) as bar:
        values = _read_all(r, list(range(len(r.manifest.leaves))), verify, bar.callback, mmap)
        return {leaf.path: values[i] for i, leaf in enumerate(r.manifest.leaves)}


def load_into(target: Any, source: str | os.PathLike | Mapping[str, Any], *, strict: bool = True,
              verify: bool = True, mmap: bool = True) -> tuple[Any, LoadReport]:
    """Fill ``target`` from matching keys of ``source`` (a checkpoint path or a flat
    dict as returned by ``load_checkpoint``); MindSpore's ``load_param_into_net``.

    Returns ``(new_tree, LoadReport)``. ``strict=True`` raises
    ``StructureMismatchError`` when keys are missing or unexpected;
    ``strict=False`` keeps the target's value for missing keys. ``mmap`` as in
    ``restore``.
    """
    paths, tleaves, treedef = tree_mod.leaf_paths(target)
    if isinstance(source, Mapping):
        keys = set(source)
        where = "source dict"
    else:
        r = reader_mod.CheckpointReader(source)
        keys = set(r.by_path)
        where = r.path
    missing = sorted(p for p in paths if p not in keys)
    unexpected = sorted(keys - set(paths))
    report = LoadReport(missing, unexpected)
    if strict and (missing or unexpected):
        if not isinstance(source, Mapping):
            r.close()
        raise StructureMismatchError(
            f"{where}: load_into(strict=True): "
            + "; ".join(x for x in (
                f"{len(missing)} target keys missing from the source: {_list(missing)}" if missing else "",
                f"{len(unexpected)} source keys not in the target: {_list(unexpected)}" if unexpected else "") if x))
    present = [(i, p) for i, p in enumerate(paths) if p in keys]
    out = list(tleaves)
    if isinstance(source, Mapping):
        for i, p in present:
            out[i] = _convert_checked(where, p, source[p], tleaves[i])
    else:
        with r:
            filled = _fill(r, [p for _, p in present], [tleaves[i] for i, _ in present], verify, mmap=mmap)
        for (i, _), v in zip(present, filled):
            out[i] = v
    return treedef.unflatten(out), report


def _convert_checked(where: str, path: str, value: Any, t: Any) -> Any:
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
    if isinstance(value, str) != isinstance(t, str) or (
            shape is None and not isinstance(t, complex) and (isinstance(value, complex) or np.iscomplexobj(value))):
        raise StructureMismatchError(f"{where}: leaf {path!r}: the target expects {type(t).__name__}, "
                                     f"the source has {type(value).__name__}")
    return convert(np.asarray(value) if isinstance(value, jax.Array) else value, t)
