"""Restores that map the checkpoint's bytes copy-on-write (``mmap=True``, the
default) instead of copying them into fresh memory: what is mapped, that the
values are bit-exact and stay so, that writes never reach the file, that
deleting the checkpoint leaves live arrays intact, and the errors."""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
from jaxckpt import format as fmt
from jaxckpt import libc, memory, reader, readplan
from jaxckpt.errors import CorruptCheckpointError


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        nums = os.uname().release.split("-")[0].split(".")
        return (int(nums[0]), int(nums[1])) >= (major, minor)
    except (AttributeError, ValueError, IndexError):
        return False


def test_mapping_available_on_linux_5_14_and_later():
    """The mapping tests below skip only where the kernel lacks MADV_POPULATE_READ."""
    if _kernel_at_least(5, 14):
        assert memory.can_map()


pytestmark_map = pytest.mark.skipif(not memory.can_map(), reason="needs Linux >= 5.14 (MADV_POPULATE_READ)")

MiB = 1 << 20


def file_mappings(directory) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings of files under ``directory``."""
    directory = os.path.realpath(directory)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().startswith(directory):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[5].strip()))
    return out


def in_mapping(addr: int, maps: list[tuple[int, int, str]]) -> bool:
    return any(lo <= addr < hi for lo, hi, _ in maps)


def data_digest(path) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def flip_bits(path, leaf: str, at: int, mask: int) -> tuple[str, fmt.ShardRecord]:
    """XOR the byte ``at`` bytes into ``leaf``'s first shard with ``mask``; returns (data file, shard)."""
    m = reader.CheckpointReader(path).manifest
    (rec,) = [x for x in m.leaves if x.path == leaf]
    shard = rec.shards[0]
    name = os.path.join(path, m.files[shard.file].name)
    with open(name, "r+b") as f:
        f.seek(shard.offset + at)
        b = f.read(1)
        f.seek(shard.offset + at)
        f.write(bytes([b[0] ^ mask]))
    return name, shard


def tree():
    rng = np.random.default_rng(0)
    return {
        "big": rng.standard_normal((512, 1024), dtype=np.float32),  # 2 MiB: mapped
        "big_bf16": rng.standard_normal((1024, 1024)).astype(ml_dtypes.bfloat16),  # 2 MiB
        "huge": rng.standard_normal(5 * (4 << 20) // 4 + 3, dtype=np.float32),  # > one 16 MiB chunk, odd size
        "small": rng.standard_normal(1000, dtype=np.float32),  # read into fresh memory
        "step": np.int64(7),
    }


@pytestmark_map
def test_large_leaves_are_mappings_of_the_file_small_ones_are_not(ckdir):
    t = tree()
    jaxckpt.save(ckdir / "c", t)
    got = jaxckpt.restore(ckdir / "c")
    maps = file_mappings(ckdir / "c")
    for k in ("big", "big_bf16", "huge"):
        assert got[k].dtype == t[k].dtype and got[k].tobytes() == t[k].tobytes()
        assert in_mapping(got[k].ctypes.data, maps), k
    assert got["small"].tobytes() == t["small"].tobytes()
    assert not in_mapping(got["small"].ctypes.data, maps)
    assert got["step"] == 7
    names = {os.path.basename(p) for _, _, p in maps}
    assert names and all(n.startswith("data-") for n in names)  # data files only, never the manifest


@pytestmark_map
def test_mmap_false_copies_everything(ckdir):
    t = tree()
    jaxckpt.save(ckdir / "c", t)
    got = jaxckpt.restore(ckdir / "c", mmap=False)
    assert file_mappings(ckdir / "c") == []
    for k in ("big", "big_bf16", "huge", "small"):
        assert got[k].tobytes() == t[k].tobytes()
    flat = jaxckpt.load_checkpoint(ckdir / "c", mmap=False)
    assert file_mappings(ckdir / "c") == [] and flat["big"].tobytes() == t["big"].tobytes()
    flat = jaxckpt.load_checkpoint(ckdir / "c")
    assert in_mapping(flat["big"].ctypes.data, file_mappings(ckdir / "c"))


@pytestmark_map
def test_writes_to_a_mapped_result_never_reach_the_file(ckdir):
    t = tree()
    jaxckpt.save(ckdir / "c", t)
    before = data_digest(ckdir / "c")
    got = jaxckpt.restore(ckdir / "c")
    assert got["big"].flags.writeable
    got["big"][:] = 0  # copy-on-write: this process's pages only
    got["huge"][::1000] = -1
    assert not got["big"].any()
    assert data_digest(ckdir / "c") == before
    again = jaxckpt.restore(ckdir / "c")
    assert again["big"].tobytes() == t["big"].tobytes()
    assert again["huge"].tobytes() == t["huge"].tobytes()


@pytestmark_map
def test_cpu_jax_arrays_adopt_the_mapping_and_donation_leaves_the_file_alone(ckdir):
    dev = SingleDeviceSharding(jax.devices()[0])
    x = jnp.arange(1 << 20, dtype=jnp.float32)  # 4 MiB
    jaxckpt.save(ckdir / "c", {"x": x})
    before = data_digest(ckdir / "c")
    got = jaxckpt.restore(ckdir / "c", {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev)})["x"]
    assert isinstance(got, jax.Array) and got.sharding == dev
    assert in_mapping(got.unsafe_buffer_pointer(), file_mappings(ckdir / "c"))  # no copy
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    step = jax.jit(lambda a: a * 2 + 1, donate_argnums=0)
    out = step(got)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2 + 1)
    assert data_digest(ckdir / "c") == before
    again = jaxckpt.restore(ckdir / "c", {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev)})["x"]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(x))


