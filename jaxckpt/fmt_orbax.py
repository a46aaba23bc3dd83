"""Orbax checkpoints, read and written through orbax's own API.

Orbax is the reference reader of its format, so this module parses no array
data: a filesystem walk (no orbax import) finds the orbax items, and
``orbax.checkpoint`` (optional, imported on first use; without it all but
:func:`sniff` raise ``UnsupportedLocationError`` naming :data:`INSTALL`)
does every array read and write.

Layouts (orbax 0.12): an *item* directory (``StandardCheckpointer`` /
``PyTreeCheckpointer``): ``_METADATA`` with OCDBT (``manifest.ocdbt``, ``d/``,
``ocdbt.process_N/``) or zarr (``use_ocdbt=False``: ``<a.b.c>/.zarray`` or
``zarr.json`` per array); a ``CheckpointManager`` *step* directory holding
item subdirectories (named by its ``_CHECKPOINT_METADATA`` ``item_handlers``):
pytree items are read, JSON items shown by :func:`describe`, others skipped.
A manager *root* (numbered steps) is not a checkpoint: :func:`read` names its
steps (:func:`root_steps`). A jaxckpt checkpoint is never taken for orbax.

Flat keys join key paths with ``/`` as ``jaxckpt.tree`` does (dict keys,
sequence indices, dataclass / NamedTuple fields): an orbax and a jaxckpt
checkpoint of one pytree list the same keys. Orbax keeps no container types
(tuples read back as lists, NamedTuples as dicts; empty nodes drop out).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import stat
from contextlib import contextmanager
from typing import Any, Iterator

import jax
import numpy as np

from jaxckpt import format as fmt
from jaxckpt import tree as tree_mod
from jaxckpt.errors import (CheckpointError, CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError,
                            StructureMismatchError, UnsupportedLocationError, UnsupportedValueError)

NAME = "orbax"
INSTALL = "pip install 'jaxckpt[orbax]'"
#: :func:`iter_tensors` restores leaves in groups of about this many bytes.
ITER_BATCH_BYTES = 256 << 20

_STEP_META, _TREE_META, _TMP_MARK = "_CHECKPOINT_METADATA", "_METADATA", ".orbax-checkpoint-tmp"
MARKERS = (_STEP_META, _TREE_META, "manifest.ocdbt")  # files of which one is in every step or item directory
_STEP_NAME = re.compile(r"^(?:.*_)?(\d+)$")
_INT64 = (-(1 << 63), (1 << 63) - 1)


# ----------------------------------------------------------------------------- layout (no orbax import)
@dataclasses.dataclass(frozen=True)
class Item:
    """One orbax item: ``kind`` is ``"pytree"``, ``"json"`` or ``"other"``."""
    name: str | None
    path: str
    kind: str
    handler: str | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a directory holds: one bare item (``kind="item"``) or a manager step."""
    kind: str
    path: str
    items: tuple[Item, ...]

    @property
    def trees(self) -> tuple[Item, ...]:
        """The pytree items, the ones holding arrays."""
        return tuple(i for i in self.items if i.kind == "pytree")


def _head(path: str, n: int = 4096) -> bytes:
    """The first ``n`` bytes of a regular file, ``b""`` if unreadable or not one (a FIFO must not block)."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            return f.read(n) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else b""
    except OSError:
        return b""


def _subdirs(path: str) -> list[os.DirEntry]:
    """Subdirectories by name (none if unreadable)."""
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if e.is_dir()), key=lambda e: e.name)
    except OSError:
        return []


def _is_tree_item(path: str) -> bool:
    """An orbax pytree item: ``_METADATA`` with ``tree_metadata``, an OCDBT
    manifest, per-process OCDBT trees, or zarr arrays one directory down."""
    meta, ocdbt = os.path.join(path, _TREE_META), os.path.join(path, "manifest.ocdbt")
    if b'"tree_metadata"' in _head(meta) or os.path.isfile(ocdbt):
        return True
    return any(e.name.startswith("ocdbt.process_") or os.path.isfile(os.path.join(e.path, ".zarray"))
               or os.path.isfile(os.path.join(e.path, "zarr.json")) for e in _subdirs(path))


def _item_handlers(path: str) -> dict[str, str] | None:
    """``item_handlers`` of a step's ``_CHECKPOINT_METADATA`` when it names several items."""
    try:
        handlers = json.loads(_head(os.path.join(path, _STEP_META), 1 << 20) or b"{}").get("item_handlers")
    except (ValueError, AttributeError):
        return None
    return handlers if isinstance(handlers, dict) else None


