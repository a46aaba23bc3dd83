"""Restore into targets, partial restore, resharding, and the flat views
(load_checkpoint / load_into) of issue 2."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
from jaxckpt import format as fmt
from jaxckpt import memory, posixfs


# ---------------------------------------------------------------- helpers
def raw(x: Any) -> bytes:
    return np.ascontiguousarray(np.asarray(x)).view(np.uint8).tobytes()


def assert_same_leaves(got: Any, want: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert type(g) is type(w)
        assert np.asarray(g).dtype == np.asarray(w).dtype
        assert raw(g) == raw(w)


def assert_reads_only(reads: list[tuple[int, int]], m: fmt.Manifest, wanted: set[str]) -> None:
    """The reads cover every byte of the wanted leaves and touch no byte of any other leaf
    (reads may be coalesced across alignment padding)."""
    def ranges(pred):
        return [(s.offset, s.offset + s.length) for leaf in m.leaves if pred(leaf.path) for s in leaf.shards if s.length]

    for a, z in ranges(lambda p: p in wanted):
        covered = sorted((max(a, o), min(z, o + n)) for o, n in reads if o < z and o + n > a)
        pos = a
        for lo, hi in covered:
            assert lo <= pos, f"bytes [{pos}, {lo}) of a wanted leaf were not read"
            pos = max(pos, hi)
        assert pos >= z
    for a, z in ranges(lambda p: p not in wanted):
        assert not [(o, n) for o, n in reads if o < z and o + n > a], f"another leaf's bytes [{a}, {z}) were read"
    want = ranges(lambda p: p in wanted)  # at most 63 bytes of alignment padding after each
    assert sum(n for _, n in reads) < sum(z - a for a, z in want) + 64 * (len(reads) + len(want)) + 4096


def spy_scatter_reads(monkeypatch, reads: list[tuple[int, int]]) -> None:
    """Record coalesced scatter reads, and populated mappings, as one (offset, length) each."""
    real = posixfs.preadv_into
    real_populate = memory.populate

    def spy(fd, bufs, off, p):
        reads.append((off, sum(len(b) for b in bufs)))
        real(fd, bufs, off, p)

    def spy_populate(view, p, off):
        reads.append((off, len(view)))
        return real_populate(view, p, off)

    monkeypatch.setattr(posixfs, "preadv_into", spy)
    monkeypatch.setattr(memory, "populate", spy_populate)


def read_manifest(path) -> fmt.Manifest:
    with open(os.path.join(path, fmt.MANIFEST_NAME), "rb") as f:
        return fmt.decode_manifest(f.read(), "test")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))


@pytest.fixture(scope="module")
def state() -> train_state.TrainState:
    """A Flax TrainState with optax adamw after three real training steps."""
    model = MLP()
    x = jnp.linspace(-1, 1, 12).reshape(4, 3)
    y = jnp.eye(4, 2)
    st = train_state.TrainState.create(apply_fn=model.apply, params=model.init(jax.random.key(0), x),
                                       tx=optax.adamw(1e-2))

    @jax.jit
    def step(st):
        grads = jax.grad(lambda p: jnp.mean((st.apply_fn(p, x) - y) ** 2))(st.params)
        return st.apply_gradients(grads=grads)

    for _ in range(3):
        st = step(st)
    return st


def state_dict(st: train_state.TrainState) -> dict:
    """The TrainState's data as a plain dict (what a notebook would save)."""
    return {"step": st.step, "params": st.params, "opt_state": st.opt_state}


# ---------------------------------------------------------------- targets
def test_trainstate_target_gets_type_and_sharding(ckdir, state):
    jaxckpt.save(ckdir / "c", state)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    # a target whose leaves live replicated over the 8-device mesh
    target = jax.tree.map(lambda x: jax.device_put(jnp.zeros_like(x), NamedSharding(mesh, P())), state)
    got = jaxckpt.restore(ckdir / "c", target)
    assert type(got) is train_state.TrainState
    assert got.apply_fn is target.apply_fn and got.tx is target.tx
    for g, t, w in zip(jax.tree.leaves(got), jax.tree.leaves(target), jax.tree.leaves(state)):
        assert isinstance(g, jax.Array) and g.sharding == t.sharding and g.dtype == w.dtype
        assert raw(g) == raw(w)


