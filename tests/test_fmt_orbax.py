"""Orbax interop (jaxckpt.fmt_orbax): checkpoints written by orbax in the test
run (StandardCheckpointer/OCDBT, PyTreeCheckpointer/zarr, CheckpointManager
with one and with several items) are detected, described and read bit-exact;
what we write is restored by orbax itself."""

import gc
import glob
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ocp = pytest.importorskip("orbax.checkpoint")
flax_linen = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

import jaxckpt  # noqa: E402
from jaxckpt import fmt_orbax  # noqa: E402
from jaxckpt.errors import (  # noqa: E402
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StructureMismatchError,
    UnsupportedLocationError,
    UnsupportedValueError,
)
from jaxckpt.tree import leaf_paths  # noqa: E402

pytestmark = [
    # orbax's own noise: after a TensorStore read error it abandons its other read
    # coroutines, whose exceptions Python reports as "Exception ignored" (unraisable)
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:orbax.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:orbax.*"),
]


@pytest.fixture(autouse=True)
def _collect_abandoned_coroutines():
    """Finalize orbax's abandoned coroutines inside the test that made them, where
    the filter above applies, not in some later test module."""
    yield
    gc.collect()


# ----------------------------------------------------------------------------- fixtures
def _mesh():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))


def _state():
    """Flax params + optax adam state, bfloat16, int8, scalars, a sharded array."""
    model = flax_linen.Sequential([flax_linen.Dense(64), flax_linen.Dense(8)])
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 64)))
    opt = optax.adam(1e-3).init(params)
    opt = jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32 else x + 1, opt)  # non-zero moments, count
    rng = np.random.default_rng(0)
    sharded = jax.device_put(rng.standard_normal((8, 16)).astype(np.float32), NamedSharding(_mesh(), P("x", "y")))
    return {"params": params, "opt": opt,
            "extra": {"bf16": jnp.asarray(rng.standard_normal((4, 6)), jnp.bfloat16),
                      "i8": np.arange(-5, 7, dtype=np.int8).reshape(3, 4), "sharded": sharded,
                      "step": 7, "lr": 0.5, "flag": True, "seq": [np.int32(3), np.ones(3, np.float16)]}}


def _flat(tree):
    keys, leaves, _ = leaf_paths(tree)
    return {k: np.asarray(v) for k, v in zip(keys, leaves)}


def _assert_bitexact(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert (a.dtype, a.shape) == (b.dtype, b.shape), k
        assert a.tobytes() == b.tobytes(), k


@pytest.fixture(scope="module")
def state():
    return _state()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, state):
    """Checkpoints written by orbax: name -> path."""
    base = tmp_path_factory.mktemp("orbax")
    out = {"std": str(base / "std"), "zarr": str(base / "zarr")}
    with ocp.StandardCheckpointer() as ck:
        ck.save(out["std"], state, custom_metadata={"note": "std"})
        ck.wait_until_finished()
    with ocp.PyTreeCheckpointer(use_ocdbt=False) as ck:
        ck.save(out["zarr"], state)
    with ocp.CheckpointManager(str(base / "mgr1")) as mgr:
        mgr.save(1, args=ocp.args.StandardSave(state))
        mgr.save(2, args=ocp.args.StandardSave(state))
        mgr.wait_until_finished()
    out["mgr1_root"], out["mgr1"] = str(base / "mgr1"), str(base / "mgr1" / "2")
    small = {"ema": {"w": np.full((5,), 3.0, np.float32)}, "n": 2}
    with ocp.CheckpointManager(str(base / "mgr2"), item_names=("state", "extra", "info")) as mgr:
        mgr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.StandardSave(small),
                                            info=ocp.args.JsonSave({"epoch": 4})))
        mgr.wait_until_finished()
    out["mgr2"], out["small"] = str(base / "mgr2" / "3"), small
    jaxckpt.save(str(base / "jaxckpt"), state)
    out["jaxckpt"] = str(base / "jaxckpt")
    os.mkdir(base / "empty")
    out["empty"] = str(base / "empty")
    return out