@pytestmark_map
def test_live_arrays_survive_deleting_the_checkpoint(ckdir):
    t = tree()
    with jaxckpt.CheckpointManager(ckdir / "run", max_to_keep=1) as mgr:
        mgr.save(1, t, force=True)
        mgr.wait_until_finished()
        first = mgr.restore(1)
        assert in_mapping(first["huge"].ctypes.data, file_mappings(ckdir / "run"))
        t2 = {k: (v + 1 if k != "step" else v) for k, v in t.items()}
        mgr.save(2, t2, force=True)  # rotation deletes step 1 while `first` maps its file
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2]
        assert "1" not in os.listdir(ckdir / "run") and "2" in os.listdir(ckdir / "run")
        copied = mgr.restore(2, mmap=False)
        assert file_mappings(ckdir / "run") and not in_mapping(copied["big"].ctypes.data,
                                                                file_mappings(ckdir / "run"))
    shutil.rmtree(ckdir / "run")
    gc.collect()
    for k in ("big", "big_bf16", "huge", "small"):
        assert first[k].tobytes() == t[k].tobytes()
        assert copied[k].tobytes() == t2[k].tobytes()


@pytestmark_map
def test_sharded_leaf_pieces_are_mapped_when_they_are_saved_shards(ckdir):
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    rows = NamedSharding(mesh, P("x"))
    x = jax.device_put(jnp.arange(8 * 65536 * 4, dtype=jnp.float32).reshape(8 * 256, 1024), rows)  # 1 MiB a device
    jaxckpt.save(ckdir / "c", {"x": x})
    same = jaxckpt.restore(ckdir / "c", {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows)})["x"]
    maps = file_mappings(ckdir / "c")
    assert same.sharding == rows
    assert all(in_mapping(s.data.unsafe_buffer_pointer(), maps) for s in same.addressable_shards)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(x))
    cols = NamedSharding(mesh, P(None, "x"))  # resharded: each piece is assembled from 8 shards
    other = jaxckpt.restore(ckdir / "c", {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cols)})["x"]
    assert other.sharding == cols
    assert not any(in_mapping(s.data.unsafe_buffer_pointer(), maps) for s in other.addressable_shards)
    np.testing.assert_array_equal(np.asarray(other), np.asarray(x))


