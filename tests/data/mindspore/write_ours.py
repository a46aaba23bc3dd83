"""Write MindSpore checkpoints with jaxckpt's writer, for ``make.py verify`` to load with MindSpore.

    .venv/bin/python tests/data/mindspore/write_ours.py /tmp/ours

Writes ``<dir>/<file>`` for each case, ``<dir>/<file>.npz`` (the values; bfloat16 as uint16 bits) and
``<dir>/manifest.json`` (load_checkpoint arguments and dtype notes).
"""

from __future__ import annotations

import json
import os
import sys

import ml_dtypes
import numpy as np

from jaxckpt import fmt_mindspore, fmt_mindspore_write


def values() -> dict[str, np.ndarray]:
    """Every dtype our writer stores, 0-d scalars, a size-0 array, a str, odd inputs (big-endian, strided)."""
    f = np.array([[0.0, -0.0, 1.5, -2.25], [np.inf, -np.inf, np.nan, 1e-3]])
    out = {"f16": f.astype(np.float16), "f32": f.astype(np.float32), "f64": f, "bf16": f.astype(ml_dtypes.bfloat16),
           "flags": np.array([[True, False], [False, True]])}
    for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        info = np.iinfo(t)
        out[np.dtype(t).name] = np.array([info.min, info.max, 0, 1, info.max // 3], dtype=t)
    out.update({"scalar_f32": np.array(2.5, np.float32), "scalar_bool": np.array(True), "scalar_u8": np.uint8(9),
                "empty_2x0": np.zeros((2, 0), np.float32), "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
                "strided": np.arange(40, dtype=np.float32).reshape(5, 8)[::2, 1::3],
                "sliced": np.arange(3000, dtype=np.float64).reshape(30, 100), "note": np.array("héllo ✓")})
    return out


CASES = {  # file: (write kwargs, load kwargs)
    "ours_plain.ckpt": ({}, {}),
    "ours_crc.ckpt": ({"crc_check": True}, {"crc_check": True}),
    "ours_gcm16.ckpt": ({"enc_key": bytes(range(16))}, {"dec_key": bytes(range(16))}),
    "ours_gcm24.ckpt": ({"enc_key": bytes(range(24))}, {"dec_key": bytes(range(24))}),
    "ours_gcm32_blocks.ckpt": ({"enc_key": bytes(range(32)), "block_bytes": 1000}, {"dec_key": bytes(range(32))}),
    "ours_cbc.ckpt": ({"enc_key": bytes(range(32)), "enc_mode": "AES-CBC"},
                      {"dec_key": bytes(range(32)), "dec_mode": "AES-CBC"}),
    "ours_cbc_blocks.ckpt": ({"enc_key": bytes(range(16)), "enc_mode": "AES-CBC", "block_bytes": 4096},
                             {"dec_key": bytes(range(16)), "dec_mode": "AES-CBC"}),
    "ours_sm4.ckpt": ({"enc_key": bytes(range(16)), "enc_mode": "SM4-CBC"},
                      {"dec_key": bytes(range(16)), "dec_mode": "SM4-CBC"}),
    "ours_sliced.ckpt": ({"slice_bytes": 1000}, {}),
    "ours_sliced_crc.ckpt": ({"slice_bytes": 64, "crc_check": True}, {"crc_check": True}),
}


def _note(arr: np.ndarray) -> tuple[np.ndarray, str]:
    arr = np.asarray(arr)
    if arr.dtype.kind == "U":
        return arr, "str"
    if arr.dtype == ml_dtypes.bfloat16:
        return arr.view(np.uint16), "bfloat16"
    arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("="), order="C")  # (ascontiguousarray makes 0-d 1-d)
    return arr, arr.dtype.name


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    manifest, vals = {}, values()
    for name, (write_kw, load_kw) in CASES.items():
        fmt_mindspore_write.write(os.path.join(out_dir, name), vals.items(), **write_kw)
        notes = {k: _note(v) for k, v in vals.items()}
        np.savez(os.path.join(out_dir, name + ".npz"), **{k: a for k, (a, _) in notes.items()})
        manifest[name] = {"load_kwargs": {k: v.hex() if isinstance(v, bytes) else v for k, v in load_kw.items()},
                          "dtypes": {k: d for k, (_, d) in notes.items()}, "write_kwargs": {
                              k: v.hex() if isinstance(v, bytes) else v for k, v in write_kw.items()}}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def big(folder: str) -> None:
    """Read MindSpore's ms_big.ckpt (a 520 MiB parameter in two slices), check it, write ours_big.ckpt."""
    n = 130 * 1024 * 1024 + 7  # as make.py's big_values()
    want = (np.arange(n, dtype=np.uint32) * np.uint32(2654435761) % 1000003).astype(np.float32)
    path = os.path.join(folder, "ms_big.ckpt")
    with fmt_mindspore._opened(path, None, "AES-GCM") as stream:  # the slices, as stored
        slices = [len(fmt_mindspore._decode_record(buf).content) for buf in stream.records()]
    got = fmt_mindspore.read(path)
    if got["big"].tobytes() != want.tobytes() or int(got["s"]) != 3 or len(slices) != 3:
        raise SystemExit(f"MISMATCH reading {path}: records of {slices} bytes")
    print("read MindSpore's", path, "records of", slices, "bytes: bit-exact")
    fmt_mindspore_write.write(os.path.join(folder, "ours_big.ckpt"), got.items())


if __name__ == "__main__":
    big(sys.argv[2]) if sys.argv[1] == "--big" else main(sys.argv[1])