def _copy(src, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- sniff
@pytest.mark.parametrize("name", ["std", "zarr", "mgr1", "mgr2"])
def test_sniff_orbax_layouts(ckpts, name):
    assert fmt_orbax.sniff(ckpts[name])


@pytest.mark.parametrize("name", ["jaxckpt", "empty", "mgr1_root"])
def test_sniff_rejects_others(ckpts, name):
    assert not fmt_orbax.sniff(ckpts[name])


def test_zarr_fixture_really_is_zarr(ckpts):
    assert glob.glob(os.path.join(ckpts["zarr"], "*", ".zarray")) and not os.path.exists(
        os.path.join(ckpts["zarr"], "manifest.ocdbt"))
    assert os.path.exists(os.path.join(ckpts["std"], "manifest.ocdbt"))


def test_manager_root_is_not_a_checkpoint(ckpts):
    assert fmt_orbax.root_steps(ckpts["mgr1_root"]) == ["1", "2"]
    with pytest.raises(CheckpointNotFoundError, match=r"CheckpointManager root.*\['1', '2'\]"):
        fmt_orbax.read(ckpts["mgr1_root"])
    with pytest.raises(CheckpointNotFoundError, match="not an orbax checkpoint"):
        fmt_orbax.describe(ckpts["jaxckpt"])


# ----------------------------------------------------------------------------- read
@pytest.mark.parametrize("name", ["std", "zarr", "mgr1"])
def test_read_bitexact(ckpts, state, name):
    got = fmt_orbax.read(ckpts[name])
    _assert_bitexact(got, _flat(state))
    assert got["extra/bf16"].dtype == ml_dtypes.bfloat16 and got["extra/step"].shape == ()
    assert all(type(v) is np.ndarray for v in got.values())


def test_keys_match_jaxckpt(ckpts):
    assert sorted(fmt_orbax.read(ckpts["std"])) == sorted(jaxckpt.load_checkpoint(ckpts["jaxckpt"]))


def test_read_several_items_prefixes_keys(ckpts, state):
    want = {f"state/{k}": v for k, v in _flat(state).items()}
    want.update({f"extra/{k}": v for k, v in _flat(ckpts["small"]).items()})
    _assert_bitexact(fmt_orbax.read(ckpts["mgr2"]), want)


def test_iter_tensors_in_groups(ckpts, state):
    seen = list(fmt_orbax.iter_tensors(ckpts["std"], batch_bytes=4096))
    assert len({k for k, _ in seen}) == len(seen)
    _assert_bitexact(dict(seen), _flat(state))


@pytest.mark.parametrize("name", ["std", "zarr"])
def test_read_with_target_shardings(ckpts, state, name):
    mesh = _mesh()
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("y", None))

    def abstract(path, x):
        if isinstance(x, (int, float)):
            return x
        sharding = rows if path[-1] == jax.tree_util.DictKey("sharded") else replicated
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    target = jax.tree_util.tree_map_with_path(abstract, state)
    got = fmt_orbax.read(ckpts[name], target=target)
    assert jax.tree.structure(got) == jax.tree.structure(target)
    assert got["extra"]["sharded"].sharding == rows
    assert got["params"]["params"]["layers_0"]["kernel"].sharding == replicated
    _assert_bitexact(_flat(got), _flat(state))


def test_read_target_mismatch(ckpts, state):
    target = jax.tree.map(lambda x: x, state)
    target["extra"]["i8"] = np.zeros((4, 3), np.int8)
    with pytest.raises(StructureMismatchError, match=r"extra/i8: the checkpoint holds shape \(3, 4\)"):
        fmt_orbax.read(ckpts["std"], target=target)
    del target["extra"]["i8"]
    with pytest.raises(StructureMismatchError, match="missing from the target.*extra/i8"):
        fmt_orbax.read(ckpts["std"], target=target)


