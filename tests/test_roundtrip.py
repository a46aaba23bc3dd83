"""Round trips that must be bit-exact (issue 2, "What must round-trip bit-exactly").

Arrays are compared by their raw bytes (``tobytes``), so NaN payloads, signed
zeros and every bit of every dtype count.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from typing import Any, NamedTuple

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
from jaxckpt import arrayinfo
from jaxckpt import format as fmt


# ---------------------------------------------------------------- helpers
def is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def raw(x: Any) -> bytes:
    return np.ascontiguousarray(np.asarray(x)).view(np.uint8).tobytes()


def py_bits(v: Any) -> Any:
    """A Python scalar as something whose == is bit-exact (NaN, -0.0)."""
    if isinstance(v, float):
        return struct.pack("<d", v)
    if isinstance(v, complex):
        return struct.pack("<dd", v.real, v.imag)
    return v


def assert_leaf_same(got: Any, want: Any, where: str = "") -> None:
    """Same kind, same type, same dtype and shape, same bytes."""
    if is_key(want):
        assert is_key(got), where
        assert jax.random.key_impl(got) == jax.random.key_impl(want), where
        assert got.shape == want.shape, where
        assert raw(jax.random.key_data(got)) == raw(jax.random.key_data(want)), where
        return
    if isinstance(want, (np.ndarray, np.generic, jax.Array)):
        assert type(got) is type(want), (where, type(got), type(want))
        assert got.dtype == want.dtype, (where, got.dtype, want.dtype)
        assert got.shape == want.shape, (where, got.shape, want.shape)
        assert raw(got) == raw(want), where
        if isinstance(want, jax.Array):
            assert got.sharding == want.sharding, where
        return
    assert type(got) is type(want), (where, type(got), type(want))
    assert py_bits(got) == py_bits(want), (where, got, want)


def plain(tree: Any) -> Any:
    """What restore(target=None) must return for ``tree``."""
    if tree is None:
        return None
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {f: plain(getattr(tree, f)) for f in tree._fields}
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if type(tree) is list:
        return [plain(v) for v in tree]
    if type(tree) is tuple:
        return tuple(plain(v) for v in tree)
    if is_key(tree):
        return tree
    if isinstance(tree, jax.Array):
        return np.asarray(tree)
    return tree


def assert_plain_same(got: Any, want: Any, where: str = "") -> None:
    """Recursive comparison with exact container types (dict/list/tuple/None)."""
    if want is None:
        assert got is None, where
    elif isinstance(want, dict):
        assert type(got) is dict, (where, type(got))
        assert set(got) == set(want), (where, sorted(got), sorted(want))
        for k in want:
            assert_plain_same(got[k], want[k], f"{where}/{k}")
    elif type(want) in (list, tuple):
        assert type(got) is type(want), (where, type(got), type(want))
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_plain_same(g, w, f"{where}/{i}")
    else:
        assert_leaf_same(got, want, where)


def assert_tree_same(got: Any, want: Any) -> None:
    """Exactly the same pytree structure (incl. container types) and leaves."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    gl = jax.tree_util.tree_flatten_with_path(got)[0]
    wl = jax.tree_util.tree_flatten_with_path(want)[0]
    for (p, g), (_, w) in zip(gl, wl):
        assert_leaf_same(g, w, jax.tree_util.keystr(p))


def data_file(path: str) -> str:
    names = [n for n in os.listdir(path) if n.endswith(".bin")]
    assert len(names) == 1, names
    return os.path.join(path, names[0])


def read_manifest(path: str) -> fmt.Manifest:
    with open(os.path.join(path, fmt.MANIFEST_NAME), "rb") as f:
        return fmt.decode_manifest(f.read(), "test")


# ---------------------------------------------------------------- hypothesis
class Pair(NamedTuple):
    first: Any
    second: Any


class Single(NamedTuple):
    only: Any