def test_trainstate_restores_from_plain_dict_checkpoint(ckdir, state):
    # paths agree (step, params/..., opt_state/0/mu/...), containers differ
    jaxckpt.save(ckdir / "c", state_dict(state))
    got = jaxckpt.restore(ckdir / "c", state)
    assert type(got) is train_state.TrainState
    assert_same_leaves(got, state)


def test_partial_restore_params_only(ckdir, state, monkeypatch):
    jaxckpt.save(ckdir / "c", state_dict(state))
    target = {"params": jax.tree.map(jnp.zeros_like, state.params)}
    with pytest.raises(jaxckpt.StructureMismatchError) as ei:
        jaxckpt.restore(ckdir / "c", target)
    extra = ["opt_state/0/count"] + [f"opt_state/0/{m}/params/{d}/{k}" for m in ("mu", "nu")
                                     for d in ("Dense_0", "Dense_1") for k in ("bias", "kernel")] + ["step"]
    assert str(ei.value) == (f"{ckdir / 'c'}: the checkpoint does not match the target structure; "
                             "checkpoint leaves not in the target: " + ", ".join(repr(x) for x in extra)
                             + " (pass partial=True to restore a subset)")
    # more than 10: the list is cut
    jaxckpt.save(ckdir / "d", {"params": state.params, "more": list(range(12))})
    with pytest.raises(jaxckpt.StructureMismatchError) as ei:
        jaxckpt.restore(ckdir / "d", target)
    assert str(ei.value).endswith("checkpoint leaves not in the target: 'more/0', 'more/1', 'more/10', 'more/11', "
                                  "'more/2', 'more/3', 'more/4', 'more/5', 'more/6', 'more/7' and 2 more "
                                  "(pass partial=True to restore a subset)")

    reads: list[tuple[int, int]] = []
    real = posixfs.pread_into

    def spy(fd, buf, offset, path):
        reads.append((offset, len(buf)))
        real(fd, buf, offset, path)

    monkeypatch.setattr(posixfs, "pread_into", spy)
    spy_scatter_reads(monkeypatch, reads)
    got = jaxckpt.restore(ckdir / "c", target, partial=True)
    assert_same_leaves(got, {"params": state.params})
    # exactly the params' bytes were read, each once, nothing of opt_state or step
    m = read_manifest(ckdir / "c")
    assert_reads_only(reads, m, {leaf.path for leaf in m.leaves if leaf.path.startswith("params/")})
    assert len([leaf for leaf in m.leaves if leaf.path.startswith("params/")]) == 4


def test_partial_restore_reads_one_leaf_only(ckdir, monkeypatch):
    tree = {"a": np.arange(100_000, dtype=np.float32), "b": np.ones((300, 700), np.int16), "c": np.zeros(5, np.int8)}
    jaxckpt.save(ckdir / "c", tree)
    reads: list[tuple[int, int]] = []
    real = posixfs.pread_into
    monkeypatch.setattr(posixfs, "pread_into", lambda fd, buf, off, p: (reads.append((off, len(buf))), real(fd, buf, off, p)))
    spy_scatter_reads(monkeypatch, reads)
    got = jaxckpt.restore(ckdir / "c", {"b": np.zeros((300, 700), np.int16)}, partial=True)
    np.testing.assert_array_equal(got["b"], tree["b"])
    m = read_manifest(ckdir / "c")
    rec = next(x for x in m.leaves if x.path == "b")
    assert reads == [(rec.shards[0].offset, 300 * 700 * 2)]
    assert_reads_only(reads, m, {"b"})
    # two leaves with a third, large one saved between them: it is not read
    reads.clear()
    got = jaxckpt.restore(ckdir / "c", {"a": np.zeros(100_000, np.float32), "c": np.zeros(5, np.int8)}, partial=True)
    np.testing.assert_array_equal(got["a"], tree["a"])
    assert_reads_only(reads, m, {"a", "c"})


