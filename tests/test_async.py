"""AsyncCheckpointer: snapshot semantics, background errors, backpressure, timeouts."""

import errno
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import hostcopy, layout, memory, posixfs, snapshot, targets, writer


def _entries(directory):
    return sorted(os.listdir(directory))


@pytest.fixture
def slow_writes(monkeypatch):
    """Hold every data-file write until the test releases it."""
    gate = threading.Event()
    original = posixfs.DataFile.pwrite

    def pwrite(self, view, offset, direct=False):
        gate.wait(30)
        return original(self, view, offset, direct)

    monkeypatch.setattr(posixfs.DataFile, "pwrite", pwrite)
    monkeypatch.setattr(posixfs.DataFile, "pwritev", lambda self, views, off: pwrite(
        self, memoryview(b"".join(bytes(v) for v in views)), off))
    yield gate
    gate.set()


def test_save_returns_before_write_and_holds_values_at_call_time(ckdir, slow_writes):
    # The write is held back until after we donate, delete and mutate the inputs.
    step = jax.jit(lambda x: x * 2 + 1, donate_argnums=0)
    x = jnp.arange(1 << 16, dtype=jnp.float32)
    gone = jnp.full((1 << 12,), 7, jnp.int32)
    host = np.arange(1000, dtype=np.int64)
    expect = {"donated": np.asarray(x).copy(), "deleted": np.asarray(gone).copy(), "numpy": host.copy()}
    with jaxckpt.AsyncCheckpointer() as ck:
        h = ck.save(ckdir / "c", {"donated": x, "deleted": gone, "numpy": host})
        assert not h.done()
        y = step(x)  # donates x's buffer
        gone.delete()
        host[:] = -1
        y.block_until_ready()
        slow_writes.set()
        h.result(timeout=60)
    got = jaxckpt.restore(ckdir / "c")
    for k, v in expect.items():
        np.testing.assert_array_equal(got[k], v)
    assert h.stats.bytes >= sum(v.nbytes for v in expect.values())


def test_cpu_snapshot_is_zero_copy_and_survives_donation(ckdir):
    # On the CPU backend the snapshot holds a view of the jax buffer instead of
    # a copy; while it is alive XLA must neither free nor reuse that memory.
    x = jnp.arange(1 << 20, dtype=jnp.float32) + 1
    snap = snapshot.take({"x": x})
    (_, host), = snap.leaves[0].shards
    assert host.ctypes.data == x.unsafe_buffer_pointer()  # zero-copy
    before = host.copy()
    y = jax.jit(lambda a: a * 0 - 5, donate_argnums=0)(x)
    z = jnp.zeros(1 << 20, jnp.float32) - 9  # would reuse a freed buffer
    jax.block_until_ready((y, z))
    np.testing.assert_array_equal(host, before)