# dtypes whose every bit pattern is a valid value: filled with random bytes
RAW_DTYPES = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "bfloat16", "complex64", "complex128",
    "float8_e3m4", "float8_e4m3", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz",
    "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
]
# sub-byte or bool dtypes: only canonical values (the unused bits are zero)
RANGED_DTYPES = {"bool": (0, 2), "int4": (-8, 8), "uint4": (0, 16), "int2": (-2, 2), "uint2": (0, 4)}
ALL_DTYPES = RAW_DTYPES + list(RANGED_DTYPES)
# without jax_enable_x64, jax cannot hold 64-bit dtypes
JAX_DTYPES = [d for d in ALL_DTYPES if d not in ("int64", "uint64", "float64", "complex128")]

SHAPES = st.one_of(
    st.just(()), st.just((0,)), st.just((3, 0)), st.just((1,)), st.just((7,)), st.just((3, 5)),
    st.just((2, 1, 3)), st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),
)


def make_array(dtype_name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    dtype = arrayinfo.DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if dtype_name in RANGED_DTYPES:
        lo, hi = RANGED_DTYPES[dtype_name]
        return rng.integers(lo, hi, size=shape).astype(dtype)
    return np.frombuffer(rng.bytes(n * dtype.itemsize), dtype=dtype).reshape(shape).copy()


@st.composite
def np_arrays(draw, dtypes=ALL_DTYPES):
    return make_array(draw(st.sampled_from(dtypes)), draw(SHAPES), draw(st.integers(0, 2**32 - 1)))


@st.composite
def jax_arrays(draw):
    return jax.device_put(draw(np_arrays(JAX_DTYPES)))


@st.composite
def np_scalars(draw):
    return make_array(draw(st.sampled_from(ALL_DTYPES)), (), draw(st.integers(0, 2**32 - 1)))[()]


PY_VALUES = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.complex_numbers(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=6)
LEAVES = st.one_of(np_arrays(), jax_arrays(), np_scalars(), PY_VALUES, st.none(),
                   st.integers(0, 2**31).map(jax.random.key))
TREES = st.recursive(
    LEAVES,
    lambda kids: st.one_of(
        st.dictionaries(KEYS, kids, max_size=4),
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.builds(Pair, kids, kids),
        st.builds(Single, kids),
    ),
    max_leaves=10,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tree=TREES)
def test_property_roundtrip_bit_exact(tree):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt")
        jaxckpt.save(path, tree)
        assert_plain_same(jaxckpt.restore(path), plain(tree))
        assert_tree_same(jaxckpt.restore(path, tree), tree)


# ---------------------------------------------------------------- numpy inputs
def test_every_format_dtype_roundtrips(ckdir):
    tree = {name: {"odd": make_array(name, (5, 3), i), "zero_d": make_array(name, (), i), "empty": make_array(name, (0, 2), i)}
            for i, name in enumerate(ALL_DTYPES)}
    tree["jax"] = {name: jax.device_put(make_array(name, (3, 7), i)) for i, name in enumerate(JAX_DTYPES)}
    jaxckpt.save(ckdir / "c", tree)
    assert_plain_same(jaxckpt.restore(ckdir / "c"), plain(tree))
    assert_tree_same(jaxckpt.restore(ckdir / "c", tree), tree)
    info = {leaf.path: leaf.dtype for leaf in jaxckpt.inspect(ckdir / "c").leaves}
    assert {p: d for p, d in info.items() if p.endswith("/odd")} == {f"{n}/odd": n for n in ALL_DTYPES}
    assert {p: d for p, d in info.items() if p.startswith("jax/")} == {f"jax/{n}": n for n in JAX_DTYPES}


def test_noncontiguous_and_fortran_views(ckdir):
    base = np.arange(7 * 9 * 4, dtype=np.float32).reshape(7, 9, 4)
    tree = {
        "strided": base[::2, 1::3, ::-1],
        "transposed": base.transpose(2, 0, 1),
        "fortran": np.asfortranarray(base[:, :, 1]),
        "column": base[:, 3, 2],
    }
    for v in tree.values():
        assert not v.flags.c_contiguous
    jaxckpt.save(ckdir / "c", tree)
    got = jaxckpt.restore(ckdir / "c")
    for k, v in tree.items():
        assert got[k].flags.c_contiguous
        np.testing.assert_array_equal(got[k], v)
        assert got[k].tobytes() == v.tobytes()  # tobytes is C order for both


def test_big_endian_comes_back_little_endian(ckdir):
    tree = {"i": np.arange(-5, 7, dtype=">i4").reshape(3, 4), "f": np.array([1.5, np.nan, -0.0], ">f8"),
            "c": np.array([1 + 2j, -3j], ">c8"), "u16": np.array([1, 65535], ">u2")}
    jaxckpt.save(ckdir / "c", tree)
    got = jaxckpt.restore(ckdir / "c")
    for k, v in tree.items():
        le = v.dtype.newbyteorder("<")
        assert got[k].dtype == le and got[k].dtype.byteorder in ("<", "=")
        assert got[k].tobytes() == v.astype(le).tobytes()
    # the bytes on disk are little-endian: int32 -5 at the start of the file
    m = read_manifest(str(ckdir / "c"))
    rec = next(x for x in m.leaves if x.path == "i")
    with open(data_file(str(ckdir / "c")), "rb") as f:
        f.seek(rec.shards[0].offset)
        assert f.read(4) == struct.pack("<i", -5)


def test_numpy_scalars_come_back_as_numpy_scalars(ckdir):
    tree = [np.float32(1.5), np.int64(-2**62), np.uint8(200), np.bool_(True), np.complex128(1 - 2j),
            ml_dtypes.bfloat16(3.0), np.float16(np.nan), ml_dtypes.int4(-3), np.float64(-0.0)]
    jaxckpt.save(ckdir / "c", tree)
    got = jaxckpt.restore(ckdir / "c")
    for g, w in zip(got, tree):
        assert isinstance(g, np.generic) and not isinstance(g, np.ndarray)
        assert_leaf_same(g, w)
    assert_tree_same(jaxckpt.restore(ckdir / "c", tree), tree)
    assert [leaf.kind for leaf in jaxckpt.inspect(ckdir / "c").leaves] == ["scalar"] * len(tree)


def test_python_values_and_none(ckdir):
    tree = {"i": 3, "big": 2**64 - 1, "neg": -(2**63), "f": -0.0, "nan": float("nan"), "b": False,
            "c": complex(1.5, -2), "s": "héllo/wörld", "empty": "", "n": None, "nested": [None, (None,), {}]}
    jaxckpt.save(ckdir / "c", tree)
    assert_plain_same(jaxckpt.restore(ckdir / "c"), tree)
    assert_tree_same(jaxckpt.restore(ckdir / "c", tree), tree)


def test_zero_d_and_empty_arrays(ckdir):
    tree = {"z": np.array(7, np.int16), "e": np.zeros((0,), np.float32), "e2": np.zeros((4, 0, 2), np.complex64),
            "jz": jnp.array(2.5, jnp.bfloat16), "je": jnp.zeros((0, 3), jnp.int8)}
    jaxckpt.save(ckdir / "c", tree)
    assert_plain_same(jaxckpt.restore(ckdir / "c"), plain(tree))
    assert_tree_same(jaxckpt.restore(ckdir / "c", tree), tree)


def test_single_leaf_and_empty_trees(ckdir):
    for i, tree in enumerate([np.arange(3), 5, None, {}, [], (), {"a": {}, "b": [()]}]):
        p = ckdir / f"c{i}"
        jaxckpt.save(p, tree)
        assert_plain_same(jaxckpt.restore(p), plain(tree))
        assert_tree_same(jaxckpt.restore(p, tree), tree)


# ---------------------------------------------------------------- jax inputs
@pytest.mark.parametrize("impl", [None, "rbg", "threefry2x32", "unsafe_rbg"])
def test_typed_prng_keys(ckdir, impl):
    k = jax.random.key(42, impl=impl)
    tree = {"one": k, "many": jax.random.split(k, 6).reshape(2, 3)}
    jaxckpt.save(ckdir / "c", tree)
    for got in (jaxckpt.restore(ckdir / "c"), jaxckpt.restore(ckdir / "c", tree)):
        for name in tree:
            assert_leaf_same(got[name], tree[name], name)
            assert str(jax.random.key_impl(got[name])) == str(jax.random.key_impl(tree[name]))
        # the restored key draws the same numbers
        np.testing.assert_array_equal(jax.random.normal(got["one"], (4,)), jax.random.normal(k, (4,)))
    info = {leaf.path: leaf for leaf in jaxckpt.inspect(ckdir / "c").leaves}
    assert info["one"].kind == "key" and info["one"].dtype == "uint32"


def test_64_bit_jax_arrays_with_x64(ckdir):
    with jax.enable_x64(True):
        tree = {n: jax.device_put(make_array(n, (3, 5), i)) for i, n in enumerate(["int64", "uint64", "float64", "complex128"])}
        assert [v.dtype for v in tree.values()] == [np.int64, np.uint64, np.float64, np.complex128]
        jaxckpt.save(ckdir / "c", tree)
        assert_plain_same(jaxckpt.restore(ckdir / "c"), plain(tree))
        assert_tree_same(jaxckpt.restore(ckdir / "c", tree), tree)


def mesh42() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))