def test_many_small_leaves_are_read_in_a_few_runs(ckdir, monkeypatch):
    """Small whole leaves are read in runs of neighbours (one read and one
    buffer per run, each result a view of it); a partial restore's runs skip
    the leaves it leaves out."""
    rng = np.random.default_rng(3)
    dtypes = [np.float32, np.int8, np.float16, ml_dtypes.bfloat16, np.int64, np.bool_, np.complex64]
    tree = {f"l{i:03d}": (rng.standard_normal(int(rng.integers(1, 3000))) * 100).astype(dtypes[i % len(dtypes)])
            for i in range(300)}
    tree["scalar"] = np.float64(2.5)
    jaxckpt.save(ckdir / "c", tree)
    m = read_manifest(ckdir / "c")
    reads: list[tuple[int, int]] = []
    real = posixfs.pread_into
    monkeypatch.setattr(posixfs, "pread_into", lambda fd, buf, off, p: (reads.append((off, len(buf))), real(fd, buf, off, p)))
    spy_scatter_reads(monkeypatch, reads)
    got = jaxckpt.restore(ckdir / "c")
    assert_same_leaves(got, tree)
    assert 1 <= len(reads) <= 2  # ~1.2 MB of leaves: one or two runs of at most 8 MiB, not 301 reads
    assert_reads_only(reads, m, set(tree))
    bases = {id(np.asarray(v).base) for k, v in got.items() if k != "scalar"}
    assert len(bases) <= 2
    # every fourth leaf: runs break at the leaves left out, whose bytes are never read
    reads.clear()
    wanted = {k for i, k in enumerate(sorted(tree)) if i % 4 == 0}
    part = jaxckpt.restore(ckdir / "c", {k: tree[k] for k in wanted}, partial=True)
    assert_same_leaves(part, {k: tree[k] for k in wanted})
    assert_reads_only(reads, m, wanted)


def test_target_dtype_casts(ckdir):
    vals = np.array([[0.5, -1.25, 3.0], [1e4, -0.0, 7.75]], np.float32)
    jaxckpt.save(ckdir / "c", {"np": vals, "jx": vals, "sds": vals, "i": np.arange(6, dtype=np.int64).reshape(2, 3),
                                "py": np.float32(2.5)})
    target = {"np": np.zeros((2, 3), np.float16), "jx": jnp.zeros((2, 3), jnp.bfloat16),
              "sds": jax.ShapeDtypeStruct((2, 3), jnp.float16), "i": np.zeros((2, 3), np.float64), "py": 0.0}
    got = jaxckpt.restore(ckdir / "c", target)
    assert type(got["np"]) is np.ndarray and got["np"].dtype == np.float16
    assert raw(got["np"]) == raw(vals.astype(np.float16))
    assert isinstance(got["jx"], jax.Array) and got["jx"].dtype == jnp.bfloat16
    assert raw(got["jx"]) == raw(vals.astype(ml_dtypes.bfloat16))
    assert isinstance(got["sds"], jax.Array) and got["sds"].dtype == jnp.float16
    assert raw(got["i"]) == raw(np.arange(6, dtype=np.float64).reshape(2, 3))
    assert type(got["py"]) is float and got["py"] == 2.5


