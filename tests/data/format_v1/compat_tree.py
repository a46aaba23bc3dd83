"""The tree stored in tests/data/format_v1/ (see make.py and tests/test_compat.py).

Deterministic: every call builds the same leaves, bit for bit. Float leaves
are random bit patterns (NaN payloads, signed zeros, subnormals included), so
a round trip that is not bit-exact shows.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxckpt import arrayinfo


class Pair(NamedTuple):
    first: object
    second: object


def _bits(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = rng.integers(0, 256, size=n, dtype=np.uint8)
    if dtype == np.dtype(bool):
        raw &= 1
    return raw.view(dtype).reshape(shape)


def build() -> dict:
    """The tree; needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)."""
    rng = np.random.default_rng(20261203)
    by_dtype = {}
    for name, dt in sorted(arrayinfo.DTYPES.items()):
        if dt.itemsize == 1 and name not in ("bool", "int8", "uint8") and "float8" not in name:
            continue  # sub-byte ml_dtypes (int4, float4...) hold a byte per element: stored below via jax
        by_dtype[name] = _bits(rng, (3, 5), dt)
    devices = np.array(jax.devices()[:8])
    mesh1 = Mesh(devices, ("x",))
    mesh2 = Mesh(devices.reshape(4, 2), ("a", "b"))
    rows = jnp.asarray(np.arange(8 * 16, dtype=np.float32).reshape(8, 16) * 0.5 - 3.0)
    grid = jnp.asarray(_bits(rng, (8, 6), np.dtype(np.float32)))
    return {
        "dtypes": by_dtype,
        "jax": {
            "bf16": jnp.asarray(_bits(rng, (4, 4), np.dtype(jnp.bfloat16))),
            "int4": jnp.asarray(np.arange(-8, 8, dtype=np.int8)).astype(jnp.int4),
            "rows": jax.device_put(rows, NamedSharding(mesh1, P("x"))),
            "grid": jax.device_put(grid, NamedSharding(mesh2, P("a", "b"))),
            "replicated": jax.device_put(jnp.arange(10, dtype=jnp.int32), NamedSharding(mesh1, P())),
            "empty": jnp.zeros((0, 3), jnp.float32),
            "big": jnp.asarray(np.arange(300_000, dtype=np.float32)),  # > 1 MiB: mapped on restore
        },
        "keys": {"typed": jax.random.key(7), "typed_batch": jax.random.split(jax.random.key(1), 3),
                 "raw": jax.random.PRNGKey(3)},
        "scalars": {"np_f32": np.float32(-0.0), "np_i64": np.int64(-(1 << 62)), "py_int": 1 << 62,
                    "py_float": float("-inf"), "py_complex": complex(1.5, -2.0), "py_str": "naïve ✓",
                    "py_bool": True, "none": None},
        "containers": [Pair(np.arange(3, dtype=np.int16), "x"), (np.ones((2, 2), np.uint8), [1, 2.5])],
        "u64": {7: np.array([1, 2, 3], np.uint64), 11: np.uint64(2**64 - 1)},
    }


METADATA = {"note": "written before issue 15", "step": 12, "lr": 0.125, "tags": ["a", "b"], "blob": b"\x00\x01"}