SHARDINGS = {
    "xy": P("x", "y"),
    "yx": P("y", "x"),
    "x_only": P("x", None),   # 4 unique shards, each on 2 devices
    "y_cols": P(None, "y"),   # 2 unique shards, each on 4 devices
    "joint": P(("x", "y"), None),
    "replicated": P(),
}


@pytest.mark.parametrize("name", sorted(SHARDINGS))
def test_sharded_arrays_write_each_unique_shard_once(ckdir, name):
    mesh = mesh42()
    spec = SHARDINGS[name]
    # 256 x 512 float32 = 512 KiB: every shard is >= 64 KiB and 4096-aligned, so
    # the data file holds exactly the unique bytes, without padding.
    host = make_array("float32", (256, 512), 1)
    arr = jax.device_put(host, NamedSharding(mesh, spec))
    n_unique = len({tuple((s.start, s.stop) for s in idx) for idx in arr.sharding.devices_indices_map(arr.shape).values()})
    jaxckpt.save(ckdir / "c", {"w": arr})
    assert os.path.getsize(data_file(str(ckdir / "c"))) == host.nbytes
    rec = read_manifest(str(ckdir / "c")).leaves[0]
    assert len(rec.shards) == n_unique
    assert {s.box for s in rec.shards} == {
        tuple((s.start or 0, s.stop or d) for s, d in zip(idx, host.shape))
        for idx in arr.sharding.devices_indices_map(arr.shape).values()}
    got = jaxckpt.restore(ckdir / "c", {"w": arr})["w"]
    assert got.sharding == arr.sharding
    assert raw(got) == host.tobytes()
    assert jaxckpt.restore(ckdir / "c")["w"].tobytes() == host.tobytes()