def test_background_error_is_raised_exactly_once_on_next_save(ckdir, monkeypatch, caplog):
    def fail(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", self.path)

    tree = {"a": jnp.ones(1000)}
    ck = jaxckpt.AsyncCheckpointer()
    with monkeypatch.context() as m:
        m.setattr(posixfs.DataFile, "pwrite", fail)
        m.setattr(posixfs.DataFile, "pwritev", fail)
        h = ck.save(ckdir / "bad", tree)
        assert h.wait(timeout=30)  # waits without consuming the error
    assert "background save of" in caplog.text and "No space left" in caplog.text  # logged at once
    with pytest.raises(OSError) as info:
        ck.save(ckdir / "next", tree)
    assert info.value.errno == errno.ENOSPC and "data-00000.bin" in str(info.value)
    ck.save(ckdir / "next", tree).result()  # raised once only: this save works
    ck.wait_until_finished()
    ck.close()
    assert _entries(ckdir) == ["next"]  # no temporary directory left, nothing committed for "bad"


def test_error_reported_by_result_is_not_raised_again(ckdir, monkeypatch):
    tree = {"a": jnp.ones(10)}
    ck = jaxckpt.AsyncCheckpointer()
    monkeypatch.setattr(layout, "write_run", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    h = ck.save(ckdir / "bad", tree)
    with pytest.raises(OSError, match="I/O error"):
        h.result(timeout=30)
    ck.wait_until_finished()  # already reported through result()
    ck.close()
    assert _entries(ckdir) == []


@pytest.mark.parametrize("where", ["wait_until_finished", "close", "context"])
def test_pending_error_surfaces_on_wait_close_and_context_exit(ckdir, monkeypatch, where):
    monkeypatch.setattr(layout, "write_run", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    tree = {"a": jnp.ones(10)}
    if where == "context":
        with pytest.raises(OSError, match="I/O error"):
            with jaxckpt.AsyncCheckpointer() as ck:
                ck.save(ckdir / "c", tree)
        return
    ck = jaxckpt.AsyncCheckpointer()
    ck.save(ckdir / "c", tree)
    with pytest.raises(OSError, match="I/O error"):
        getattr(ck, where)()
    ck.close()  # nothing left to raise
    assert _entries(ckdir) == []


def test_context_exit_keeps_the_body_exception(ckdir, monkeypatch):
    monkeypatch.setattr(layout, "write_run", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(KeyError):
        with jaxckpt.AsyncCheckpointer() as ck:
            ck.save(ckdir / "c", {"a": jnp.ones(3)})
            raise KeyError("body")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("via", ["checkpointer", "manager"])
def test_an_interrupt_as_save_queues_its_job_leaves_nothing_to_wait_for(ckdir, via):
    """Ctrl-C landing in save() after its handle was registered and before its
    job was queued (simulated: the pool's submit raises it) left a handle that
    never resolved: close(), wait_until_finished() and a manager's exception
    save waited forever, and its SIGTERM handler kept the process alive."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if via == "checkpointer":
        ck = jaxckpt.AsyncCheckpointer()
        ck._bg.submit = interrupted
        with pytest.raises(KeyboardInterrupt):
            ck.save(ckdir / "x", {"w": np.ones(4)})
        (handle,) = ck._handles
        assert handle.done() and handle.wait(timeout=0)
        with pytest.raises(jaxckpt.CheckpointError, match=r"x: the save was interrupted \(KeyboardInterrupt\) "
                                                          "before it began; nothing was written"):
            handle.result()
        ck.wait_until_finished()  # the interrupt was the error: not raised again
        ck.close()
        assert not (ckdir / "x").exists()
        return
    with pytest.raises(KeyboardInterrupt):
        with jaxckpt.CheckpointManager(ckdir / "run", save_on_exception=True) as mgr:
            mgr.save(1, {"w": np.ones(4)})
            mgr.wait_until_finished()
            real = mgr._ckptr._bg.submit
            mgr._ckptr._bg.submit = interrupted
            try:
                mgr.save(2, {"w": np.full(4, 2.0)})
            finally:
                mgr._ckptr._bg.submit = real  # the exception save on the way out may queue its job
    assert jaxckpt.CheckpointManager(ckdir / "run", read_only=True).all_steps()[0] == 1


def test_max_in_flight_is_honoured(ckdir, monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    release = threading.Semaphore(0)
    original = writer.write_checkpoint

    def tracked(*a, **k):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        release.acquire(timeout=30)
        try:
            return original(*a, **k)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(writer, "write_checkpoint", tracked)
    ck = jaxckpt.AsyncCheckpointer(max_in_flight=2)
    tree = {"a": jnp.ones(100)}
    h1 = ck.save(ckdir / "1", tree)
    h2 = ck.save(ckdir / "2", tree)
    started = threading.Event()
    third = []

    def save_third():
        started.set()
        third.append(ck.save(ckdir / "3", tree))

    t = threading.Thread(target=save_third)
    t.start()
    started.wait(10)
    t.join(0.3)
    assert t.is_alive() and not third  # blocked: two saves in flight
    release.release()  # let the oldest finish
    t.join(30)
    assert third and not t.is_alive()
    release.release()
    release.release()
    ck.close()
    assert peak[0] == 2
    assert all(h.done() for h in (h1, h2, third[0]))
    assert _entries(ckdir) == ["1", "2", "3"]


def test_many_sequential_async_saves_are_identical(ckdir):
    tree = {"w": jnp.arange(12345, dtype=jnp.float32), "b": [np.int8(3), 2.5], "k": jax.random.key(1)}
    with jaxckpt.AsyncCheckpointer(max_in_flight=3) as ck:
        for i in range(12):
            ck.save(ckdir / f"s{i}", tree)
    datas = {(ckdir / f"s{i}" / "data-00000.bin").read_bytes() for i in range(12)}
    assert len(datas) == 1
    for i in range(12):
        got = jaxckpt.restore(ckdir / f"s{i}", tree)
        np.testing.assert_array_equal(got["w"], tree["w"])
        assert got["b"][0] == np.int8(3) and got["b"][1] == 2.5
        np.testing.assert_array_equal(jax.random.key_data(got["k"]), jax.random.key_data(tree["k"]))


def test_timeout_abandons_a_hung_save(ckdir, slow_writes):
    ck = jaxckpt.AsyncCheckpointer(timeout=0.5)
    h = ck.save(ckdir / "hung", {"a": jnp.ones(1 << 16)})
    with pytest.raises(jaxckpt.SaveTimeoutError, match="hung.* did not finish within the timeout"):
        h.result(timeout=30)
    slow_writes.set()
    ck.close()
    assert _entries(ckdir) == []  # nothing committed, temporary directory removed


def test_stats_and_files(ckdir):
    tree = {"a": jnp.ones((256, 256)), "b": np.zeros(10, np.uint8)}
    with jaxckpt.AsyncCheckpointer(max_workers=3) as ck:
        h = ck.save(ckdir / "c", tree, metadata={"note": "hi"})
        h.result()
    s = h.stats
    assert isinstance(s, jaxckpt.SaveStats)
    assert s.bytes >= 256 * 256 * 4 + 10 and s.files == 2
    assert 0 <= s.blocking_s <= s.total_s and s.throughput_gbps > 0
    assert sorted(os.listdir(ckdir / "c")) == ["data-00000.bin", "manifest.msgpack"]
    with pytest.raises(dataclasses_frozen_error()):
        s.bytes = 0  # frozen record


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_save_validates_on_the_calling_thread(ckdir):
    with jaxckpt.AsyncCheckpointer() as ck:
        ck.save(ckdir / "c", {"a": 1}).result()
        with pytest.raises(jaxckpt.CheckpointExistsError, match="already exists"):
            ck.save(ckdir / "c", {"a": 1})
        with pytest.raises(jaxckpt.UnsupportedValueError, match="metadata.*set is not storable"):
            ck.save(ckdir / "d", {"a": 1}, metadata={"x": {1, 2}})
        with pytest.raises(jaxckpt.UnsupportedValueError, match="leaf 'a/obj': object is not storable"):
            ck.save(ckdir / "e", {"a": {"obj": object()}})
    assert _entries(ckdir) == ["c"]


def test_closed_checkpointer_refuses_saves(ckdir):
    ck = jaxckpt.AsyncCheckpointer()
    ck.close()
    with pytest.raises(jaxckpt.CheckpointError, match="closed"):
        ck.save(ckdir / "c", {"a": 1})


def test_buffered_fallback_when_o_direct_is_unavailable(ckdir, monkeypatch):
    monkeypatch.setattr(posixfs, "O_DIRECT", 0)
    tree = {f"x{i}": np.random.default_rng(i).random(n).astype(np.float32) for i, n in enumerate([1, 17, 5000, 300000])}
    with jaxckpt.AsyncCheckpointer() as ck:
        ck.save(ckdir / "c", tree).result()
    got = jaxckpt.restore(ckdir / "c")
    for k in tree:
        np.testing.assert_array_equal(got[k], tree[k])


def _copied(tree) -> hostcopy.Copied:
    """A snapshot of ``tree`` with its CPU arrays copied, into a pool prepared for it."""
    pool = hostcopy.HostPool()
    pool.warm(hostcopy.cpu_view_sizes(snapshot.take(tree)))
    return hostcopy.copy_views(snapshot.take(tree), pool)


def test_copy_cpu_arrays_takes_an_owned_copy_and_frees_the_buffer_for_donation(ckdir):
    x = jnp.arange(1 << 16, dtype=jnp.float32) + 1
    snap = _copied({"x": x}).snapshot
    (_, host), = snap.leaves[0].shards
    assert host.ctypes.data != x.unsafe_buffer_pointer() and not np.shares_memory(host, np.asarray(x))
    np.testing.assert_array_equal(host, np.arange(1 << 16, dtype=np.float32) + 1)
    with jaxckpt.AsyncCheckpointer(copy_cpu_arrays=True) as ck:
        h = ck.save(ckdir / "c", {"x": x})
        y = jax.jit(lambda a: a * 0 - 5, donate_argnums=0)(x)
        y.block_until_ready()
        h.result()
    np.testing.assert_array_equal(jaxckpt.restore(ckdir / "c")["x"], np.arange(1 << 16, dtype=np.float32) + 1)
    with jaxckpt.CheckpointManager(ckdir / "m", copy_cpu_arrays=True) as mgr:
        assert mgr._ckptr.copy_cpu_arrays is True


def _warmed(ck) -> None:
    """Wait until the checkpointer's background buffer preparation is done."""
    ck._copies.wait_prepared()


def test_copy_cpu_arrays_reuses_its_host_buffers_between_saves(ckdir, monkeypatch):
    """Copies go only into ready buffers: the first save finds none, keeps a
    zero-copy view and has a buffer prepared in the background; later saves
    copy into that same memory."""
    seen = []
    real = hostcopy.HostPool.take
    monkeypatch.setattr(hostcopy.HostPool, "take", lambda self, shape, dtype: (
        seen.append(b := real(self, shape, dtype)), b)[1])
    training = threading.current_thread()
    real_alloc = hostcopy._page_aligned
    monkeypatch.setattr(hostcopy, "_page_aligned", lambda n: (
        threading.current_thread() is not training or pytest.fail("a save allocated on the training thread"))
        and real_alloc(n))
    step = jax.jit(lambda a: a + 1, donate_argnums=0)
    w = jnp.arange(1 << 16, dtype=jnp.float32)
    with jaxckpt.AsyncCheckpointer(copy_cpu_arrays=True) as ck:
        for name in "abc":
            h = ck.save(ckdir / name, {"w": w})
            w = step(w)  # donated: a view keeps it alive, a copy lets the step reuse it
            h.result()
            _warmed(ck)
    assert seen[0] is None  # nothing ready at the first save: a view
    assert seen[1] is not None and seen[2] is not None and seen[1].ctypes.data == seen[2].ctypes.data
    for i, name in enumerate("abc"):
        np.testing.assert_array_equal(jaxckpt.restore(ckdir / name)["w"], np.arange(1 << 16, dtype=np.float32) + i)


def test_a_copying_save_never_faults_in_fresh_memory_on_the_training_thread(ckdir):
    """A tree that grows between saves: the new leaf stays a view for one save
    (its buffer is prepared in the background), the others are copied."""
    small = {"a": jnp.arange(1 << 16, dtype=jnp.float32)}
    with jaxckpt.AsyncCheckpointer(copy_cpu_arrays=True) as ck:
        ck.save(ckdir / "s0", small).result()
        _warmed(ck)
        grown = dict(small, b=jnp.arange(1 << 17, dtype=jnp.float32))
        copied = ck._copies.take(grown)
        snap = copied.snapshot
        (_, a), = snap.leaves[0].shards
        (_, b), = snap.leaves[1].shards
        assert not np.shares_memory(a, np.asarray(grown["a"])) and not snap.leaves[0].cpu_view
        assert np.shares_memory(b, np.asarray(grown["b"])) and snap.leaves[1].cpu_view
        assert copied.missing == (1 << 19,)
        del snap, copied
        ck.save(ckdir / "s1", grown).result()
        _warmed(ck)
        assert sorted(ck._copies.pool._free) == [1 << 18, 1 << 19]
    np.testing.assert_array_equal(jaxckpt.restore(ckdir / "s1")["b"], np.arange(1 << 17, dtype=np.float32))


def test_pooled_buffers_of_a_tree_that_changed_are_let_go(ckdir):
    """Host memory stays bounded: once saves stop asking for a size (the tree
    changed), its buffers are dropped after KEEP_SAVES saves."""
    old = {"w": jnp.ones(1 << 16, jnp.float32)}  # 256 KiB
    new = {"v": jnp.ones(3 << 15, jnp.float32)}  # 384 KiB
    with jaxckpt.AsyncCheckpointer(copy_cpu_arrays=True) as ck:
        for i in range(2):
            ck.save(ckdir / f"old{i}", old).result()
            _warmed(ck)
        assert sorted(ck._copies.pool._free) == [1 << 18]
        for i in range(hostcopy.HostPool.KEEP_SAVES + 1):
            ck.save(ckdir / f"new{i}", new).result()
            _warmed(ck)
            assert (1 << 18 in ck._copies.pool._free) == (i < hostcopy.HostPool.KEEP_SAVES - 1)
        assert sorted(ck._copies.pool._free) == [3 << 17]
    np.testing.assert_array_equal(jaxckpt.restore(ckdir / "new4")["v"], np.ones(3 << 15, np.float32))


def test_copies_of_small_cpu_leaves_share_one_pooled_buffer(ckdir, monkeypatch):
    """Small leaves are copied into one arena (not a buffer, a mapping, each:
    a 10,000-leaf tree would otherwise map 10,000 regions), each at a 64-byte
    aligned offset; large ones get their own. Values stay bit-exact."""
    seen = []
    real = hostcopy.HostPool.take
    monkeypatch.setattr(hostcopy.HostPool, "take", lambda self, shape, dtype: (
        seen.append((shape, b := real(self, shape, dtype))), b)[1])
    rng = np.random.default_rng(0)
    tree = {f"s{i}": jnp.asarray(rng.integers(-100, 100, n).astype(dt))
            for i, (n, dt) in enumerate([(7, np.int8), (0, np.float32), (1000, np.float32), (33, jnp.bfloat16),
                                         (5, np.complex64), (1, np.int64)] * 20)}
    tree["scalar"] = jnp.float32(2.5)
    tree["big"] = jnp.arange(1 << 15, dtype=jnp.float32)  # 128 KiB: a buffer of its own
    expected = {k: np.asarray(v).copy() for k, v in tree.items()}
    snap = _copied(tree).snapshot
    small = sum(-(-np.asarray(v).nbytes // 64) * 64 for k, v in tree.items() if k != "big")
    assert sorted(shape for shape, _ in seen) == sorted([(small,), (1 << 15,)])
    assert all(b is not None for _, b in seen)  # the prepared buffers
    assert hostcopy.cpu_view_sizes(snapshot.take(tree)) == [1 << 17, small]
    arena = next(b for shape, b in seen if shape == (small,))
    for (k, v), leaf in zip(sorted(tree.items()), snap.leaves):
        (_, host), = leaf.shards
        assert host.tobytes() == expected[k].tobytes() and host.dtype == expected[k].dtype
        assert host.ctypes.data % 64 == 0 or not host.nbytes
        assert not np.shares_memory(host, np.asarray(v))
        assert np.shares_memory(host, arena) == (k != "big" and host.nbytes > 0)
        assert not leaf.cpu_view
    with jaxckpt.AsyncCheckpointer(copy_cpu_arrays=True) as ck:
        h = ck.save(ckdir / "c", tree)
        jax.jit(lambda t: jax.tree.map(lambda a: a * 0, t), donate_argnums=0)(tree)
        h.result()
    got = jaxckpt.restore(ckdir / "c")
    for k in expected:
        assert np.asarray(got[k]).tobytes() == expected[k].tobytes()


def _aligned(nbytes, seed, shift=0):
    """Random bytes whose address is ``shift`` bytes past a page boundary."""
    import mmap
    a = np.frombuffer(mmap.mmap(-1, max(nbytes + shift, 1)), np.uint8)[shift:shift + nbytes]
    a[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return a


@pytest.mark.parametrize("sizes", [
    [4096 * 3 + 5, 17, 70000, 4096, 1],           # aligned sources, tails, small leaves between
    [100, 5, 4096 * 2, 9, (8 << 20) + 4096 * 3 + 1],  # a source larger than one staging buffer
    [65536, 65536, 3],
    [16384 + 7] * 1800 + [1, 4096 * 5],               # small leaves filling several staging buffers
    # (size, address past a page boundary): what XLA's and numpy's allocators return; staged
    [(70000, 64), 17, ((8 << 20) + 4096 * 3 + 1, 64), (3 << 20, 4032), 4096 * 4, ((1 << 20) + 3, 17)],
])
def test_direct_writes_from_aligned_sources_match_the_buffered_layout(tmp_path, sizes):
    """Page-aligned sources skip the staging copy; the file must be byte-for-byte
    what the buffered path writes for the same plan (gaps zero-filled)."""
    arrays = []
    for i, n in enumerate(sizes):
        n, shift = n if isinstance(n, tuple) else (n, 0)
        a = _aligned(n, i, shift) if n >= 4096 else np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)
        arrays.append(a)
    leaves = []
    for a in arrays:
        box = ((0, a.size),)
        leaves.append(snapshot.HostLeaf("array", "uint8", a.shape, ((box, a),)))
    snap = snapshot.Snapshot(None, tuple(leaves))
    lay = layout.plan(snap, 1 << 20)
    direct_sources = [u for u in lay.units if layout.direct_ok(u.src, u.offset)]
    assert direct_sources, "the plan must contain page-aligned units for this test to mean anything"
    files = {}
    for direct in (True, False):
        f = posixfs.DataFile(str(tmp_path), f"d{int(direct)}.bin", direct=direct)
        if direct and not f.direct:
            pytest.skip("O_DIRECT is not supported on this file system")
        for run in layout.split_runs(lay.units, 3):
            if direct:
                layout.write_direct(f, run, layout.StagingPool(), layout.Abort())
            else:
                layout.write_buffered(f, run, layout.Abort())
        f.finish(lay.size)
        files[direct] = (tmp_path / f"d{int(direct)}.bin").read_bytes()
    assert len(files[True]) == lay.size
    assert files[True] == files[False]
    for a, off in zip(arrays, lay.shard_offsets):
        assert files[True][off[0]:off[0] + a.nbytes] == a.tobytes()


def test_pooled_copies_go_to_disk_without_the_staging_copy(ckdir, monkeypatch):
    copied = []
    real = np.copyto

    def spy(dst, src, *a, **k):
        if sys._getframe(1).f_code.co_name == "_write_direct":  # staging copies only
            copied.append(np.asarray(src).nbytes)
        return real(dst, src, *a, **k)

    tree = {"w": jnp.arange(3 << 18, dtype=jnp.float32) * 3, "b": jnp.arange(7, dtype=jnp.int8)}
    with jaxckpt.AsyncCheckpointer(copy_cpu_arrays=True) as ck:
        ck.save(ckdir / "warm", tree).result()
        _warmed(ck)
        monkeypatch.setattr(layout.np, "copyto", spy)
        ck.save(ckdir / "c", tree).result()
    monkeypatch.undo()
    if not posixfs.DataFile(str(ckdir), "probe", direct=True).direct:
        pytest.skip("O_DIRECT is not supported on this file system")
    assert sum(copied) < 64 << 10, f"the writer staged {sum(copied)} bytes of a 3 MiB pooled leaf"
    got = jaxckpt.restore(ckdir / "c")
    np.testing.assert_array_equal(got["w"], np.arange(3 << 18, dtype=np.float32) * 3)
    np.testing.assert_array_equal(got["b"], np.arange(7, dtype=np.int8))


def test_default_switches_to_copies_once_a_save_sees_its_arrays_donated(ckdir, slow_writes, caplog):
    """copy_cpu_arrays=None: zero-copy views until a save finds, at its end, that
    arrays it viewed were donated meanwhile; later snapshots copy."""
    copies = []
    real = hostcopy.copy_views
    step = jax.jit(lambda s: {k: v * 2 for k, v in s.items()}, donate_argnums=0)
    state = {"w": jnp.ones(1 << 19, jnp.float32), "b": jnp.ones(3, jnp.float32)}
    with jaxckpt.AsyncCheckpointer() as ck:
        assert ck.copy_cpu_arrays is None
        slow_writes.set()
        for i in range(3):  # a loop that does not donate: views throughout
            ck.save(ckdir / f"nodonate{i}", state).result()
        assert ck._copies.copying is False
        slow_writes.clear()
        h = ck.save(ckdir / "a", state)
        state = step(state)  # donates the viewed buffers while the save is held
        jax.block_until_ready(state)
        slow_writes.set()
        with caplog.at_level("INFO", logger="jaxckpt"):
            h.result()
        assert ck._copies.copying is True
        assert "let go of (donated, deleted or replaced) arrays the save of" in caplog.text
        # the copies' memory was faulted in after that save, off the training thread
        _warmed(ck)
        assert {n: len(bufs) for n, bufs in ck._copies.pool._free.items()} == {(1 << 19) * 4: 1, 64: 1}  # "b": an arena
        warmed_buffer = ck._copies.pool._free[(1 << 19) * 4][0]
        import unittest.mock as mock
        with mock.patch.object(hostcopy, "copy_views", lambda *a: copies.append(1) or real(*a)):
            ck.save(ckdir / "b", state).result()
    assert copies == [1]
    assert any(b is warmed_buffer for bufs in ck._copies.pool._free.values() for b in bufs)  # reused, not a new one
    np.testing.assert_array_equal(jaxckpt.restore(ckdir / "a")["w"], np.ones(1 << 19, np.float32))
    np.testing.assert_array_equal(jaxckpt.restore(ckdir / "b")["w"], np.full(1 << 19, 2, np.float32))


@pytest.mark.parametrize("choice", [False, True])
def test_an_explicit_copy_choice_is_never_changed(ckdir, choice):
    step = jax.jit(lambda s: {k: v + 1 for k, v in s.items()}, donate_argnums=0)
    state = {"w": jnp.zeros(1 << 19, jnp.float32)}
    with jaxckpt.AsyncCheckpointer(copy_cpu_arrays=choice) as ck:
        for i in range(3):
            h = ck.save(ckdir / f"s{i}", state)
            state = step(state)
            h.result()
            assert ck._copies.copying is choice
    for i in range(3):
        np.testing.assert_array_equal(jaxckpt.restore(ckdir / f"s{i}")["w"], np.full(1 << 19, i, np.float32))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_staging_and_pool_buffers_are_private_memory():
    """Shared anonymous memory (mmap's default) is shmem, which never gets huge
    pages; O_DIRECT from huge pages ran twice as fast here (memory.aligned_buffer)."""

    def perms(addr):
        with open("/proc/self/maps") as f:
            for line in f:
                span, mode = line.split()[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= addr < hi:
                    return mode
        raise AssertionError(f"address {addr:#x} not mapped")

    a = np.frombuffer(memory.aligned_buffer(4 << 20), np.uint8)
    b = hostcopy._page_aligned(4 << 20)
    for buf in (a, b):
        assert buf.ctypes.data % 4096 == 0
        assert perms(buf.ctypes.data) == "rw-p"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_background_threads_run_at_the_lowest_priority():
    from jaxckpt import checkpointer

    def nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = nice()
    warm = []
    with jaxckpt.AsyncCheckpointer() as ck:
        io = ck._io.submit(nice).result()
        bg = ck._bg.submit(nice).result()
        ck._copies.pool.warm = lambda sizes: warm.append(nice())  # the buffer preparation thread
        ck._copies.prepare([4096])
        ck._copies.wait_prepared()
    assert io == bg == warm[0] == checkpointer.BACKGROUND_NICE == 19
    assert nice() == before  # the caller's thread keeps its priority


def test_the_cyclic_collector_is_paused_for_whole_many_leaf_saves_and_restores_and_always_resumes(ckdir, monkeypatch):
    """A save of a tree of many leaves runs with the collector paused from its
    first stage to its commit (one collection afterwards instead of one per
    stage), a restore likewise; after success or failure it runs again."""
    import gc

    from jaxckpt import writer

    seen = []
    real_commit = writer._commit
    monkeypatch.setattr(writer, "_commit", lambda *a, **k: (seen.append(gc.isenabled()), real_commit(*a, **k)))
    many = {f"l{i}": np.full(3, i, np.float32) for i in range(writer._PAUSE_WHOLE_SAVE_LEAVES)}
    few = {"a": np.zeros(3)}
    assert gc.isenabled()
    with jaxckpt.AsyncCheckpointer() as ck:
        ck.save(ckdir / "many", many).result()
        ck.save(ckdir / "few", few).result()
    assert seen == [False, True]  # paused at the commit of the many-leaf save only
    assert gc.isenabled()
    from jaxckpt import api, reader

    paused = []
    for owner, name in ((reader.CheckpointReader, "read"), (api.progress_mod, "for_restore"), (targets, "fill")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, real=real, **k: (paused.append(gc.isenabled()), real(*a, **k))[1])
    got = jaxckpt.restore(ckdir / "many", target=many)
    assert paused == [False, False, False] and gc.isenabled() and got["l7"].tobytes() == many["l7"].tobytes()
    # failures resume it too
    monkeypatch.setattr(layout, "write_run", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with jaxckpt.AsyncCheckpointer() as ck:
        h = ck.save(ckdir / "bad", many)
        with pytest.raises(OSError, match="I/O error"):
            h.result()
    assert gc.isenabled() and not os.path.exists(ckdir / "bad")
    with pytest.raises(jaxckpt.StructureMismatchError):
        jaxckpt.restore(ckdir / "many", target={"nope": np.zeros(3)})
    assert gc.isenabled()
