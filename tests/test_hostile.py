"""Hostile manifests and planted files (issue 2, "Format": readers enforce ...).

Every manifest here carries a valid xxh3 envelope, so the checks behind the
checksum are what is exercised. Each must yield CorruptCheckpointError: never
another exception, a hang, a huge allocation or a read outside the directory.
"""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
import textwrap
from typing import Any, Callable

import jax
import msgpack
import numpy as np
import pytest

import jaxckpt
from jaxckpt import format as fmt

DATA = "data-00000.bin"
A = np.arange(16, dtype=np.float32)                     # 64 bytes at offset 0
B = np.arange(8, dtype=np.int64).reshape(2, 4)          # 64 bytes at offset 64


def seal(body_bytes: bytes) -> bytes:
    """A manifest envelope with a correct checksum around ``body_bytes``."""
    return msgpack.packb({"format": "jaxckpt", "version": 1, "body": body_bytes, "xxh3": fmt.checksum(body_bytes)},
                         use_bin_type=True)


def write_body(path, body: Any) -> None:
    (path / fmt.MANIFEST_NAME).write_bytes(seal(msgpack.packb(body, use_bin_type=True)))


def read_body(path) -> dict:
    outer = msgpack.unpackb((path / fmt.MANIFEST_NAME).read_bytes(), raw=False)
    return msgpack.unpackb(outer["body"], raw=False, strict_map_key=False)


@pytest.fixture
def ckpt(ckdir):
    p = ckdir / "c"
    jaxckpt.save(p, {"a": A, "b": B, "n": 3})
    body = read_body(p)
    assert [leaf["path"] for leaf in body["leaves"]] == ["a", "b", "n"]
    assert [s["offset"] for leaf in body["leaves"][:2] for s in leaf["shards"]] == [0, 64]
    assert body["files"] == [{"name": DATA, "size": 128}]
    return p


READERS: dict[str, Callable] = {
    "inspect": jaxckpt.inspect,
    "restore": jaxckpt.restore,
    "restore_target": lambda p: jaxckpt.restore(p, {"a": A, "b": B, "n": 0}),
    "load_checkpoint": jaxckpt.load_checkpoint,
    "load_into": lambda p: jaxckpt.load_into({"a": A, "b": B, "n": 0}, p),
}


def assert_corrupt(path, pattern: str, readers=tuple(READERS)) -> str:
    """Every reader raises CorruptCheckpointError with a message matching ``pattern``."""
    msgs = set()
    for name in readers:
        with pytest.raises(jaxckpt.CorruptCheckpointError) as ei:
            READERS[name](path)
        msgs.add(str(ei.value))
        assert re.search(pattern, str(ei.value)), (name, str(ei.value))
    assert len(msgs) == 1, msgs
    return msgs.pop()


def mutated(body: dict, fn: Callable[[dict], Any]) -> dict:
    b = copy.deepcopy(body)
    fn(b)
    return b


def leaf(b: dict, i: int) -> dict:
    return b["leaves"][i]


def shard(b: dict, i: int, j: int = 0) -> dict:
    return b["leaves"][i]["shards"][j]


def _set(d: dict, k: str, v: Any) -> Callable[[dict], None]:
    return lambda b: d(b).__setitem__(k, v)


