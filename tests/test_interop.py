"""Every format behind the public functions (issue 17): detection, the flat
view, restore into targets, load_into with key_map, inspect, and convert
between every pair (bit-exact where both formats hold the values), with
fixtures written by the real libraries in the test run."""

from __future__ import annotations

import gc
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from flax import serialization
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
from jaxckpt import cli, interop

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(autouse=True)
def _collect_orbax_leftovers():
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()


def flat_values():
    rng = np.random.default_rng(0)
    return {"params/dense/kernel": rng.standard_normal((8, 4), dtype=np.float32),
            "params/dense/bias": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
            "opt/count": np.array(12, np.int64),
            "opt/mu/kernel": rng.standard_normal((8, 4)).astype(np.float16),
            "codes": rng.integers(-128, 127, (3, 3), dtype=np.int8)}


def nested(flat):
    return {"params": {"dense": {"kernel": flat["params/dense/kernel"], "bias": flat["params/dense/bias"]}},
            "opt": {"count": flat["opt/count"], "mu": {"kernel": flat["opt/mu/kernel"]}}, "codes": flat["codes"]}


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def same_flat(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert same(got[k], want[k]), k


@pytest.fixture
def sources(tmp_path):
    """One checkpoint of the same values in each format, written by its own library."""
    flat = flat_values()
    paths = {"jaxckpt": tmp_path / "ck", "orbax": tmp_path / "orbax", "flax": tmp_path / "state.msgpack",
             "safetensors": tmp_path / "model.safetensors"}
    jaxckpt.save(paths["jaxckpt"], nested(flat))
    with ocp.StandardCheckpointer() as ck:
        ck.save(paths["orbax"], nested(flat))
    paths["flax"].write_bytes(serialization.to_bytes(nested(flat)))
    safetensors.numpy.save_file(flat, str(paths["safetensors"]), metadata={"framework": "test"})
    return flat, paths


def test_every_format_is_detected_and_read_flat(sources):
    flat, paths = sources
    for name, path in paths.items():
        assert interop.detect(path) == name
        same_flat(jaxckpt.load_checkpoint(path), flat)
        same_flat(jaxckpt.load_checkpoint(path, format=name), flat)


def test_inspect_works_on_every_format(sources):
    flat, paths = sources
    for name, path in paths.items():
        info = jaxckpt.inspect(path)
        got = {x.path: (tuple(x.shape), np.dtype(x.dtype), x.nbytes) for x in info.leaves}
        assert got == {k: (v.shape, v.dtype, v.nbytes) for k, v in flat.items()}, name
        assert info.total_bytes == sum(v.nbytes for v in flat.values())
    assert jaxckpt.inspect(paths["safetensors"]).metadata == {"metadata": {"framework": "test"}}


def test_orbax_and_flax_restore_into_sharded_targets(sources):
    flat, paths = sources
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    sh = NamedSharding(mesh, P("a", "b"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                          nested(flat))
    target["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sh)
    for name in ("orbax", "flax", "jaxckpt"):
        out = jaxckpt.restore(paths[name], target)
        assert out["params"]["dense"]["kernel"].sharding == sh, name
        got = {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(out)[0]}
        want = {k: v.astype(jax.dtypes.canonicalize_dtype(v.dtype)) for k, v in flat.items()}  # int64 -> int32 unless x64 is on
        same_flat(got, want)
        plain = jaxckpt.restore(paths[name])
        assert same(plain["params"]["dense"]["kernel"], flat["params/dense/kernel"])
    part = jaxckpt.restore(paths["flax"], {"codes": np.zeros((3, 3), np.int8)}, partial=True)
    assert same(part["codes"], flat["codes"])


def test_load_into_renames_and_drops_with_key_map(tmp_path):
    """MindSpore-style dotted names into a Flax-style tree."""
    rng = np.random.default_rng(1)
    src = {"fc1.weight": rng.standard_normal((4, 3), dtype=np.float32),
           "fc1.bias": rng.standard_normal(3, dtype=np.float32),
           "moments.fc1.weight": np.zeros((4, 3), np.float32), "global_step": np.array(7, np.int32)}
    path = tmp_path / "net.safetensors"
    safetensors.numpy.save_file(src, str(path))
    target = {"params": {"fc1": {"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}}

    def key_map(k):
        if k.startswith("moments.") or k == "global_step":
            return None
        layer, name = k.split(".")
        return f"params/{layer}/{'kernel' if name == 'weight' else name}"

    out, report = jaxckpt.load_into(target, path, key_map=key_map)
    assert same(out["params"]["fc1"]["kernel"], src["fc1.weight"]) and same(out["params"]["fc1"]["bias"],
                                                                              src["fc1.bias"])
    assert report.missing == [] and report.unexpected == []
    with pytest.raises(jaxckpt.StructureMismatchError, match="source keys not in the target"):
        jaxckpt.load_into(target, path)  # without the map the names do not match


CONVERTIBLE = ["jaxckpt", "orbax", "safetensors", "mindspore"]


@pytest.mark.parametrize("to", CONVERTIBLE)
@pytest.mark.parametrize("src_fmt", ["jaxckpt", "orbax", "flax", "safetensors"])
def test_every_conversion_round_trips_bit_exactly(sources, tmp_path, src_fmt, to):
    flat, paths = sources
    dst = tmp_path / f"out-{to}"
    jaxckpt.convert(paths[src_fmt], dst, to=to)
    assert interop.detect(dst) == to
    same_flat(jaxckpt.load_checkpoint(dst), flat)


def test_exports_are_read_by_the_target_libraries(sources, tmp_path):
    flat, paths = sources
    jaxckpt.convert(paths["jaxckpt"], tmp_path / "o", to="orbax")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nested(flat))
    with ocp.StandardCheckpointer() as ck:
        back = ck.restore(tmp_path / "o", abstract)
    assert same(back["params"]["dense"]["bias"], flat["params/dense/bias"])
    jaxckpt.save(tmp_path / "m", nested(flat), metadata={"epoch": 3, "note": "x"})
    jaxckpt.convert(tmp_path / "m", tmp_path / "s.safetensors", to="safetensors")
    loaded = safetensors.numpy.load_file(str(tmp_path / "s.safetensors"))
    assert same(loaded["params/dense/kernel"], flat["params/dense/kernel"])
    with safetensors.safe_open(str(tmp_path / "s.safetensors"), "numpy") as f:  # jaxckpt metadata carried
        assert f.metadata() == {"format": "jaxckpt", "jaxckpt_metadata": '{"epoch": 3, "note": "x"}'}


def test_what_a_format_cannot_hold_is_named(tmp_path):
    jaxckpt.save(tmp_path / "ck", {"rng": jax.random.key(0), "w": np.ones(3)})
    with pytest.raises(jaxckpt.UnsupportedValueError, match="'rng': a PRNG key cannot be carried into "
                                                             "safetensors"):
        jaxckpt.convert(tmp_path / "ck", tmp_path / "x.safetensors", to="safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    jaxckpt.save(tmp_path / "ck2", {"w": np.ones(3), "name": "run-7"})
    with pytest.raises(jaxckpt.UnsupportedValueError, match="'name': a str value cannot be carried into "
                                                             "safetensors, which holds arrays only"):
        jaxckpt.convert(tmp_path / "ck2", tmp_path / "y.safetensors", to="safetensors")
    jaxckpt.convert(tmp_path / "ck2", tmp_path / "y.ckpt", to="mindspore")  # MindSpore holds a str
    assert jaxckpt.load_checkpoint(tmp_path / "y.ckpt")["name"] == "run-7"


def test_unknown_formats_and_bad_arguments(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(interop.UnknownFormatError, match=r"notes.txt: not a checkpoint of a supported format "
                                                          r"\(found a 5-byte file starting with b'hello'"):
        jaxckpt.load_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(interop.UnknownFormatError, match="unknown format 'pickle'"):
        jaxckpt.load_checkpoint(tmp_path / "notes.txt", format="pickle")
    with pytest.raises(interop.UnknownFormatError, match="cannot convert to 'flax'"):
        jaxckpt.convert(tmp_path / "notes.txt", tmp_path / "y", to="flax")
    with pytest.raises(jaxckpt.CheckpointNotFoundError):
        jaxckpt.load_checkpoint(tmp_path / "missing.ckpt")


def test_cli_convert_and_show_a_foreign_file(sources, tmp_path, capsys):
    flat, paths = sources
    assert cli.main(["convert", str(paths["safetensors"]), str(tmp_path / "c"), "--no-progress"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'c'} (jaxckpt)\n"
    same_flat(jaxckpt.load_checkpoint(tmp_path / "c"), flat)
    assert cli.main(["show", str(paths["safetensors"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{paths['safetensors']}\n  safetensors checkpoint\n  5 leaves")


# ----------------------------------------------------------------------------- MindSpore files (written by MindSpore)
MS = __import__("pathlib").Path(__file__).parent / "data" / "mindspore"


def test_mindspore_files_through_the_public_api(tmp_path):
    net = jaxckpt.load_checkpoint(MS / "net-1_6.ckpt")
    assert interop.detect(MS / "net-1_6.ckpt") == "mindspore"
    assert {"dense.weight", "moments.dense.weight", "bn.moving_mean", "global_step"} <= set(net)
    key = bytes(range(16))
    with pytest.raises(jaxckpt.DecryptionError, match="the file is encrypted"):
        jaxckpt.load_checkpoint(MS / "enc_gcm.ckpt")
    with pytest.raises(jaxckpt.DecryptionError):
        jaxckpt.load_checkpoint(MS / "enc_gcm.ckpt", dec_key=bytes(16))
    plain = jaxckpt.load_checkpoint(MS / "dtypes.ckpt")
    enc = jaxckpt.load_checkpoint(MS / "enc_gcm.ckpt", dec_key=key, dec_mode="AES-GCM")
    assert sorted(enc) == sorted(k for k in plain if k in enc) and same(enc["bf16"], plain["bf16"])
    info = jaxckpt.inspect(MS / "enc_gcm.ckpt", dec_key=key)
    assert info.library == "mindspore" and {x.path for x in info.leaves} == set(enc)
    ms_st = jaxckpt.load_checkpoint(MS / "net.safetensors")  # MindSpore's own format="safetensors"
    assert interop.detect(MS / "net.safetensors") == "safetensors" and "f32" in ms_st


def test_mindspore_conversions_round_trip(tmp_path):
    key = bytes(range(16))
    src = jaxckpt.load_checkpoint(MS / "enc_gcm.ckpt", dec_key=key)
    jaxckpt.convert(MS / "enc_gcm.ckpt", tmp_path / "ck", dec_key=key)  # to jaxckpt
    same_flat(jaxckpt.load_checkpoint(tmp_path / "ck"), src)
    jaxckpt.convert(tmp_path / "ck", tmp_path / "back.ckpt", to="mindspore", enc_key=bytes(range(32)),
                    enc_mode="AES-CBC")
    same_flat(jaxckpt.load_checkpoint(tmp_path / "back.ckpt", dec_key=bytes(range(32)), dec_mode="AES-CBC"), src)
    jaxckpt.convert(MS / "enc_gcm.ckpt", tmp_path / "s.safetensors", to="safetensors", dec_key=key)  # streamed
    same_flat(safetensors.numpy.load_file(str(tmp_path / "s.safetensors")) | {"bf16": src["bf16"]}, src)
    assert cli.main(["convert", str(MS / "net-1_6.ckpt"), str(tmp_path / "n.safetensors"), "--to", "safetensors",
                     "--no-progress"]) == 0
    same_flat(jaxckpt.load_checkpoint(tmp_path / "n.safetensors"), jaxckpt.load_checkpoint(MS / "net-1_6.ckpt"))


@pytest.mark.parametrize("to, suffix", [("mindspore", ".ckpt"), ("safetensors", ".safetensors")])
def test_converting_between_files_holds_one_tensor_at_a_time(tmp_path, to, suffix):
    import tracemalloc
    rng = np.random.default_rng(2)
    big = {f"layer{i}.weight": rng.standard_normal(1 << 20, dtype=np.float32) for i in range(12)}  # 12 x 4 MiB
    safetensors.numpy.save_file(big, str(tmp_path / "in.safetensors"))
    del big
    tracemalloc.start()
    try:
        jaxckpt.convert(tmp_path / "in.safetensors", tmp_path / f"out{suffix}", to=to)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * (4 << 20), peak  # the largest tensor (4 MiB) and buffers, not the 48 MiB state
    back = jaxckpt.load_checkpoint(tmp_path / f"out{suffix}")
    same_flat(back, jaxckpt.load_checkpoint(tmp_path / "in.safetensors"))
