"""Fuzzing of hostile foreign checkpoint files (issue 17), run by
tests/test_fuzz.py in a subprocess with a memory limit (``RLIMIT_AS``: 2 GiB
above what the process holds after its imports) and a timeout.

``python tests/fuzz_foreign_worker.py EXAMPLES SEED WORKDIR``

Real files of each foreign format (MindSpore's own ``.ckpt`` files, plain,
with ``crc_num`` and AES-GCM encrypted; a safetensors file and a flax msgpack
file written by those libraries) are mutated: truncated, bytes flipped or
overwritten, huge varints / little-endian lengths written over them, random
bytes spliced in. ``jaxckpt.inspect`` and ``jaxckpt.load_checkpoint`` (with
the format named, and detected) must return or raise a ``CheckpointError``;
nothing else may come out. Prints one JSON line of statistics.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import sys

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import jaxckpt
import nopickle

EXAMPLES, SEED, WORK = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
MS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mindspore")
GCM_KEY = bytes(range(16))
stats: collections.Counter = collections.Counter()


def bases() -> list[tuple[str, bytes, dict]]:
    """(format, file bytes, load arguments) of each real file."""
    import safetensors.numpy
    from flax import serialization

    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((16, 8), dtype=np.float32), "b": rng.integers(0, 9, 12).astype(np.int8),
              "s": np.array(3.5, np.float64)}
    st_path = os.path.join(WORK, "base.safetensors")
    safetensors.numpy.save_file(arrays, st_path, metadata={"k": "v"})
    flax_bytes = serialization.to_bytes({"params": {"dense": arrays}, "step": 3, "opt": [arrays["b"], 2.0]})
    out = [("safetensors", open(st_path, "rb").read(), {}), ("flax", flax_bytes, {})]
    for name, kw in (("net-1_6.ckpt", {}), ("crc.ckpt", {}), ("enc_gcm.ckpt", {"dec_key": GCM_KEY})):
        with open(os.path.join(MS, name), "rb") as f:
            out.append(("mindspore", f.read(), kw))
    return out


@st.composite
def mutated(draw, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "overwrite", "varint", "u64", "splice"]))
        pos = draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "truncate":
            del b[pos:]
        elif op == "flip" and b:
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            b[pos:pos + 1] = bytes([draw(st.integers(0, 255))])
        elif op == "varint":  # a huge protobuf / msgpack-ish length
            n = draw(st.sampled_from([2**31 - 1, 2**32, 2**40, 2**63 - 1, 2**64 - 1]))
            v = bytearray()
            while True:
                v.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
                n >>= 7
                if not n:
                    break
            b[pos:pos + len(v)] = v
        elif op == "u64":  # a huge little-endian length (safetensors header, MindSpore block sizes)
            b[pos:pos + 8] = draw(st.sampled_from([2**62, 2**32 + 7, 2**31, 10**12])).to_bytes(8, "little")
        else:
            b[pos:pos] = draw(st.binary(min_size=1, max_size=64))
    return bytes(b)


def check(fmt_name: str, data: bytes, kw: dict) -> None:
    path = os.path.join(WORK, "victim")
    with open(path, "wb") as f:
        f.write(data)
    for label, call in (("inspect", lambda: jaxckpt.inspect(path, format=fmt_name, **kw)),
                        ("load", lambda: jaxckpt.load_checkpoint(path, format=fmt_name, **kw)),
                        ("detected", lambda: jaxckpt.load_checkpoint(path, **kw))):
        try:
            call()
            stats[f"{label}_ok"] += 1
        except jaxckpt.CheckpointError:
            stats[f"{label}_refused"] += 1


def main() -> None:
    nopickle.install()
    files = bases()
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))
    for fmt_name, data, kw in files:  # the unmutated files read (else the fuzzing could not tell)
        assert jaxckpt.load_checkpoint(_write(data), format=fmt_name, **kw)

    @seed(SEED)
    @settings(max_examples=EXAMPLES, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              report_multiple_bugs=False)
    @given(st.data())
    def fuzz(d):
        i = d.draw(st.integers(0, len(files) - 1))
        fmt_name, data, kw = files[i]
        stats["examples"] += 1
        stats[fmt_name] += 1
        check(fmt_name, d.draw(mutated(data)), kw)

    fuzz()
    print(json.dumps(dict(stats)))


def _write(data: bytes) -> str:
    path = os.path.join(WORK, "base")
    with open(path, "wb") as f:
        f.write(data)
    return path


if __name__ == "__main__":
    main()