MANIFEST_CASES = {
    # shapes and sizes
    "huge_shape": (lambda b: leaf(b, 0).__setitem__("shape", [2**40, 2**40]),
                   r"leaf 'a': shape \[1099511627776, 1099511627776\] x itemsize 4 exceeds the cap of 281474976710656 bytes"),
    "shape_overflows_int64": (lambda b: leaf(b, 0).__setitem__("shape", [2**24] * 4),
                              r"leaf 'a': shape .* exceeds the cap"),
    "too_many_dims": (lambda b: leaf(b, 0).__setitem__("shape", [1] * 65), r"leaf 'a': 65 dimensions, above the cap of 64"),
    "negative_dim": (lambda b: leaf(b, 0).__setitem__("shape", [-16]),
                     r"leaf 'a' shape: expected an integer in \[0, 281474976710656\], found -16"),
    "float_dim": (lambda b: leaf(b, 0).__setitem__("shape", [16.0]), r"leaf 'a' shape: expected an integer .* found 16.0"),
    "bool_dim": (lambda b: leaf(b, 0).__setitem__("shape", [True]), r"leaf 'a' shape: expected an integer .* found True"),
    "length_not_shape_x_itemsize": (lambda b: shard(b, 0).__setitem__("length", 60),
                                    r"leaf 'a' shard 0: length 60 bytes but box \[\[0, 16\]\] x itemsize 4 = 64"),
    "box_outside_shape": (lambda b: shard(b, 0).__setitem__("box", [[0, 17]]),
                          r"leaf 'a' shard 0: box dimension 0 must be \[start, stop\] with 0 <= start <= stop <= 16, found \[0, 17\]"),
    "box_reversed": (lambda b: shard(b, 0).__setitem__("box", [[16, 0]]), r"leaf 'a' shard 0: box dimension 0 must be \[start, stop\] with 0 <= start <= stop <= 16, found \[16, 0\]"),
    "box_wrong_rank": (lambda b: shard(b, 0).__setitem__("box", [[0, 16], [0, 1]]), r"leaf 'a' shard 0: box must be a list of 1 \[start, stop\] pairs"),
    "shards_missing": (lambda b: leaf(b, 0).__setitem__("shards", []), r"leaf 'a': shards cover 0 elements, the array has 16"),
    "checksum_count": (lambda b: shard(b, 0).__setitem__("xxh3", [1, 2]),
                       r"leaf 'a' shard 0: expected 1 checksums for 64 bytes in chunks of 16777216, found \[1, 2\]"),
    "checksum_negative": (lambda b: shard(b, 0).__setitem__("xxh3", [-1]), r"leaf 'a' shard 0: checksum -1 is not a 64-bit unsigned integer"),
    "scalar_with_shape": (lambda b: leaf(b, 0).__setitem__("kind", "scalar"),
                          r"leaf 'a': a numpy scalar must have shape \(\), found \[16\]"),
    # offsets
    "negative_offset": (lambda b: shard(b, 1).__setitem__("offset", -64),
                        r"leaf 'b' shard 0: offset must be an integer in \[0, 2\*\*56\], found -64"),
    "overlapping_offsets": (lambda b: shard(b, 1).__setitem__("offset", 32),
                            r"leaves 'a' and 'b' overlap in data-00000.bin at byte 32"),
    "same_offsets": (lambda b: shard(b, 1).__setitem__("offset", 0), r"leaves 'a' and 'b' overlap in data-00000.bin at byte 0"),
    "offset_beyond_file": (lambda b: shard(b, 1).__setitem__("offset", 128),
                           r"leaf 'b': bytes \[128, 192\) lie beyond the end of data-00000.bin \(128 bytes\)"),
    "offset_huge": (lambda b: shard(b, 1).__setitem__("offset", 2**63), r"leaf 'b' shard 0: offset must be an integer in \[0, 2\*\*56\], found 9223372036854775808"),
    "file_index_out_of_range": (lambda b: shard(b, 1).__setitem__("file", 1), r"leaf 'b' shard 0: file index 1 but 1 data files are listed"),
    "file_size_negative": (lambda b: b["files"][0].__setitem__("size", -1), r"files\[0\].size: expected an integer"),
    # file names
    **{f"name_{i}": (lambda b, n=n: b["files"][0].__setitem__("name", n), r"files\[0\]: file name .* is not a plain file name")
       for i, n in enumerate(["../x", "/etc/passwd", "a/b", "..", ".", ".hidden", "", "manifest.msgpack",
                              "x\x00y", "data\\..\\x", "a" * 300, "\u00e9t\u00e9.bin"])},
    "name_listed_twice": (lambda b: b["files"].append(dict(b["files"][0])), r"a data file is listed twice"),
    "name_not_str": (lambda b: b["files"][0].__setitem__("name", b"data-00000.bin"),
                     r"files\[0\]: field 'name' expected str, found bytes"),
    # dtypes and kinds
    **{f"dtype_{d}": (lambda b, d=d: leaf(b, 0).__setitem__("dtype", d), rf"leaf 'a': dtype '{re.escape(d)}' is not in the allow-list")
       for d in ["object", "O", "<f4", "float128", "str", "V8", "void"]},
    "kind_unknown": (lambda b: leaf(b, 0).__setitem__("kind", "pickle"), r"leaf 'a': unknown leaf kind 'pickle'"),
    "key_impl_not_identifier": (lambda b: (leaf(b, 0).__setitem__("kind", "key"), leaf(b, 0).__setitem__("impl", "os.system")),
                                r"leaf 'a': PRNG implementation name 'os.system' is not an identifier"),
    "value_bytes": (lambda b: leaf(b, 2).__setitem__("value", b"\x80\x04"), r"leaf 'n': value of type bytes is not a scalar"),
    "value_list": (lambda b: leaf(b, 2).__setitem__("value", [1, 2]), r"leaf 'n': value of type list is not a scalar"),
    "value_bad_complex": (lambda b: leaf(b, 2).__setitem__("value", {"complex": ["1", 2]}), r"leaf 'n': malformed complex value"),
    "leaf_not_a_map": (lambda b: b["leaves"].__setitem__(0, [1, 2]), r"leaves\[0\]: expected a map, found list"),
    "duplicate_paths": (lambda b: leaf(b, 1).__setitem__("path", "a"), r"two leaves have the same path"),
    # envelope-level fields of the body
    "hash_unknown": (lambda b: b.__setitem__("hash", "md5"), r"unknown hash 'md5', expected 'xxh3-64'"),
    "chunk_bytes_zero": (lambda b: b.__setitem__("chunk_bytes", 0), r"chunk_bytes 0 outside \[4096, 2\*\*40\]"),
    "files_not_list": (lambda b: b.__setitem__("files", {"0": 1}), r"body: field 'files' expected list, found dict"),
    "leaves_missing": (lambda b: b.pop("leaves"), r"body: missing field 'leaves'"),
    "too_many_files": (lambda b: b.__setitem__("files", [{"name": f"f{i}", "size": 0} for i in range(fmt.MAX_FILES + 1)]),
                       r"65537 data files, above the cap of 65536"),
    # tree
    "tree_out_of_range": (lambda b: b["tree"]["c"].__setitem__(0, 7), r"tree references leaf 7 which is out of range or used twice"),
    "tree_used_twice": (lambda b: b["tree"]["c"].__setitem__(1, 0), r"tree references leaf 0 which is out of range or used twice"),
    "tree_misses_leaf": (lambda b: b["tree"].update(k=["a", "b"], c=[0, 1]), r"tree does not reference leaf 2"),
    "tree_unknown_kind": (lambda b: b["tree"].__setitem__("t", "set"), r"tree node kind 'set' is unknown"),
    "tree_keys_mismatch": (lambda b: b["tree"]["k"].pop(), r"tree node dict: 2 keys for 3 children"),
    "tree_key_bool": (lambda b: b["tree"]["k"].__setitem__(0, True), r"tree node dict: key True is not a str or int"),
    "tree_duplicate_key": (lambda b: b["tree"]["k"].__setitem__(1, "a"), r"tree node dict: a key occurs twice"),
    "tree_missing": (lambda b: b.pop("tree"), r"tree node: expected a map, found NoneType"),
    "tree_too_deep": (lambda b: b.__setitem__("tree", _deep_tree(fmt.MAX_TREE_DEPTH + 5)), r"tree nested deeper than 256 levels"),
    "tree_custom_without_name": (lambda b: b["tree"].__setitem__("t", "custom"), r"tree node custom: missing field 'n'"),
}