def _step_items(path: str) -> list[Item]:
    """The items of a manager step: those its handlers name, else every pytree subdirectory."""
    handlers = _item_handlers(path)
    items = []
    for e in _subdirs(path):
        handler = (handlers or {}).get(e.name)
        if handlers is not None and handler is None:
            continue
        if _is_tree_item(e.path):
            items.append(Item(e.name, e.path, "pytree", handler))
        elif os.path.isfile(os.path.join(e.path, "metadata")) and (handler is None or "Json" in handler):
            items.append(Item(e.name, e.path, "json", handler))
        elif handler is not None:
            items.append(Item(e.name, e.path, "other", handler))
    return items


def _layout(path: str) -> Layout | None:
    """The orbax layout at ``path``, or None when it holds none."""
    if not os.path.isdir(path) or b"jaxckpt" in _head(os.path.join(path, fmt.MANIFEST_NAME), 64):
        return None  # not a directory, or a jaxckpt checkpoint
    if _is_tree_item(path):
        return Layout("item", path, (Item(None, path, "pytree"),))
    items = _step_items(path)
    if any(i.kind == "pytree" for i in items) or (items and _item_handlers(path) is not None):
        return Layout("step", path, tuple(items))
    return None


def sniff(path: str) -> bool:
    """Whether the directory ``path`` is an orbax item or ``CheckpointManager``
    step directory. A manager root, a jaxckpt checkpoint or an empty directory
    is not."""
    return _layout(os.fspath(path)) is not None


def root_steps(path: str) -> list[str]:
    """Names of the step directories when ``path`` is a ``CheckpointManager``
    root (``[]`` otherwise), in step order, for a "pick a step" message."""
    found = []
    for e in _subdirs(os.fspath(path)):
        m = _STEP_NAME.match(e.name)
        if m and (lay := _layout(e.path)) is not None and lay.kind == "step":
            found.append((int(m.group(1)), e.name))
    return [name for _, name in sorted(found)]


def _resolve(path: Any) -> Layout:
    """The layout to read, or the typed error saying why there is none."""
    path = os.fspath(path)
    if "://" in path:
        raise UnsupportedLocationError(f"{path}: orbax checkpoints are read from local directories only")
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such orbax checkpoint")
    lay = _layout(path)
    if lay is None:
        if steps := root_steps(path):
            raise CheckpointNotFoundError(
                f"{path} is an orbax CheckpointManager root, not a checkpoint: pass one step directory, "
                f"one of {steps} (e.g. {os.path.join(path, steps[-1])})")
        raise CheckpointNotFoundError(f"{path} is not an orbax checkpoint (no _METADATA, OCDBT or zarr item found)")
    if _TMP_MARK in os.path.basename(os.path.normpath(path)):
        raise CheckpointNotFoundError(f"{path} is an uncommitted orbax checkpoint (a save that did not finish)")
    return lay


# ----------------------------------------------------------------------------- orbax access
def _ocp() -> Any:
    """``orbax.checkpoint``, or the error saying how to install it."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise UnsupportedLocationError(f"reading or writing orbax checkpoints needs orbax-checkpoint: {INSTALL}") from e
    return ocp


@contextmanager
def _orbax_errors(path: str, doing: str, error: type[CheckpointError] = CorruptCheckpointError) -> Iterator[None]:
    """Turn what orbax / TensorStore raise into ``error`` naming ``path`` (ours and
    MemoryError pass). TensorStore reports a damaged file as a plain ValueError."""
    try:
        yield
    except (CheckpointError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - orbax raises anything; the caller gets one typed error
        detail = str(e).split("[tensorstore_spec=")[0].strip()
        raise error(f"{path}: orbax could not {doing}: {type(e).__name__}: {detail[:400]}") from e


def _tree_metadata(ocp: Any, item: Item) -> Any:
    """The item's orbax ``TreeMetadata`` (``_METADATA`` + zarr headers, no array data)."""
    with _orbax_errors(item.path, "read the tree metadata"), ocp.PyTreeCheckpointer() as ck:
        meta = ck.metadata(item.path).item_metadata
    if meta is None:  # orbax logs and returns None for a missing or malformed _METADATA
        raise CorruptCheckpointError(f"{item.path}: orbax found no readable tree metadata "
                                     f"({_TREE_META} missing or malformed)")
    return meta