def test_fully_replicated_small_array_is_written_once(ckdir):
    mesh = mesh42()
    host = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)  # 512 bytes
    arr = jax.device_put(host, NamedSharding(mesh, P()))
    assert len(arr.addressable_shards) == 8
    jaxckpt.save(ckdir / "c", arr)
    assert os.path.getsize(data_file(str(ckdir / "c"))) == 512
    assert len(read_manifest(str(ckdir / "c")).leaves[0].shards) == 1


def test_several_small_sharded_leaves_file_size(ckdir):
    mesh = mesh42()
    a = jax.device_put(np.arange(8 * 16, dtype=np.int32).reshape(8, 16), NamedSharding(mesh, P("x", "y")))  # 8 x 64 B
    b = jax.device_put(np.ones((4, 6), np.float16), NamedSharding(mesh, P("x")))  # 4 x 12 B, padded to 64
    c = jax.device_put(np.ones((3,), np.int8), NamedSharding(mesh, P()))  # 3 B, once
    jaxckpt.save(ckdir / "c", {"a": a, "b": b, "c": c})
    m = read_manifest(str(ckdir / "c"))
    assert [len(x.shards) for x in m.leaves] == [8, 4, 1]
    # small shards start on 64-byte boundaries: 8*64 + 3*64 + 12 + 3*64 ... computed from the layout rule
    pos = 0
    for rec in m.leaves:
        for s in rec.shards:
            assert s.offset == -(-pos // 64) * 64
            pos = s.offset + s.length
    assert os.path.getsize(data_file(str(ckdir / "c"))) == pos == 8 * 64 + 4 * 64 + 3
    got = jaxckpt.restore(ckdir / "c", {"a": a, "b": b, "c": c})
    assert_tree_same(got, {"a": a, "b": b, "c": c})
    for k, v in {"a": a, "b": b, "c": c}.items():
        assert got[k].sharding == v.sharding


def test_empty_sharded_arrays(ckdir):
    mesh = mesh42()
    tree = {f"e{i}": jax.device_put(np.zeros(shape, np.float32), NamedSharding(mesh, spec))
            for i, (shape, spec) in enumerate([((0, 16), P(None, "y")), ((8, 0), P("x", None)), ((0, 16), P("x", "y"))])}
    jaxckpt.save(ckdir / "c", tree)
    assert_tree_same(jaxckpt.restore(ckdir / "c", tree), tree)
    assert_plain_same(jaxckpt.restore(ckdir / "c"), plain(tree))


def test_colliding_key_paths_are_refused(ckdir):
    # "a/b" and a -> b flatten to the same key path: restoring by path could not tell them apart
    with pytest.raises(jaxckpt.UnsupportedValueError, match="leaf 'a/b': two leaves have the same key path"):
        jaxckpt.save(ckdir / "c", {"a/b": 1, "a": {"b": 2}})
    assert os.listdir(ckdir) == []
    # a '/' in a key is fine otherwise; int dict keys come back as ints
    tree = {"a/b": np.arange(2), "c": {1: 3}}
    jaxckpt.save(ckdir / "d", tree)
    assert_plain_same(jaxckpt.restore(ckdir / "d"), tree)
    assert sorted(jaxckpt.load_checkpoint(ckdir / "d")) == ["a/b", "c/1"]


# ---------------------------------------------------------------- flax / optax containers
@flax.struct.dataclass
class Stats:
    mean: Any
    count: Any
    label: str = flax.struct.field(pytree_node=False, default="stats")


def test_flax_struct_dataclass(ckdir):
    tree = {"s": Stats(mean=jnp.arange(4.0), count=np.int32(3)), "t": 1.0}
    jaxckpt.save(ckdir / "c", tree)
    got = jaxckpt.restore(ckdir / "c")
    assert_plain_same(got, {"s": {"mean": np.arange(4.0, dtype=np.float32), "count": np.int32(3)}, "t": 1.0})
    got_t = jaxckpt.restore(ckdir / "c", tree)
    assert type(got_t["s"]) is Stats and got_t["s"].label == "stats"
    assert_tree_same(got_t, tree)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(2)(x)


def trained_state(steps: int = 3) -> train_state.TrainState:
    model = MLP()
    x = jnp.linspace(-1, 1, 4 * 3).reshape(4, 3)
    y = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=model.init(jax.random.key(0), x), tx=optax.adamw(1e-2))

    @jax.jit
    def step(state):
        grads = jax.grad(lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2))(state.params)
        return state.apply_gradients(grads=grads)

    for _ in range(steps):
        state = step(state)
    return state


