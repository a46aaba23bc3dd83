"""Make the MindSpore fixtures of tests/test_mindspore.py with MindSpore itself, and check with MindSpore that
files jaxckpt's writer made load. Runs in a scratch venv outside the repository, on CPU:

    python3 -m venv /tmp/msvenv
    /tmp/msvenv/bin/pip install "numpy<2" mindspore==2.10.0
    /tmp/msvenv/bin/python tests/data/mindspore/make.py fixtures          # MindSpore writes, records what it loads
    .venv/bin/python tests/data/mindspore/write_ours.py /tmp/ours           # jaxckpt writes (the project venv)
    /tmp/msvenv/bin/python tests/data/mindspore/make.py verify /tmp/ours  # MindSpore loads what jaxckpt wrote

and, once (a 520 MiB parameter, above MindSpore's real 512 MiB slice size; not kept in the repository):

    /tmp/msvenv/bin/python tests/data/mindspore/make.py big /tmp/big       # MindSpore writes ms_big.ckpt
    .venv/bin/python tests/data/mindspore/write_ours.py --big /tmp/big     # we read it, write ours_big.ckpt
    /tmp/msvenv/bin/python tests/data/mindspore/make.py big /tmp/big       # MindSpore loads ours_big.ckpt

``fixtures`` writes the .ckpt/.safetensors files here, ``expected/<file>.npz`` (what
``mindspore.load_checkpoint`` returned; bfloat16 as its uint16 bits) and ``expected.json`` (per file: the
load arguments, names in order, dtypes, shapes; and what MindSpore refuses). ``verify`` adds
``ours_loaded_by_mindspore`` to expected.json.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.train import serialization as ser

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED = os.path.join(HERE, "expected")
KEYS = {"enc_gcm.ckpt": (bytes(range(16)), "AES-GCM"), "enc_gcm_blocks.ckpt": (bytes(range(24)), "AES-GCM"),
        "enc_cbc.ckpt": (bytes(range(100, 132)), "AES-CBC"), "enc_sm4.ckpt": (bytes(range(50, 66)), "SM4-CBC"),
        "enc_crc.ckpt": (bytes(range(16)), "AES-GCM")}


def _param(name, arr, dtype=None):
    t = Tensor(arr)
    return Parameter(t.astype(dtype) if dtype is not None else t, name=name)


def _dtype_values():
    """Every dtype MindSpore's load_checkpoint reads, with edge values, and 0-d scalars."""
    f = np.array([[0.0, -0.0, 1.5, -2.25], [np.inf, -np.inf, np.nan, 1e-3]])
    ints = {np.int8: [-128, 127, 0, -1], np.int16: [-32768, 32767, 1, -1], np.int32: [-2**31, 2**31 - 1, 2, -2],
            np.int64: [-2**63, 2**63 - 1, 3, -3], np.uint8: [0, 255, 1, 128], np.uint16: [0, 65535, 1, 2**15],
            np.uint32: [0, 2**32 - 1, 1, 2**31], np.uint64: [0, 2**64 - 1, 1, 2**63]}
    out = {"f16": _param("f16", f.astype(np.float16)), "f32": _param("f32", (f * 3.1).astype(np.float32)),
           "f64": _param("f64", f * np.pi), "bf16": _param("bf16", f.astype(np.float32), ms.bfloat16),
           "flags": _param("flags", np.array([[True, False, True], [False, False, True]]))}
    for t, v in ints.items():
        out[np.dtype(t).name] = _param(np.dtype(t).name, np.array([v, v[::-1]], dtype=t))
    out["scalar_f32"] = _param("scalar_f32", np.array(2.5, np.float32))
    out["scalar_i64"] = _param("scalar_i64", np.array(-7, np.int64))
    out["deep.nested.name/with:chars"] = _param("deep.nested.name/with:chars", np.arange(24, dtype=np.float32)
                                                 .reshape(1, 2, 3, 4))
    return out