def _leaves(ocp: Any, meta: Any) -> list[tuple[str, Any]]:
    """(flat key, leaf metadata) in JAX order; empty nodes (None) drop out."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(meta.tree, is_leaf=lambda x: isinstance(x, ocp.metadata.Metadata))
    return [(tree_mod.path_str(p), m) for p, m in with_path]


def _info(m: Any) -> tuple[str, tuple[int, ...], int]:
    """dtype name, shape and byte size of one leaf's metadata."""
    ocp = _ocp()
    if isinstance(m, ocp.metadata.StringMetadata):
        return "str", (), 0
    if isinstance(m, ocp.metadata.ArrayMetadata):
        dtype, shape = np.dtype(m.dtype), tuple(int(d) for d in m.shape)
        return dtype.name, shape, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return type(m).__name__, (), 0


def _prefix(lay: Layout, item: Item) -> str:
    """``"<item>/"`` when the step holds several pytree items, else ``""``."""
    return f"{item.name}{tree_mod.SEP}" if len(lay.trees) > 1 else ""


def _prng_keys(item: Item) -> dict[str, str]:
    """``param name -> key impl`` for typed PRNG keys, from orbax's per-process
    ``array_metadatas`` (the tree metadata API does not expose it)."""
    found: dict[str, str] = {}
    for name in sorted(glob.glob(os.path.join(glob.escape(item.path), "array_metadatas", "process_*"))):
        with _orbax_errors(name, "parse array metadata"), open(name, "rb") as f:
            records = [r.get("array_metadata", {}) for r in json.load(f).get("array_metadatas", [])]
        found.update({am.get("param_name"): am["ext_metadata"]["random_key_impl"] for am in records
                      if (am.get("ext_metadata") or {}).get("random_key_impl")})
    return found


def describe(path: str) -> tuple[list[tuple[str, str, tuple[int, ...], int]], dict]:
    """``[(flat key, dtype name, shape, nbytes)]`` and ``extra``, from orbax's
    metadata API (tree metadata and zarr headers, no array data). ``extra``:
    ``layout``, ``items`` (pytree item names), ``storage`` (item -> ocdbt /
    zarr), ``prng_keys`` (flat key -> impl; keys read back as uint32 key data),
    ``custom_metadata`` (the step's), ``item_custom_metadata``, ``json_items``
    (content), ``skipped_items`` (item -> handler), ``item_handlers``, commit
    time, ``orbax_version`` (the reader's: orbax records none). String leaves
    are listed as dtype ``"str"``, shape ``()``, nbytes 0."""
    ocp, lay = _ocp(), _resolve(path)
    rows: list[tuple[str, str, tuple[int, ...], int]] = []
    extra: dict[str, Any] = {"format": NAME, "layout": lay.kind, "orbax_version": ocp.__version__,
                             "items": [i.name for i in lay.trees if i.name], "storage": {}, "prng_keys": {},
                             "item_custom_metadata": {}, "json_items": {}, "skipped_items": {}}
    for item in lay.trees:
        meta, pre, keys = _tree_metadata(ocp, item), _prefix(lay, item), _prng_keys(item)
        label = item.name or ""
        extra["storage"][label] = "ocdbt" if os.path.isfile(os.path.join(item.path, "manifest.ocdbt")) else "zarr"
        extra["item_custom_metadata"][label] = meta.custom_metadata
        for key, m in _leaves(ocp, meta):
            rows.append((pre + key, *_info(m)))
            if getattr(m, "name", None) in keys:
                extra["prng_keys"][pre + key] = keys[m.name]
    for item in lay.items:
        if item.kind == "json":
            with _orbax_errors(item.path, "read the JSON item"), ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
                extra["json_items"][item.name] = ck.restore(item.path)
        elif item.kind == "other":
            extra["skipped_items"][item.name] = item.handler
    extra.update(_step_meta(ocp, lay.path))
    return rows, extra