def test_a_cast_that_changes_the_kind_of_the_values_is_refused(ckdir):
    """float32 [0.7, 1e10] into int32 would come back as [0, -2147483648]: a
    target of another kind is a mismatch, as a shape is; within a kind (or
    widening it: int -> float, real -> complex) the values are cast."""
    vals = np.array([0.7, 1e10], np.float32)
    jaxckpt.save(ckdir / "c", {"w": vals, "z": vals.astype(np.complex64), "s": np.array([-1, 2], np.int16)})
    base = {"w": np.zeros(2, np.float32), "z": np.zeros(2, np.complex64), "s": np.zeros(2, np.int16)}
    for key, t, found, why in (
            ("w", np.zeros(2, np.int32), "float32", "floating point to signed integer"),
            ("w", jax.ShapeDtypeStruct((2,), np.uint8), "float32", "floating point to unsigned integer"),
            ("z", jnp.zeros(2, jnp.float32), "complex64", "complex to floating point"),
            ("s", np.zeros(2, np.uint16), "int16", "signed integer to unsigned integer"),
            ("s", np.zeros(2, bool), "int16", "signed integer to bool")):
        with pytest.raises(jaxckpt.StructureMismatchError) as ei:
            jaxckpt.restore(ckdir / "c", {**base, key: t})
        assert str(ei.value) == (f"{ckdir / 'c'}: leaf {key!r}: dtype mismatch: the target expects {np.dtype(t.dtype)}, "
                                 f"the checkpoint has {found}, and a cast from {why} changes values (restore without a "
                                 "target and cast it yourself)")
        with pytest.raises(jaxckpt.StructureMismatchError, match=f"the source has {found}, and a cast from {why}"):
            jaxckpt.load_into({key: t}, {key: jaxckpt.restore(ckdir / "c")[key]})
    got = jaxckpt.restore(ckdir / "c", {"w": jnp.zeros(2, jnp.bfloat16), "z": np.zeros(2, np.complex128),
                                        "s": np.zeros(2, ml_dtypes.int4)})
    assert got["w"].dtype == jnp.bfloat16 and got["z"].dtype == np.complex128 and got["s"].tolist() == [-1, 2]


def test_shape_mismatch_names_path_and_shapes(ckdir):
    jaxckpt.save(ckdir / "c", {"params": {"w": np.zeros((4, 3), np.float32)}, "b": np.zeros(2)})
    for t in (np.zeros((3, 4), np.float32), jnp.zeros((3, 4)), jax.ShapeDtypeStruct((3, 4), jnp.float32)):
        with pytest.raises(jaxckpt.StructureMismatchError) as ei:
            jaxckpt.restore(ckdir / "c", {"params": {"w": t}, "b": np.zeros(2)})
        assert str(ei.value) == (f"{ckdir / 'c'}: leaf 'params/w': shape mismatch: "
                                 "the target expects (3, 4), the checkpoint has (4, 3)")


def test_missing_leaf_names_it(ckdir):
    jaxckpt.save(ckdir / "c", {"a": np.zeros(2), "b": {"c": np.ones(3)}})
    target = {"a": np.zeros(2), "b": {"c": np.ones(3), "d": np.ones(1)}}
    for partial in (False, True):
        with pytest.raises(jaxckpt.StructureMismatchError) as ei:
            jaxckpt.restore(ckdir / "c", target, partial=partial)
        assert str(ei.value) == (f"{ckdir / 'c'}: the checkpoint does not match the target structure; "
                                 "target leaves missing from the checkpoint: 'b/d'")


def test_kind_mismatches(ckdir):
    jaxckpt.save(ckdir / "c", {"n": 3, "a": np.zeros((2,)), "k": jax.random.key(1)})
    where = str(ckdir / "c")
    with pytest.raises(jaxckpt.StructureMismatchError) as ei:
        jaxckpt.restore(ckdir / "c", {"n": np.zeros(2), "a": np.zeros(2), "k": jax.random.key(0)})
    assert str(ei.value) == f"{where}: leaf 'n': the target expects an array of shape (2,), the checkpoint has a Python int"
    with pytest.raises(jaxckpt.StructureMismatchError) as ei:
        jaxckpt.restore(ckdir / "c", {"n": 1, "a": 0.0, "k": jax.random.key(0)})
    assert str(ei.value) == f"{where}: leaf 'a': the target expects a Python float, the checkpoint has an array of shape (2,)"
    with pytest.raises(jaxckpt.StructureMismatchError) as ei:
        jaxckpt.restore(ckdir / "c", {"n": 1, "a": np.zeros(2), "k": np.zeros(2, np.uint32)})
    assert str(ei.value) == (f"{where}: leaf 'k': the target expects a numeric array, the checkpoint has a PRNG key array")