def test_read_target_several_items(ckpts):
    sharding = NamedSharding(_mesh(), P("x"))
    target = {"extra": {"ema": {"w": jax.ShapeDtypeStruct((5,), np.float32, sharding=sharding)}, "n": 0}}
    with pytest.raises(StructureMismatchError, match="a dict of some of them"):
        fmt_orbax.read(ckpts["mgr2"], target=target["extra"])
    got = fmt_orbax.read(ckpts["mgr2"], target={"extra": {"ema": {"w": jax.ShapeDtypeStruct(
        (5,), np.float32, sharding=NamedSharding(_mesh(), P()))}, "n": 0}})
    assert list(got) == ["extra"] and got["extra"]["n"] == 2
    assert np.asarray(got["extra"]["ema"]["w"]).tolist() == [3.0] * 5


# ----------------------------------------------------------------------------- describe
def test_describe_without_reading_data(ckpts, state, tmp_path):
    path = _copy(ckpts["std"], tmp_path)
    for f in glob.glob(os.path.join(path, "ocdbt.process_*", "d", "*")):  # array data gone; metadata intact
        with open(f, "r+b") as fh:
            fh.truncate(0)
    rows, extra = fmt_orbax.describe(path)
    want = {k: (v.dtype.name, v.shape, v.nbytes) for k, v in _flat(state).items()}
    assert {k: (d, s, n) for k, d, s, n in rows} == want
    assert ("extra/bf16", "bfloat16", (4, 6), 48) in rows
    assert extra["layout"] == "item" and extra["storage"] == {"": "ocdbt"}
    assert extra["custom_metadata"] == {"note": "std"} and extra["orbax_version"] == ocp.__version__
    with pytest.raises(CorruptCheckpointError):  # the data really is gone
        fmt_orbax.read(path)


def test_describe_step_items(ckpts):
    rows, extra = fmt_orbax.describe(ckpts["mgr2"])
    assert extra["items"] == ["extra", "state"] and extra["json_items"] == {"info": {"epoch": 4}}
    assert ("extra/ema/w", "float32", (5,), 20) in rows and ("extra/n", "int64", (), 8) in rows
    assert fmt_orbax.describe(ckpts["zarr"])[1]["storage"] == {"": "zarr"}
    assert all(not k.startswith("default/") for k, *_ in fmt_orbax.describe(ckpts["mgr1"])[0])


# ----------------------------------------------------------------------------- write
def test_write_flat_then_orbax_restores(tmp_path, state):
    flat = _flat(state)
    flat["extra/sharded"] = state["extra"]["sharded"]
    flat["extra/step"], flat["extra/lr"] = 7, 0.5
    path = str(tmp_path / "out")
    fmt_orbax.write(path, flat, metadata={"source": "test"})
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fmt_orbax._nest(flat))
    with ocp.StandardCheckpointer() as ck:
        restored = ck.restore(path, abstract)
    assert restored["extra"]["step"] == 7 and restored["extra"]["lr"] == 0.5
    _assert_bitexact(_flat(restored), _flat(fmt_orbax._nest(flat)))
    assert fmt_orbax.sniff(path) and fmt_orbax.describe(path)[1]["custom_metadata"] == {"source": "test"}
    assert restored["extra"]["sharded"].sharding.is_equivalent_to(state["extra"]["sharded"].sharding, 2)