def _deep_tree(depth: int) -> dict:
    node: Any = {"t": "dict", "k": ["a", "b", "n"], "c": [0, 1, 2]}
    for _ in range(depth):
        node = {"t": "list", "c": [node]}
    return node


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_hostile_manifest_body(ckpt, case):
    fn, pattern = MANIFEST_CASES[case]
    write_body(ckpt, mutated(read_body(ckpt), fn))
    msg = assert_corrupt(ckpt, pattern)
    assert msg.startswith(f"{ckpt / fmt.MANIFEST_NAME}: ")


def test_the_untouched_body_is_valid(ckpt):
    # the cases above differ from a valid manifest only by their mutation
    write_body(ckpt, read_body(ckpt))
    got = jaxckpt.restore(ckpt)
    assert got["a"].tobytes() == A.tobytes() and got["b"].tobytes() == B.tobytes() and got["n"] == 3
    write_body(ckpt, mutated(read_body(ckpt), lambda b: b.__setitem__("tree", _deep_tree(fmt.MAX_TREE_DEPTH - 1))))
    got = jaxckpt.restore(ckpt)
    for _ in range(fmt.MAX_TREE_DEPTH - 1):
        (got,) = got
    assert got["n"] == 3


def test_name_traversal_never_reads_outside(ckpt):
    # a file the traversal would reach holds exactly the right bytes
    (ckpt.parent / "x").write_bytes((ckpt / DATA).read_bytes())
    os.unlink(ckpt / DATA)
    write_body(ckpt, mutated(read_body(ckpt), lambda b: b["files"][0].__setitem__("name", "../x")))
    assert_corrupt(ckpt, r"files\[0\]: file name '../x' is not a plain file name")


def test_overlapping_shards_of_one_leaf(ckpt):
    body = read_body(ckpt)

    def grid_twice(b):  # two identical boxes: volumes add up, one half covered twice
        leaf(b, 0)["shards"] = [{"box": [[0, 8]], "file": 0, "offset": 0, "length": 32, "xxh3": [0]},
                                {"box": [[0, 8]], "file": 0, "offset": 32, "length": 32, "xxh3": [0]}]

    write_body(ckpt, mutated(body, grid_twice))
    assert_corrupt(ckpt, r"leaf 'a': shards 0 and 1 overlap")

    def bricks(b):  # not a grid: rows [0,2) x all, rows [1,3) x cols [0,2), rows [3,4) x all  (in a 4 x 4 array)
        leaf(b, 1).update(dtype="int32", shape=[4, 4])
        leaf(b, 1)["shards"] = [
            {"box": [[0, 2], [0, 4]], "file": 0, "offset": 64, "length": 32, "xxh3": [0]},
            {"box": [[1, 3], [0, 2]], "file": 0, "offset": 96, "length": 16, "xxh3": [0]},
            {"box": [[3, 4], [0, 4]], "file": 0, "offset": 112, "length": 16, "xxh3": [0]}]

    write_body(ckpt, mutated(body, bricks))
    assert_corrupt(ckpt, r"leaf 'b': shards 0 and 1 overlap")


