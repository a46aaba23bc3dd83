"""Accelerator smoke check: `python -m benchmarks.gpu_smoke`.

Saves a mixed tree living on the default device (float32/bfloat16/int8
arrays, a PRNG key, a scalar, a numpy array) with the AsyncCheckpointer,
donates the device arrays right after save() returns, restores with and
without a target and compares bit for bit. Prints the snapshot path taken
(pinned host memory or copy_to_host_async) and the blocking time.
"""

import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxckpt
from jaxckpt import arrayinfo, snapshot


def main() -> int:
    dev = jax.devices()[0]
    tree = {
        "w": jax.random.normal(jax.random.key(0), (4096, 1024), jnp.float32),
        "b": jnp.arange(1000, dtype=jnp.bfloat16),
        "q": jnp.arange(-100, 100, dtype=jnp.int8),
        "key": jax.random.key(3),
        "step": jnp.int32(17),
        "host": np.arange(7.0),
    }
    want = {k: np.array(jax.random.key_data(v) if k == "key" else v) for k, v in tree.items()}
    pinned = snapshot.has_pinned_host(dev)
    with tempfile.TemporaryDirectory() as d, jaxckpt.AsyncCheckpointer() as ck:
        t0 = time.perf_counter()
        h = ck.save(f"{d}/c", tree)
        blocking = time.perf_counter() - t0
        step = jax.jit(lambda t: jax.tree.map(lambda x: x * 0, t), donate_argnums=0)
        arrays = {k: v for k, v in tree.items() if k not in ("key", "host")}
        jax.block_until_ready(step(arrays))  # donated: the save must not need them
        h.result()
        got = jaxckpt.restore(f"{d}/c")
        one = jax.sharding.SingleDeviceSharding(dev)
        abstract = {k: jax.ShapeDtypeStruct(want[k].shape, want[k].dtype, sharding=one)
                    for k in ("w", "b", "q", "step")}
        placed = jaxckpt.restore(f"{d}/c", {**abstract, "key": jax.random.key(0), "host": np.zeros(7)})
    ok = True
    for k, v in want.items():
        g = np.asarray(jax.random.key_data(got[k]) if k == "key" else got[k])
        p = np.asarray(jax.random.key_data(placed[k]) if k == "key" else placed[k])
        same = g.tobytes() == v.tobytes() and p.tobytes() == v.tobytes()
        ok &= same
        print(f"{k:5s} {'bit-exact' if same else 'DIFFERENT'}")
    path = ("pinned_host" if pinned else "copy_to_host_async") if arrayinfo.on_accelerator(dev) else "CPU view"
    print(f"device {dev.device_kind}; snapshot via {path}; "
          f"blocking {blocking * 1e3:.1f} ms for {sum(v.nbytes for v in want.values()) / 2**20:.1f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
