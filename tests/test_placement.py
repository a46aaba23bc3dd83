"""placement.put: host arrays -> single-device jax.Arrays, identical to jax.device_put."""

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

import jaxckpt
from jaxckpt import arrayinfo, config, placement


@pytest.fixture
def fresh_fast_path(monkeypatch):
    """Each test sees the module's fast-path state as after import, and leaves it so."""
    monkeypatch.setattr(placement, "_fast", None)


def _host_arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal(300).astype(np.float32),
        rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        rng.integers(-128, 127, 17).astype(np.int8),
        rng.integers(0, 2, (2, 2)).astype(bool),
        (rng.standard_normal(4) + 1j).astype(np.complex64),
        np.array(7, np.int32),
        np.zeros((0, 3), np.float32),
        rng.standard_normal((4, 6)).astype(np.float32).T,  # not C-contiguous
        rng.standard_normal(5),  # float64: narrowed by JAX with x64 off, so not on the fast path
        np.arange(5, dtype=np.uint64),
    ]


def _same(a: jax.Array, b: jax.Array) -> None:
    assert type(a) is type(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.sharding == b.sharding and a.committed == b.committed
    assert a.aval.weak_type == b.aval.weak_type
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_fast_path_is_active_on_the_pinned_jax(fresh_fast_path):
    # If a JAX upgrade removes the internal transfer, restores still work
    # (next test) but lose ~35 us per leaf: this test says so.
    from jax._src.lib import xla_client

    assert placement.fast_path_active()
    assert placement._fast[1] is xla_client.batched_device_put  # the runtime's, not pxla's wrapper


def test_put_equals_device_put(fresh_fast_path):
    host = _host_arrays()
    devs = jax.devices()
    shardings = [SingleDeviceSharding(devs[i % len(devs)]) for i in range(len(host))]
    got = placement.put(host, shardings)
    want = jax.device_put(host, shardings)
    for a, b in zip(got, want):
        _same(a, b)
    assert got[3].devices() == {devs[3 % len(devs)]}
    assert placement.fast_path_active()


def test_other_shardings_keep_their_order(fresh_fast_path):
    host = _host_arrays()[:4]
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    shardings = [SingleDeviceSharding(jax.devices()[1]), NamedSharding(mesh, PartitionSpec()),
                 SingleDeviceSharding(jax.devices()[2]), NamedSharding(mesh, PartitionSpec())]
    got = placement.put(host, shardings)
    for a, b in zip(got, jax.device_put(host, shardings)):
        _same(a, b)


def test_changed_internal_api_falls_back_for_good(fresh_fast_path, monkeypatch, caplog):
    calls = []

    def refused(*args):
        calls.append(args)
        raise TypeError("batched_device_put() takes 3 positional arguments")

    from jax._src import core
    monkeypatch.setattr(placement, "_fast", (core.ShapedArray, refused))
    host = _host_arrays()
    shardings = [SingleDeviceSharding(jax.devices()[0])] * len(host)
    with caplog.at_level("INFO", logger="jaxckpt"):
        got = placement.put(host, shardings)
    for a, b in zip(got, jax.device_put(host, shardings)):
        _same(a, b)
    assert len(calls) == 1
    assert not placement.fast_path_active()
    assert "direct host-to-device transfer unavailable (TypeError" in caplog.text
    placement.put(host, shardings)
    assert len(calls) == 1  # not tried again


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"put: 2 arrays but 1 shardings"):
        placement.put([np.zeros(1), np.zeros(1)], [SingleDeviceSharding(jax.devices()[0])])


def test_restore_of_many_leaves_uses_it_and_round_trips(fresh_fast_path, ckdir, monkeypatch):
    seen = []
    real = placement.put
    monkeypatch.setattr(placement, "put", lambda a, s: seen.append(len(a)) or real(a, s))
    dev = jax.devices()[5]
    tree = {f"l{i}": jax.device_put(np.arange(i, i + 40, dtype=np.float32), dev) for i in range(300)}
    jaxckpt.save(ckdir / "c", tree)
    out = jaxckpt.restore(ckdir / "c", target=tree)
    assert seen == [300]
    for k, v in tree.items():
        _same(out[k], v)


def test_a_changed_meaning_is_caught_too(fresh_fast_path, monkeypatch, caplog):
    from jax._src import core
    from jax._src.interpreters import pxla

    def uncommitted(aval, sharding, xs, devices, committed):
        return pxla.batched_device_put(aval, sharding, xs, devices, False)

    monkeypatch.setattr(placement, "_fast", (core.ShapedArray, uncommitted))
    host = _host_arrays()[:3]
    shardings = [SingleDeviceSharding(jax.devices()[1])] * 3
    with caplog.at_level("INFO", logger="jaxckpt"):
        got = placement.put(host, shardings)
    for a, b in zip(got, jax.device_put(host, shardings)):
        _same(a, b)
    assert not placement.fast_path_active()
    assert "unexpected result ArrayImpl" in caplog.text and "committed False" in caplog.text