def test_write_tree_roundtrip_and_prng_key(tmp_path, state):
    tree = dict(state, key=jax.random.key(3), np_scalar=np.float32(1.5), z=1 + 2j)
    path = str(tmp_path / "out")
    fmt_orbax.write(path, tree)
    got = fmt_orbax.read(path)
    want = _flat(state)
    want.update(key=np.asarray(jax.random.key_data(tree["key"])), np_scalar=np.asarray(np.float32(1.5)),
                z=np.asarray(1 + 2j))
    _assert_bitexact(got, want)
    rows, extra = fmt_orbax.describe(path)
    assert extra["prng_keys"] == {"key": "threefry2x32"} and ("key", "uint32", (2,), 8) in rows
    target = {"key": jax.ShapeDtypeStruct((), tree["key"].dtype, sharding=NamedSharding(_mesh(), P()))}
    stored = dict(tree, z=np.asarray(tree["z"]))  # as written: complex scalars become 0-d arrays
    restored = fmt_orbax.read(path, target=dict(jax.tree.map(ocp.utils.to_shape_dtype_struct, stored), **target))
    assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(tree["key"]))


@pytest.mark.parametrize("leaf, match", [
    ("text", "a/b: str cannot be written"),
    (np.zeros((0, 3), np.float32), "a/b: orbax cannot save arrays with zero size"),
    (np.array([1, "x"], dtype=object), "a/b: dtype object"),
    (1 << 70, "a/b: the integer"),
    (object(), "a/b: object cannot be written"),
])
def test_write_refuses(tmp_path, leaf, match):
    with pytest.raises(UnsupportedValueError, match=match):
        fmt_orbax.write(str(tmp_path / "out"), {"a/b": leaf, "c": 1.0})
    assert not os.path.exists(tmp_path / "out")


def test_write_refuses_bad_keys_metadata_and_existing(tmp_path):
    with pytest.raises(UnsupportedValueError, match="both a leaf and a subtree"):
        fmt_orbax.write(str(tmp_path / "a"), {"a/b": 1, "a": 2})
    with pytest.raises(UnsupportedValueError, match="metadata"):
        fmt_orbax.write(str(tmp_path / "b"), {"a": 1}, metadata={"x": object()})
    with pytest.raises(CheckpointExistsError):
        fmt_orbax.write(str(tmp_path), {"a": 1})


# ----------------------------------------------------------------------------- damage and absence
def _truncate_biggest(path):
    files = [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as fh:
        fh.truncate(os.path.getsize(biggest) // 2)


@pytest.mark.parametrize("name", ["std", "zarr", "mgr2"])
def test_truncated_data_is_corrupt(ckpts, tmp_path, name):
    path = _copy(ckpts[name], tmp_path)
    _truncate_biggest(path)
    with pytest.raises(CorruptCheckpointError, match=f"^{re.escape(path)}.*orbax could not restore"):
        fmt_orbax.read(path)
    with pytest.raises(CorruptCheckpointError):
        dict(fmt_orbax.iter_tensors(path))


def test_damaged_metadata_is_corrupt(ckpts, tmp_path):
    path = _copy(ckpts["std"], tmp_path)
    with open(os.path.join(path, "_METADATA"), "r+b") as fh:
        fh.truncate(40)
    with pytest.raises(CorruptCheckpointError, match=f"^{re.escape(path)}.*tree metadata"):
        fmt_orbax.describe(path)
    with pytest.raises(CorruptCheckpointError, match=f"^{re.escape(path)}"):
        fmt_orbax.read(path)


def test_missing_array_is_corrupt(ckpts, tmp_path):
    path = _copy(ckpts["zarr"], tmp_path)
    shutil.rmtree(os.path.join(path, "params.params.layers_0.kernel"))
    with pytest.raises(CheckpointError) as info:
        fmt_orbax.read(path)
    assert isinstance(info.value, CorruptCheckpointError) and path in str(info.value)


def test_missing_path_and_url(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        fmt_orbax.read(str(tmp_path / "nope"))
    with pytest.raises(UnsupportedLocationError):
        fmt_orbax.describe("gs://bucket/ckpt")


def test_without_orbax(monkeypatch, ckpts):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    assert fmt_orbax.sniff(ckpts["std"])  # detection needs no orbax
    with pytest.raises(UnsupportedLocationError, match=r"pip install 'jaxckpt\[orbax\]'"):
        fmt_orbax.read(ckpts["std"])