_SHARDS_SCRIPT = textwrap.dedent("""
    import resource
    import msgpack
    from jaxckpt import format as fmt
    n, ndim = fmt.MAX_BOX_ENTRIES // fmt.MAX_NDIM, fmt.MAX_NDIM
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for overlap in (False, True):
        shards = [{"box": [[0, 1]] * (ndim - 1) + [[i, i + 1]], "file": 0, "offset": i, "length": 1, "xxh3": [0]}
                  for i in range(n)]
        if overlap:  # the last shard moved onto the first: a hole and an overlap
            shards[-1]["box"][-1] = [0, 1]
        body = msgpack.packb({"library": "x", "created": 0.0, "hash": "xxh3-64", "chunk_bytes": 4096,
                              "files": [{"name": "d.bin", "size": n}], "tree": 0, "metadata": None,
                              "leaves": [{"path": "a", "kind": "array", "dtype": "uint8",
                                          "shape": [1] * (ndim - 1) + [n], "shards": shards}]}, use_bin_type=True)
        del shards
        data = msgpack.packb({"format": "jaxckpt", "version": 1, "body": body, "xxh3": fmt.checksum(body)})
        del body
        try:
            m = fmt.decode_manifest(data, "m")
            print("OK", len(m.leaves[0].shards))
            del m
        except fmt.CorruptCheckpointError as e:
            print("ERROR", e)
    print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
""")


