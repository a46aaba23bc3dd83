"""Small accelerator shards packed on their device (jaxckpt/accelcopy.py), and
the background preparation of the first save, on CPU devices declared
accelerators (the CPU backend has pinned host memory, so the same jax calls
run as on a GPU; the speed was measured on one, benchmarks/RESULTS.md)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxckpt
from jaxckpt import accelcopy, arrayinfo, config, snapshot

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int8, np.int16, np.int32, np.int64,
          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, ml_dtypes.float8_e4m3fn,
          ml_dtypes.float8_e5m2, ml_dtypes.int4]


@pytest.fixture
def as_accelerator(monkeypatch):
    monkeypatch.setattr(arrayinfo, "on_accelerator", lambda device: True)


def _values(dtype, n, rng):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, n).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(np.int8 if dtype == ml_dtypes.int4 else dtype)
        lo, hi = (-8, 7) if dtype == ml_dtypes.int4 else (max(info.min, -1000), min(info.max, 1000))
        return rng.integers(lo, hi, n).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dtype)
    return rng.standard_normal(n).astype(dtype)


def _small_tree(rng, per_dtype=12):
    """Every dtype, each with enough small leaves to make a packed chunk; odd
    shapes, 0-d and 2-d leaves, a PRNG key among them."""
    tree = {}
    for dtype in DTYPES:
        name = np.dtype(dtype).name
        for i in range(per_dtype):
            shape = [(), (3,), (5, 7), (1, 1, 9), (33,)][i % 5]
            tree[f"{name}_{i:02d}"] = jnp.asarray(_values(dtype, int(np.prod(shape)), rng).reshape(shape))
    tree["keys"] = [jax.random.key(i) for i in range(10)]
    tree["big"] = jnp.arange(300_000, dtype=jnp.float32)  # above pack_max_bytes below: its own transfer
    return tree


def _leaf_bytes(snap):
    return [(leaf.dtype, leaf.shape, tuple((box, a.dtype.str, a.tobytes()) for box, a in leaf.shards))
            for leaf in snap.leaves]


def test_packed_snapshot_equals_the_shard_by_shard_one_for_every_dtype(as_accelerator):
    tree = _small_tree(np.random.default_rng(0))
    with config.tuned(pack_max_bytes=1 << 20):
        plain_first = snapshot.take(tree)  # chunk functions not compiled yet: shard by shard, compiles queued
        accelcopy.packers.wait()
        packed = snapshot.take(tree)
    with config.tuned(pack_max_bytes=0):
        unpacked = snapshot.take(tree)
    assert _leaf_bytes(packed) == _leaf_bytes(unpacked) == _leaf_bytes(plain_first)
    # The small leaves of one dtype are views of one host buffer; the big one is not.
    by_dtype: dict[str, set[int]] = {}
    for leaf in packed.leaves:
        if leaf.shape != (300_000,):
            by_dtype.setdefault(leaf.dtype, set()).add(id(leaf.shards[0][1].base))
    assert all(len(bases) == 1 for bases in by_dtype.values()), by_dtype
    (big,) = [leaf for leaf in packed.leaves if leaf.shape == (300_000,)]
    assert id(big.shards[0][1].base) not in by_dtype["float32"]
    assert len(by_dtype) == len({jnp.asarray(np.zeros(1, d)).dtype for d in DTYPES})  # (x64 off: 64-bit narrowed)


def test_packed_copies_outlive_their_donated_sources(as_accelerator):
    rng = np.random.default_rng(1)
    tree = {f"v{i}": jnp.asarray(rng.standard_normal(int(n)).astype(np.float32))
            for i, n in enumerate(rng.integers(1, 500, 40))}
    want = {k: np.asarray(v).copy() for k, v in tree.items()}
    snapshot.take(tree)
    accelcopy.packers.wait()
    snap = snapshot.take(tree)
    for v in tree.values():
        v.delete()
    jax.block_until_ready(jnp.zeros(1 << 20) + 1)
    for (k, w), leaf in zip(sorted(want.items()), snap.leaves):
        np.testing.assert_array_equal(leaf.shards[0][1], w, err_msg=k)


def test_chunks_group_by_device_and_dtype_and_respect_the_limits(monkeypatch):
    devs = jax.devices()
    f32, i8 = np.dtype(np.float32), np.dtype(np.int8)
    items = [(devs[i % 2], (10,), f32, 40) for i in range(40)] + [(devs[0], (4,), i8, 4)] * 3
    items.append((devs[0], (1000,), f32, 4000))
    monkeypatch.setattr(accelcopy, "PACK_LEAVES", 7)
    got = accelcopy.chunks(items, max_bytes=1000)
    # device 0: 20 float32 shards in chunks of 7, 7, 6; device 1 the same; int8 (3) too few; the big one left out
    assert [len(c.indices) for c in got] == [7, 7, 6, 7, 7, 6]
    assert got[0].indices == tuple(range(0, 14, 2)) and got[3].indices == tuple(range(1, 15, 2))
    assert got[0].key == (devs[0], f32, ((10,),) * 7)
    assert accelcopy.chunks(items, max_bytes=0) == []
    monkeypatch.setattr(accelcopy, "PACK_BYTES", 100)
    assert [len(c.indices) for c in accelcopy.chunks(items, max_bytes=1000)][:2] == [3, 3]


def test_planned_transfers_of_an_abstract_state_match_the_snapshot(as_accelerator):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    tree = {
        "w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32),
        "sharded": jax.device_put(jnp.arange(16 * 8, dtype=jnp.int32).reshape(16, 8),
                                  NamedSharding(mesh, P("a", None))),  # each row block on 2 devices: replica 0 taken
        "replicated": jax.device_put(jnp.linspace(0, 1, 10, dtype=jnp.bfloat16), NamedSharding(mesh, P())),
        "key": jax.random.key(7),
        "n": np.arange(5),
    }
    taken = []
    for leaf in snapshot.take(tree).leaves:
        taken += [a.shape for _, a in leaf.shards if leaf.kind != "array" or leaf.shape != (5,)]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                            if isinstance(x, jax.Array) else x, tree)
    planned = snapshot.planned_transfers(abstract)
    assert planned == snapshot.planned_transfers(tree)
    assert [shape for _, shape, _, _ in planned] == taken
    # every leaf but the numpy one is a transfer: key (2,), n skipped, replicated (10,), 4 row blocks, w
    assert [shape for _, shape, _, _ in planned] == [(2,), (10,), (4, 8), (4, 8), (4, 8), (4, 8), (64, 32)]
    assert [n for *_, n in planned] == [8, 20, 128, 128, 128, 128, 8192]
    assert [d.id for d, *_ in planned][2:6] == [0, 2, 4, 6]


def test_prepare_compiles_the_chunks_so_the_first_save_packs(as_accelerator, tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    tree = {f"v{i:03d}": jnp.asarray(rng.standard_normal(int(n)).astype(np.float32))
            for i, n in enumerate(rng.integers(1, 300, 30))}
    warmed = []
    real_warm = accelcopy.warm_pinned
    monkeypatch.setattr(accelcopy, "warm_pinned", lambda sizes: (warmed.append(list(sizes)), real_warm(sizes)))
    with jaxckpt.AsyncCheckpointer() as ck:
        ck.prepare(jax.eval_shape(lambda: tree)).result(timeout=120)
        assert warmed == [[(jax.devices()[0], sum(int(v.nbytes) for v in tree.values()))]]  # one packed chunk
        packed = []
        real_unpack = accelcopy.unpack
        monkeypatch.setattr(accelcopy, "unpack", lambda host, shapes: packed.append(len(shapes))
                            or real_unpack(host, shapes))
        ck.save(tmp_path / "c", tree).result()
    assert packed == [30]  # the first save used the compiled chunk
    got = jaxckpt.restore(tmp_path / "c")
    for k, v in tree.items():
        np.testing.assert_array_equal(got[k], np.asarray(v), err_msg=k)


def test_a_failed_pinned_warm_up_is_logged_and_saves_still_work(as_accelerator, tmp_path, monkeypatch, caplog):
    def refuse(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: pinned host memory")

    tree = {"w": jnp.arange(1000, dtype=jnp.float32)}
    monkeypatch.setattr(accelcopy.jax, "device_put", refuse)
    with caplog.at_level("WARNING", logger="jaxckpt"):
        snapshot.prepare(tree).result(timeout=60)
    monkeypatch.undo()
    assert "could not prepare pinned host memory (RuntimeError: RESOURCE_EXHAUSTED: pinned host memory)" \
        in caplog.text
    jaxckpt.save(tmp_path / "c", tree)
    np.testing.assert_array_equal(jaxckpt.restore(tmp_path / "c")["w"], np.arange(1000, dtype=np.float32))


def test_the_manager_prepares_from_expected_state_or_its_first_non_saving_call(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(jaxckpt.AsyncCheckpointer, "prepare", lambda self, tree: seen.append(tree))
    tree = {"w": jnp.zeros(4)}
    abstract = jax.eval_shape(lambda: tree)
    with jaxckpt.CheckpointManager(tmp_path / "a", save_interval_steps=10, expected_state=abstract) as mgr:
        assert seen == [abstract]
        assert not mgr.save(1, tree)
    assert seen == [abstract]  # once
    seen.clear()
    with jaxckpt.CheckpointManager(tmp_path / "b", save_interval_steps=10) as mgr:
        assert seen == []
        assert not mgr.save(1, tree) and not mgr.save(2, tree)
        assert mgr.save(10, tree)
    assert seen == [tree]


def test_a_packing_that_fails_on_real_arrays_falls_back_and_is_not_tried_again(as_accelerator, monkeypatch,
                                                                                  caplog):
    tree = {f"v{i}": jnp.full((i + 1,), i, jnp.int32) for i in range(10)}
    calls = []

    def broken(*xs):
        calls.append(len(xs))
        raise ValueError("compiled for another sharding")

    keys = [c.key for c in accelcopy.chunks(snapshot.planned_transfers(tree), 1 << 20)]
    assert len(keys) == 1
    monkeypatch.setitem(accelcopy.packers._ready, keys[0], broken)
    with caplog.at_level("INFO", logger="jaxckpt"):
        first = snapshot.take(tree)
        second = snapshot.take(tree)
    assert calls == [10]  # tried once, then dropped
    assert "packing 10 small shards failed (ValueError: compiled for another sharding)" in caplog.text
    for snap in (first, second):
        for (k, v), leaf in zip(sorted(tree.items()), snap.leaves):
            np.testing.assert_array_equal(leaf.shards[0][1], np.asarray(v), err_msg=k)


def test_prepare_lets_go_of_the_tree_once_it_is_planned(monkeypatch):
    """The state given to prepare is not held while the (slow) compiles run:
    on a full accelerator, keeping the first state's arrays alive that long
    would double its memory."""
    import gc
    import threading
    import weakref

    class Marker:  # a leaf that can be watched (snapshots skip it when planning)
        pass

    compiling, release = threading.Event(), threading.Event()

    def slow_compile(keys):
        compiling.set()
        release.wait(30)

    monkeypatch.setattr(accelcopy.packers, "compile_now", slow_compile)
    marker = Marker()
    watch = weakref.ref(marker)
    future = snapshot.prepare({"w": jnp.ones(3), "m": marker})
    del marker
    try:
        assert compiling.wait(30)
        gc.collect()
        assert watch() is None, "prepare still holds the tree while compiling"
    finally:
        release.set()
    future.result(30)