@pytest.mark.parametrize("name,target,found", [
    ("s", 0, "a Python str"), ("s", 0.0, "a Python str"), ("i", "", "a Python int"), ("c", 0.0, "a Python complex"),
    ("z", "", "a float32 array of shape ()"), ("zc", 0.0, "a complex64 array of shape ()"),
])
def test_python_target_kind_mismatches(ckdir, name, target, found):
    jaxckpt.save(ckdir / "c", {"s": "abc", "i": 3, "c": 1j, "z": np.float32(2), "zc": np.complex64(1j)})
    with pytest.raises(jaxckpt.StructureMismatchError) as ei:
        jaxckpt.restore(ckdir / "c", {name: target}, partial=True)
    assert str(ei.value) == (f"{ckdir / 'c'}: leaf {name!r}: the target expects a Python {type(target).__name__}, "
                             f"the checkpoint has {found}")
    with pytest.raises(jaxckpt.StructureMismatchError) as ei:
        jaxckpt.load_into({name: target}, jaxckpt.load_checkpoint(ckdir / "c"), strict=False)
    assert str(ei.value).startswith(f"source dict: leaf {name!r}: the target expects {type(target).__name__}, the source has ")


def test_python_target_casts(ckdir):
    jaxckpt.save(ckdir / "c", {"i": 3, "f": 2.5, "z": np.float32(2), "b": True, "s": "x", "c": 1.5})
    got = jaxckpt.restore(ckdir / "c", {"i": 0.0, "f": 0.0, "z": 0, "b": False, "s": "", "c": 0j})
    assert got == {"i": 3.0, "f": 2.5, "z": 2, "b": True, "s": "x", "c": 1.5 + 0j}
    assert [type(got[k]) for k in ("i", "z", "c")] == [float, int, complex]


def test_restore_not_found(ckdir):
    with pytest.raises(jaxckpt.CheckpointNotFoundError) as ei:
        jaxckpt.restore(ckdir / "nothing")
    assert isinstance(ei.value, FileNotFoundError) and str(ckdir / "nothing") in str(ei.value)
    os.mkdir(ckdir / "empty")  # a directory without a manifest is not a checkpoint
    with pytest.raises(jaxckpt.CheckpointNotFoundError, match="manifest.msgpack is missing"):
        jaxckpt.inspect(ckdir / "empty")


# ---------------------------------------------------------------- resharding
@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))


@pytest.fixture
def saved_xy(ckdir, mesh):
    host = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    host[0, 0] = np.nan
    arr = jax.device_put(host, NamedSharding(mesh, P("x", "y")))
    jaxckpt.save(ckdir / "c", {"w": arr})
    assert len(read_manifest(ckdir / "c").leaves[0].shards) == 8
    return ckdir / "c", host


def check_sharded(got: jax.Array, host: np.ndarray, sharding) -> None:
    assert isinstance(got, jax.Array)
    assert got.sharding == sharding
    assert raw(got) == host.tobytes()
    for shard in got.addressable_shards:  # each device holds exactly its slice
        assert raw(shard.data) == np.ascontiguousarray(host[shard.index]).tobytes()


@pytest.mark.parametrize("spec", [P("y", "x"), P(None, "x"), P(), P("x", "y"), P(("y", "x"))],
                         ids=["yx", "none_x", "replicated", "same", "joint"])
@pytest.mark.parametrize("verify", [True, False])
def test_reshard_named_sharding(saved_xy, mesh, spec, verify):
    path, host = saved_xy
    sharding = NamedSharding(mesh, spec)
    got = jaxckpt.restore(path, {"w": jax.device_put(np.zeros((8, 16), np.float32), sharding)}, verify=verify)["w"]
    check_sharded(got, host, sharding)
    got = jaxckpt.restore(path, {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=sharding)}, verify=verify)["w"]
    check_sharded(got, host, sharding)