def test_flax_trainstate_with_adamw(ckdir):
    state = trained_state()
    assert int(state.step) == 3
    jaxckpt.save(ckdir / "c", state, metadata={"step": 3})
    got = jaxckpt.restore(ckdir / "c", state)
    assert type(got) is train_state.TrainState
    assert got.apply_fn is state.apply_fn and got.tx is state.tx
    assert_tree_same(got, state)
    # training continues identically from the restored state
    grads = jax.tree.map(jnp.ones_like, state.params)
    assert_tree_same(got.apply_gradients(grads=grads), state.apply_gradients(grads=grads))

    plain_got = jaxckpt.restore(ckdir / "c")
    assert set(plain_got) == {"step", "params", "opt_state"}
    adam, decay, lr = plain_got["opt_state"]
    assert set(adam) == {"count", "mu", "nu"} and decay == {} and lr == {}
    assert_plain_same(plain_got["params"], plain(state.params))
    assert_leaf_same(adam["nu"]["params"]["Dense_1"]["kernel"], np.asarray(state.opt_state[0].nu["params"]["Dense_1"]["kernel"]))


def test_flax_nnx_state(ckdir):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.lin(x))

    model = Net(nnx.Rngs(0))
    model(jnp.ones((2, 3)))  # update the batch statistics
    graphdef, state = nnx.split(model)
    jaxckpt.save(ckdir / "c", state)
    got = jaxckpt.restore(ckdir / "c", state)
    assert type(got) is type(state)
    assert_tree_same(got, state)
    restored = nnx.merge(graphdef, got)
    np.testing.assert_array_equal(restored(jnp.ones((2, 3))), model(jnp.ones((2, 3))))
    plain_got = jaxckpt.restore(ckdir / "c")
    assert_leaf_same(plain_got["lin"]["kernel"]["value"], np.asarray(state["lin"]["kernel"].get_value()))
    assert set(plain_got) == {"lin", "bn"}