@pytestmark_map
def test_dtype_cast_from_a_mapped_leaf(ckdir):
    t = tree()
    jaxckpt.save(ckdir / "c", t)
    target = {"big": np.zeros((512, 1024), np.float16), "big_bf16": np.zeros((1024, 1024), np.float32),
              "huge": np.zeros(t["huge"].shape, np.float32), "small": np.zeros(1000, np.float32), "step": 0}
    got = jaxckpt.restore(ckdir / "c", target)
    assert got["big"].dtype == np.float16 and got["big"].tobytes() == t["big"].astype(np.float16).tobytes()
    assert got["big_bf16"].tobytes() == t["big_bf16"].astype(np.float32).tobytes()
    assert got["huge"].tobytes() == t["huge"].tobytes() and got["step"] == 7


@pytestmark_map
@pytest.mark.parametrize("mmap", [True, False])
def test_corrupt_large_leaf_names_leaf_chunk_and_file(ckdir, mmap):
    t = tree()
    jaxckpt.save(ckdir / "c", t)
    name, shard = flip_bits(ckdir / "c", "huge", fmt.CHUNK_BYTES + 12345, 0x10)  # in the second chunk
    at = shard.offset + fmt.CHUNK_BYTES + 12345
    with pytest.raises(CorruptCheckpointError) as e:
        jaxckpt.restore(ckdir / "c", mmap=mmap)
    msg = str(e.value)
    assert name in msg and "leaf 'huge', chunk 1" in msg and "checksum mismatch" in msg
    got = jaxckpt.restore(ckdir / "c", verify=False, mmap=mmap)  # unverified: the flipped bit comes through
    flat = t["huge"].view(np.uint8).copy()
    flat[at - shard.offset] ^= 0x10
    assert got["huge"].view(np.uint8).tobytes() == flat.tobytes()


@pytestmark_map
def test_populate_reports_a_file_truncated_under_the_mapping(tmp_path):
    p = str(tmp_path / "f.bin")
    with open(p, "wb") as f:
        f.write(os.urandom(4 * 4096))
    fd = os.open(p, os.O_RDONLY)
    try:
        view = memory.map_range(fd, 4096 + 64, 2 * 4096)
        memory.populate(view, p, 4096 + 64)  # fine while the bytes are there
        with open(p, "rb") as f:
            assert bytes(view) == f.read()[4096 + 64:3 * 4096 + 64]
        late = memory.map_range(fd, 2 * 4096, 2 * 4096)
        os.truncate(p, 4096)
        with pytest.raises(CorruptCheckpointError, match=r"f\.bin: truncated: 8192 bytes at offset 8192 are no longer"):
            memory.populate(late, p, 2 * 4096)
    finally:
        os.close(fd)


def test_mappable_flags_must_match_requests(ckdir):
    jaxckpt.save(ckdir / "c", {"a": np.zeros(4, np.float32)})
    with reader.CheckpointReader(ckdir / "c") as r:
        with pytest.raises(ValueError, match="1 requests but 2 mappable flags"):
            r.read([(0, None)], mappable=[True, True])


def test_a_lone_small_shard_is_read_not_mapped(ckdir, monkeypatch):
    """Small shards whose run of neighbours holds less than MAP_MIN_BYTES are read, never mapped."""
    monkeypatch.setattr(memory, "map_range", lambda *a: pytest.fail(f"mapped {a}"))
    t = {"a": np.arange(readplan.MAP_MIN_BYTES // 8, dtype=np.float32), "b": np.ones(10, np.int8)}
    jaxckpt.save(ckdir / "c", t)
    got = jaxckpt.restore(ckdir / "c")
    assert got["a"].tobytes() == t["a"].tobytes() and got["b"].tobytes() == t["b"].tobytes()


def many_small():
    rng = np.random.default_rng(1)
    return {f"l{i:03d}": rng.standard_normal(1000 + 37 * i, dtype=np.float32) for i in range(300)}  # ~1.4 MiB


@pytestmark_map
def test_a_run_of_small_shards_is_one_mapping_and_each_leaf_a_view_of_it(ckdir):
    """Neighbouring small shards (a 10,000-leaf tree) are read in runs; a run of
    at least MAP_MIN_BYTES whose results stay on the host is one copy-on-write
    mapping of the file and every leaf a view of it: no fresh memory, no copy."""
    t = many_small()
    jaxckpt.save(ckdir / "c", t)
    before = data_digest(ckdir / "c")
    got = jaxckpt.restore(ckdir / "c")
    maps = file_mappings(ckdir / "c")
    assert len(maps) == 1  # one run, one mapping
    for k, v in t.items():
        assert got[k].tobytes() == v.tobytes(), k
        assert in_mapping(got[k].ctypes.data, maps), k
        assert got[k].ctypes.data % 64 == 0, k  # the writer's alignment survives: XLA can adopt it
    got["l007"][:] = 0  # copy-on-write
    assert data_digest(ckdir / "c") == before
    assert jaxckpt.restore(ckdir / "c")["l007"].tobytes() == t["l007"].tobytes()
    dev = SingleDeviceSharding(jax.devices()[0])
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dev) for k, v in t.items()}
    placed = jaxckpt.restore(ckdir / "c", target=target)
    maps = file_mappings(ckdir / "c")
    assert all(in_mapping(placed[k].unsafe_buffer_pointer(), maps) for k in t)  # adopted, not copied
    del got, placed
    copied = jaxckpt.restore(ckdir / "c", mmap=False)
    assert all(not in_mapping(copied[k].ctypes.data, file_mappings(ckdir / "c")) for k in t)
    assert all(copied[k].tobytes() == v.tobytes() for k, v in t.items())