def _step_meta(ocp: Any, path: str) -> dict[str, Any]:
    """Custom metadata, handlers and commit time from orbax's step metadata."""
    if not os.path.isfile(os.path.join(path, _STEP_META)):
        return {"custom_metadata": None}
    with _orbax_errors(path, f"read {_STEP_META}"):
        m = ocp.metadata.get_step_metadata(path)
    return {"custom_metadata": m.custom_metadata, "item_handlers": m.item_handlers,
            "commit_timestamp_nsecs": m.commit_timestamp_nsecs}


# ----------------------------------------------------------------------------- read
def _restore_numpy(ocp: Any, item: Item, meta: Any, wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    """Restore an item (or only the flat keys in ``wanted``) as host numpy arrays.

    Leaves outside ``wanted`` are orbax ``PLACEHOLDER``\\ s, which it skips.
    """
    base, string = ocp.metadata.Metadata, ocp.metadata.StringMetadata
    entries = _leaves(ocp, meta)
    keep = {id(m) for k, m in entries if wanted is None or k in wanted}
    item_tree = jax.tree.map(lambda m: m if id(m) in keep else ocp.PLACEHOLDER, meta.tree,
                             is_leaf=lambda x: isinstance(x, base))
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=str if isinstance(m, string) else np.ndarray),
                        meta.tree, is_leaf=lambda x: isinstance(x, base))
    with _orbax_errors(item.path, "restore the arrays"), ocp.PyTreeCheckpointer() as ck:
        restored = ck.restore(item.path, args=ocp.args.PyTreeRestore(item=item_tree, restore_args=args))
    values, _ = jax.tree_util.tree_flatten_with_path(restored, is_leaf=lambda x: x is ocp.PLACEHOLDER)
    by_key = {tree_mod.path_str(p): v for p, v in values}
    return {k: _as_array(item.path, k, by_key.get(k, ocp.PLACEHOLDER), m, ocp) for k, m in entries if id(m) in keep}


def _as_array(path: str, key: str, value: Any, m: Any, ocp: Any) -> np.ndarray:
    """One restored leaf as a numpy array of the stored dtype (0-d for scalars)."""
    if value is ocp.PLACEHOLDER:
        raise CorruptCheckpointError(f"{path}: orbax restored no value for {key}")
    arr = np.asarray(value)  # strings: 0-d unicode arrays
    if isinstance(m, ocp.metadata.ArrayMetadata) and arr.dtype != np.dtype(m.dtype):
        arr = arr.astype(np.dtype(m.dtype))  # python scalars: int64 / float64 / bool as recorded
    return arr


def read(path: str, *, target: Any = None) -> dict[str, Any] | Any:
    """Read an orbax checkpoint.

    ``target=None``: the flat dict ``{flat key: numpy array}`` (stored dtype,
    ml_dtypes for bfloat16 / int4 / fp8, 0-d arrays for scalars, typed PRNG
    keys as uint32 key data). A step with several pytree items prefixes the
    keys with the item name (``state/params/w``); with one, it is that item.

    ``target``: a pytree of ``jax.ShapeDtypeStruct`` / arrays (with shardings)
    restored by orbax's abstract-target restore (``StandardCheckpointer``) in
    the target's structure, dtypes (orbax casts) and shardings (a leaf without
    one comes back as numpy, as in orbax). With several pytree items, a dict of
    item name -> tree (items left out are not read). Key paths, shapes and
    shardings are checked first (``StructureMismatchError``).
    """
    ocp, lay = _ocp(), _resolve(path)
    if target is not None:
        return _read_target(ocp, lay, target)
    return {_prefix(lay, item) + key: arr for item in lay.trees
            for key, arr in _restore_numpy(ocp, item, _tree_metadata(ocp, item)).items()}