# ---------------------------------------------------------------- save options
def test_overwrite_replaces_and_exists_error(ckdir):
    p = ckdir / "c"
    jaxckpt.save(p, {"a": np.arange(3)}, metadata={"v": 1})
    with pytest.raises(jaxckpt.CheckpointExistsError, match="a checkpoint already exists") as ei:
        jaxckpt.save(p, {"b": np.arange(4)})
    assert isinstance(ei.value, FileExistsError) and str(p) in str(ei.value)
    assert_plain_same(jaxckpt.restore(p), {"a": np.arange(3)})  # untouched
    jaxckpt.save(p, {"b": np.arange(4.0)}, metadata={"v": 2}, overwrite=True)
    assert_plain_same(jaxckpt.restore(p), {"b": np.arange(4.0)})
    assert jaxckpt.inspect(p).metadata == {"v": 2}
    assert sorted(os.listdir(ckdir)) == ["c"]  # no temporary or old directories left
    assert sorted(os.listdir(p)) == ["data-00000.bin", "manifest.msgpack"]


def test_metadata_roundtrip_and_inspect(ckdir):
    meta = {"step": 12, "loss": 0.25, "name": "run-1", "ok": True, "none": None,
            "nested": {"lrs": [1e-3, 5e-4], "tags": ["a", "b"]}, "neg": -(2**63), "u": 2**64 - 1}
    tree = {"w": np.ones((3, 4), np.float32), "b": jnp.zeros((4,), jnp.bfloat16), "step": 12}
    jaxckpt.save(ckdir / "c", tree, metadata=meta)
    info = jaxckpt.inspect(ckdir / "c")
    assert info.metadata == meta
    assert info.format_version == 1
    assert info.library == f"jaxckpt {jaxckpt.__version__}"
    assert info.total_bytes == 48 + 8
    assert [(x.path, x.shape, x.dtype, x.nbytes) for x in info.leaves] == [
        ("b", (4,), "bfloat16", 8), ("step", (), None, 0), ("w", (3, 4), "float32", 48)]
    assert "w: float32[3, 4]" in repr(info)