def test_reshard_other_mesh_and_single_device(saved_xy):
    path, host = saved_xy
    mesh2 = Mesh(np.array(jax.devices()[::-1]).reshape(2, 2, 2), ("a", "b", "c"))
    sharding = NamedSharding(mesh2, P(("a", "b"), "c"))
    got = jaxckpt.restore(path, {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=sharding)})["w"]
    check_sharded(got, host, sharding)
    one = SingleDeviceSharding(jax.devices()[5])
    got = jaxckpt.restore(path, {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=one)})["w"]
    check_sharded(got, host, one)


def test_sharded_and_single_device_leaves_are_placed_in_one_call(saved_xy, mesh, monkeypatch):
    """Every device's slice of a sharded leaf goes through placement.put with the
    single-device leaves (fast path, windows on accelerators), in one call."""
    from jaxckpt import placement
    path, host = saved_xy
    calls = []
    real = placement.put
    monkeypatch.setattr(placement, "put", lambda arrays, shardings: calls.append(
        [s.device_set for s in shardings]) or real(arrays, shardings))
    sharded = NamedSharding(mesh, P("y", "x"))
    one = SingleDeviceSharding(jax.devices()[3])
    target = {"a": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=sharded),
              "b": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=one)}
    source = {"a": jax.device_put(host, sharded), "b": jax.device_put(host, one)}
    jaxckpt.save(path.parent / "two", source)
    got = jaxckpt.restore(path.parent / "two", target)
    assert len(calls) == 1 and len(calls[0]) == 8 + 1
    assert sorted(d.id for ds in calls[0][:8] for d in ds) == sorted(d.id for d in jax.devices())
    check_sharded(got["a"], host, sharded)
    check_sharded(got["b"], host, one)


def test_reshard_to_numpy(saved_xy):
    path, host = saved_xy
    got = jaxckpt.restore(path, {"w": np.zeros((8, 16), np.float32)})["w"]
    assert type(got) is np.ndarray and got.tobytes() == host.tobytes()
    got = jaxckpt.restore(path)["w"]
    assert type(got) is np.ndarray and got.dtype == np.float32 and got.tobytes() == host.tobytes()
    flat = jaxckpt.load_checkpoint(path)
    assert list(flat) == ["w"] and flat["w"].tobytes() == host.tobytes()