def iter_tensors(path: str, *, batch_bytes: int = ITER_BATCH_BYTES) -> Iterator[tuple[str, np.ndarray]]:
    """``(flat key, numpy array)`` in JAX order, restored by orbax in groups of
    about ``batch_bytes`` (other leaves are orbax placeholders, not read), so
    memory holds one group at a time. Each group re-opens the item in orbax."""
    ocp, lay = _ocp(), _resolve(path)
    for item in lay.trees:
        meta, pre = _tree_metadata(ocp, item), _prefix(lay, item)
        for group in _groups(_leaves(ocp, meta), batch_bytes):
            arrays = _restore_numpy(ocp, item, meta, set(group))
            for key in group:
                yield pre + key, arrays.pop(key)


def _groups(entries: list[tuple[str, Any]], budget: int) -> Iterator[list[str]]:
    """Consecutive flat keys of about ``budget`` bytes (at least one key each)."""
    group, size = [], 0  # keys, and their bytes
    for key, m in entries:
        nbytes = _info(m)[2]
        if group and size + nbytes > budget:
            yield group
            group, size = [], 0
        group.append(key)
        size += nbytes
    if group:
        yield group


def _read_target(ocp: Any, lay: Layout, target: Any) -> Any:
    """Restore through ``StandardCheckpointer`` into the target's shardings."""
    trees = lay.trees
    if len(trees) == 1:
        return _restore_item_target(ocp, trees[0], target)
    if not isinstance(target, dict) or not set(target) <= {i.name for i in trees}:
        got = sorted(target) if isinstance(target, dict) else type(target).__name__
        raise StructureMismatchError(f"{lay.path} holds the items {[i.name for i in trees]}: the target must be a "
                                     f"dict of some of them, got {got}")
    return {i.name: _restore_item_target(ocp, i, target[i.name]) for i in trees if i.name in target}


def _restore_item_target(ocp: Any, item: Item, target: Any) -> Any:
    """One item into its target (numpy scalars as 0-d arrays: orbax refuses them)."""
    target = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, target)
    _check_target(ocp, item, target)
    with _orbax_errors(item.path, "restore into the target"), ocp.StandardCheckpointer() as ck:
        return ck.restore(item.path, target)


def _stored_shape(x: Any) -> tuple[int, ...]:
    """The shape orbax stores for a target leaf (key data for typed PRNG keys)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, dtype)).shape)
    return tuple(np.shape(x))


def _check_target(ocp: Any, item: Item, target: Any) -> None:
    """Same flat keys, same shapes, shardings that divide them."""
    stored = {k: _info(m) for k, m in _leaves(ocp, _tree_metadata(ocp, item))}
    keys, leaves, _ = tree_mod.leaf_paths(target)
    missing, unexpected = sorted(set(stored) - set(keys)), sorted(set(keys) - set(stored))
    if missing or unexpected:
        raise StructureMismatchError(f"{item.path}: the target does not match the checkpoint: missing from the "
                                     f"target {missing[:10]}, not in the checkpoint {unexpected[:10]}")
    for key, leaf in zip(keys, leaves):
        want, shape = stored[key][1], _stored_shape(leaf)
        if stored[key][0] != "str" and shape != want:
            raise StructureMismatchError(f"{item.path}: {key}: the checkpoint holds shape {want}, "
                                         f"the target asks for {shape}")
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            try:
                sharding.shard_shape(tuple(np.shape(leaf)))
            except ValueError as e:
                raise StructureMismatchError(f"{item.path}: {key}: the target's sharding does not fit shape "
                                             f"{tuple(np.shape(leaf))}: {e}") from e


# ----------------------------------------------------------------------------- write
def _nest(flat: dict) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``; clashing or empty key parts are refused."""
    root: dict = {}
    for key, value in flat.items():
        parts = key.split(tree_mod.SEP) if isinstance(key, str) else []
        if not parts or "" in parts:
            raise UnsupportedValueError(f"flat key {key!r}: keys must be non-empty strings of '/'-joined names")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UnsupportedValueError(f"flat key {key!r}: {part!r} is both a leaf and a subtree")
        if parts[-1] in node:
            raise UnsupportedValueError(f"flat key {key!r}: {parts[-1]!r} is both a leaf and a subtree")
        node[parts[-1]] = value
    return root