@pytestmark_map
@pytest.mark.parametrize("mmap", [True, False])
def test_corrupt_small_leaf_in_a_run_names_leaf_and_file(ckdir, mmap):
    t = many_small()
    jaxckpt.save(ckdir / "c", t)
    name, shard = flip_bits(ckdir / "c", "l123", 100, 4)
    with pytest.raises(CorruptCheckpointError) as e:
        jaxckpt.restore(ckdir / "c", mmap=mmap)
    assert f"{name}: checksum mismatch in leaf 'l123', chunk 0 (bytes at offset {shard.offset})" in str(e.value)


@pytestmark_map
def test_only_a_whole_aligned_shard_is_mapped(ckdir):
    """The planner maps a box only when it is exactly one saved shard at a
    64-byte aligned offset (what XLA's CPU client adopts without copying)."""
    t = {"a": np.arange(MiB, dtype=np.float32)}
    jaxckpt.save(ckdir / "c", t)
    with reader.CheckpointReader(ckdir / "c") as r:
        rec = r.manifest.leaves[0]
        whole = ((0, MiB),)

        def plan() -> readplan.Plan:
            return readplan.Plan(r.manifest, readplan.shard_starts(r.manifest), True, r._try_map)

        p = plan()
        got = p._map_shard(rec, whole, (MiB,), np.dtype(np.float32))
        assert got is not None and len(p.ops) == 1 and p.ops[0].mapped and p.ops[0].checksum is not None
        assert plan()._map_shard(rec, ((0, MiB // 2),), (MiB // 2,), np.dtype(np.float32)) is None  # part
        odd = rec._replace(shards=(rec.shards[0]._replace(offset=rec.shards[0].offset + 4),))
        assert plan()._map_shard(odd, whole, (MiB,), np.dtype(np.float32)) is None
        r._run([p.ops[0]])
        assert got.tobytes() == t["a"].tobytes()


@pytestmark_map
def test_an_io_error_while_populating_names_the_file_and_leaf(ckdir, monkeypatch):
    import ctypes
    import errno

    t = tree()
    jaxckpt.save(ckdir / "c", t)
    real = libc.madvise_fn()

    def failing(addr, length, advice):
        if advice == libc.MADV_POPULATE_READ:
            ctypes.set_errno(errno.EIO)
            return -1
        return real(addr, length, advice)

    monkeypatch.setattr(libc, "madvise_fn", lambda: failing)
    with pytest.raises(OSError) as e:
        jaxckpt.restore(ckdir / "c")
    assert e.value.errno == errno.EIO and not isinstance(e.value, CorruptCheckpointError)
    assert "data-" in e.value.filename and "(leaf '" in e.value.filename
    got = jaxckpt.restore(ckdir / "c", mmap=False)  # the copying path does not populate mappings
    assert got["huge"].tobytes() == t["huge"].tobytes()


class _Device:
    def __init__(self, platform):
        self.platform = platform


class _Sharding:
    def __init__(self, *platforms):
        self.device_set = {_Device(p) for p in platforms}


def test_only_host_and_cpu_bound_leaves_are_mappable(monkeypatch):
    from jaxckpt import targets

    cache: dict = {}  # by id(): the shardings must stay alive, as a target's do
    cpu, gpu, mixed = _Sharding("cpu", "cpu"), _Sharding("gpu"), _Sharding("cpu", "tpu")
    assert targets.host_bound(np.zeros(3), None, cache)
    assert targets.host_bound(None, cpu, cache)
    assert not targets.host_bound(None, gpu, cache)
    assert not targets.host_bound(None, mixed, cache)
    from jaxckpt import config
    with config.tuned(map_for_accelerators=True):
        assert targets.host_bound(None, gpu, {})


@pytestmark_map
def test_cli_verify_hashes_mapped_pages_and_finds_a_flipped_bit(ckdir):
    from jaxckpt import cli

    t = tree()
    jaxckpt.save(ckdir / "c", t)
    ok = cli.verify_checkpoint(str(ckdir / "c"), progress=False)
    assert ok.ok and ok.leaves == len(t)
    name, _ = flip_bits(ckdir / "c", "big_bf16", 777, 1)
    bad = cli.verify_checkpoint(str(ckdir / "c"), progress=False)
    assert not bad.ok and "checksum mismatch in leaf 'big_bf16', chunk 0" in bad.error and name in bad.error


@pytestmark_map
def test_a_mapping_the_kernel_will_not_populate_is_read_into(ckdir, monkeypatch):
    """EINVAL from MADV_POPULATE_READ (a file system whose mappings it does not
    support): the bytes are read into the private mapping instead."""
    import ctypes
    import errno

    t = {**tree(), **many_small()}  # large shards and a run of small ones
    jaxckpt.save(ckdir / "c", t)
    before = data_digest(ckdir / "c")
    real = libc.madvise_fn()
    refused = []

    def refusing(addr, length, advice):
        if advice == libc.MADV_POPULATE_READ:
            refused.append(length)
            ctypes.set_errno(errno.EINVAL)
            return -1
        return real(addr, length, advice)

    monkeypatch.setattr(libc, "madvise_fn", lambda: refusing)
    got = jaxckpt.restore(ckdir / "c")
    assert len(refused) >= 4  # the mapped path was taken, and refused (3 large leaves, 1 run)
    for k in t:
        assert got[k].tobytes() == t[k].tobytes(), k
    maps = file_mappings(ckdir / "c")
    assert in_mapping(got["l005"].ctypes.data, maps) and in_mapping(got["big"].ctypes.data, maps)
    assert data_digest(ckdir / "c") == before


@pytestmark_map
def test_populate_queues_the_whole_range_before_faulting_it_in(ckdir, monkeypatch):
    """Each mapped range is first handed to the kernel's readahead in one call
    (MADV_WILLNEED), then populated: same range, that order, nothing else."""
    t = {**tree(), **many_small()}
    jaxckpt.save(ckdir / "c", t)
    real = libc.madvise_fn()
    calls = []

    def recording(addr, length, advice):
        calls.append((threading.get_ident(), advice, addr, length))
        return real(addr, length, advice)

    monkeypatch.setattr(libc, "madvise_fn", lambda: recording)
    got = jaxckpt.restore(ckdir / "c")
    assert all(got[k].tobytes() == v.tobytes() for k, v in t.items() if k != "step")
    populated = sorted((a, n) for _, advice, a, n in calls if advice == libc.MADV_POPULATE_READ)
    hinted = sorted((a, n) for _, advice, a, n in calls if advice == libc.MADV_WILLNEED)
    assert len(populated) >= 4 and hinted == populated  # 2 + 1 + 2 chunks of large leaves, 1 run
    for thread in {c[0] for c in calls}:  # in each reader thread: hint, then populate, range by range
        mine = [c[1:] for c in calls if c[0] == thread]
        for i, (advice, a, n) in enumerate(mine):
            if advice == libc.MADV_POPULATE_READ:
                assert mine[i - 1] == (libc.MADV_WILLNEED, a, n)
