"""The functional API: save, restore, load_checkpoint, load_into, inspect.

Restore matches leaves by their flat key path (``params/Dense_0/kernel``), so a
target may use other container types than the saved tree (a FrozenDict for a
dict, a TrainState for the dict a notebook saved) as long as the paths agree.
"""

from __future__ import annotations

import dataclasses
import html
import os
import pprint
from typing import Any, Mapping

import jax
import numpy as np

from jaxckpt import gcpause
from jaxckpt import checkpointer
from jaxckpt import crypto
from jaxckpt import display
from jaxckpt import format as fmt
from jaxckpt import progress as progress_mod
from jaxckpt import reader as reader_mod
from jaxckpt import targets
from jaxckpt import tree as tree_mod
from jaxckpt.errors import StructureMismatchError


# ------------------------------------------------------------------ save
def save(path: str | os.PathLike, tree: Any, *, metadata: Any = None, overwrite: bool = False,
         storage_options: dict | None = None, encryption_key: crypto.Key | None = None,
         file_mode: int | None = None, dir_mode: int | None = None) -> None:
    """Write ``tree`` to the checkpoint directory ``path`` (a local path, or an
    ``s3://`` / ``gs://`` / ``az://`` URL), atomically and durably.

    ``metadata``: msgpack-able plain values stored with the checkpoint.
    Raises ``CheckpointExistsError`` if ``path`` exists and ``overwrite`` is False.
    ``storage_options``: for ``s3://`` / ``gs://`` / ``az://`` paths, passed to the object-store client (endpoint, region, credentials...; see the README).
    ``encryption_key``: 16, 24 or 32 bytes (or a callable returning them): the
    checkpoint is encrypted, arrays and manifest (docs/FORMAT.md §12).
    ``file_mode`` / ``dir_mode``: permission bits of what is created (default: umask).
    """
    checkpointer.save_sync(path, tree, metadata=metadata, overwrite=overwrite, storage_options=storage_options,
                           encryption_key=encryption_key, file_mode=file_mode, dir_mode=dir_mode)


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


def inspect(path: str | os.PathLike, *, storage_options: dict | None = None,
            encryption_key: crypto.Key | None = None) -> CheckpointInfo:
    """Read only the manifest: version, metadata, and per leaf path/shape/dtype/size.
    ``storage_options`` and ``encryption_key`` as in ``save``."""
    with reader_mod.CheckpointReader(path, storage_options=storage_options, encryption_key=encryption_key) as r:
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
            targets.check_key_record(r, r.manifest.leaves[i])
    got = r.read([(i, None) for i in arrays], verify=verify, progress=progress, mappable=[mmap] * len(arrays))
    host = dict(zip(arrays, got))
    return {i: _host_value(r.manifest.leaves[i], host.get(i)) for i in indices}


def restore(path: str | os.PathLike, target: Any = None, *, partial: bool = False, verify: bool = True,
            progress: bool | None = None, mmap: bool = True, storage_options: dict | None = None,
            encryption_key: crypto.Key | None = None) -> Any:
    """Read a checkpoint (a local path, or an ``s3://`` / ``gs://`` / ``az://`` URL).

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
    never does). ``mmap=False``: every array in fresh memory (objects in a
    bucket or encrypted are never mapped). ``storage_options`` and
    ``encryption_key`` as in ``save``.
    """
    # One pause of the cyclic collector for the whole restore (see jaxckpt/gcpause.py):
    # pausing stage by stage let each stage's survivors (a 10,000-leaf
    # manifest, then the host arrays) be traversed by a collection in the next.
    with gcpause.paused():
        return _restore(path, target, partial, verify, progress, mmap, storage_options, encryption_key)


def _restore(path: str | os.PathLike, target: Any, partial: bool, verify: bool, progress: bool | None,
             mmap: bool, storage_options: dict | None, encryption_key: Any) -> Any:
    with reader_mod.CheckpointReader(path, storage_options=storage_options, encryption_key=encryption_key) as r, \
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
        out = targets.fill(r, paths, tleaves, verify, bar.callback, mmap)
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


# ------------------------------------------------------------------ flat views
def load_checkpoint(path: str | os.PathLike, *, verify: bool = True, progress: bool | None = None,
                    mmap: bool = True, storage_options: dict | None = None,
                    encryption_key: crypto.Key | None = None) -> dict[str, Any]:
    """The flat view: ``{"params/Dense_0/kernel": ndarray, "step": 3, ...}`` (MindSpore's ``load_checkpoint``).
    ``progress``, ``mmap``, ``storage_options`` and ``encryption_key`` as in ``restore``."""
    with reader_mod.CheckpointReader(path, storage_options=storage_options, encryption_key=encryption_key) as r, \
            progress_mod.for_restore(r.path, r.manifest.total_bytes, len(r.manifest.leaves), progress) as bar:
        values = _read_all(r, list(range(len(r.manifest.leaves))), verify, bar.callback, mmap)
        return {leaf.path: values[i] for i, leaf in enumerate(r.manifest.leaves)}


def load_into(target: Any, source: str | os.PathLike | Mapping[str, Any], *, strict: bool = True,
              verify: bool = True, mmap: bool = True, storage_options: dict | None = None,
              encryption_key: crypto.Key | None = None) -> tuple[Any, LoadReport]:
    """Fill ``target`` from matching keys of ``source`` (a checkpoint path or a flat
    dict as returned by ``load_checkpoint``); MindSpore's ``load_param_into_net``.

    Returns ``(new_tree, LoadReport)``. ``strict=True`` raises
    ``StructureMismatchError`` when keys are missing or unexpected;
    ``strict=False`` keeps the target's value for missing keys. ``mmap``,
    ``storage_options`` and ``encryption_key`` as in ``restore``.
    """
    paths, tleaves, treedef = tree_mod.leaf_paths(target)
    if isinstance(source, Mapping):
        keys = set(source)
        where = "source dict"
    else:
        r = reader_mod.CheckpointReader(source, storage_options=storage_options, encryption_key=encryption_key)
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
            out[i] = targets.convert_checked(where, p, source[p], tleaves[i])
    else:
        with r:
            filled = targets.fill(r, [p for _, p in present], [tleaves[i] for i, _ in present], verify, mmap=mmap)
        for (i, _), v in zip(present, filled):
            out[i] = v
    return treedef.unflatten(out), report
