"""The manifest a save commits, built from its snapshot's tree and every
process's shard records (for ``jaxckpt/writer.py``; the bytes are
``format.encode_manifest``'s, docs/FORMAT.md).

A shard record is ``(file index, (leaf, box, offset, length, checksums))``:
``shard_records`` makes this process's from its files' layouts and the
checksums its writes computed; other processes send theirs through the
coordination service as msgpack lists (``from_report``). ``encode`` never
returns a manifest our own reader would reject.
"""

from __future__ import annotations

import time
from typing import Any

from jaxckpt import format as fmt
from jaxckpt import gcpause
from jaxckpt import layout as layout_mod
from jaxckpt import tree as tree_mod
from jaxckpt import version
from jaxckpt.errors import CorruptCheckpointError, UnsupportedValueError
from jaxckpt.snapshot import Snapshot


def shard_records(snap: Snapshot, layouts: list[layout_mod.Layout], sums: list[list[list[int]]]) -> list[tuple]:
    """This process's shard records: (index of its data file, (leaf, box, offset, length, checksums)),
    from the layout of each of its files and the checksums."""
    # Zero-byte shards are left out: an empty array has no shards, and a
    # checkpoint holding only empty arrays lists no data file to point at.
    with gcpause.paused():
        return [(fi, (li, box, lay.shard_offsets[li][si], arr.nbytes, tuple(sums[li][si])))
                for fi, lay in enumerate(layouts) for li in lay.leaves
                for si, (box, arr) in enumerate(snap.leaves[li].shards) if arr.nbytes]


def from_report(shard: list) -> tuple:
    """A shard record received from another process (msgpack lists) as tuples."""
    li, box, offset, length, sums = shard
    return li, tuple(tuple(b) for b in box), offset, length, tuple(sums)


def encode(snap: Snapshot, metadata: Any, files: list[fmt.FileRecord], shards: list[tuple[int, list]],
           path: str, full_check: bool = False) -> bytes:
    """Encode the manifest from the snapshot's tree and every process's shard
    records (``(file index, [leaf, box, offset, length, checksums])``).

    Never returns a manifest our own reader would reject: with shards from
    other processes the full decoder checks that they tile every array; else
    the cheaper ``check_writable`` checks the caps on what the user stored.
    """
    with gcpause.paused():  # ~5 objects per leaf, acyclic: see jaxckpt/gcpause.py
        manifest = _build(snap, metadata, files, shards)
        data = fmt.encode_manifest(manifest)
        try:
            if full_check:
                fmt.decode_manifest(data, f"{path} (manifest being written)")
            else:
                fmt.check_writable(manifest, data, f"{path} (manifest being written)")
        except CorruptCheckpointError as e:
            raise UnsupportedValueError(f"refusing to write a checkpoint that cannot be read back: {e}") from None
        return data


def _build(snap: Snapshot, metadata: Any, files: list[fmt.FileRecord], shards: list[tuple[int, list]]
           ) -> fmt.Manifest:
    tree_desc, paths = tree_mod.describe(snap.treedef)
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise UnsupportedValueError(f"leaf {dup!r}: two leaves have the same key path (e.g. keys 1 and '1')")
    per_leaf: list[list[fmt.ShardRecord]] = [[] for _ in snap.leaves]
    for file_index, (li, box, offset, length, sums) in shards:
        per_leaf[li].append(fmt.ShardRecord(box, file_index, offset, length, sums))
    records = []
    for i, (leaf, path, mine) in enumerate(zip(snap.leaves, paths, per_leaf)):
        if not i & 63:
            layout_mod.let_others_run()
        if leaf.kind == "value":
            records.append(fmt.LeafRecord(path, "value", value=leaf.value))
        else:
            if len(mine) > 1:
                mine.sort(key=lambda r: r.box)
            records.append(fmt.LeafRecord(path, leaf.kind, leaf.dtype, tuple(leaf.shape), tuple(mine), impl=leaf.impl))
    return fmt.Manifest(fmt.FORMAT_VERSION, f"jaxckpt {version.VERSION}", time.time(), fmt.CHUNK_BYTES,
                        tuple(files), tree_desc, tuple(records), metadata)


def with_per_process(metadata: Any, per_process: tuple[str, Any] | None, values: list[Any]) -> Any:
    """The metadata to commit: ``metadata`` (a dict) with ``key: [value of each process]``."""
    if per_process is None:
        return metadata
    if metadata is not None and not isinstance(metadata, dict):
        raise UnsupportedValueError(f"per-process values need dict metadata, found {type(metadata).__name__}")
    return {**(metadata or {}), per_process[0]: values}
