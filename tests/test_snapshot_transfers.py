"""The accelerator snapshot path (device -> pinned host memory), exercised on
CPU devices by declaring them accelerators: the same jax calls run, so the
batching, the fallback and the ownership of the copies are checked here; the
speed was measured on a GPU (benchmarks/transfer_probe.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxckpt
from jaxckpt import accelcopy, arrayinfo, snapshot


@pytest.fixture
def as_accelerator(monkeypatch):
    monkeypatch.setattr(arrayinfo, "on_accelerator", lambda device: True)


def _tree():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    return {
        "w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32),
        "sharded": jax.device_put(jnp.arange(16 * 8, dtype=jnp.int32).reshape(16, 8),
                                  NamedSharding(mesh, P("a", "b"))),
        "replicated": jax.device_put(jnp.linspace(0, 1, 10, dtype=jnp.bfloat16), NamedSharding(mesh, P())),
        "key": jax.random.key(7),
        "n": np.arange(5),
    }


def _expected(tree):
    return {k: np.asarray(jax.random.key_data(v) if k == "key" else v) for k, v in tree.items()}


def _host(snap, paths=("key", "n", "replicated", "sharded", "w")):
    """Reassemble each leaf from the snapshot's shards (tree order is sorted keys)."""
    out = {}
    for name, leaf in zip(paths, snap.leaves):
        full = np.zeros(leaf.shape, dtype=leaf.shards[0][1].dtype)
        for box, a in leaf.shards:
            full[tuple(slice(lo, hi) for lo, hi in box)] = a
        out[name] = full
    return out


def _assert_holds(snap, want):
    got = _host(snap)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_one_batched_transfer_to_pinned_host_and_the_copies_outlive_the_sources(as_accelerator, monkeypatch):
    calls = []
    real = jax.device_put

    def spy(x, s=None, **kw):
        calls.append((len(x) if isinstance(x, list) else 1, {getattr(t, "memory_kind", None) for t in s}
                      if isinstance(s, list) else {getattr(s, "memory_kind", None)}))
        return real(x, s, **kw)

    tree = _tree()
    want = _expected(tree)
    monkeypatch.setattr(snapshot.jax, "device_put", spy)
    snap = snapshot.take(tree)
    monkeypatch.undo()
    # w (1) + sharded (8 unique shards) + replicated (one device's copy) + key (1): one call
    assert calls == [(11, {"pinned_host"})]
    for k in ("w", "sharded", "replicated"):
        tree[k].delete()
    jax.block_until_ready(jnp.zeros(1 << 20) + 1)  # memory churn after the sources are gone
    _assert_holds(snap, want)
    assert [len(leaf.shards) for leaf in snap.leaves] == [1, 1, 1, 8, 1]


def test_refused_pinned_transfer_falls_back_to_copy_to_host_async(as_accelerator, monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: pinned host memory")

    started = []
    tree = _tree()
    want = _expected(tree)
    monkeypatch.setattr(snapshot, "_device_put", refuse)
    cls = type(tree["w"])
    real_async = cls.copy_to_host_async
    monkeypatch.setattr(cls, "copy_to_host_async", lambda self: (started.append(self.shape), real_async(self))[1])
    snap = snapshot.take(tree)
    monkeypatch.undo()
    assert len(started) == 11
    _assert_holds(snap, want)


def test_devices_without_pinned_host_memory_use_copy_to_host_async(as_accelerator, monkeypatch):
    tree = _tree()
    want = _expected(tree)
    monkeypatch.setattr(accelcopy, "pinned_sharding", lambda device: None)
    assert not snapshot.has_pinned_host(jax.devices()[0])
    called = []
    monkeypatch.setattr(snapshot, "_device_put", lambda *a, **k: called.append(1))
    snap = snapshot.take(tree)
    monkeypatch.undo()
    assert called == []
    _assert_holds(snap, want)


def test_save_and_restore_through_the_pinned_path_is_bit_exact(as_accelerator, tmp_path):
    tree = _tree()
    want = _expected(tree)
    with jaxckpt.AsyncCheckpointer(copy_cpu_arrays=True) as ck:  # no effect on "accelerator" arrays
        ck.save(tmp_path / "c", tree).result()
    got = jaxckpt.restore(tmp_path / "c")
    for k in ("w", "sharded", "replicated", "n"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(got["key"])), want["key"])
