"""Every supported format behind the public functions: jaxckpt's own
(``jaxckpt/api.py``) and the foreign ones, each a module with one shape
(``describe`` / ``iter_tensors`` / ``read`` / ``write``): ``fmt_orbax``
(through orbax), ``fmt_flax`` (flax msgpack files), ``fmt_mindspore``
(``.ckpt``, plain or encrypted) and ``fmt_safetensors``.

A foreign checkpoint is seen as a flat dict ``{key: numpy array}``: MindSpore
and safetensors names exactly as stored, orbax and flax key paths joined with
``/`` as jaxckpt joins them. ``format=None`` detects the format from what is
at the path (``detect``). ``convert`` streams one tensor at a time where both
formats allow it (MindSpore and safetensors sources and destinations).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from jaxckpt import api
from jaxckpt import arrayinfo
from jaxckpt import checkpointer
from jaxckpt import crypto
from jaxckpt import display
from jaxckpt import localcopy
from jaxckpt import progress as progress_mod
from jaxckpt import storage
from jaxckpt import tree as tree_mod
from jaxckpt.errors import (CheckpointExistsError, CheckpointNotFoundError, UnsupportedLocationError,
                            UnsupportedValueError)

FORMATS = ("jaxckpt", "orbax", "flax", "mindspore", "safetensors")
EXPORTS = ("jaxckpt", "orbax", "safetensors", "mindspore")
_HEAD_BYTES = 64 << 10


class UnknownFormatError(UnsupportedValueError):
    """What is at a path is no checkpoint format jaxckpt reads (or ``format=`` names none)."""


def _module(name: str) -> Any:
    if name == "orbax":
        from jaxckpt import fmt_orbax as m
    elif name == "flax":
        from jaxckpt import fmt_flax as m
    elif name == "mindspore":
        from jaxckpt import fmt_mindspore as m
    elif name == "safetensors":
        from jaxckpt import fmt_safetensors as m
    else:
        raise UnknownFormatError(f"unknown format {name!r} (supported: {', '.join(FORMATS)})")
    return m


# ----------------------------------------------------------------------------- detection
def detect(path: str | os.PathLike) -> str:
    """The format of the checkpoint at ``path`` (one of ``FORMATS``): a path or a URL."""
    loc = storage.Location.parse(path)
    be = storage.backend(loc)
    if loc.is_local:
        p = loc.path
        if os.path.isdir(p):
            if be.is_committed(loc, follow=True):
                return "jaxckpt"
            if _module("orbax").sniff(p):
                return "orbax"
            return "jaxckpt"  # not a checkpoint: jaxckpt's reader says what is missing
        if not os.path.lexists(p):
            raise CheckpointNotFoundError(f"{p}: no such file or directory")
    elif be.is_committed(loc):  # first: one request for the common case
        return "jaxckpt"
    return _detect_uncommitted(loc, be)


def _detect_uncommitted(loc: storage.Location, be: Any) -> str:
    """``detect`` where no jaxckpt manifest is (or a directory on disk is not)."""
    try:
        with be.open_file(loc) as f:
            head, size = f.pread(_HEAD_BYTES, 0), f.size
    except CheckpointNotFoundError:
        if loc.is_local:
            raise
        return "orbax" if _has_orbax_files(loc) else "jaxckpt"  # else jaxckpt's reader says what is missing
    return _sniffed(str(loc), size, head)


def _has_orbax_files(loc: Any) -> bool:
    """Whether the prefix ``loc`` holds one of the files of an orbax step or item (a HEAD each)."""
    return any(storage.is_file(loc.join(name)) for name in _module("orbax").MARKERS)


def _orbax_in_bucket(path: Any, fmt_name: str, options: dict | None) -> Any:
    """The location of an orbax checkpoint in a bucket, which is read through a
    local copy (``localcopy``: orbax reads local directories); else None."""
    if fmt_name != "orbax":
        return None
    loc = storage.Location.parse(path, options)
    return None if loc.is_local else loc


@contextlib.contextmanager
def _readable(path: Any, fmt_name: str, options: dict | None) -> Iterator[Any]:
    """Where a foreign checkpoint is read from: its ``Location`` (a single file),
    its local directory (orbax), or a local copy of an orbax checkpoint in a bucket."""
    loc = _orbax_in_bucket(path, fmt_name, options)
    if loc is None:
        yield _where(path, fmt_name, options)
        return
    with localcopy.copied(loc) as local:
        yield local


_COPY_UP = {"gs": "gcloud storage cp -r ./ck gs://{}", "s3": "aws s3 cp --recursive ./ck s3://{}",
            "az": "azcopy copy --recursive ./ck https://<account>.blob.core.windows.net/{}"}


def _sniffed(where: str, size: int, head: bytes) -> str:
    """The format of a single file from its size and first bytes."""
    if _module("mindspore").sniff(head):
        return "mindspore"
    if _module("safetensors").sniff(size, head):
        return "safetensors"
    if _module("flax").sniff(size, head):
        return "flax"
    raise UnknownFormatError(f"{where}: not a checkpoint of a supported format (found a {size}-byte file "
                             f"starting with {head[:8]!r}; supported: a jaxckpt or orbax checkpoint directory, a "
                             "flax msgpack file, a MindSpore .ckpt, a .safetensors file)")


def _format_of(path: Any, format: str | None) -> str:
    if format is None:
        return detect(path)
    if format not in FORMATS:
        raise UnknownFormatError(f"unknown format {format!r} (supported: {', '.join(FORMATS)})")
    return format


def _jaxckpt_first(path: Any, format: str | None, options: dict | None,
                   read: Callable[[], Any]) -> tuple[str | None, Any]:
    """``(None, read())`` for a jaxckpt checkpoint (``read``: jaxckpt's own
    read of it), else ``(the format's name, None)``. On a URL with no
    ``format``, ``read`` comes first: its manifest GET tells a jaxckpt
    checkpoint with no request of its own (a HEAD before it was a round trip
    more per restore); other formats are looked for only once it found no
    manifest there."""
    where = path if options is None else storage.Location.parse(path, options)
    if format is None and not storage.Location.parse(path, options).is_local:
        try:
            return None, read()
        except CheckpointNotFoundError:
            loc = storage.Location.parse(where)
            fmt_name = _detect_uncommitted(loc, storage.backend(loc))
            if fmt_name == "jaxckpt":
                raise
            return fmt_name, None
    fmt_name = _format_of(where, format)
    return (None, read()) if fmt_name == "jaxckpt" else (fmt_name, None)


def _where(path: Any, fmt_name: str, options: dict | None = None) -> Any:
    """Where a foreign checkpoint is read or written: the ``Location`` (a path or
    a URL) of a single-file format; the local directory of an orbax checkpoint."""
    loc = storage.Location.parse(path, options)
    if fmt_name != "orbax":
        return loc
    if not loc.is_local:
        raise UnsupportedLocationError(f"{loc}: orbax checkpoints are written to local directories only; write it "
                                       f"to one, then copy it up (e.g. {_COPY_UP[loc.scheme].format(loc.path)})")
    return loc.path


def _decryption(fmt_name: str, dec_key: Any, dec_mode: str) -> dict:
    if fmt_name == "mindspore":
        return {"dec_key": dec_key, "dec_mode": dec_mode}
    if dec_key is not None:
        raise UnsupportedValueError(f"dec_key is for encrypted MindSpore checkpoints; a {fmt_name} checkpoint "
                                    "is not encrypted that way")
    return {}


# ----------------------------------------------------------------------------- reading
def load_checkpoint(path: str | os.PathLike, *, format: str | None = None, dec_key: bytes | None = None,
                    dec_mode: str = "AES-GCM", verify: bool = True, progress: bool | None = None,
                    mmap: bool = True, storage_options: dict | None = None,
                    encryption_key: crypto.Key | None = None) -> dict[str, Any]:
    """The flat view of any supported checkpoint: ``{key: value}`` (MindSpore's
    ``load_checkpoint``). ``format``: one of ``FORMATS``, detected when None.
    ``dec_key`` / ``dec_mode``: for encrypted MindSpore files (``"AES-GCM"``,
    ``"AES-CBC"``, ``"SM4-CBC"``). Foreign formats give numpy arrays of the
    stored dtype (0-d for scalars); ``verify``, ``progress``, ``mmap``,
    ``storage_options`` and ``encryption_key`` are those of ``restore``
    (jaxckpt checkpoints)."""
    fmt_name, flat = _jaxckpt_first(path, format, storage_options, lambda: api.load_checkpoint(
        path, verify=verify, progress=progress, mmap=mmap, storage_options=storage_options,
        encryption_key=encryption_key))
    if fmt_name is None:
        return flat
    with _readable(path, fmt_name, storage_options) as where:
        return _module(fmt_name).read(where, **_decryption(fmt_name, dec_key, dec_mode))


def inspect(path: str | os.PathLike, *, format: str | None = None, dec_key: bytes | None = None,
            dec_mode: str = "AES-GCM", storage_options: dict | None = None,
            encryption_key: crypto.Key | None = None) -> api.CheckpointInfo:
    """Names, shapes, dtypes and sizes of any supported checkpoint (no array
    data read where the format allows), and what it stores besides
    (``metadata``: jaxckpt's metadata; a foreign format's extras)."""
    fmt_name, info = _jaxckpt_first(path, format, storage_options, lambda: api.inspect(
        path, storage_options=storage_options, encryption_key=encryption_key))
    if fmt_name is None:
        return info
    with _readable(path, fmt_name, storage_options) as where:
        found = _module(fmt_name).describe(where, **_decryption(fmt_name, dec_key, dec_mode))
    rows, extra = (found, {}) if fmt_name == "mindspore" else found
    leaves = tuple(api.LeafInfo(name, "array", tuple(shape), str(dtype), int(nbytes))
                   for name, dtype, shape, nbytes in rows)
    return api.CheckpointInfo(str(storage.Location.parse(path)), None, fmt_name, None, extra or None,
                              sum(x.nbytes for x in leaves), leaves)


def restore(path: str | os.PathLike, target: Any = None, *, format: str | None = None, partial: bool = False,
            verify: bool = True, progress: bool | None = None, mmap: bool = True,
            storage_options: dict | None = None, encryption_key: crypto.Key | None = None) -> Any:
    """``api.restore`` for jaxckpt checkpoints; orbax and flax checkpoints
    restore the same way: ``target=None`` gives nested dicts of numpy arrays,
    a target gives its structure, dtypes and shardings (``partial=True``: a
    subset of the checkpoint's keys)."""
    fmt_name, restored = _jaxckpt_first(path, format, storage_options, lambda: api.restore(
        path, target, partial=partial, verify=verify, progress=progress, mmap=mmap,
        storage_options=storage_options, encryption_key=encryption_key))
    if fmt_name is None:
        return restored
    if fmt_name not in ("orbax", "flax"):
        raise UnsupportedValueError(f"{path}: restore() reads jaxckpt, orbax and flax checkpoints; for a "
                                    f"{fmt_name} file use load_checkpoint() or load_into()")
    with _readable(path, fmt_name, storage_options) as p:
        if target is None:
            return _nested(_module(fmt_name).read(p))
        if fmt_name == "orbax" and not partial:
            return _module("orbax").read(p, target=target)
        filled, _ = load_into(target, _module(fmt_name).read(p), strict=not partial)
        return filled


def load_into(target: Any, source: str | os.PathLike | Mapping[str, Any], *, strict: bool = True,
              format: str | None = None, dec_key: bytes | None = None, dec_mode: str = "AES-GCM",
              key_map: Callable[[str], str | None] | None = None, verify: bool = True, mmap: bool = True,
              storage_options: dict | None = None, encryption_key: crypto.Key | None = None
              ) -> tuple[Any, api.LoadReport]:
    """Fill ``target`` from matching keys of ``source`` (MindSpore's
    ``load_param_into_net``): a checkpoint of any supported format, or a flat
    dict. ``key_map(source_key)`` returns the target key path for a source key,
    or None to drop it (e.g. ``lambda k: k.replace(".", "/")`` for MindSpore
    names); the ``LoadReport`` names keys after mapping. Other arguments as in
    ``load_checkpoint`` and ``api.load_into``."""
    if isinstance(source, Mapping):
        flat = source
    else:
        if key_map is None:
            fmt_name, filled = _jaxckpt_first(source, format, storage_options, lambda: api.load_into(
                target, source, strict=strict, verify=verify, mmap=mmap, storage_options=storage_options,
                encryption_key=encryption_key))
            if fmt_name is None:
                return filled
        else:
            fmt_name = _format_of(source if storage_options is None else storage.Location.parse(
                source, storage_options), format)
        flat = load_checkpoint(source, format=fmt_name, dec_key=dec_key, dec_mode=dec_mode, verify=verify,
                               mmap=mmap, storage_options=storage_options, encryption_key=encryption_key)
    if key_map is not None:
        flat = _mapped(flat, key_map)
    return api.load_into(target, _as_targets(flat, target), strict=strict)


def _mapped(flat: Mapping[str, Any], key_map: Callable[[str], str | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        new = key_map(k)
        if new is None:
            continue
        if new in out:
            raise UnsupportedValueError(f"key_map sends two source keys to {new!r} (one of them {k!r})")
        out[new] = v
    return out


def _as_targets(flat: Mapping[str, Any], target: Any) -> Mapping[str, Any]:
    """PRNG key data (foreign formats store keys as their uint32 data) as key
    arrays where the target holds a key at that path."""
    paths, leaves, _ = tree_mod.leaf_paths(target)
    keys = {p: t for p, t in zip(paths, leaves) if arrayinfo.is_key_dtype(getattr(t, "dtype", None))}
    if not keys or not any(p in flat and not arrayinfo.is_key_array(flat[p]) for p in keys):
        return flat
    import jax
    out = dict(flat)
    for p, t in keys.items():
        if p in out and not arrayinfo.is_key_array(out[p]):
            out[p] = jax.random.wrap_key_data(np.asarray(out[p]), impl=jax.random.key_impl(t))
    return out


# ----------------------------------------------------------------------------- converting
def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str = "jaxckpt", format: str | None = None,
            dec_key: bytes | None = None, dec_mode: str = "AES-GCM", enc_key: bytes | None = None,
            enc_mode: str = "AES-GCM", progress: bool | None = None, storage_options: dict | None = None,
            encryption_key: crypto.Key | None = None, new_encryption_key: crypto.Key | None = None,
            dst_storage_options: dict | None = None, overwrite: bool = False) -> None:
    """Write the checkpoint ``src`` (any supported format) as a new checkpoint
    ``dst`` in format ``to`` (one of ``EXPORTS``). ``dec_key`` / ``dec_mode``:
    an encrypted MindSpore source; ``enc_key`` / ``enc_mode``: encrypt a
    MindSpore destination. Tensors stream one at a time between MindSpore and
    safetensors files (memory: the largest tensor plus a buffer); jaxckpt and
    orbax destinations are written from the whole tree. What a destination
    cannot hold (a PRNG key or a string into safetensors, ...) raises
    ``UnsupportedValueError`` naming the key, before ``dst`` is created.
    ``encryption_key``: the key of an encrypted jaxckpt ``src``, and of a jaxckpt
    ``dst`` (other formats are written in plaintext); ``new_encryption_key``:
    encrypt a jaxckpt ``dst`` with it instead (key rotation). A jaxckpt ``src``'s
    metadata goes with it. ``storage_options``: for ``src``, and ``dst`` unless
    ``dst_storage_options`` is given. An existing ``dst`` raises
    ``CheckpointExistsError`` unless ``overwrite`` (then replaced atomically;
    an orbax one never is)."""
    dst_key = _destination_key(to, enc_key, encryption_key, new_encryption_key)
    src = storage.Location.parse(src, storage_options)  # each side keeps its own options from here on
    dst = storage.Location.parse(dst, storage_options if dst_storage_options is None else dst_storage_options)
    src_fmt = _format_of(src, format)
    out = _where(dst, to)  # an orbax URL is refused before anything is read
    _check_destination(out, to, overwrite)
    if (bucket := _orbax_in_bucket(src, src_fmt, None)) is not None:
        with localcopy.copied(bucket) as local:  # one local copy serves the whole conversion
            return convert(local, dst, to=to, format="orbax", enc_key=enc_key, enc_mode=enc_mode, progress=progress,
                           new_encryption_key=dst_key, overwrite=overwrite)
    items = _source_items(src, src_fmt, dec_key, dec_mode, encryption_key)
    with progress_mod.progress_bar(f"convert {src} -> {dst}",
                                   _total_bytes(src, src_fmt, encryption_key),
                                   enabled=progress, min_bytes=progress_mod.AUTO_MIN_BYTES) as bar:
        items = _counted(items, bar)
        plain, layout = _laid_out(src, src_fmt, to, ((k, _plain(k, v, to)) for k, v in items), dec_key, dec_mode)
        if to == "mindspore":
            from jaxckpt import fmt_mindspore_write

            fmt_mindspore_write.write(out, plain, enc_key=enc_key, enc_mode=enc_mode, layout=layout)
        elif to == "safetensors" and layout is not None:
            _module("safetensors").write_streamed(out, layout, plain, in_order=True,
                                                  metadata=_carried_metadata(src, src_fmt, None))
        elif to == "safetensors":  # jaxckpt / orbax values: mapped files / one restore, not streamed
            _module("safetensors").write(out, list(plain),
                                         metadata=_carried_metadata(src, src_fmt, encryption_key))
        elif to == "orbax":
            _module("orbax").write(out, dict(items))
        else:
            _save_jaxckpt(src, src_fmt, dst, items, encryption_key, dst_key, overwrite)


def _save_jaxckpt(src: storage.Location, src_fmt: str, dst: storage.Location, items: Iterable[tuple[str, Any]],
                  encryption_key: Any, dst_key: Any, overwrite: bool) -> None:
    """A jaxckpt destination: a jaxckpt source whole, with its metadata (a manager's step record: time,
    metrics), or the flat items nested."""
    if src_fmt == "jaxckpt":
        tree, meta = api.restore(src, encryption_key=encryption_key), api.inspect(src, encryption_key=encryption_key)
        checkpointer.save_sync(dst, tree, metadata=meta.metadata, encryption_key=dst_key, overwrite=overwrite)
    else:
        checkpointer.save_sync(dst, _nested(dict(items)), encryption_key=dst_key, overwrite=overwrite)


def _check_destination(out: Any, to: str, overwrite: bool) -> None:
    """A file destination (safetensors, MindSpore) that exists is replaced only with ``overwrite``, and never
    where a directory (a bucket prefix in use: a checkpoint, say) is; an orbax one is never replaced."""
    if to == "orbax" and overwrite:
        raise UnsupportedValueError(f"{out}: overwrite: an orbax destination is never replaced; remove it first")
    if to not in ("safetensors", "mindspore"):
        return  # jaxckpt: the save refuses (or replaces) it; orbax: its writer refuses it
    if out.is_local:
        directory, there = os.path.isdir(out.path), os.path.lexists(out.path)
    else:
        directory = storage.backend(out).exists(out)
        there = directory or storage.is_file(out)
    if directory:
        raise CheckpointExistsError(f"{out}: a directory is there; refusing to replace it with a file")
    if there and not overwrite:
        raise CheckpointExistsError(f"{out}: exists (pass overwrite=True, or --overwrite on the command line, "
                                    "to replace it)")


def _laid_out(src: storage.Location, src_fmt: str, to: str, plain: Iterator[tuple[str, np.ndarray]],
              dec_key: Any, dec_mode: str) -> tuple[Iterable[tuple[str, np.ndarray]], list | None]:
    """The values to write and, for a tensor-file destination, their (name, dtype,
    shape) in the order they come: with it the file is written front to back and a
    bucket streams it up. A file source's come from ``describe`` (in ``iter_tensors``'
    order, one tensor in memory at a time); a checkpoint's values, all at hand (mapped
    or read), give their own. Layout None: safetensors from a checkpoint (``write``)."""
    if to not in ("mindspore", "safetensors"):
        return plain, None
    if src_fmt in ("mindspore", "safetensors", "flax"):
        info = inspect(src, format=src_fmt, dec_key=dec_key, dec_mode=dec_mode)
        return plain, [(x.path, x.dtype, x.shape) for x in info.leaves]
    if to == "safetensors":
        return plain, None
    values = list(plain)
    return values, [(k, v.dtype, v.shape) for k, v in values]


def _destination_key(to: str, enc_key: Any, encryption_key: Any, new_encryption_key: Any) -> Any:
    """The key a jaxckpt destination is encrypted with; the arguments checked against ``to``."""
    if to not in EXPORTS:
        raise UnknownFormatError(f"cannot convert to {to!r} (supported: {', '.join(EXPORTS)})")
    if enc_key is not None and to != "mindspore":
        raise UnsupportedValueError("enc_key encrypts MindSpore destinations only")
    if to != "jaxckpt":  # encryption_key only decrypts the source here
        if new_encryption_key is not None:
            raise UnsupportedValueError(f"new_encryption_key encrypts jaxckpt destinations; {to} files are written "
                                        "in plaintext (MindSpore: enc_key=)")
        return None
    return encryption_key if new_encryption_key is None else new_encryption_key


def _total_bytes(src: storage.Location, src_fmt: str, encryption_key: Any) -> int:
    if src_fmt in ("jaxckpt", "orbax"):
        return inspect(src, format=src_fmt, encryption_key=encryption_key).total_bytes
    with storage.open_file(_where(src, src_fmt)) as f:
        return f.size  # a file: its size is close enough for a bar


def _carried_metadata(src: storage.Location, src_fmt: str, encryption_key: Any) -> dict[str, str] | None:
    """What a safetensors destination's ``__metadata__`` carries (str -> str): a safetensors source's own,
    a jaxckpt source's metadata as JSON."""
    if src_fmt == "safetensors":
        return _module("safetensors").describe(src)[1]["metadata"]
    if src_fmt != "jaxckpt":
        return None
    import json
    meta = api.inspect(src, encryption_key=encryption_key).metadata
    return {"format": "jaxckpt", "jaxckpt_metadata": json.dumps(display.jsonable(meta), sort_keys=True)}


def _counted(items: Iterable[tuple[str, Any]], bar: Any) -> Iterator[tuple[str, Any]]:
    for k, v in items:
        bar.update(int(getattr(v, "nbytes", 0)), leaves=1)
        yield k, v


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    try:
        return tree_mod.nest(flat)
    except ValueError as e:
        raise UnsupportedValueError(f"cannot nest the flat keys into a tree: {e}") from None


def _source_items(src: storage.Location, src_fmt: str, dec_key: Any, dec_mode: str,
                  encryption_key: Any) -> Iterator[tuple[str, Any]]:
    if src_fmt == "jaxckpt":
        return iter(api.load_checkpoint(src, encryption_key=encryption_key).items())
    where = _where(src, src_fmt)
    return _module(src_fmt).iter_tensors(where, **_decryption(src_fmt, dec_key, dec_mode))


def _plain(key: str, value: Any, to: str) -> np.ndarray:
    """A value as a plain numpy array for a tensor-only format; ``UnsupportedValueError`` for what cannot go."""
    if arrayinfo.is_key_array(value):
        raise UnsupportedValueError(f"{key!r}: a PRNG key cannot be carried into {to} (it holds plain arrays "
                                    "only); drop it, or store jax.random.key_data(key) instead")
    if isinstance(value, str) and to == "mindspore":
        return np.array(value)  # MindSpore stores a str (append_dict)
    if value is None or isinstance(value, (str, bytes)) or (isinstance(value, np.ndarray) and value.dtype == object):
        raise UnsupportedValueError(f"{key!r}: a {type(value).__name__} value cannot be carried into {to}, which "
                                    "holds arrays only")
    return np.asarray(value)