def test_metadata_not_storable_is_refused(ckdir):
    with pytest.raises(jaxckpt.UnsupportedValueError, match=r"metadata\['x'\]: ndarray is not storable"):
        jaxckpt.save(ckdir / "c", {"a": 1}, metadata={"x": np.zeros(2)})
    assert not os.path.exists(ckdir / "c")


def test_what_the_reader_would_refuse_is_never_written(ckdir, monkeypatch):
    """The reader caps every string at MAX_STR bytes of UTF-8 and every list
    or map at 2 x MAX_LEAVES entries; a save whose manifest would break one
    is refused, names what is too large, and leaves nothing behind. At the
    caps exactly, the checkpoint is written and reads back."""
    cap = fmt.MAX_STR
    a = np.arange(3, dtype=np.float32)
    refused = {
        "key path": ({"k" * (cap + 1): a}, None, "its key path is 1048577 bytes of UTF-8, above the cap of 1048576"),
        "key path, 2-byte chars": ({"\u00e9" * (cap // 2 + 1): a}, None, "its key path is 1048578 bytes of UTF-8"),
        "value leaf": ({"s": "v" * (cap + 1)}, None, "leaf 's': a str of 1048577 bytes of UTF-8"),
        "metadata str": ({"a": a}, {"note": "m" * (cap + 1)}, "manifest body would not decode"),
        "metadata list": ({"a": a}, {"xs": list(range(2 * 1000 + 1))}, "manifest body would not decode"),
    }
    monkeypatch.setattr(fmt, "MAX_LEAVES", 1000)  # the list cap is 2 x MAX_LEAVES, for reader and writer alike
    for what, (tree, meta, message) in refused.items():
        with pytest.raises(jaxckpt.UnsupportedValueError) as e:
            jaxckpt.save(ckdir / "c", tree, metadata=meta)
        assert "refusing to write a checkpoint that cannot be read back" in str(e.value), what
        assert message in str(e.value), (what, str(e.value)[:300])
        assert os.listdir(ckdir) == [], what
    at_caps = {"k" * cap: a, "s": "v" * cap}
    jaxckpt.save(ckdir / "c", at_caps, metadata={"note": "m" * cap, "xs": list(range(2 * 1000))})
    got = jaxckpt.restore(ckdir / "c")
    assert got["s"] == "v" * cap and got["k" * cap].tobytes() == a.tobytes()
    assert jaxckpt.inspect(ckdir / "c").metadata["xs"] == list(range(2000))


def _described_by_jax(tree: Any) -> tuple[Any, list[str]]:
    """What ``tree.describe`` must give for ``tree``, built here node by node from
    ``jax.tree_util`` alone: each node's children and key entries as
    ``tree_flatten_with_path`` gives them, every container asked the same way."""
    tu = jax.tree_util
    leaf_index = iter(range(1 << 30))

    def key(e):
        if isinstance(e, tu.DictKey):
            return e.key if isinstance(e.key, (str, int)) else str(e.key)
        if isinstance(e, tu.SequenceKey):
            return e.idx
        if isinstance(e, tu.GetAttrKey):
            return e.name
        assert isinstance(e, tu.FlattenedIndexKey), e
        return e.key

    def walk(node):
        if node is None:
            return {"t": "none"}
        if tu.all_leaves([node]):
            return next(leaf_index)
        kids = [(p[0], x) for p, x in tu.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]]
        children = [walk(x) for _, x in kids]
        if isinstance(node, dict):
            return {"t": "dict", "k": [key(e) for e, _ in kids], "c": children}
        if type(node) in (list, tuple):
            return {"t": type(node).__name__, "c": children}
        kind = "namedtuple" if isinstance(node, tuple) and hasattr(node, "_fields") else "custom"
        return {"t": kind, "n": f"{type(node).__module__}.{type(node).__qualname__}",
                "k": [key(e) for e, _ in kids], "c": children}

    paths = [tu.keystr(p, simple=True, separator="/") for p, _ in tu.tree_flatten_with_path(tree)[0]]
    return walk(tree), paths


def test_tree_description_matches_what_jax_says_of_every_node():
    """``tree.describe`` reads plain dicts, lists and tuples directly instead of
    asking JAX for each node's children: it must give what asking JAX gives,
    same description, same key paths, for every kind of container and key."""
    import collections
    import enum

    from jaxckpt import tree as tree_mod

    class Color(enum.IntEnum):
        RED = 1

    class Pair(NamedTuple):
        x: Any
        y: Any

    @flax.struct.dataclass
    class Box:
        w: Any
        meta: Any

    a = np.zeros(2)
    trees = [
        {"b": a, "a": {"z": a, "y": [a, (a, None, {})]}, "c": []},
        {3: a, 1: a, 2: {10: a, 9: a}},
        {(1, 2): a, (0, 5): a},
        {Color.RED: a, 0: a},
        [Pair(a, {"k": a}), Box(w={"q": a, "p": a}, meta=(a,))],
        collections.OrderedDict([("z", a), ("a", a)]),
        collections.defaultdict(list, {"m": a, "l": [a]}),
        flax.core.FrozenDict({"params": {"w": a, "b": a}}),
        nnx.State({"layer": {"kernel": nnx.Param(a), "bias": nnx.Param(a)}}),
        (a,),
        a,
        {},
        None,
    ]
    for t in trees:
        _, treedef = jax.tree.flatten(t)
        assert tree_mod.describe(treedef) == _described_by_jax(t), t
        assert tree_mod.describe(treedef)[1] == tree_mod.leaf_paths(t)[0], t


def test_unsupported_leaf_names_its_path(ckdir):
    with pytest.raises(jaxckpt.UnsupportedValueError, match=r"leaf 'a/1': object is not storable"):
        jaxckpt.save(ckdir / "c", {"a": [1, object()]})
    with pytest.raises(jaxckpt.UnsupportedValueError, match=r"leaf 'o': dtype object is not supported"):
        jaxckpt.save(ckdir / "c", {"o": np.array([None, 1], dtype=object)})
    assert os.listdir(ckdir) == []


@pytest.mark.skipif(os.environ.get("JAXCKPT_TEST_LARGE") != "1", reason="set JAXCKPT_TEST_LARGE=1 (needs ~8 GiB RAM and disk)")
def test_array_over_2gib(ckdir):
    n = (2**31 + 4096 * 3 + 5)  # just over 2 GiB, not a multiple of the chunk size
    a = np.empty(n, np.uint8)
    a[::4096] = np.arange(len(a[::4096])) % 251
    a[-5:] = [1, 2, 3, 4, 5]
    jaxckpt.save(ckdir / "c", {"big": a, "small": np.arange(3)})
    assert os.path.getsize(data_file(str(ckdir / "c"))) >= n
    got = jaxckpt.restore(ckdir / "c")
    assert got["big"].shape == (n,)
    assert np.array_equal(got["big"], a)
    del got
    j = jaxckpt.restore(ckdir / "c", {"big": jax.ShapeDtypeStruct((n,), np.uint8), "small": np.arange(3)})
    assert isinstance(j["big"], jax.Array) and j["big"].shape == (n,)
    assert np.array_equal(np.asarray(j["big"]), a)


def test_overwrite_refuses_to_replace_a_non_checkpoint_directory(ckdir):
    victim = ckdir / "notes"
    victim.mkdir()
    (victim / "todo.txt").write_text("keep me")
    with pytest.raises(jaxckpt.CheckpointExistsError, match="exists and is not a jaxckpt checkpoint; refusing"):
        jaxckpt.save(victim, {"a": np.ones(3)}, overwrite=True)
    assert (victim / "todo.txt").read_text() == "keep me"
    assert sorted(os.listdir(ckdir)) == ["notes"]  # no temporary directory left
