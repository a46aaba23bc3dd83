"""Fuzzing of hostile manifests, run by tests/test_fuzz.py in a subprocess
with a memory limit (``RLIMIT_AS``: 2 GiB above what the process holds after
importing jax) and a timeout.

``python tests/fuzz_worker.py MODE EXAMPLES SEED WORKDIR``

* ``decode``: ``format.decode_manifest`` on structured mutations of real
  manifests (ints made huge or negative, types swapped, fields dropped and
  added, containers nested, msgpack extension types), on byte-level
  mutations of them, and on random bytes.
* ``restore``: the same manifests written into a copy of a real checkpoint
  whose directory also holds a symlink to a file outside, a FIFO and a
  directory; then ``inspect``, ``restore`` and ``load_checkpoint``. An audit
  hook records every file jaxckpt opens: all must lie in the checkpoint
  directory and be opened with ``O_NOFOLLOW``.

Only ``CheckpointError`` subclasses may come out. Prints one JSON line of
statistics on success; a failing example makes hypothesis print it and the
process exit non-zero.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import shutil
import sys

import jax
import msgpack
import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import jaxckpt
import nopickle
from jaxckpt import format as fmt

MODE, EXAMPLES, SEED, WORK = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
PLANTED = ("link.bin", "fifo.bin", "dir.bin")


# --------------------------------------------------------------------------- real manifests
def real_checkpoints() -> list[str]:
    trees = [
        {"a": np.arange(16, dtype=np.float32), "b": np.arange(8, dtype=np.int64).reshape(2, 4), "n": 3},
        {"params": {"w": np.ones((4, 3), np.float16), "b": np.zeros(0, np.uint8)}, "opt": (np.int32(7), [None, 1.5]),
         "s": "text", "c": 1 + 2j, "t": True},
        {"k": jax.random.key(3), "bf": np.asarray(jax.numpy.arange(5, dtype=jax.numpy.bfloat16)),
         "deep": [[[{"x": np.uint32(9)}]]]},
    ]
    paths = []
    for i, tree in enumerate(trees):
        p = os.path.join(WORK, f"real{i}")
        jaxckpt.save(p, tree, metadata={"step": i, "tags": ["a", "b"], "m": {"loss": 0.5}})
        outside = os.path.join(WORK, f"outside{i}.bin")
        shutil.copyfile(os.path.join(p, "data-00000.bin"), outside)
        os.symlink(outside, os.path.join(p, "link.bin"))  # the right bytes: following it would "work"
        os.mkfifo(os.path.join(p, "fifo.bin"))
        os.mkdir(os.path.join(p, "dir.bin"))
        paths.append(p)
    return paths


def body_of(path: str) -> dict:
    with open(os.path.join(path, fmt.MANIFEST_NAME), "rb") as f:
        outer = msgpack.unpackb(f.read(), raw=False)
    return msgpack.unpackb(outer["body"], raw=False, strict_map_key=False)


def seal(body: bytes, good: bool = True) -> bytes:
    return msgpack.packb({"format": "jaxckpt", "version": 1, "body": body,
                          "xxh3": fmt.checksum(body) if good else 12345}, use_bin_type=True)


def nested_ext(depth: int) -> bytes:
    """An extension whose payload is an extension whose payload is ... (ext32 headers)."""
    # built outside-in in linear time: the layer k levels above the nil holds 1 + 6 (k - 1) bytes
    return b"".join(b"\xc9" + (1 + 6 * (k - 1)).to_bytes(4, "big") + b"\x05" for k in range(depth, 0, -1)) + b"\xc0"


# --------------------------------------------------------------------------- strategies
SCALARS = st.sampled_from([
    0, 1, -1, 2**31, 2**32 + 1, 2**53 + 1, 2**62, 2**63 - 1, 2**64 - 1, -2**63, 4096, 2**40, 2**48, 2**56,
    0.0, -0.0, 1.5, float("nan"), float("inf"), -float("inf"), 1e308,
    "", "x", "../x", "/etc/passwd", "a\x00b", "x" * 5000, "data-00000.bin", "manifest.msgpack", "\u00e9",
    "link.bin", "fifo.bin", "dir.bin", "..", ".", "float32", "bfloat16", "object", "array", "key", "value",
    "scalar", "dict", "list", "custom", "threefry2x32", "rbg",
    b"", b"\x80\x04", True, False, None, msgpack.ExtType(1, b"x"),
])
VALUES = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.sampled_from(
                                                          ["t", "c", "k", "n", "box", "file", "offset", "length",
                                                           "xxh3", "name", "size", "shape", "dtype", "kind",
                                                           "path", "shards", "value", "impl", "complex"]),
                                                          kids, max_size=4)), max_leaves=12)


def locations(node, prefix=()):
    """Every (container, key) pair inside a body."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from locations(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from locations(v, prefix + (i,))


def get(node, loc):
    for k in loc:
        node = node[k]
    return node


def mutate(draw, body: dict) -> dict:
    for _ in range(draw(st.integers(1, 4))):
        locs = list(locations(body))
        if not locs:
            break
        loc = draw(st.sampled_from(locs))
        parent, key = get(body, loc[:-1]), loc[-1]
        op = draw(st.sampled_from(["replace", "replace", "replace", "drop", "add", "wrap", "nest", "dup", "int"]))
        if op == "replace":
            parent[key] = draw(VALUES)
        elif op == "drop":
            del parent[key]
        elif op == "add":
            if isinstance(parent, dict):
                parent[draw(st.text(max_size=6))] = draw(VALUES)
            else:
                parent.insert(key, draw(VALUES))
        elif op == "wrap":
            parent[key] = [parent[key]] if draw(st.booleans()) else {"t": "list", "c": [parent[key]]}
        elif op == "nest":
            v = parent[key]
            for _ in range(draw(st.integers(2, 300))):
                v = [v]
            parent[key] = v
        elif op == "dup" and isinstance(parent, list):
            parent.extend([parent[key]] * draw(st.integers(1, 50)))
        elif op == "int":
            v = parent[key]
            if isinstance(v, int) and not isinstance(v, bool):
                parent[key] = draw(st.sampled_from([v + 1, v - 1, -v, v * 4096, 2**64 - 1, -2**63, v + 2**48]))
    return body