def test_many_shards_many_dims_small_memory():
    # the most shards a 64-dimensional leaf may have: the cover check must not build n x n x ndim temporaries
    out = subprocess.run([sys.executable, "-c", _SHARDS_SCRIPT], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    n = fmt.MAX_BOX_ENTRIES // fmt.MAX_NDIM
    assert lines[:2] == [f"OK {n}", f"ERROR m: leaf 'a': shards 0 and {n - 1} overlap"], lines
    growth_kb = int(lines[2].split()[1])
    assert growth_kb < 150 * 1024, growth_kb  # the decoded records take ~60 MB of Python objects


def _bricks(rows: int) -> tuple[list[dict], int]:
    """A tiling of a (rows, 3) uint8 array that is not a grid: row r is split at column 1 + r % 2."""
    shards, off = [], 0
    for r in range(rows):
        cut = 1 + r % 2
        for lo, hi in ((0, cut), (cut, 3)):
            shards.append({"box": [[r, r + 1], [lo, hi]], "file": 0, "offset": off, "length": hi - lo, "xxh3": [0]})
            off += hi - lo
    return shards, off


@pytest.mark.parametrize("rows", [8, fmt.MAX_PAIRWISE_SHARDS // 2 + 1])
def test_off_grid_tilings(ckpt, rows):
    shards, size = _bricks(rows)

    def bricks(b):
        b["files"][0]["size"] = size
        b["leaves"] = [{"path": "a", "kind": "array", "dtype": "uint8", "shape": [rows, 3], "shards": shards}]
        b["tree"] = 0

    write_body(ckpt, mutated(read_body(ckpt), bricks))
    if len(shards) <= fmt.MAX_PAIRWISE_SHARDS:  # legal, checked pairwise
        assert jaxckpt.inspect(ckpt).leaves[0].shape == (rows, 3)
    else:  # too many to check pairwise: refused
        assert_corrupt(ckpt, rf"leaf 'a': {len(shards)} shards that do not form a grid "
                             rf"\(at most {fmt.MAX_PAIRWISE_SHARDS} allowed\)", readers=("inspect", "restore"))


def test_too_many_leaves(ckpt):
    # the leaf count is checked before any leaf is decoded
    write_body(ckpt, mutated(read_body(ckpt), lambda b: b.__setitem__("leaves", [0] * (fmt.MAX_LEAVES + 1))))
    assert_corrupt(ckpt, r"4000001 leaves, above the cap of 4000000", readers=("inspect",))


# ---------------------------------------------------------------- raw msgpack
def nested_maps(depth: int) -> bytes:
    return b"\x81\xa1k" * depth + b"\xc0"  # {"k": {"k": ... None}}


def test_deeply_nested_body(ckpt):
    (ckpt / fmt.MANIFEST_NAME).write_bytes(seal(nested_maps(10_000)))
    assert_corrupt(ckpt, r"manifest body is not valid msgpack \(")


def test_deeply_nested_envelope(ckpt):
    (ckpt / fmt.MANIFEST_NAME).write_bytes(nested_maps(10_000))
    assert_corrupt(ckpt, r"not a valid msgpack manifest \(")
    (ckpt / fmt.MANIFEST_NAME).write_bytes(b"\x91" * 100_000 + b"\xc0")  # [[[[...]]]]
    assert_corrupt(ckpt, r"not a valid msgpack manifest \(")


def test_deeply_nested_metadata(ckpt):
    body = msgpack.packb(read_body(ckpt), use_bin_type=True)
    # replace the metadata value (nil, the last byte) with 10_000 nested maps
    assert body.endswith(b"\xa8metadata\xc0")
    (ckpt / fmt.MANIFEST_NAME).write_bytes(seal(body[:-1] + nested_maps(10_000)))
    assert_corrupt(ckpt, r"manifest body is not valid msgpack \(")


def test_msgpack_claims_huge_containers(ckpt):
    # a map header claiming 2**32-1 entries, an array of 2**32-1, a 4 GiB string: refused before allocating
    for raw in (b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"):
        (ckpt / fmt.MANIFEST_NAME).write_bytes(seal(raw))
        assert_corrupt(ckpt, r"manifest body is not valid msgpack \(", readers=("inspect",))


def test_msgpack_ext_types_refused(ckpt):
    body = msgpack.packb(mutated(read_body(ckpt), lambda b: b.__setitem__("metadata", msgpack.ExtType(1, b"x"))),
                         use_bin_type=True)
    (ckpt / fmt.MANIFEST_NAME).write_bytes(seal(body))
    assert_corrupt(ckpt, r"manifest body is not valid msgpack \(ValueError: 2 exceeds max_ext_len\(0\)\)",
                   readers=("inspect",))


def test_manifest_over_size_cap(ckpt):
    os.truncate(ckpt / fmt.MANIFEST_NAME, fmt.MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    assert_corrupt(ckpt, rf"manifest.msgpack: {fmt.MAX_MANIFEST_BYTES + 1} bytes, above the cap of {fmt.MAX_MANIFEST_BYTES}")


# ---------------------------------------------------------------- data files and PRNG keys
def test_value_leaf_none_into_a_number_target(ckpt):
    # the writer never stores None as a leaf (it is an empty subtree); a manifest that does
    # must not reach int(None)
    write_body(ckpt, mutated(read_body(ckpt), lambda b: leaf(b, 2).__setitem__("value", None)))
    assert jaxckpt.restore(ckpt)["n"] is None
    with pytest.raises(jaxckpt.StructureMismatchError, match=re.escape(
            f"{ckpt}: leaf 'n': the target expects a Python int, the checkpoint has a Python NoneType")):
        jaxckpt.restore(ckpt, {"a": A, "b": B, "n": 0})


def test_recorded_file_size_larger_than_file(ckpt):
    def bigger(b):
        b["files"][0]["size"] = 1 << 40
    write_body(ckpt, mutated(read_body(ckpt), bigger))
    assert jaxckpt.inspect(ckpt).total_bytes == 128  # the manifest alone is fine
    assert_corrupt(ckpt, re.escape(f"{ckpt / DATA}: truncated: the manifest records {1 << 40} bytes, found 128"),
                   readers=("restore", "restore_target", "load_checkpoint", "load_into"))


@pytest.mark.parametrize("impl,dtype,shape,pattern", [
    ("nosuchprng", "uint32", [2], r"leaf 'k': unknown PRNG implementation 'nosuchprng'"),
    ("rbg", "uint32", [2], r"leaf 'k': rbg key data must be uint32\[\.\.\., 4\], found uint32\[2\]"),
    ("threefry2x32", "float32", [2], r"leaf 'k': threefry2x32 key data must be uint32\[\.\.\., 2\], found float32\[2\]"),
    ("threefry2x32", "uint32", [], r"leaf 'k': threefry2x32 key data must be uint32\[\.\.\., 2\], found uint32\[\]"),
])
def test_hostile_prng_key_records(ckdir, impl, dtype, shape, pattern):
    p = ckdir / "c"
    key = jax.random.key(0)
    jaxckpt.save(p, {"k": key})
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize

    def hack(b):
        leaf(b, 0).update(impl=impl, dtype=dtype, shape=shape)
        shard(b, 0).update(box=[[0, d] for d in shape], length=n)
    write_body(p, mutated(read_body(p), hack))
    for fn in (jaxckpt.restore, jaxckpt.load_checkpoint, lambda q: jaxckpt.restore(q, {"k": key}),
               lambda q: jaxckpt.load_into({"k": key}, q)):
        with pytest.raises(jaxckpt.CorruptCheckpointError, match=re.escape(f"{p / fmt.MANIFEST_NAME}: ") + pattern):
            fn(p)


# ---------------------------------------------------------------- planted files
def test_symlinked_data_file_is_refused(ckpt, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes((ckpt / DATA).read_bytes())  # the right bytes: following the link would "work"
    os.unlink(ckpt / DATA)
    os.symlink(outside, ckpt / DATA)
    assert_corrupt(ckpt, re.escape(f"{ckpt / DATA}: is a symbolic link; checkpoint files must be regular files"),
                   readers=("restore", "restore_target", "load_checkpoint", "load_into"))


def test_symlinked_manifest_is_refused(ckpt, tmp_path):
    outside = tmp_path / "m.msgpack"
    outside.write_bytes((ckpt / fmt.MANIFEST_NAME).read_bytes())
    os.unlink(ckpt / fmt.MANIFEST_NAME)
    os.symlink(outside, ckpt / fmt.MANIFEST_NAME)
    assert_corrupt(ckpt, re.escape(f"{ckpt / fmt.MANIFEST_NAME}: is a symbolic link"))


@pytest.mark.timeout(20)
def test_fifo_as_data_file_does_not_hang(ckpt):
    os.unlink(ckpt / DATA)
    os.mkfifo(ckpt / DATA)
    assert_corrupt(ckpt, re.escape(f"{ckpt / DATA}: is not a regular file (mode prw-"),
                   readers=("restore", "restore_target", "load_checkpoint", "load_into"))


@pytest.mark.timeout(20)
def test_fifo_as_manifest_does_not_hang(ckpt):
    os.unlink(ckpt / fmt.MANIFEST_NAME)
    os.mkfifo(ckpt / fmt.MANIFEST_NAME)
    assert_corrupt(ckpt, re.escape(f"{ckpt / fmt.MANIFEST_NAME}: is not a regular file (mode prw-"))


def test_directory_as_data_file(ckpt):
    os.unlink(ckpt / DATA)
    os.mkdir(ckpt / DATA)
    assert_corrupt(ckpt, re.escape(f"{ckpt / DATA}: is not a regular file (mode d"),
                   readers=("restore", "load_checkpoint"))


# ---------------------------------------------------------------- memory, in a fresh process
_MEMORY_SCRIPT = textwrap.dedent("""
    import os, resource, sys
    import msgpack, numpy as np
    import jaxckpt
    from jaxckpt import format as fmt

    path = sys.argv[1]
    n = 2 ** 47  # a 128 TiB array
    jaxckpt.save(path, {"a": np.arange(16, dtype=np.uint8)})
    outer = msgpack.unpackb(open(os.path.join(path, fmt.MANIFEST_NAME), "rb").read())
    body = msgpack.unpackb(outer["body"], strict_map_key=False)
    body["chunk_bytes"] = 2 ** 40
    body["files"][0]["size"] = n
    leaf = body["leaves"][0]
    leaf["shape"] = [n]
    leaf["shards"][0].update(box=[[0, n]], length=n, xxh3=[7] * fmt.chunk_count(n, 2 ** 40))
    raw = msgpack.packb(body, use_bin_type=True)
    with open(os.path.join(path, fmt.MANIFEST_NAME), "wb") as f:
        f.write(msgpack.packb({"format": "jaxckpt", "version": 1, "body": raw, "xxh3": fmt.checksum(raw)}))
    assert jaxckpt.inspect(path).total_bytes == n
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for fn in (jaxckpt.restore, jaxckpt.load_checkpoint, lambda p: jaxckpt.restore(p, {"a": np.zeros(0, np.uint8)})):
        try:
            fn(path)
        except jaxckpt.CorruptCheckpointError as e:
            print("ERROR", e)
        except jaxckpt.StructureMismatchError as e:
            print("MISMATCH", e)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("GROWTH_KB", after - before)
""")


def test_manifest_claiming_2_47_bytes_costs_little_memory(ckdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(ckdir / "c")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    expected = f"ERROR {ckdir / 'c' / DATA}: truncated: the manifest records {2**47} bytes, found 16 (while reading leaf 'a')"
    assert lines[:2] == [expected, expected], lines
    assert lines[2] == f"MISMATCH {ckdir / 'c'}: leaf 'a': shape mismatch: the target expects (0,), the checkpoint has ({2**47},)"
    growth_kb = int(lines[3].split()[1])
    assert growth_kb < 200 * 1024, growth_kb


# ---------------------------------------------------------------- the one-shard fast path
def _one_leaf_body(r: dict) -> dict:
    return {"library": "x", "created": 0.0, "hash": "xxh3-64", "chunk_bytes": 4096, "tree": 0, "metadata": None,
            "files": [{"name": "f0", "size": 1 << 40}, {"name": "f1", "size": 1 << 40}], "leaves": [r]}


def _verdicts(r: dict, monkeypatch) -> tuple[Any, Any, bool]:
    """(the decoder's record or message, the spec reader's verdict, whether the decoder skipped the tiling check)."""
    from test_format_spec import SpecError, validate  # the independent reader written from docs/FORMAT.md

    body = _one_leaf_body(r)
    try:
        validate(copy.deepcopy(body))
        spec: Any = "accepted"
    except SpecError as e:
        spec = e
    calls = []
    real = fmt._check_cover
    monkeypatch.setattr(fmt, "_check_cover", lambda *a: (calls.append(a), real(*a)))
    try:  # the leaf decoder itself: some hostile values (2**64) have no msgpack encoding
        got: Any = fmt._decode_leaf(fmt._Checker("M"), 0, r, [fmt.FileRecord(f["name"], f["size"]) for f in
                                                              body["files"]], body["chunk_bytes"], [])
    except fmt.CorruptCheckpointError as e:
        got = str(e)
    finally:
        monkeypatch.setattr(fmt, "_check_cover", real)
    return got, spec, not calls


def test_the_one_shard_fast_path_accepts_only_what_the_spec_accepts(monkeypatch):
    """The decoder checks a leaf once; its fast path for a leaf stored as one shard is
    only a predicate (one shard holding every element) that skips the tiling check
    (R17). On a well-formed one-shard leaf and on every single-field mutation of it
    from a list of hostile values: the decoder accepts exactly what the independent
    spec reader of tests/test_format_spec.py accepts, builds the record the fields
    say, and skips the tiling check only where that check passes."""
    good = {"path": "p/q", "kind": "array", "dtype": "float32", "shape": [3, 1500],
            "shards": [{"box": [[0, 3], [0, 1500]], "file": 1, "offset": 64, "length": 18000, "xxh3": [1, 2, 3, 4, 5]}]}
    got, spec, skipped = _verdicts(good, monkeypatch)
    assert spec == "accepted" and skipped
    assert got == fmt.LeafRecord("p/q", "array", "float32", (3, 1500),
                                 (fmt.ShardRecord(((0, 3), (0, 1500)), 1, 64, 18000, (1, 2, 3, 4, 5)),))
    hostile = [None, True, False, 0, 1, -1, 2, 3, 5, 64, 1500, 1501, 18000, 17999, 2 ** 56, 2 ** 56 + 1, 2 ** 64,
               2 ** 64 - 1, 1.0, 0.0, "0", "", "float32", "bool", "x", "scalar", "key", "value", [], [0], [0, 3],
               [True, 3], [0.0, 3], [0, 3.0], [[0, 3]], [[0, 3], [0, 1500]], [[0, 3], [1, 1500]], [[0, 2], [0, 1500]],
               [1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, -5], [1, 2, 3, 4, 2 ** 64], [3, 1500], [3, 0],
               [3, True], [3.0, 1500], {"a": 1}]

    def places(r):
        yield from ((r, k) for k in ("path", "kind", "dtype", "shape", "shards"))
        s = r["shards"][0]
        yield from ((s, k) for k in ("box", "file", "offset", "length", "xxh3"))
        yield from ((r["shape"], i) for i in range(2))
        yield from ((s["box"], i) for i in range(2))
        yield from ((s["box"][0], i) for i in range(2))
        yield from ((s["xxh3"], i) for i in (0, 4))

    checked, accepted = 0, 0
    for n in range(len(list(places(copy.deepcopy(good))))):
        for value in hostile + ["<delete>"]:
            r = copy.deepcopy(good)
            container, key = list(places(r))[n]
            if value == "<delete>":
                if not isinstance(container, dict):
                    continue
                del container[key]
            else:
                container[key] = copy.deepcopy(value)
            got, spec, skipped = _verdicts(r, monkeypatch)
            checked += 1
            if isinstance(got, str):  # refused, with a located message
                assert spec != "accepted" and got.startswith("M: "), (n, value, got)
                continue
            assert spec == "accepted", (n, value, spec)
            accepted += 1
            if got.kind == "value":
                assert got == fmt.LeafRecord(r["path"], "value", value=r.get("value"))
                continue
            (s,) = r["shards"]
            assert got == fmt.LeafRecord(r["path"], r["kind"], r["dtype"], tuple(r["shape"]), (fmt.ShardRecord(
                tuple(map(tuple, s["box"])), s["file"], s["offset"], s["length"], tuple(s["xxh3"])),)), (n, value)
            assert [type(d) for d in got.shape] == [int] * len(got.shape)  # never a bool for an int
            if skipped:  # the predicate skipped only a tiling check that passes
                fmt._check_cover(fmt._Checker("M"), "leaf", math.prod(got.shape), got.shards,
                                 math.prod(got.shards[0].shape))
    assert checked > 600 and accepted > 20
    scalar = {"path": "s", "kind": "scalar", "dtype": "int64", "shape": [],
              "shards": [{"box": [], "file": 0, "offset": 0, "length": 8, "xxh3": [7]}]}
    got, spec, skipped = _verdicts(scalar, monkeypatch)
    assert spec == "accepted" and skipped and got == fmt.LeafRecord("s", "scalar", "int64", (), (
        fmt.ShardRecord((), 0, 0, 8, (7,)),))


# ---------------------------------------------------------------- R4 duplicate keys, R5 trailing bytes
def pack_map(pairs: list[tuple[Any, Any]]) -> bytes:
    """A msgpack map of ``pairs`` as given, repeated keys included (msgpack.packb cannot write them)."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True) for k, v in pairs)


def body_with(body: dict, where: Callable[[dict], Any], pairs: Callable[[dict], list]) -> bytes:
    """The body's bytes with one of its maps (``where`` gives its container and key; None: the body
    itself) written as ``pairs``."""
    b = copy.deepcopy(body)
    if where(b) is None:
        return pack_map(pairs(b))
    container, key = where(b)
    target = container[key]
    container[key] = "@@map@@"
    raw = msgpack.packb(b, use_bin_type=True)
    marker = msgpack.packb("@@map@@", use_bin_type=True)
    assert raw.count(marker) == 1
    return raw.replace(marker, pack_map(pairs(target)))


DUPLICATE_CASES = {
    # where: (the container of the map and its key), the map's pairs, the key reported
    "body": (lambda b: None, lambda m: list(m.items()) + [("leaves", m["leaves"])], "leaves"),
    "file": (lambda b: (b["files"], 0), lambda m: list(m.items()) + [("size", 0)], "size"),
    "leaf": (lambda b: (b["leaves"], 0), lambda m: [("path", "b")] + list(m.items()), "path"),
    "shard": (lambda b: (leaf(b, 1)["shards"], 0), lambda m: list(m.items()) + [("offset", 0)], "offset"),
    "same_value_twice": (lambda b: (leaf(b, 1)["shards"], 0), lambda m: list(m.items()) + [("offset", 64)], "offset"),
    "tree_node": (lambda b: (b, "tree"), lambda m: list(m.items()) + [("t", "list")], "t"),
    "value_leaf": (lambda b: (b["leaves"], 2), lambda m: list(m.items()) + [("value", 4)], "value"),
    "metadata": (lambda b: (b, "metadata"), lambda m: [("epoch", 1), ("epoch", 2)], "epoch"),
    "int_keys": (lambda b: (b, "metadata"), lambda m: [(1, "a"), (1, "b")], 1),
}


@pytest.mark.parametrize("case", sorted(DUPLICATE_CASES))
def test_duplicate_keys_in_the_body_are_refused(ckpt, case):
    # R4: msgpack keeps the last value of a repeated key silently; another reader could keep the first
    where, pairs, key = DUPLICATE_CASES[case]
    body = read_body(ckpt)
    body["metadata"] = {"epoch": 1}
    (ckpt / fmt.MANIFEST_NAME).write_bytes(seal(body_with(body, where, pairs)))
    assert_corrupt(ckpt, "^" + re.escape(f"{ckpt / fmt.MANIFEST_NAME}: body: the key {key!r} occurs twice in one map")
                   + "$")


def test_duplicate_keys_in_the_envelope_are_refused(ckpt):
    body = msgpack.packb(read_body(ckpt), use_bin_type=True)
    fields = [("format", "jaxckpt"), ("version", 1), ("body", body), ("xxh3", fmt.checksum(body))]
    for extra in (("version", 2), ("version", 1), ("xxh3", 0), ("format", "jaxckpt")):
        (ckpt / fmt.MANIFEST_NAME).write_bytes(pack_map(fields + [extra]))
        assert_corrupt(ckpt, "^" + re.escape(f"{ckpt / fmt.MANIFEST_NAME}: envelope: the key {extra[0]!r} occurs "
                                             "twice in one map") + "$")
    (ckpt / fmt.MANIFEST_NAME).write_bytes(pack_map(fields))  # the same bytes as the writer's, which reads back
    assert jaxckpt.restore(ckpt)["n"] == 3


@pytest.mark.parametrize("extra", [b"\x00", b"\xc0", b"\x81\xa1k\x01", b"trailing garbage"])
def test_bytes_after_the_envelope_map_are_refused(ckpt, extra):
    # R5: the manifest file is one msgpack map and nothing else
    (ckpt / fmt.MANIFEST_NAME).write_bytes((ckpt / fmt.MANIFEST_NAME).read_bytes() + extra)
    assert_corrupt(ckpt, "^" + re.escape(f"{ckpt / fmt.MANIFEST_NAME}: envelope: {len(extra)} bytes after the end "
                                         "of the envelope map (one map, nothing else)") + "$")


@pytest.mark.parametrize("extra", [b"\x00", b"\xc0", b"\x81\xa1k\x01", b"trailing garbage"])
def test_bytes_after_the_body_map_are_refused(ckpt, extra):
    # R5: the body bytes, covered by the checksum, are one msgpack map and nothing else
    (ckpt / fmt.MANIFEST_NAME).write_bytes(seal(msgpack.packb(read_body(ckpt), use_bin_type=True) + extra))
    assert_corrupt(ckpt, "^" + re.escape(f"{ckpt / fmt.MANIFEST_NAME}: body: {len(extra)} bytes after the end "
                                         "of the body map (one map, nothing else)") + "$")