def test_transfers_to_an_accelerator_go_in_windows_with_two_in_flight(fresh_fast_path, monkeypatch):
    """Windows of ~accel_window_bytes, the one before last waited for before the
    next is issued; results identical to jax.device_put, in order. (The CPU
    backend plays the accelerator here; on it ``put`` never windows.)"""
    arrays = _host_arrays() * 3
    shardings = [SingleDeviceSharding(jax.devices()[i % 2]) for i in range(len(arrays))]
    assert placement._windows(arrays, shardings) == [(0, len(arrays))]  # CPU: one window
    monkeypatch.setattr(arrayinfo, "on_accelerator", lambda d: True)
    with config.tuned(accel_window_bytes=1000):
        windows = placement._windows(arrays, shardings)
        assert windows[0][0] == 0 and windows[-1][1] == len(arrays) and len(windows) > 3
        assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
        for lo, hi in windows[:-1]:
            assert sum(a.nbytes for a in arrays[lo:hi]) >= 1000
            assert sum(a.nbytes for a in arrays[lo:hi - 1]) < 1000
        waited: list[int] = []
        real_wait = jax.block_until_ready
        monkeypatch.setattr(placement.jax, "block_until_ready", lambda xs: waited.append(len(xs)) or real_wait(xs))
        got = placement.put(arrays, shardings)
        assert waited == [0] + [hi - lo for lo, hi in windows[:-1]]
        for a, b in zip(got, jax.device_put(arrays, shardings)):
            _same(a, b)


def test_windows_issued_from_several_threads_give_the_same_arrays_in_order(fresh_fast_path, monkeypatch):
    """accel_put_threads > 1: every window is placed by a pool thread that waits
    for it to land; the result is identical to jax.device_put, in order."""
    import threading

    arrays = _host_arrays() * 4
    shardings = [SingleDeviceSharding(jax.devices()[i % 3]) for i in range(len(arrays))]
    monkeypatch.setattr(arrayinfo, "on_accelerator", lambda d: True)
    threads: set[str] = set()
    real_put = placement._put
    monkeypatch.setattr(placement, "_put", lambda a, s: threads.add(threading.current_thread().name) or real_put(a, s))
    with config.tuned(accel_window_bytes=1000, accel_put_threads=3):
        windows = placement._windows(arrays, shardings)
        assert len(windows) > 3
        got = placement.put(arrays, shardings)
    assert threads and all(name.startswith("jaxckpt-put") for name in threads)
    assert len(got) == len(arrays)
    for a, b in zip(got, jax.device_put(arrays, shardings)):
        _same(a, b)


def test_put_threads_must_be_positive():
    with pytest.raises(ValueError, match="accel_put_threads must be an int >= 1, got 0"):
        config.configure(accel_put_threads=0)


def test_windows_staged_through_pinned_host_memory_give_the_same_arrays(fresh_fast_path, monkeypatch):
    """accel_stage_pinned: arrays of >= STAGE_MIN_BYTES go host -> pinned host ->
    device (the CPU backend has pinned host memory too); smaller ones and other
    shardings the direct way; all identical to jax.device_put, in order."""
    rng = np.random.default_rng(3)
    big = [rng.standard_normal(300_000).astype(np.float32), rng.integers(0, 9, (700, 700)).astype(np.int32),
           rng.standard_normal(2 << 20).astype(ml_dtypes.bfloat16)]
    arrays = _host_arrays() + big + _host_arrays()
    shardings = [SingleDeviceSharding(jax.devices()[i % 3]) for i in range(len(arrays))]
    monkeypatch.setattr(arrayinfo, "on_accelerator", lambda d: True)
    kinds = []
    real = jax.device_put
    monkeypatch.setattr(placement.jax, "device_put", lambda x, s=None, **kw: (
        kinds.append(sorted({t.memory_kind for t in s})), real(x, s, **kw))[1])
    for threads in (1, 2):
        kinds.clear()
        with config.tuned(accel_window_bytes=4 << 20, accel_put_threads=threads, accel_stage_pinned=True):
            got = placement.put(arrays, shardings)
        assert ["pinned_host"] in kinds  # the big ones went through pinned host memory
        monkeypatch.setattr(placement.jax, "device_put", real)
        for a, b in zip(got, jax.device_put(arrays, shardings)):
            _same(a, b)
        monkeypatch.setattr(placement.jax, "device_put", lambda x, s=None, **kw: (
            kinds.append(sorted({t.memory_kind for t in s})), real(x, s, **kw))[1])