# Each kind of input gets its own search and share of the examples (one
# search over all kinds would let hypothesis' choices skew the mix). The
# "ext" space is small: it stops early once every input was tried.
SHARES = {"structured": 0.6, "bytes": 0.25, "random": 0.1, "ext": 0.05}


@st.composite
def manifests(draw, bases, kind):
    base = draw(st.sampled_from(bases))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "ext":
        depth = draw(st.sampled_from([1, 2, 100, 10_000, 100_000]))
        where = draw(st.sampled_from(["whole", "body", "metadata"]))
        if where == "whole":
            return nested_ext(depth)
        if where == "body":
            return seal(nested_ext(depth))
        return seal(msgpack.packb({**base, "metadata": msgpack.ExtType(5, nested_ext(depth))}, use_bin_type=True))
    body = mutate(draw, json_copy(base))
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):  # e.g. nested deeper than the packer allows
        packed = msgpack.packb(base, use_bin_type=True)
    data = seal(packed, good=draw(st.integers(0, 9)) > 0)
    if kind == "bytes":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, max(len(data) - 1, 0)))
            op = draw(st.sampled_from(["flip", "insert", "delete", "splice"]))
            if op == "flip" and data:
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif op == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            elif op == "delete":
                del data[at:at + draw(st.integers(1, 16))]
            else:
                data[at:at] = draw(st.sampled_from([b"\x91" * 5000, b"\x81\xa1k" * 3000, b"\xdd\xff\xff\xff\xff",
                                                    b"\xc6\xff\xff\xff\xff", nested_ext(50)]))
        data = bytes(data)
    return data


def json_copy(x):
    if isinstance(x, dict):
        return {k: json_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_copy(v) for v in x]
    return x


# --------------------------------------------------------------------------- the checks
stats: collections.Counter = collections.Counter()
opened: list[tuple[str, int]] = []
recording = [False]


def audit(event: str, args) -> None:
    if event == "open" and recording[0]:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("jaxckpt"):
            path, _, flags = args
            opened.append((os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path), flags or 0))


def check_decode(data: bytes) -> None:
    try:
        fmt.decode_manifest(data, "m")
        stats["decoded"] += 1
    except jaxckpt.CheckpointError as e:
        assert str(e).startswith("m: "), str(e)
        stats["refused"] += 1


def check_restore(data: bytes, base: str) -> None:
    d = os.path.join(WORK, "victim")
    if os.path.lexists(d):
        shutil.rmtree(d)
    os.mkdir(d)
    for e in os.listdir(base):  # the data file and the planted entries (copied as what they are)
        src = os.path.join(base, e)
        if os.path.islink(src):
            os.symlink(os.readlink(src), os.path.join(d, e))
        elif e == "fifo.bin":
            os.mkfifo(os.path.join(d, e))
        elif os.path.isdir(src):
            os.mkdir(os.path.join(d, e))
        elif e != fmt.MANIFEST_NAME:
            shutil.copyfile(src, os.path.join(d, e))
    with open(os.path.join(d, fmt.MANIFEST_NAME), "wb") as f:
        f.write(data)
    del opened[:]
    recording[0] = True
    try:
        for name, fn in (("inspect", jaxckpt.inspect), ("restore", jaxckpt.restore),
                         ("load_checkpoint", jaxckpt.load_checkpoint)):
            try:
                fn(d)
                stats[f"{name}_ok"] += 1
            except jaxckpt.CheckpointError:
                stats[f"{name}_refused"] += 1
    finally:
        recording[0] = False
    for path, flags in opened:
        assert os.path.dirname(path) == d and "/" not in os.path.basename(path), path
        assert os.path.basename(path) not in ("..", "."), path
        assert flags & os.O_NOFOLLOW, (path, flags)
    stats["opens_audited"] += len(opened)


def main() -> None:
    nopickle.install()  # the suite's no-pickle guard, in this process too
    bases = real_checkpoints()
    bodies = [body_of(p) for p in bases]
    jax.devices()  # the backend (key leaves need it) before the memory limit: its reservations are not ours
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.addaudithook(audit)
    recording[0] = True  # the audit sees jaxckpt's opens (else the checks below could not fail)
    jaxckpt.restore(bases[0])
    recording[0] = False
    assert [os.path.basename(p) for p, _ in opened] == [fmt.MANIFEST_NAME, "data-00000.bin"], opened

    for kind, share in SHARES.items():
        @seed(SEED)
        @settings(max_examples=max(1, round(EXAMPLES * share)), database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        @given(st.data())
        def fuzz(data):
            i = data.draw(st.integers(0, len(bases) - 1))
            raw = data.draw(manifests([bodies[i]], kind))
            stats["examples"] += 1
            stats[kind] += 1
            if MODE == "decode":
                check_decode(raw)
            else:
                check_restore(raw, bases[i])

        fuzz()
    stats["rss_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    print(json.dumps(dict(stats)))


if __name__ == "__main__":
    main()