def _is_flat(tree: Any) -> bool:
    """A flat dict: some key holds ``/`` and no value is a container."""
    return (isinstance(tree, dict) and any(isinstance(k, str) and tree_mod.SEP in k for k in tree)
            and not any(isinstance(v, (dict, list, tuple)) for v in tree.values()))


def _storable_dtype(dtype: Any) -> bool:
    """Numbers, bool, ml_dtypes and typed PRNG keys; not float0, strings or objects."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype != jax.dtypes.float0 and (np.dtype(dtype) == np.bool_ or jax.dtypes.issubdtype(dtype, np.number))


def _prepare_leaf(key: str, x: Any) -> Any:
    """A leaf orbax can hold, or ``UnsupportedValueError`` naming its key."""
    if isinstance(x, int) and not isinstance(x, bool) and not _INT64[0] <= x <= _INT64[1]:
        raise UnsupportedValueError(f"{key}: the integer {x} does not fit the int64 orbax stores scalars in")
    if isinstance(x, (bool, int, float)):
        return x
    if isinstance(x, (complex, np.generic)):
        x = np.asarray(x)  # orbax refuses numpy and complex scalars; a 0-d array holds the same value
    if not isinstance(x, (np.ndarray, jax.Array)):
        raise UnsupportedValueError(f"{key}: {type(x).__name__} cannot be written to an orbax checkpoint "
                                    "(arrays and int / float / bool / complex scalars only)")
    if not _storable_dtype(x.dtype):
        raise UnsupportedValueError(f"{key}: dtype {x.dtype} cannot be written to an orbax checkpoint")
    if x.size == 0:
        raise UnsupportedValueError(f"{key}: orbax cannot save arrays with zero size (shape {x.shape})")
    return x


def _check_metadata(metadata: Any) -> None:
    """Orbax's ``custom_metadata`` must be a JSON-serializable dict."""
    if metadata is not None and not isinstance(metadata, dict):
        raise UnsupportedValueError(f"metadata: orbax's custom metadata is a dict, got {type(metadata).__name__}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise UnsupportedValueError(f"metadata: orbax stores custom metadata as JSON: {e}") from e


def write(path: str, tree_or_flat: Any, *, metadata: dict | None = None) -> None:
    """Write an orbax checkpoint with ``StandardCheckpointer`` (OCDBT), readable
    by ``ocp.StandardCheckpointer().restore(path, abstract)``. A flat dict (see
    ``_is_flat``) is nested by splitting keys on ``/``. Leaves: numpy / jax
    arrays (sharded: orbax writes the shards), typed PRNG keys (orbax stores
    key data + impl, and restores a key for a key-typed target), python int /
    float / bool (orbax scalars), numpy and complex scalars (as 0-d arrays).
    Refused (``UnsupportedValueError`` naming the key): strings, objects,
    float0, zero-size arrays, ints outside int64. ``metadata``: a JSON dict,
    the ``custom_metadata``. ``path`` must not exist (``CheckpointExistsError``).
    """
    ocp, path = _ocp(), os.fspath(path)
    if "://" in path:
        raise UnsupportedLocationError(f"{path}: orbax checkpoints are written to local directories only")
    if os.path.lexists(path):
        raise CheckpointExistsError(f"{path} already exists")
    tree = _nest(tree_or_flat) if _is_flat(tree_or_flat) else tree_or_flat
    tree = jax.tree_util.tree_map_with_path(lambda p, x: _prepare_leaf(tree_mod.path_str(p), x), tree)
    _check_metadata(metadata)
    with _orbax_errors(path, "write the checkpoint", CheckpointError), ocp.StandardCheckpointer() as ck:
        ck.save(os.path.abspath(path), tree, custom_metadata=metadata)
        ck.wait_until_finished()