def _refusals(tmp):
    """What MindSpore 2.10 cannot save or cannot load back."""
    notes = {}
    for name in ("complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "hifloat8"):
        path = os.path.join(tmp, name + ".ckpt")
        try:
            ms.save_checkpoint({"x": _param("x", np.ones((2,), np.float32), getattr(ms, name))}, path)
        except Exception as e:  # noqa: BLE001 - we record whatever MindSpore raises
            notes[name] = f"save_checkpoint refuses: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        try:
            ms.load_checkpoint(path)
            notes[name] = "saved and loaded"
        except Exception as e:  # noqa: BLE001
            notes[name] = f"saved, but load_checkpoint refuses: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    path = os.path.join(tmp, "empty.ckpt")
    ms.save_checkpoint({"e": _param("e", np.zeros((0,), np.float32)), "e2": _param("e2", np.zeros((2, 0)))}, path)
    notes["size-0 arrays"] = f"save_checkpoint silently drops them (file of {os.path.getsize(path)} bytes)"
    notes["Int4 (qint4x2)"] = "saved and loaded by MindSpore; jaxckpt raises UnsupportedValueError"
    notes["AES-GCM with crc_check"] = "save_checkpoint writes it (enc_crc.ckpt), load_checkpoint cannot read it"
    return notes


class _Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Dense(3, 2)

    def construct(self, x):
        return self.head(self.bn(self.dense(x)))


def _train(out_dir):
    """(a): Model.train for 6 steps, ModelCheckpoint every 2 steps keeping the last 2."""
    import mindspore.dataset as ds
    from mindspore.train import CheckpointConfig, Model, ModelCheckpoint
    ms.set_seed(0)
    rng = np.random.default_rng(0)
    data = ds.NumpySlicesDataset({"x": rng.normal(size=(24, 4)).astype(np.float32),
                                  "y": rng.integers(0, 2, size=(24,)).astype(np.int32)}, shuffle=False).batch(4)
    net = _Net()
    opt = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt)
    config = CheckpointConfig(save_checkpoint_steps=2, keep_checkpoint_max=2)
    model.train(1, data, callbacks=[ModelCheckpoint(prefix="net", directory=out_dir, config=config)],
                dataset_sink_mode=False)
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "net-*.ckpt")))


def _save_all(tmp):
    """Every fixture into ``tmp``; returns {file: load_checkpoint kwargs}."""
    files = {name: {} for name in _train(tmp)}
    values = _dtype_values()
    strs = {"note": "héllo wörld ✓"}
    ms.save_checkpoint({**values, **strs}, os.path.join(tmp, "dtypes.ckpt"))
    ms.save_checkpoint([{"name": "w", "data": _param("w", np.arange(6, dtype=np.float32).reshape(2, 3))},
                        {"name": "b", "data": _param("b", np.array([1, 2], np.int32))}], os.path.join(tmp, "list.ckpt"))
    ms.save_checkpoint(values, os.path.join(tmp, "crc.ckpt"), crc_check=True)
    ms.save_checkpoint({"w": values["f32"], "step": values["scalar_i64"]}, os.path.join(tmp, "append.ckpt"),
                       append_dict={"epoch": 3, "step": 7, "lr": 0.01})
    files.update({"dtypes.ckpt": {}, "list.ckpt": {}, "crc.ckpt": {"crc_check": True}, "append.ckpt": {}})
    for name, (key, mode) in KEYS.items():
        if name != "enc_gcm_blocks.ckpt":
            ms.save_checkpoint(values, os.path.join(tmp, name), enc_key=key, enc_mode=mode,
                               crc_check=name == "enc_crc.ckpt")
        if name != "enc_crc.ckpt":
            files[name] = {"dec_key": key, "dec_mode": mode}
    # (g) slices: MindSpore slices above SLICE_SIZE (512 MiB); with SLICE_SIZE = 1 (KiB) its own code slices
    # these small parameters, by raw 1 KiB chunks (Tensors) or np.array_split on axis 0 (async_save).
    big = {"big": _param("big", np.arange(64 * 40, dtype=np.float32).reshape(64, 40)),
           "row": _param("row", np.arange(700, dtype=np.float64).reshape(1, 700)), "small": values["int16"]}
    ser.SLICE_SIZE = 1
    ms.save_checkpoint(big, os.path.join(tmp, "sliced.ckpt"))
    ms.save_checkpoint(big, os.path.join(tmp, "sliced_split.ckpt"), async_save=True)
    ser._wait_async_thread_save_ckpt()  # pylint: disable=protected-access
    ser.SLICE_SIZE = 512 * 1024
    # Encrypted blocks hold up to ENCRYPT_BLOCK_SIZE (64 MiB) of plaintext; with 1 KiB, a 16 KiB file has 17.
    ser.ENCRYPT_BLOCK_SIZE = 1
    ms.save_checkpoint(big, os.path.join(tmp, "enc_gcm_blocks.ckpt"), enc_key=KEYS["enc_gcm_blocks.ckpt"][0])
    ser.ENCRYPT_BLOCK_SIZE = 64 * 1024
    files.update({"sliced.ckpt": {}, "sliced_split.ckpt": {}})
    ms.save_checkpoint(values, os.path.join(tmp, "net.safetensors"), format="safetensors")
    return files


def _as_numpy(value):
    """load_checkpoint's value as (array to store, dtype note)."""
    if isinstance(value, str):
        return np.array(value), "str"
    arr = value.asnumpy()
    if value.dtype == ms.bfloat16:
        return arr.view(np.uint16), "bfloat16"
    return arr, arr.dtype.name