def test_reshard_uneven_and_cast(ckdir, mesh):
    # 12 rows over 4 devices, then restored over 8 devices as bfloat16
    host = np.arange(12 * 6, dtype=np.float32).reshape(12, 6) / 7
    arr = jax.device_put(host, NamedSharding(mesh, P("x", None)))
    jaxckpt.save(ckdir / "c", arr)
    target = NamedSharding(Mesh(np.array(jax.devices()).reshape(2, 4), ("p", "q")), P("p", None))
    got = jaxckpt.restore(ckdir / "c", jax.ShapeDtypeStruct((12, 6), jnp.bfloat16, sharding=target))
    assert got.sharding == target and got.dtype == jnp.bfloat16
    assert raw(got) == raw(host.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("verify", [False, True])
def test_reshard_multi_chunk_leaf_reads_needed_ranges(ckdir, mesh, monkeypatch, verify):
    chunk = fmt.CHUNK_BYTES
    host = np.random.default_rng(1).integers(0, 2**31, size=(4096, 2560), dtype=np.int32)  # 40 MiB: 2.5 chunks
    jaxckpt.save(ckdir / "c", {"w": host})
    (s,) = read_manifest(ckdir / "c").leaves[0].shards
    assert len(s.checksums) == 3
    reads: list[tuple[int, int]] = []
    real = posixfs.pread_into
    monkeypatch.setattr(posixfs, "pread_into", lambda fd, buf, off, p: (reads.append((off, len(buf))), real(fd, buf, off, p)))
    spy_scatter_reads(monkeypatch, reads)
    sharding = NamedSharding(mesh, P("x", None))  # 4 row blocks of 10 MiB, none aligned to a chunk
    got = jaxckpt.restore(ckdir / "c", {"w": jax.ShapeDtypeStruct(host.shape, jnp.int32, sharding=sharding)}, verify=verify)["w"]
    check_sharded(got, host, sharding)
    rel = sorted((o - s.offset, n) for o, n in reads)
    assert all(0 <= o and o + n <= host.nbytes for o, n in rel)
    if not verify:  # exactly the rows the blocks need: every byte once
        assert sum(n for _, n in rel) == host.nbytes
        assert all(a + n <= b for (a, n), (b, _) in zip(rel, rel[1:]))
    else:  # whole checksum chunks only (reads may split them, never straddle), those a block overlaps
        per_chunk = {}
        for o, n in rel:
            assert o // chunk == (o + n - 1) // chunk
            per_chunk[o // chunk] = per_chunk.get(o // chunk, 0) + n
        # block 0: chunk 0; block 1: chunks 0,1; block 2: chunk 1; block 3: chunks 1,2
        sizes = [min(chunk, host.nbytes - c * chunk) for c in range(3)]
        assert per_chunk == {0: 2 * sizes[0], 1: 3 * sizes[1], 2: sizes[2]}


def test_sharded_prng_key_restore(ckdir, mesh):
    keys = jax.random.split(jax.random.key(3), 8)
    sharding = NamedSharding(mesh, P("x"))
    sk = jax.device_put(keys, sharding)
    jaxckpt.save(ckdir / "c", {"k": sk})
    got = jaxckpt.restore(ckdir / "c", {"k": sk})["k"]
    assert jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key)
    assert got.sharding == sharding
    assert raw(jax.random.key_data(got)) == raw(jax.random.key_data(keys))


# ---------------------------------------------------------------- flat views
def test_load_checkpoint_flat_keys(ckdir, state):
    jaxckpt.save(ckdir / "c", state_dict(state))
    flat = jaxckpt.load_checkpoint(ckdir / "c")
    assert sorted(flat) == [
        "opt_state/0/count",
        "opt_state/0/mu/params/Dense_0/bias", "opt_state/0/mu/params/Dense_0/kernel",
        "opt_state/0/mu/params/Dense_1/bias", "opt_state/0/mu/params/Dense_1/kernel",
        "opt_state/0/nu/params/Dense_0/bias", "opt_state/0/nu/params/Dense_0/kernel",
        "opt_state/0/nu/params/Dense_1/bias", "opt_state/0/nu/params/Dense_1/kernel",
        "params/params/Dense_0/bias", "params/params/Dense_0/kernel",
        "params/params/Dense_1/bias", "params/params/Dense_1/kernel",
        "step",
    ]
    assert type(flat["params/params/Dense_0/kernel"]) is np.ndarray
    assert raw(flat["params/params/Dense_0/kernel"]) == raw(state.params["params"]["Dense_0"]["kernel"])
    assert raw(flat["opt_state/0/nu/params/Dense_1/bias"]) == raw(state.opt_state[0].nu["params"]["Dense_1"]["bias"])
    assert flat["step"].shape == () and int(flat["step"]) == 3


def test_load_checkpoint_values_and_scalars(ckdir):
    jaxckpt.save(ckdir / "c", {"lr": 0.5, "name": "x", "s": np.int16(4), "l": [np.arange(2), None, {"z": 1j}]})
    flat = jaxckpt.load_checkpoint(ckdir / "c")
    assert flat.keys() == {"lr", "name", "s", "l/0", "l/2/z"}
    assert flat["lr"] == 0.5 and flat["name"] == "x" and flat["l/2/z"] == 1j
    assert type(flat["s"]) is np.int16 and flat["s"] == 4
    np.testing.assert_array_equal(flat["l/0"], np.arange(2))


def _target_with_extra_and_missing(state):
    params = jax.tree.map(jnp.zeros_like, state.params["params"])
    params["Dense_2"] = {"kernel": jnp.full((2, 2), 7.0)}   # missing from the source
    return {"params": {"params": params}}


def test_load_into_strict_and_non_strict(ckdir, state):
    jaxckpt.save(ckdir / "c", {"params": state.params, "extra_stat": np.arange(3)})
    target = _target_with_extra_and_missing(state)
    with pytest.raises(jaxckpt.StructureMismatchError) as ei:
        jaxckpt.load_into(target, ckdir / "c")
    assert str(ei.value) == (f"{ckdir / 'c'}: load_into(strict=True): 1 target keys missing from the source: "
                             "'params/params/Dense_2/kernel'; 1 source keys not in the target: 'extra_stat'")

    got, report = jaxckpt.load_into(target, ckdir / "c", strict=False)
    assert report == jaxckpt.LoadReport(missing=["params/params/Dense_2/kernel"], unexpected=["extra_stat"])
    assert jax.tree.structure(got) == jax.tree.structure(target)
    assert raw(got["params"]["params"]["Dense_2"]["kernel"]) == raw(jnp.full((2, 2), 7.0))  # the target's value
    for name in ("Dense_0", "Dense_1"):
        for k in ("kernel", "bias"):
            g = got["params"]["params"][name][k]
            assert isinstance(g, jax.Array) and raw(g) == raw(state.params["params"][name][k])


def test_load_into_reports_are_sorted(ckdir):
    jaxckpt.save(ckdir / "c", {"z": 1, "b": 2, "m": {"q": 3, "a": 4}})
    got, report = jaxckpt.load_into({"y": 0, "c": 0, "m": {"a": 0}, "aa": 9}, ckdir / "c", strict=False)
    assert report.missing == ["aa", "c", "y"]
    assert report.unexpected == ["b", "m/q", "z"]
    assert got == {"y": 0, "c": 0, "m": {"a": 4}, "aa": 9}


def test_load_into_from_flat_dict(ckdir, state):
    jaxckpt.save(ckdir / "c", {"params": state.params, "extra_stat": np.arange(3)})
    flat = jaxckpt.load_checkpoint(ckdir / "c")
    target = _target_with_extra_and_missing(state)
    with pytest.raises(jaxckpt.StructureMismatchError) as ei:
        jaxckpt.load_into(target, flat)
    assert str(ei.value) == ("source dict: load_into(strict=True): 1 target keys missing from the source: "
                             "'params/params/Dense_2/kernel'; 1 source keys not in the target: 'extra_stat'")
    got, report = jaxckpt.load_into(target, flat, strict=False)
    assert report == jaxckpt.LoadReport(["params/params/Dense_2/kernel"], ["extra_stat"])
    k = got["params"]["params"]["Dense_0"]["kernel"]
    assert isinstance(k, jax.Array) and raw(k) == raw(state.params["params"]["Dense_0"]["kernel"])
    assert raw(got["params"]["params"]["Dense_2"]["kernel"]) == raw(jnp.full((2, 2), 7.0))
    # exact match: strict passes and the report is empty
    full = {"params": jax.tree.map(jnp.zeros_like, state.params), "extra_stat": np.zeros(3, np.int64)}
    got, report = jaxckpt.load_into(full, flat)
    assert report == jaxckpt.LoadReport([], [])
    assert_same_leaves(got, {"params": state.params, "extra_stat": np.arange(3)})


def test_load_into_shape_mismatch_from_flat_dict():
    with pytest.raises(jaxckpt.StructureMismatchError) as ei:
        jaxckpt.load_into({"a": {"b": np.zeros((2, 2))}}, {"a/b": np.zeros(3)})
    assert str(ei.value) == "source dict: leaf 'a/b': shape mismatch: the target expects (2, 2), the source has (3,)"


def test_load_into_trainstate_from_checkpoint(ckdir, state):
    jaxckpt.save(ckdir / "c", state_dict(state))
    fresh = state.replace(step=jnp.zeros_like(state.step), params=jax.tree.map(jnp.zeros_like, state.params))
    got, report = jaxckpt.load_into(fresh, ckdir / "c")
    assert report == jaxckpt.LoadReport([], [])
    assert type(got) is train_state.TrainState
    assert_same_leaves(got, state)