def _record(path, kwargs):
    """What load_checkpoint returns for one file: npz + its JSON entry."""
    loaded = ms.load_checkpoint(path, **kwargs)
    arrays, entry = {}, {"order": list(loaded), "dtypes": {}, "shapes": {}}
    for name, value in loaded.items():
        arrays[name], entry["dtypes"][name] = _as_numpy(value)
        entry["shapes"][name] = list(arrays[name].shape)
    base = os.path.basename(path)
    np.savez(os.path.join(EXPECTED, base + ".npz"), **arrays)
    entry["load_kwargs"] = {k: v.hex() if isinstance(v, bytes) else v for k, v in kwargs.items()}
    with open(path, "rb") as f:
        data = f.read()
    entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    return entry


def fixtures():
    ms.set_context(device_target="CPU")
    shutil.rmtree(EXPECTED, ignore_errors=True)
    os.makedirs(EXPECTED)
    for old in glob.glob(os.path.join(HERE, "*.ckpt")) + glob.glob(os.path.join(HERE, "*.safetensors")):
        os.chmod(old, 0o644)
        os.remove(old)
    tmp = tempfile.mkdtemp()
    files = _save_all(tmp)
    refusals = _refusals(tempfile.mkdtemp())
    extra = ["net.safetensors", "enc_crc.ckpt"]
    for name in list(files) + extra:
        shutil.copy(os.path.join(tmp, name), os.path.join(HERE, name))
        os.chmod(os.path.join(HERE, name), 0o644)  # MindSpore leaves its files read-only (0400)
    out = {"mindspore": ms.__version__, "numpy": np.__version__, "files": {}, "refusals": refusals,
           "not_loadable": {"enc_crc.ckpt": {"dec_key": KEYS["enc_crc.ckpt"][0].hex(), "dec_mode": "AES-GCM"}}}
    for name, kwargs in files.items():
        out["files"][name] = _record(os.path.join(HERE, name), kwargs)
    out["files"]["net.safetensors"] = _record(os.path.join(HERE, "net.safetensors"), {"format": "safetensors"})
    _write_json(out)


def verify(ours):
    """Load every file of ``ours/manifest.json`` (written by write_ours.py) with MindSpore; compare bits."""
    with open(os.path.join(ours, "manifest.json")) as f:
        manifest = json.load(f)
    results = {}
    for name, spec in manifest.items():
        kwargs = {k: bytes.fromhex(v) if k == "dec_key" else v for k, v in spec["load_kwargs"].items()}
        want = np.load(os.path.join(ours, name + ".npz"))
        try:
            loaded = ms.load_checkpoint(os.path.join(ours, name), **kwargs)
            bad = [k for k in want.files if k not in loaded or not _same(loaded[k], want[k], spec["dtypes"][k])]
            extra = sorted(set(loaded) - set(want.files))
            result = "loaded, all values bit-exact" if not bad and not extra else f"MISMATCH {bad} {extra}"
        except Exception as e:  # noqa: BLE001
            result = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        results[name] = {"result": result, "written_with": spec["write_kwargs"], "dtypes": spec["dtypes"],
                         "load_kwargs": spec["load_kwargs"]}
        print(name, result)
    with open(os.path.join(HERE, "expected.json")) as f:
        out = json.load(f)
    out["ours_loaded_by_mindspore"] = results
    _write_json(out)


def _same(value, want, dtype):
    got, _ = _as_numpy(value)
    if dtype == "str":
        return str(got) == str(want)
    return got.shape == want.shape and got.dtype.itemsize == want.dtype.itemsize and got.tobytes() == want.tobytes()


BIG_N = 130 * 1024 * 1024 + 7  # float32 elements: 520 MiB and 28 bytes


def big_values():
    """The 520 MiB parameter of ``big`` (the same formula in write_ours.py)."""
    return (np.arange(BIG_N, dtype=np.uint32) * np.uint32(2654435761) % 1000003).astype(np.float32)


def big(folder):
    """MindSpore writes a parameter it slices at its real 512 MiB; later, loads the one our writer wrote."""
    ours = os.path.join(folder, "ours_big.ckpt")
    if not os.path.exists(ours):
        os.makedirs(folder, exist_ok=True)
        ms.save_checkpoint({"big": _param("big", big_values()), "s": _param("s", np.int8(3))},
                           os.path.join(folder, "ms_big.ckpt"))
        return print("wrote", os.path.join(folder, "ms_big.ckpt"))
    loaded = ms.load_checkpoint(ours)
    same = _same(loaded["big"], big_values(), "float32") and int(loaded["s"].asnumpy()) == 3
    with open(os.path.join(HERE, "expected.json")) as f:
        out = json.load(f)
    out["big_slices"] = {"parameter": f"float32 ({BIG_N},), {BIG_N * 4} bytes",
                         "mindspore_loaded_ours": "bit-exact" if same else "MISMATCH"}
    print(out["big_slices"])
    _write_json(out)


def _write_json(out):
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    {"fixtures": lambda: fixtures(), "verify": lambda: verify(sys.argv[2]), "big": lambda: big(sys.argv[2])}[
        sys.argv[1]]()
